"""Reading and writing volumes (NIfTI .nii/.nii.gz, MGZ/MGH, NRRD) with their geometry, atomically.

A volume is ``(data [I,J,K], affine 4x4 IJK->RAS mm)``, the nibabel convention. NRRD goes through SimpleITK
(LPS) and is converted to RAS here. Writes go to a temporary file in the target folder and are renamed into
place, so an interrupted run never leaves a half-written output; the renamed file gets the mode a plain write
would give it (0666 less the umask). A write that fails for the user's environment (full disk, read-only or
forbidden folder) raises ``OutputError`` naming the output, and leaves no temporary file behind.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from USBLib.errors import InputError, OutputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SUFFIXES = (".nii", ".nii.gz", ".mgz", ".mgh", ".nrrd", ".nhdr")


@dataclass
class Volume:
    """Voxel data with its IJK->RAS affine; ``header`` keeps the source header for faithful re-writing.

    Args:
        data: voxel values [I, J, K] in the file's own dtype and units (NIfTI slope/intercept applied by nibabel).
        affine: 4x4 voxel-to-RAS affine (IJK -> RAS world coordinates, mm), float64.
        header: the source nibabel header (NIfTI, MGH), or None (NRRD, or a volume built in memory).
        path: the file the volume was read from, or None.
        file_shape: the array shape in the file (e.g. [I, J, K, 1] for a singleton 4-D scan), or None when it is
            ``data``'s own shape; ``as_in_file`` gives results that shape back.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = field(default=None, repr=False)
    path: Path | None = None
    file_shape: tuple[int, ...] | None = None

    def as_in_file(self, values: np.ndarray) -> np.ndarray:
        """``values`` [I, J, K] on this volume's grid, reshaped to the file's own shape (a singleton 4-D scan
        gives a singleton 4-D output)."""
        return values if self.file_shape is None else np.reshape(values, self.file_shape)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size [3] in mm along the I, J, K axes (column norms of the affine's 3x3 part)."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


def float_map_header(header: Any) -> Any:
    """A scan's ``header`` for a float32 map written beside it (an uncertainty map): its sform/qform codes, units
    and description kept, its storage float32 without a slope/intercept (a map is not rounded to an integer scan's
    stored type). None when ``header`` is not a nibabel NIfTI/MGH header (NRRD, or none)."""
    if header is None or not hasattr(header, "set_data_dtype"):
        return None
    header = header.copy()
    header.set_data_dtype(np.float32)
    if hasattr(header, "set_slope_inter"):
        header.set_slope_inter(1.0, 0.0)
    return header


def _with_stored_scaling(img) -> Any:
    """The header of a nibabel image, with the scaling of values stored with a NIfTI slope/intercept (integers or
    floats) put back into it (nibabel applies it on reading and leaves the loaded header's scl_slope/scl_inter
    empty), so that an output is written as its input was stored (``_stored_scaling``)."""
    import nibabel as nib

    header = img.header
    slope, inter = float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))
    if isinstance(header, nib.Nifti1Header) and (slope, inter) != (1.0, 0.0) \
            and np.issubdtype(header.get_data_dtype(), np.number):
        header = header.copy()
        header.set_slope_inter(slope, inter)
    return header


def _stored_scaling(header: Any) -> tuple[np.dtype, float, float] | None:
    """(stored dtype, slope, intercept) of a NIfTI header read from values stored with a scaling (integers, or
    floats: nibabel hands those back as float64), or None (no header, or no scaling)."""
    if header is None or not np.issubdtype(header.get_data_dtype(), np.number):
        return None
    slope, inter = header.get_slope_inter()
    if slope is None or (float(slope), float(inter or 0.0)) == (1.0, 0.0):
        return None
    return np.dtype(header.get_data_dtype()), float(slope), float(inter or 0.0)


def suffix_of(path: os.PathLike | str) -> str:
    """The supported suffix ``path`` ends with, lower case, longest match first (``.nii.gz`` before ``.nii``).

    Args:
        path: a file path or name; only the end of its name is looked at.

    Raises ``InputError`` for an unsupported file type.
    """
    name = str(path).lower()
    for suf in sorted(SUFFIXES, key=len, reverse=True):
        if name.endswith(suf):
            return suf
    raise InputError(f"{path}: unsupported file type (use .nii, .nii.gz, .mgz, .mgh or .nrrd)")


def _sitk_to_ras_affine(img) -> np.ndarray:
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = direction @ np.diag(img.GetSpacing())
    aff[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ aff


def read_volume(path: os.PathLike | str, what: str = "image", max_bytes: int | None = None) -> Volume:
    """Read a 3D volume; 4D with a single frame is squeezed. Raises ``InputError`` with one clear line.

    Returns a ``Volume`` with ``data`` [I, J, K] (at least 2 voxels per axis, the real scalar dtype the reader
    returns) and a finite, invertible 4x4 voxel-to-RAS ``affine`` (mm). NRRD is read with SimpleITK and converted
    from LPS to RAS and from SimpleITK's [K, J, I] array order to [I, J, K]; NIfTI and MGZ/MGH are read with nibabel.

    Args:
        path: a ``.nii``, ``.nii.gz``, ``.mgz``, ``.mgh``, ``.nrrd`` or ``.nhdr`` file.
        what: the file's role, used in error messages (e.g. ``"image"``, ``"lesion mask"``).
        max_bytes: refuse, before reading them, voxels that take more than this many bytes as stored (a server's
            guard: a few MB of ``.nii.gz`` can hold gigabytes of zeros); None reads any size.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} path is not a file: {path}")
    suf = suffix_of(path)
    try:
        if suf in (".nrrd", ".nhdr"):
            import SimpleITK as sitk

            if max_bytes is not None:
                check_nrrd_size(path, what, max_bytes)
            img = sitk.ReadImage(str(path))
            if img.GetNumberOfComponentsPerPixel() != 1:
                raise InputError(f"{path}: {what} has {img.GetNumberOfComponentsPerPixel()} components per voxel; "
                                 "a scalar volume is needed")
            if img.GetDimension() == 4 and img.GetSize()[3] == 1:  # [I, J, K, 1]: a 3D scan, as for NIfTI/MGZ
                img = img[:, :, :, 0]
            if img.GetDimension() != 3:
                raise InputError(f"{path}: {what} is {img.GetDimension()}D; a 3D volume is needed")
            data = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
            vol = Volume(np.ascontiguousarray(data), _sitk_to_ras_affine(img), None, path)
        else:
            with _lower_case_suffix(path, suf) as readable:
                import nibabel as nib

                img = nib.load(str(readable))
                if max_bytes is not None:  # (scaled integers come out as float64)
                    scaled = float(getattr(img.dataobj, "slope", 1.0)) != 1.0 or \
                        float(getattr(img.dataobj, "inter", 0.0)) != 0.0
                    _check_size(path, what, img.shape, 8 if scaled else img.get_data_dtype().itemsize, max_bytes)
                data = np.asanyarray(img.dataobj)
            if not data.dtype.isnative:  # MGZ is big-endian: the same type in this machine's byte order, so that it
                data = data.astype(data.dtype.newbyteorder("="))  # is written back as it came (SimpleITK takes it)
            vol = Volume(data, np.asarray(img.affine, dtype=np.float64), _with_stored_scaling(img), path)
    except InputError:
        raise
    except Exception as exc:  # corrupt or unreadable file: one line, no traceback
        raise InputError(f"cannot read {what} {path}: {read_failure(exc)}") from None
    if _one_volume_4d(vol.data.shape):
        vol.file_shape = tuple(vol.data.shape)
        vol.data = vol.data.reshape(vol.data.shape[:3])
    if vol.data.ndim != 3:
        raise InputError(f"{path}: {what} has shape {vol.data.shape}; a 3D volume is needed")
    if min(vol.data.shape) < 2:
        raise InputError(f"{path}: {what} has shape {vol.data.shape}; a 3D volume is needed, not a 2D slice")
    if not np.issubdtype(vol.data.dtype, np.number) or np.issubdtype(vol.data.dtype, np.complexfloating):
        raise InputError(f"{path}: {what} has voxel type {vol.data.dtype}; a real scalar type is needed")
    if not np.all(np.isfinite(vol.affine)) or abs(np.linalg.det(vol.affine[:3, :3])) < 1e-9:
        raise InputError(f"{path}: {what} has a degenerate voxel-to-world affine")
    return vol


@contextmanager
def _lower_case_suffix(path: Path, suf: str) -> Iterator[Path]:
    """``path`` under a name whose suffix is lower case (a link in a temporary folder when it is not): nibabel looks
    for 'scan.nii' when told 'scan.Nii'."""
    name = path.name
    if name.endswith(suf):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="usb-read-") as folder:
        link = Path(folder) / (name[: len(name) - len(suf)] + suf)
        link.symlink_to(path.resolve())
        yield link


def check_nrrd_size(path: os.PathLike | str, what: str, max_bytes: int) -> None:
    """Refuse (``InputError``) a NRRD (``.nrrd``, ``.nhdr``, ``.seg.nrrd``) whose voxels, every component counted,
    take more than ``max_bytes`` once read; only its header is read (one that cannot be read passes: the reader that
    follows says why)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return  # not a readable header: the reader that follows says why
    itemsize = sitk.GetArrayViewFromImage(sitk.Image([1] * 3, reader.GetPixelID())).itemsize
    _check_size(Path(path), what, reader.GetSize(), itemsize * max(1, reader.GetNumberOfComponents()), max_bytes)


def _check_size(path: Path, what: str, shape, itemsize: int, max_bytes: int) -> None:
    """Refuse (``InputError``) a volume whose voxels as stored (``shape`` x ``itemsize``) exceed ``max_bytes``."""
    size = int(np.prod([int(n) for n in shape], dtype=np.float64)) * int(itemsize)
    if size > max_bytes:
        raise InputError(f"{path}: {what} holds {size / 2**20:.0f} MB of voxels ({' x '.join(map(str, shape))}); "
                         f"at most {max_bytes / 2**20:.0f} MB are read here")


CUT_SHORT = "the file ends early (an incomplete download or copy?)"
_CUT_SHORT_SIGNS = ("ended before the end-of-stream", "bytes, got", "bytes but received", "unexpected end of file",
                    "fread got only")


def read_failure(exc: BaseException) -> str:
    """Why a reader failed, as one line: a file that ends early (a truncated ``.nii.gz``, ``.nii`` or ``.nrrd``) says
    so (``CUT_SHORT``, the reader's detail after it); a SimpleITK error gives its last line (its first names a C++
    source file), without ITK's ``[nrrd] function:`` prefix."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[-1] if lines[0].startswith("Exception thrown in SimpleITK") else lines[0]
    line = re.sub(r"^\[\w+\]\s*(\w+:\s*)?", "", line)
    if any(sign in line.lower() for sign in _CUT_SHORT_SIGNS):
        return f"{CUT_SHORT}: {line}"
    return line


def check_image_values(vol: Volume, what: str = "image") -> None:
    """An input scan read from disk must have values (NaN or Inf only where it has none, e.g. outside a normalised
    scan's bounding box: the edit keeps them) and not be constant (``checks.check_image``, named by its path).

    Args:
        vol: a volume from ``read_volume``; its ``data`` [I, J, K] is checked, not changed.
        what: the file's role, used in the ``InputError`` message with the volume's path.
    """
    from USBLib.imaging.checks import check_image

    check_image(vol.data, None, f"{vol.path}: {what}" if vol.path else what, missing_ok=True)


def plain_file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` gives a new file: 0o666 less the process umask.

    Read from ``/proc/self/status`` where it is there (Linux), so that the umask is never changed, not even briefly.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _cannot_write(target: Path, exc: BaseException) -> OutputError:
    """``OutputError`` naming the user's ``target`` (never the temporary file) and the system's reason."""
    reason = getattr(exc, "strerror", None)
    if not reason:
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
    return OutputError(f"cannot write {target}: {reason}")


def check_writable(target: os.PathLike | str) -> None:
    """Refuse, before any work starts, an output whose folder cannot be written (read-only, not ours).

    The nearest existing folder on the way to ``target`` must accept a new file: that is tried for real (a
    temporary file, removed at once), because permission bits do not tell about read-only file systems or ACLs.
    Raises ``OutputError`` naming ``target``.

    Args:
        target: the output file the user asked for; its folder need not exist yet.
    """
    target = Path(target)
    folder = target.parent.resolve() if str(target.parent) else Path.cwd()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write {target}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".usb-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise _cannot_write(target, exc) from None


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` only if the block succeeds.

    The temporary file is in the same folder (so the rename is atomic) and keeps ``target``'s suffixes, so writers
    that choose the format by suffix still work; it is removed if the block raises. Before the rename it gets the
    mode of a plain write (``plain_file_mode``), not the private 0600 of a temporary file. An ``OSError`` of the
    write (full disk, read-only folder, no permission) becomes ``OutputError`` naming ``target``.

    Args:
        target: the final file path; its folder is created if needed.
    """
    target = Path(target)
    suffix = "".join(target.suffixes).lower() or ".tmp"  # nibabel writes 'x.Nii' to 'x.nii': the file must be ours
    tmp = None
    created = _make_folder(target.parent, target)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=suffix, dir=target.parent)
        os.close(fd)
        yield Path(tmp)
        os.chmod(tmp, plain_file_mode())
        _keep_replaced(target)
        os.replace(tmp, target)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _cannot_write(target, exc) from None
        raise


@dataclass
class _Undo:
    """What the writes inside one ``all_or_nothing`` changed besides their own files: the folders they made and
    (file, backup) pairs for the files they replaced."""

    folders: list[Path] = field(default_factory=list)
    replaced: list[tuple[Path, Path]] = field(default_factory=list)


_UNDO: ContextVar[_Undo | None] = ContextVar("usb_undo", default=None)


def _keep_replaced(target: Path) -> None:
    """Inside ``all_or_nothing``: before ``target`` is replaced, keep the file that is there (a hard link beside it,
    else a copy), so that a command that fails later can put it back."""
    undo = _UNDO.get()
    if undo is None or not target.is_file() or any(t == target for t, _ in undo.replaced):
        return
    fd, backup = tempfile.mkstemp(prefix=f".{target.name.split('.')[0]}.", suffix=".kept", dir=target.parent)
    os.close(fd)
    os.unlink(backup)
    try:
        os.link(target, backup)
    except OSError:
        shutil.copy2(target, backup)
    undo.replaced.append((target, Path(backup)))


def _make_folder(folder: Path, target: Path) -> list[Path]:
    """Create ``folder`` and its missing parents, one level at a time; returns those this call created, deepest
    first (and adds them to the enclosing ``all_or_nothing``'s list). Only a folder whose own ``mkdir`` succeeded
    counts, so a path like 'a/../mine' never counts the user's folder 'mine'. Raises ``OutputError`` naming the
    output ``target`` when it cannot."""
    made: list[Path] = []
    try:
        for level in [*reversed(folder.parents), folder]:
            try:
                level.mkdir()
                made.insert(0, level)
            except FileExistsError:
                if not level.is_dir():
                    raise
    except OSError as exc:
        _remove_empty(made)
        raise _cannot_write(target, exc) from None
    undo = _UNDO.get()
    if undo is not None:
        undo.folders.extend(made)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed write created (deepest first), where nothing else was put in them."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            pass


def _one_volume_4d(shape) -> bool:
    """Whether ``shape`` is a 3D scan stored with trailing singleton axes (``[I, J, K, 1]``)."""
    return len(shape) > 3 and tuple(shape[3:]) == (1,) * (len(shape) - 3)


def _write_to(path: Path, fmt: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
    data = np.asarray(data)
    if not data.dtype.isnative:  # (SimpleITK refuses big-endian arrays; the MGH check compares native types)
        data = data.astype(data.dtype.newbyteorder("="))
    if fmt not in (".nii", ".nii.gz") and _one_volume_4d(data.shape):
        data = data.reshape(data.shape[:3])  # a 4D one-volume NIfTI's shape: MGZ and NRRD take the scan as 3D
    if fmt in (".nrrd", ".nhdr"):
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
        lps = LPS_TO_RAS @ affine
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        img.SetSpacing(spacing.tolist())
        img.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
        img.SetOrigin(lps[:3, 3].tolist())
        try:
            sitk.WriteImage(img, str(path), useCompression=True)
        except RuntimeError as exc:  # SimpleITK reports a failed write (e.g. a full disk) as RuntimeError
            raise OSError(errno.EIO, _sitk_reason(exc)) from None
        return
    import nibabel as nib

    if fmt in (".mgz", ".mgh"):
        data = _mgh_storable(data)
        hdr = header.copy() if isinstance(header, nib.freesurfer.mghformat.MGHHeader) else None
        img = nib.MGHImage(data, affine, header=hdr)  # the input's header (TR, TE, TI, flip angle) kept
        img.set_data_dtype(data.dtype)
    else:
        hdr = header.copy() if isinstance(header, nib.Nifti1Header) else None
        stored = _stored_scaling(hdr) if np.issubdtype(data.dtype, np.floating) else None
        if stored is not None:  # stored with a slope/intercept as the input was: its own voxels bit for bit
            dtype, slope, inter = stored
            data = cast_like((np.asarray(data, np.float64) - inter) / slope, dtype)
        # a NIfTI-2 input stays NIfTI-2 (its header in a NIfTI-1 image makes nibabel print a repair message)
        kind = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        img = kind(data, affine, header=hdr)
        img.set_data_dtype(data.dtype)
        if hdr is not None:
            img.header.set_slope_inter(*(stored[1:] if stored is not None else (1.0, 0.0)))
            # the input's codes as they were: a qform the input did not set (code 0) stays unset, since for a sheared
            # affine it could only approximate the sform, and readers that prefer the qform would move the scan
            img.set_sform(affine, code=int(hdr["sform_code"]))
            if int(hdr["qform_code"]) > 0 and np.allclose(affine, hdr.get_best_affine(), rtol=0, atol=1e-6):
                _keep_qform(img.header, hdr)  # the scan's own geometry: its qform as it was, even one unlike the sform
            else:
                img.set_qform(affine, code=int(hdr["qform_code"]))
    nib.save(img, str(path))


QFORM_FIELDS = ("qform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")


def _keep_qform(header: Any, source: Any) -> None:
    """Copy ``source``'s qform into ``header`` field by field (the quaternion, offsets, qfac and voxel sizes), so
    that it is the input's to the bit. A qform that differs from the sform (as FSL and ANTs leave one after a
    registration) is what ITK, and so Slicer, reads: rebuilt from the sform it moved the output (6 mm in a probe)."""
    for field in QFORM_FIELDS:
        header[field] = source[field]
    header["pixdim"][:4] = source["pixdim"][:4]


MGH_DTYPES = (np.uint8, np.int16, np.int32, np.float32)  # what the MGH format stores


def _mgh_storable(data: np.ndarray) -> np.ndarray:
    """``data`` in a type the MGH format stores (``MGH_DTYPES``): as it is when it is one; other integers as int32
    when their values fit, else float32; float64 and float16 as float32 (the format has nothing wider)."""
    data = np.asarray(data)
    if data.dtype in [np.dtype(t) for t in MGH_DTYPES]:
        return data
    if data.dtype == np.bool_:
        return data.astype(np.uint8)
    if np.issubdtype(data.dtype, np.integer) and data.size and \
            np.iinfo(np.int32).min <= data.min() and data.max() <= np.iinfo(np.int32).max:
        return data.astype(np.int32)
    return data.astype(np.float32)


def _sitk_reason(exc: RuntimeError) -> str:
    """The useful line of a SimpleITK write error (its message is a multi-line ITK exception dump)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for line in lines:
        if "space" in line.lower() or "permission" in line.lower() or "read-only" in line.lower():
            return line
    return lines[-1] if lines else "write failed"


def write_volume(path: os.PathLike | str, data: np.ndarray, affine: np.ndarray, header: Any = None) -> Path:
    """Write ``data`` with ``affine`` (and the source header's codes for NIfTI) atomically; returns the path.

    The format follows the suffix: NIfTI keeps ``data``'s dtype, resets slope/intercept to 1/0 and sets both sform
    and qform to ``affine`` with the source header's codes as they were (a code 0 stays 0; without a source header,
    nibabel's defaults), except that float ``data`` for a source stored
    as integers with a slope/intercept (``read_volume`` keeps it in the header) is stored the same way again:
    rounded and clipped to the stored type, with the source's slope and intercept, so that the source's own voxels
    come back bit for bit in the file; MGZ/MGH via nibabel; NRRD via SimpleITK (converted to LPS, compressed).

    Args:
        path: output file with a supported suffix (see ``suffix_of``).
        data: voxel values [I, J, K], written in their own dtype.
        affine: 4x4 voxel-to-RAS affine (mm) of ``data``.
        header: the source volume's header (only a ``nibabel.Nifti1Header`` is used, for NIfTI outputs), or None.
    """
    path = Path(path)
    fmt = suffix_of(path)
    if fmt == ".nhdr":
        return _write_detached(path, data, affine)
    with atomic_path(path) as tmp:
        _write_to(tmp, fmt, data, affine, header)
    return path


def detached_data_file(path: os.PathLike | str) -> Path | None:
    """The data file a ``.nhdr`` output ``path`` names (``NAME.raw.gz`` beside it); None for other formats."""
    path = Path(path)
    if suffix_of(path) != ".nhdr":
        return None
    return path.with_name(path.name[: -len(".nhdr")] + ".raw.gz")


NRRD_HEADER_MAX = 1 << 16  # bytes of a NRRD file searched for its header (which ends at the first blank line)


def nrrd_data_files(path: os.PathLike | str) -> list[Path]:
    """The data files a NRRD header names (``data file: NAME``, or ``LIST`` and the names after it), beside the
    header unless absolute: a ``.nhdr``'s, or a ``.nrrd`` written detached (rare). [] for other formats, a NRRD
    whose data are attached, a header that cannot be read, or a numbered file-name pattern. The header ends at its
    first blank line, as NRRD readers stop there."""
    path = Path(path)
    if suffix_of(path) not in (".nhdr", ".nrrd"):
        return []
    try:
        with open(path, "rb") as fh:
            head = fh.read(NRRD_HEADER_MAX)
    except OSError:
        return []
    lines = head.decode("latin-1").splitlines()
    end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    for i, line in enumerate(lines[:end]):
        key, _, value = line.partition(":")
        if key.strip().lower() not in ("data file", "datafile"):
            continue
        value = value.strip()
        parts = value.rsplit(None, 3)
        pattern = "%" in value and len(parts) == 4 and all(p.lstrip("-").isdigit() for p in parts[1:])
        if value.split()[:1] == ["LIST"]:
            names = [n.strip() for n in lines[i + 1:] if n.strip()]
        else:  # one file, whose name may hold spaces (ITK writes 'my scan.raw.gz'); a numbered pattern: not followed
            names = [] if pattern or not value else [value]
        return [(path.parent / name) if not Path(name).is_absolute() else Path(name) for name in names]
    return []


def volume_sha256(path: os.PathLike | str) -> str:
    """The sha256 a sidecar records for an input volume: of the file; for a detached NRRD (``.nhdr``), of the header
    and the data files it names together (the sha256 of their sha256s, in order), so that a changed data file is a
    changed input. Raises ``FileNotFoundError`` when a file is missing."""
    import hashlib

    from USBLib.hashing import sha256_of

    path = Path(path)
    data = nrrd_data_files(path)
    if not data:
        return sha256_of(path)
    return hashlib.sha256("".join(sha256_of(f) for f in (path, *data)).encode()).hexdigest()


def output_files(path: os.PathLike | str) -> list[Path]:
    """Every file an output volume ``path`` consists of: itself and, for a ``.nhdr``, its data file."""
    data = detached_data_file(path)
    return [Path(path)] + ([data] if data is not None else [])


def _write_detached(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """A detached NRRD (``.nhdr`` + its data file ``NAME.raw.gz``, which the header names): written under their final
    names in a private folder beside ``path``, then moved out, the data file first and the header last, so that the
    header never names a temporary file; a failure leaves neither behind."""
    target_data = detached_data_file(path)
    if target_data.is_dir():
        raise OutputError(f"cannot write {path}: its data file {target_data} is a folder")
    created = _make_folder(path.parent, path)
    work, moved = None, []
    try:
        work = Path(tempfile.mkdtemp(prefix=f".{path.name.split('.')[0]}.", dir=path.parent))
        header = work / (path.name[: -len(".nhdr")] + ".nhdr")  # lower case: SimpleITK detaches only .nhdr
        _write_to(header, ".nhdr", data, affine, None)
        written = work / target_data.name
        if sorted(work.iterdir()) != sorted([header, written]):
            raise OSError(errno.EIO, "SimpleITK did not write a header and its data file")
        for source, target in ((written, target_data), (header, path)):  # the header last
            os.chmod(source, plain_file_mode())
            _keep_replaced(target)
            os.replace(source, target)
            moved.append(target)
        work.rmdir()
    except BaseException as exc:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        if len(moved) == 1:  # the data file without its header: not a result
            moved[0].unlink(missing_ok=True)
        _remove_empty(created)
        if isinstance(exc, OSError):
            raise _cannot_write(path, exc) from None
        raise
    return path


def sidecar_path(path: os.PathLike | str) -> Path:
    """``out.nii.gz`` -> ``out.json`` (BIDS-style sidecar).

    Args:
        path: a volume path with a supported suffix; the sidecar sits in the same folder.
    """
    path = Path(path)
    return path.with_name(path.name[: -len(suffix_of(path))] + ".json")


def write_json(path: os.PathLike | str, payload: dict) -> Path:
    """Write a JSON file atomically (indented; values JSON cannot hold are written with ``str``); returns the path.

    Args:
        path: the JSON file to write.
        payload: a JSON-serialisable dict.
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


@contextmanager
def all_or_nothing() -> Iterator[list[Path]]:
    """The outputs of one command, all or none: each path written is added to the yielded list, and when a later
    one cannot be written or the command is interrupted (Ctrl-C, SIGTERM), those already written go with their
    sidecars (and a ``.nhdr``'s data file), the files they had replaced come back as they were, and the folders
    they made go, so that "no output was written" holds for a command with several outputs too."""
    written: list[Path] = []
    undo = _Undo()
    token = _UNDO.set(undo)
    try:
        yield written
    except BaseException:
        for path in written:
            try:
                files = [*output_files(path), sidecar_path(path)]
            except InputError:  # not a volume (a PNG): no sidecar
                files = [Path(path)]
            for file in files:
                try:
                    file.unlink(missing_ok=True)
                except OSError:
                    pass
        for target, backup in reversed(undo.replaced):  # the files that were there before, as they were
            try:
                os.replace(backup, target)
            except OSError:
                pass
        _remove_empty(sorted(set(undo.folders), key=lambda f: len(f.parts), reverse=True))
        raise
    else:
        for _, backup in undo.replaced:
            backup.unlink(missing_ok=True)
    finally:
        _UNDO.reset(token)


def write_result(out: os.PathLike | str, data: np.ndarray, affine: np.ndarray, header: Any, provenance: dict,
                 inputs: dict[str, Any], extra: dict | None = None) -> dict:
    """Write an output volume, then its sidecar (provenance, inputs' and output's sha256); returns the sidecar.

    The image is written first and the sidecar last, both atomically, so a sidecar always describes a complete
    output: a run that dies in between leaves an output without sidecar, which resuming redoes.

    Args:
        out: output volume path (format by suffix, see ``write_volume``); the sidecar is ``sidecar_path(out)``.
        data: output voxel values [I, J, K].
        affine: 4x4 voxel-to-RAS affine (mm) of ``data``.
        header: the source volume's header, or None (see ``write_volume``).
        provenance: the run's provenance record, copied into the sidecar first.
        inputs: input role -> file path; each is recorded with its sha256 (None entries are skipped).
        extra: further keys added last (they override earlier ones), or None.

    Raises ``OutputError`` when either file cannot be written, ``InputError`` when an input was moved or deleted
    meanwhile (its sha256 is recorded); then neither is left behind. Inside ``all_or_nothing`` the same holds when
    the command is interrupted (Ctrl-C, SIGTERM) between the two (a file the image replaced comes back), so "no
    output was written" is true; outside it (``usb batch``) an interrupted output without sidecar is redone on resume.
    """
    out = Path(out)
    write_volume(out, data, affine, header)
    try:
        return _write_sidecar(out, provenance, inputs, extra)
    except BaseException as exc:
        undo = _UNDO.get()
        if isinstance(exc, Exception) or undo is not None:
            # an output without its sidecar is not a result: leave neither. Outside ``all_or_nothing`` (usb batch)
            # a sidecar still there describes the output this image replaced, which is gone: it goes too
            stale = [sidecar_path(out)] if undo is None else []
            for file in [*output_files(out), *stale]:
                file.unlink(missing_ok=True)
        raise


def _write_sidecar(out: Path, provenance: dict, inputs: dict[str, Any], extra: dict | None) -> dict:
    import time

    sidecar = dict(provenance)
    try:
        sidecar["inputs"] = {k: {"path": str(v), "sha256": volume_sha256(v)} for k, v in inputs.items()
                             if v is not None}
    except FileNotFoundError as exc:
        raise InputError(f"{exc.filename}: the input was moved or deleted while the command ran") from None
    sidecar["output"] = str(out)
    sidecar["output_sha256"] = volume_sha256(out)
    sidecar["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sidecar.update(extra or {})
    write_json(sidecar_path(out), sidecar)
    return sidecar


def cast_like(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast float results to an input's dtype: rounded and clipped to the range of integer types.

    Args:
        values: float values of any shape, in the input's units.
        dtype: the target dtype; integers are rounded and clipped to its range, bool is ``values > 0.5``, floats are
            cast as they are.
    """
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    if dtype == np.bool_:
        return values > 0.5
    return values.astype(dtype)
