"""The page's data on the MRML scene: one scan, its editable lesion segment, and the latest result.

Files are read by the engine's reader (``USBLib.imaging.io.read_volume``), so the page accepts, refuses and places a
scan or mask exactly as ``usb heal`` does, and keeps the scan's header to write the result as the CLI does; masks on
another grid, the lesion segment and the sample go through ``USBEditorLib.logic`` (``mask_from_node``,
``new_lesion_segmentation``, ``load_sample``), as in the Slicer module.
Needs ``slicer.mrmlScene`` and ``slicer.app`` (``USBWeb.slicer_env``), not trame: it is tested headless.
"""
from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

import slicer
from USBEditorLib import logic as L

from .slicer_env import node_name

UNCERTAINTY_COLORS = "vtkMRMLPETProceduralColorNodePET-Heat"


@dataclass
class Result:
    """A finished run's nodes, what it used, and how long it took."""

    outputs: L.Outputs
    task: L.Task
    mask: Optional[tuple[np.ndarray, np.ndarray]] = None  # (mask [I,J,K], affine) the run used
    engine_seconds: float = 0.0  # the model's stages (provenance timings)
    nodes: list = field(default_factory=list)

    @property
    def volume(self):
        return self.outputs.volume

    @property
    def uncertainty(self):
        return self.outputs.uncertainty


def public_provenance(value: Any) -> Any:
    """The provenance record with every absolute path reduced to its last part (the browser never sees where the
    server keeps files)."""
    if isinstance(value, dict):
        return {k: public_provenance(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [public_provenance(v) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and os.sep in value.strip(os.sep):
        return Path(value).name
    return value


def file_stem(name: str) -> str:
    """A node name as a file name: ``sample_T1w healed`` -> ``sample_T1w_healed``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "result"


NOT_AN_IMAGE = "it is not a NIfTI, NRRD or MGZ image"
CUT_SHORT = "the file ends early (an incomplete upload?)"


def read_reason(message: str, path: Path, what: str) -> str:
    """Why ``USBLib.imaging.io.read_volume`` refused ``path`` (its ``InputError`` message), without the path: "it has
    shape (4, 4, 4, 2); a 3D volume is needed"; a file that cannot be parsed at all is ``NOT_AN_IMAGE``."""
    from USBLib.imaging.io import CUT_SHORT as READER_CUT_SHORT

    message = message.strip()
    if message.startswith(f"cannot read {what} ") or not message.startswith(f"{path}: "):
        return CUT_SHORT if READER_CUT_SHORT in message else NOT_AN_IMAGE
    reason = message[len(f"{path}: "):]
    return "it " + reason[len(what) + 1:] if reason.startswith(f"{what} ") else reason


def read_node(path: Path, labelmap: bool, name: str = "", max_bytes: Optional[int] = None
              ) -> tuple[Any, Any, Optional[tuple[int, ...]]]:
    """A scan (``labelmap`` False) or mask node from a file, with its nibabel header (None for NRRD and
    ``.seg.nrrd``). Scans and masks are read by the engine's reader, ``USBLib.imaging.io.read_volume``, as ``usb heal``
    reads them: the same geometry and the same refusals (4-D with several frames, 2-D, several components, a
    non-numeric voxel type, a degenerate affine, a mask of several non-zero values); a ``.seg.nrrd`` mask by
    ``USBEditorLib.logic.load_mask``. ``max_bytes``: voxels larger than this as stored are refused before they are
    read (a small ``.nii.gz`` can hold gigabytes). Raises ``USBEditorError`` with one line naming the file as ``name``
    (the browser's name; default: the file's)."""
    from USBLib.errors import InputError
    from USBLib.imaging.checks import check_binary
    from USBLib.imaging.io import check_image_values, check_nrrd_size, read_volume

    name = name or path.name
    what = "mask" if labelmap else "scan"
    if labelmap and path.name.lower().endswith(".seg.nrrd"):
        try:
            if max_bytes is not None:
                check_nrrd_size(path, what, max_bytes)
        except InputError as exc:
            raise L.USBEditorError(f"Could not read '{name}' as a {what}: {read_reason(str(exc), path, what)}.") \
                from None
        try:
            return L.load_mask(str(path)), None, None
        except L.USBEditorError:
            raise L.USBEditorError(f"Could not read '{name}' as a mask: it is not a .seg.nrrd segmentation.") from None
    try:
        vol = read_volume(path, what, max_bytes=max_bytes)
        if not labelmap:  # values, as `usb heal` checks them: not constant, not all NaN
            check_image_values(vol, what)
        else:  # one lesion value, as `usb heal` checks a mask (not a probability map, not several labels)
            check_binary(vol.data, what, f"{path}: {what}")
    except InputError as exc:
        reason = read_reason(str(exc), path, what)
        if reason == NOT_AN_IMAGE and labelmap:
            reason += " or a .seg.nrrd segmentation"
        raise L.USBEditorError(f"Could not read '{name}' as a {what}: {reason}.") from None
    data = vol.data.astype(np.uint8) if vol.data.dtype == bool else vol.data
    node = slicer.util.addVolumeFromArray(
        np.ascontiguousarray(data.transpose(2, 1, 0)), ijkToRAS=vol.affine,
        name=slicer.mrmlScene.GenerateUniqueName(node_name(name)),  # messages about a mask name it so
        nodeClassName="vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode")
    node.CreateDefaultDisplayNodes()
    return node, vol.header, vol.file_shape


class Document:
    """The scan, its lesion segment and the latest result; each load replaces all three."""

    def __init__(self, max_bytes: Optional[int] = None) -> None:
        self.max_bytes = max_bytes  # a scan's or mask's voxels as stored, at most (``read_node``); None: any size
        self.volume = None
        self.segmentation = None
        self.segment_id = ""
        self.result: Optional[Result] = None
        self.header: Any = None  # the scan file's nibabel header (codes, units, stored type), None for NRRD
        self.file_shape: Optional[tuple[int, ...]] = None  # [I, J, K, 1] for a one-frame 4-D scan, else None
        self.source: dict[str, str] = {}  # the file the scan came from: name (as the browser named it), sha256

    # ---- scan
    def load_scan(self, path: Path, source_name: str = "") -> Any:
        """Load a scan with the engine's reader (``read_node``); raises ``USBEditorError`` with one line naming the
        file as ``source_name`` (the browser's name); on failure the current scan, lesion and result stay."""
        path = Path(path)
        node, header, file_shape = read_node(path, labelmap=False, name=source_name or path.name,
                                             max_bytes=self.max_bytes)
        self._replace(node, source_name or path.name, path, header)
        self.file_shape = file_shape
        return node

    def load_sample(self) -> Any:
        """The bundled sample scan with its lesion in the lesion segment (``USBEditorLib.logic.load_sample``)."""
        volume, labelmap = L.load_sample()
        try:
            mask, _name = L.mask_from_node(labelmap, None, volume, True)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
        from USBLib.resources import sample_files

        from USBLib.imaging.io import read_volume

        image = sample_files()["image"]
        self._replace(volume, image.name, image, read_volume(image, "scan").header)
        self._set_mask(mask)
        return volume

    def _replace(self, volume, source_name: str, path: Path, header: Any = None) -> None:
        """``volume`` becomes the scan, named after its file, with its file's ``header`` (the previous scan, lesion
        and result go)."""
        from USBLib.hashing import sha256_of

        self.clear_result()
        for node in (self.segmentation, self.volume):
            if node is not None and node is not volume:
                slicer.mrmlScene.RemoveNode(node)
        volume.SetName(file_stem(node_name(source_name)))  # not "T1_1": the previous scan is gone
        self.volume, self.source = volume, {"name": source_name, "sha256": sha256_of(Path(path))}
        self.header, self.file_shape = header, None
        self.segmentation, self.segment_id = L.new_lesion_segmentation(volume)

    # ---- lesion
    def import_mask(self, path: Path, resample: bool = True, source_name: str = "") -> int:
        """Put a mask file into the lesion segment; a mask on another grid is resampled (nearest neighbour) when
        ``resample``, else refused, and one that does not overlap the scan is refused, as in the Slicer module.
        Errors name the file as ``source_name`` (the browser's name). Returns the number of lesion voxels."""
        if self.volume is None:
            raise L.USBEditorError("Load a scan first: the mask is placed on it.")
        path = Path(path)
        node, _header, _shape = read_node(path, labelmap=True, name=source_name or path.name,
                                          max_bytes=self.max_bytes)
        try:
            mask, _name = L.mask_from_node(node, None, self.volume, resample)
        finally:
            slicer.mrmlScene.RemoveNode(node)
        return self._set_mask(mask)

    def _set_mask(self, mask: np.ndarray) -> int:
        """Replace the lesion segment by ``mask`` [I,J,K] on the scan's grid."""
        if mask.any():
            slicer.util.updateSegmentBinaryLabelmapFromArray(
                np.ascontiguousarray(mask.transpose(2, 1, 0).astype(np.uint8)), self.segmentation, self.segment_id,
                self.volume)
        else:
            self.clear_lesion()
        return self.lesion_voxels()

    def clear_lesion(self) -> None:
        """Empty the lesion segment."""
        if self.segmentation is not None:
            segmentation = self.segmentation.GetSegmentation()
            segmentation.RemoveSegment(self.segment_id)
            segmentation.AddEmptySegment(self.segment_id, "lesion", L.LESION_COLOR)

    def lesion_voxels(self) -> int:
        """Voxels in the lesion segment."""
        if self.segmentation is None:
            return 0
        labelmap = slicer.util.arrayFromSegmentInternalBinaryLabelmap(self.segmentation, self.segment_id)
        if labelmap is None:
            return 0
        value = self.segmentation.GetSegmentation().GetSegment(self.segment_id).GetLabelValue()
        return int(np.count_nonzero(labelmap == value))

    # ---- result
    def set_result(self, result: Result) -> None:
        """Keep ``result`` (its nodes are in the scene) and drop the previous one."""
        self.clear_result()
        result.nodes = [n for n in result.outputs.nodes if n is not None]
        for node in result.nodes:  # "T1 healed", not "T1 healed_1": the previous result is gone
            plain = re.sub(r"_\d+$", "", node.GetName())
            if plain != node.GetName() and slicer.mrmlScene.GetFirstNodeByName(plain) is None:
                node.SetName(plain)
        if result.uncertainty is not None and result.uncertainty.GetDisplayNode() is not None:
            display = result.uncertainty.GetDisplayNode()
            display.SetAndObserveColorNodeID(UNCERTAINTY_COLORS)
            display.AutoWindowLevelOn()
            display.AutoThresholdOff()  # zero spread is transparent: the scan shows around the edit
            display.SetThreshold(1e-6, float(slicer.util.arrayFromVolume(result.uncertainty).max()) + 1.0)
            display.ApplyThresholdOn()
        self.result = result

    def clear_result(self) -> None:
        """Remove the latest result's nodes from the scene."""
        if self.result is not None:
            for node in self.result.nodes:
                if slicer.mrmlScene.IsNodePresent(node):
                    slicer.mrmlScene.RemoveNode(node)
        self.result = None

    def export(self) -> "Export":
        """What the download holds, copied out of the scene (so it can be written in another thread)."""
        if self.result is None or self.result.volume is None:
            raise L.USBEditorError("There is no result to download yet.")
        images = [(file_stem(self.result.volume.GetName()), *L.volume_to_array(self.result.volume), None)]
        if self.result.uncertainty is not None:
            images.append((f"{images[0][0]}_uncertainty", *L.volume_to_array(self.result.uncertainty),
                           "uncertainty (std over samples)"))
        return Export(images, self.result.mask, public_provenance(self.result.outputs.provenance), dict(self.source),
                      self.header, self.file_shape)

    def export_result(self, folder: Path) -> Path:
        """``export().write(folder)``: the zip to download."""
        return self.export().write(folder)


@dataclass
class Export:
    """The download of a result: its images (name, data, affine, kind), the mask the run used, the provenance, and
    the scan file's nibabel header (None for NRRD), with which the images are written as ``usb heal`` writes them."""

    images: list[tuple[str, np.ndarray, np.ndarray, Optional[str]]]
    mask: Optional[tuple[np.ndarray, np.ndarray]]
    provenance: dict[str, Any]
    source: dict[str, str]
    header: Any = None
    file_shape: Optional[tuple[int, ...]] = None  # the scan file's shape when it is a one-frame 4-D file

    def write(self, folder: Path) -> Path:
        """The result as NIfTI with its provenance sidecar (and the uncertainty map and the lesion mask, when there
        are), zipped into one file in ``folder``; returns the zip. The result is written with the scan's header (its
        sform/qform codes and units; an integer scan stored with a slope comes back stored so), the uncertainty map
        as float32 with the scan's codes (``float_map_header``), as ``usb heal`` writes them."""
        from USBLib.hashing import sha256_of
        from USBLib.imaging.io import float_map_header, sidecar_path, write_result, write_volume

        stem = self.images[0][0]
        written: list[Path] = []
        inputs: dict[str, Any] = {"image": self.source}
        if self.mask is not None:
            mask_path = write_volume(folder / f"{stem}_lesion_mask.nii.gz", self.mask[0].astype(np.uint8),
                                     self.mask[1])
            inputs["mask"] = {"name": mask_path.name, "sha256": sha256_of(mask_path)}
            written.append(mask_path)
        for name, data, affine, kind in self.images:
            out = folder / f"{name}.nii.gz"
            extra = {"output": out.name, "inputs": inputs, **({"kind": kind} if kind else {})}
            header = self.header if kind is None else float_map_header(self.header)
            if self.file_shape is not None and tuple(data.shape) == tuple(self.file_shape[:3]):
                data = data.reshape(self.file_shape)  # one-frame 4-D in, 4-D out (as `usb heal`)
            write_result(out, data, affine, header, self.provenance, {}, extra)
            written += [out, sidecar_path(out)]
        archive = folder / f"{stem}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:  # .nii.gz is compressed already
            for path in written:
                zf.write(path, path.name)
        return archive
