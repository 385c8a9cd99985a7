"""``usb batch``: heal many scans into a BIDS derivatives dataset, resumably, in parallel, with a QC report.

Each scan's output ``<entities>_desc-healed_T1w.nii.gz`` keeps the input's grid, header and data type; its
JSON sidecar holds the provenance, the sha256 of the inputs and of the output, and the batch key (model
checksum + settings). A scan whose output and sidecar still match all of these is skipped on the next run.
Files are written to a temporary name and renamed, image first and sidecar last, so an interrupted run
never leaves a half-written file. Every scan's outcome is a record in ``qc/records/<key>.json``; the report
``qc/index.html`` is rebuilt from all records, so shards of one batch (``--shard i/n``) share one report.
A scan interrupted by Ctrl-C or SIGTERM is recorded as ``cancelled`` (not done: the next run heals it); a scan
whose output cannot be written (full disk, read-only folder) is ``failed`` with ``cause`` ``"output"``.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from USBLib.apps.batch_inputs import Subject, is_bids, lies_under
from USBLib.errors import OutputError, USBError
from USBLib.imaging.io import read_volume, sidecar_path, write_json, write_result

STATUSES = ("healed", "up-to-date", "copied", "no-mask", "failed", "cancelled")
OUTPUT_CAUSE = "output"  # Record.cause of a scan whose output could not be written
BIDS_VERSION = "1.9.0"


@dataclass
class BatchSettings:
    """What every scan of the batch is healed with (None = the model's default)."""

    model: Optional[str] = None
    device: str = "auto"
    steps: Optional[int] = None
    strength: Optional[float] = None
    alpha0: Optional[float] = None
    k: Optional[float] = None
    eta: Optional[float] = None
    acg: Optional[bool] = None
    margin_mm: Optional[float] = None
    prefill: Optional[str] = None
    stages: Optional[str] = None
    local_mode: Optional[str] = None
    local_steps: Optional[int] = None
    local_strength: Optional[float] = None
    dilation_mm: Optional[float] = None
    growth: Optional[str] = None
    boundary_average: Optional[bool] = None
    patch_blend: Optional[float] = None
    prior_anchor: Optional[bool] = None
    mirror_blend: Optional[float] = None
    samples: int = 1
    seed: int = 0
    registration: str = "affine"
    resample_mask: bool = False
    mask_threshold: Optional[float] = None  # binarise soft masks at this value (None: masks must be binary)
    without_mask: str = "skip"  # "skip" or "copy"
    qc: bool = True

    def edit_options(self) -> dict[str, Any]:
        return {"steps": self.steps, "strength": self.strength, "alpha0": self.alpha0, "k": self.k, "eta": self.eta,
                "acg": self.acg, "margin_mm": self.margin_mm, "prefill": self.prefill, "stages": self.stages,
                "local_mode": self.local_mode, "local_steps": self.local_steps, "local_strength": self.local_strength,
                "dilation_mm": self.dilation_mm, "samples": self.samples, "seed": self.seed,
                "resample_mask": self.resample_mask, **({"growth": self.growth} if self.growth else {}),
                **({} if self.boundary_average is None else {"boundary_average": self.boundary_average}),
                **({} if self.patch_blend is None else {"patch_blend": self.patch_blend}),
                **({} if self.prior_anchor is None else {"prior_anchor": self.prior_anchor}),
                **({} if self.mirror_blend is None else {"mirror_blend": self.mirror_blend})}


@dataclass
class Record:
    """The outcome of one scan."""

    key: str
    status: str
    message: str = ""
    image: str = ""
    mask: Optional[str] = None
    output: Optional[str] = None
    seconds: Optional[float] = None
    lesion_ml: Optional[float] = None
    qc: Optional[str] = None
    cause: Optional[str] = None  # OUTPUT_CAUSE when the output could not be written (the environment, not the scan)
    finished: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def cancelled_record(subject: Subject, out_root: Path) -> Record:
    """The record of a scan a Ctrl-C or SIGTERM interrupted: not done, so the next run heals it."""
    return Record(subject.key, "cancelled", "interrupted (Ctrl-C or SIGTERM) before its output was written; "
                  "the next run heals it", str(subject.image), str(subject.mask) if subject.mask else None,
                  str(Path(out_root) / subject.out_dir / subject.output_name))


# Bumped when the same model and settings heal differently (an engine change without a setting of its own), so that
# a rerun redoes the outputs an older engine made instead of finding them up to date. 1: the mirror blend runs on
# thick-slice scans too (2026-12-07). 2: a lesion cut by the field of view is healed from the scan mirrored at its
# face and the mirror blend where the mirror is in view; fill values and corrupt voxels are set aside (2026-12-07).
ENGINE_REVISION = 2


def batch_key(bundle_sha256: str, settings: BatchSettings) -> str:
    """Identifies what an output was made with: the model's checksum, every setting that changes voxels and the
    engine's revision (``ENGINE_REVISION``)."""
    relevant = dict(settings.edit_options(), registration=settings.registration, model=bundle_sha256,
                    engine=ENGINE_REVISION)
    if settings.mask_threshold is not None:  # (absent otherwise: keys of earlier batches stay valid)
        relevant["mask_threshold"] = settings.mask_threshold
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def records_dir(out_root: Path) -> Path:
    return Path(out_root) / "qc" / "records"


def save_record(out_root: Path, record: Record) -> None:
    records_dir(out_root).mkdir(parents=True, exist_ok=True)
    write_json(records_dir(out_root) / f"{record.key}.json", asdict(record))


def load_records(out_root: Path) -> list[dict[str, Any]]:
    """All records of this derivatives folder (every run and shard). Hidden files (``.<key>.XXXX.json``: the temporary
    file of a write that was killed before its rename, ``atomic_path``) are not records; a record that cannot be read
    or is not a record (a damaged file) is left out with a one-line warning on stderr, so that one bad file does not
    stop the report of this and every later run (the scan's next run writes its record again)."""
    folder = records_dir(out_root)
    if not folder.is_dir():
        return []
    records = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith("."):
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if not (isinstance(record, dict) and isinstance(record.get("key"), str)
                    and isinstance(record.get("status"), str)):
                raise ValueError("not a scan's record")
        except (OSError, ValueError) as exc:  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
            print(f"usb batch: warning: {path} left out of the report: {' '.join(str(exc).split())}", file=sys.stderr)
            continue
        records.append(record)
    return records


RAW, MASKS = "raw", "masks"  # the BIDS URI dataset names of the input dataset and of a --masks folder outside it


def _absolute(path: Path) -> Path:
    """``path`` made absolute and normalised without following links (a DataLad file is a link into the annex)."""
    return Path(os.path.abspath(path))


def dataset_links(source: Optional[Path], masks: Optional[Path] = None) -> dict[str, Path]:
    """The datasets the sidecars' ``Sources`` name by BIDS URI (``bids:<name>:<path>``): the input dataset as ``raw``
    when ``source`` is a BIDS dataset (None or a plain folder or CSV: none, their files are named by ``file:`` URIs),
    and a ``--masks`` folder outside it as ``masks``."""
    if source is None or not is_bids(Path(source)):
        return {}
    links = {RAW: _absolute(source)}
    if masks is not None and not _absolute(masks).is_relative_to(links[RAW]):
        links[MASKS] = _absolute(masks)
    return links


def source_uri(path: Path, links: dict[str, Path]) -> str:
    """``path`` as a BIDS URI of the linked dataset that holds it (the innermost), else as a ``file:`` URI."""
    path = _absolute(path)
    holders = [(root, name) for name, root in links.items() if path.is_relative_to(root)]
    if not holders:
        return path.as_uri()
    root, name = max(holders, key=lambda held: len(held[0].parts))
    return f"bids:{name}:{path.relative_to(root).as_posix()}"


def _link_location(out_root: Path, root: Path) -> str:
    """Where ``DatasetLinks`` says a linked dataset is: relative to the derivatives folder when that lies inside it
    (``derivatives/usb`` of the study: ``../..``, which holds when the study is moved), else a ``file:`` URI."""
    out = _absolute(out_root)
    return os.path.relpath(root, out) if out.is_relative_to(root) else root.as_uri()


def prepare_output(out_root: Path, source: Path, links: Optional[dict[str, Path]] = None) -> dict[str, Path]:
    """Create the derivatives folder with ``dataset_description.json`` (with ``DatasetLinks`` for ``links``, which
    the BIDS URIs of the sidecars' ``Sources`` need) and a ``.bidsignore`` for ``qc/``. A description an earlier
    run of USB wrote gets the links it lacks (its other keys are kept); one another tool wrote is left as it is.

    Returns ``links`` as the description names them: a link whose name an earlier run gave to another dataset (a
    second source healed into the same folder) gets the next free name (``raw2``, ...), so that the earlier
    sidecars' ``bids:raw:`` URIs keep naming their own dataset."""
    from USBLib import __version__

    links = dict(links or {})
    out_root.mkdir(parents=True, exist_ok=True)
    description = out_root / "dataset_description.json"
    wanted = {name: _link_location(out_root, root) for name, root in links.items()}
    if not description.is_file():
        write_json(description, {
            "Name": "USB healed T1w images", "BIDSVersion": BIDS_VERSION, "DatasetType": "derivative",
            "GeneratedBy": [{"Name": "USB", "Version": __version__,
                             "Description": "lesions removed (pathology -> healthy) by latent diffusion with ACG/LCG",
                             "CodeURL": "https://github.com/usb-slicer/SlicerUSB"}],
            "SourceDatasets": [{"URL": Path(source).resolve().as_uri()}],
            **({"DatasetLinks": wanted} if wanted else {})})
    elif wanted:
        try:
            present = json.loads(description.read_text(encoding="utf-8"))
            ours = any(isinstance(g, dict) and g.get("Name") == "USB" for g in present.get("GeneratedBy", []))
            known = present.get("DatasetLinks") or {}
        except (OSError, ValueError, AttributeError, TypeError):
            ours = False
        if ours and isinstance(known, dict):
            named = {_free_link_name(name, where, known): name for name, where in wanted.items()}
            links = {name: links[given] for name, given in named.items()}
            added = {name: wanted[given] for name, given in named.items() if name not in known}
            if added:
                write_json(description, dict(present, DatasetLinks=dict(known, **added)))
    ignore = out_root / ".bidsignore"
    if not ignore.is_file():
        ignore.write_text("qc/\n")
    return links


def _free_link_name(name: str, where: str, known: dict[str, Any]) -> str:
    """The ``DatasetLinks`` name for the dataset at ``where``: one of ``name``, ``name2``, ... that ``known``
    already gives to it, else the first that ``known`` does not hold."""
    candidates = [name] + [f"{name}{n}" for n in range(2, len(known) + 3)]
    for candidate in candidates:
        if known.get(candidate) == where:
            return candidate
    return next(candidate for candidate in candidates if candidate not in known)


def _sha256(path: Path) -> str:
    """An input's or output's sha256 as its sidecar records it (an .nhdr input's data files included)."""
    from USBLib.imaging.io import volume_sha256

    return volume_sha256(path)


def up_to_date(subject: Subject, output: Path, key: str) -> bool:
    """True when the output and sidecar exist and match the inputs, the model and the settings."""
    sidecar = sidecar_path(output)
    if not (output.is_file() and sidecar.is_file()):
        return False
    try:
        meta = json.loads(sidecar.read_text())
        inputs = meta.get("inputs", {})
        if (subject.mask is None) != (inputs.get("mask") is None):  # a mask that came or went since
            return False
        return (meta.get("batch_key") == key and meta.get("output_sha256") == _sha256(output)
                and inputs.get("image", {}).get("sha256") == _sha256(subject.image)
                and (subject.mask is None or inputs.get("mask", {}).get("sha256") == _sha256(subject.mask)))
    except (OSError, ValueError, AttributeError):
        return False


def _from_file_uri(uri: str) -> Path:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    return Path(url2pathname(urlparse(uri).path))


def _source_path(uri: str, out_root: Path) -> Optional[Path]:
    """The file a sidecar's ``Sources`` entry names: a ``file:`` URI's path, a BIDS URI's (``bids:<name>:<path>``)
    through the ``DatasetLinks`` of ``out_root``'s description; None when that cannot be told."""
    if uri.startswith("file:"):
        return _absolute(_from_file_uri(uri))
    name, _, relative = uri[len("bids:"):].partition(":") if uri.startswith("bids:") else ("", "", "")
    try:
        where = json.loads((out_root / "dataset_description.json").read_text(encoding="utf-8"))["DatasetLinks"][name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (relative and isinstance(where, str)):
        return None
    return _absolute((_from_file_uri(where) if where.startswith("file:") else Path(out_root) / where) / relative)


def _dataset_of(image: Path, links: Optional[dict[str, Path]]) -> Path:
    """The dataset ``image`` belongs to in this run: the innermost linked dataset (``dataset_links``) that holds
    it, else its folder (a plain folder's; a CSV's scan)."""
    image = _absolute(image)
    holders = [root for root in (links or {}).values() if image.is_relative_to(root)]
    return max(holders, key=lambda root: len(root.parts)) if holders else image.parent


def healed_elsewhere(output: Path, subject: Subject, out_root: Path,
                     links: Optional[dict[str, Path]] = None) -> Optional[Path]:
    """The scan an existing ``output`` was healed from when that lies outside the dataset of ``subject``'s image
    (another study healed into the same ``--out`` with the same BIDS entities, or another plain folder with the
    same file name), else None. Only outputs of this tool count (a sidecar with ``batch_key``), and only where the
    sidecar's ``Sources`` can be resolved. Such an output is another dataset's: never overwritten or removed."""
    sidecar = sidecar_path(output)
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8")) if output.is_file() and sidecar.is_file() else {}
    except (OSError, ValueError):
        return None
    sources = meta.get("Sources") if isinstance(meta, dict) and "batch_key" in meta else None
    if not (isinstance(sources, list) and sources and isinstance(sources[0], str)):
        return None
    recorded = _source_path(sources[0], Path(out_root))
    dataset = _dataset_of(subject.image, links)
    # (the same dataset reached through a link, /data -> /mnt/data, is this dataset; a link loop is not)
    return None if recorded is None or lies_under(recorded, [dataset]) else recorded


def _elsewhere_message(output: Path, recorded: Path) -> str:
    """The failure of a scan whose ``output`` another dataset's scan ``recorded`` holds (``healed_elsewhere``)."""
    return f"{output.name} was healed from another dataset ({recorded}); use another --out"


STALE_NOTE = "the earlier output, of inputs or settings that no longer apply, was removed"


def _drop_stale(output: Path, record: Record, subject: Subject, out_root: Path,
                links: Optional[dict[str, Path]] = None) -> None:
    """A scan's run that ends without an output of its own (its mask is gone, or the redo failed): an earlier
    batch's ``output`` and its sidecar (one that records a ``batch_key``: this tool's) are removed, so that the
    derivatives hold no heal of inputs or settings that no longer apply, and the record says so. A folder that
    cannot be written keeps them (the record says the run failed), and so does an output healed from another
    dataset (``healed_elsewhere``): it is not this scan's."""
    sidecar = sidecar_path(output)
    try:
        if not (output.is_file() and sidecar.is_file() and "batch_key" in json.loads(sidecar.read_text())):
            return
        if healed_elsewhere(output, subject, out_root, links) is not None:
            return
        output.unlink(missing_ok=True)
        sidecar.unlink(missing_ok=True)
    except (OSError, ValueError, TypeError):
        return
    record.message = "; ".join(m for m in (record.message, STALE_NOTE) if m)


def _copy_unchanged(output: Path, vol, inputs: dict[str, Any], extra: dict[str, Any], why: str, description: str,
                    record: Record) -> Record:
    """Write the scan ``vol`` unchanged as its output (no lesion to heal: ``why``), with a sidecar that says so
    (``description``); the record becomes ``copied``."""
    write_result(output, vol.as_in_file(np.asarray(vol.data)), vol.affine, vol.header,
                 {"task": "copy", "note": f"{why}: the input, unchanged"}, inputs, dict(extra, Description=description))
    record.status, record.message = "copied", f"{why}: copied unchanged"
    return record


def _previous(out_root: Path, key: str) -> dict[str, Any]:
    """The scan's last record, or {} when there is none or it is not a record (a damaged file, JSON that is not an
    object): a bad record must not fail the scan, whose valid output would then be removed as stale."""
    path = records_dir(out_root) / f"{key}.json"
    try:
        previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError, TypeError):
        return {}
    return previous if isinstance(previous, dict) else {}


def _heal_seconds(sidecar: dict[str, Any]) -> Optional[float]:
    """The time the heal in ``sidecar`` took: the sum of its stage timings (None for a copy, which has none)."""
    timings = sidecar.get("timings_s")
    if not isinstance(timings, dict) or not timings:
        return None
    return round(sum(float(t) for t in timings.values() if isinstance(t, (int, float))), 2)


def _montage(out_root: Path, key: str, before: np.ndarray, after: np.ndarray, lesion: np.ndarray,
             affine: np.ndarray) -> str:
    """Draw ``qc/<key>.png`` (slices through the lesion before and after); returns its name for the record."""
    from USBLib.apps.qc_report import lesion_montage

    return lesion_montage(out_root / "qc" / f"{key}.png", key, before, after, lesion, affine).name


def _montage_of_earlier_heal(out_root: Path, subject: Subject, output: Path, settings: BatchSettings) -> str | None:
    """The QC montage of a heal written by an earlier run without one (``--no-qc``), from the files: the input, the
    healed output and the lesion mask (the changed voxels where the mask lies on another grid). None for a scan
    copied unchanged, or where the files cannot be drawn (the scan stays up to date either way)."""
    from USBLib.imaging.checks import threshold_mask

    if subject.mask is None:
        return None
    try:
        vol, healed = read_volume(subject.image, "input image"), read_volume(output, "output")
        mask = read_volume(subject.mask, "lesion mask")
        if mask.data.shape == vol.data.shape and np.allclose(mask.affine, vol.affine, atol=1e-4):
            lesion = threshold_mask(mask.data, settings.mask_threshold)
        else:  # a mask on another grid or in another axis order: the voxels the heal changed
            lesion = np.asarray(vol.data) != np.asarray(healed.data)
        if not lesion.any():
            return None
        return _montage(out_root, subject.key, np.asarray(vol.data), np.asarray(healed.data), lesion, vol.affine)
    except Exception:  # a picture that cannot be drawn must not make the scan's valid output 'failed'
        return None


def heal_subject(editor, subject: Subject, out_root: Path, settings: BatchSettings, key: str,
                 links: Optional[dict[str, Path]] = None) -> Record:
    """Heal one scan (or skip it when up to date); every failure becomes a 'failed' record, never an exception.
    ``links``: the linked datasets (``dataset_links``) by which the sidecar's ``Sources`` name the inputs."""
    out_dir = out_root / subject.out_dir
    output = out_dir / subject.output_name
    record = Record(subject.key, "failed", image=str(subject.image), mask=str(subject.mask) if subject.mask else None,
                    output=str(output))
    started = time.perf_counter()
    try:
        if subject.problem:
            record.message = subject.problem
            _drop_stale(output, record, subject, out_root, links)
            return record
        skip = subject.mask is None and settings.without_mask == "skip"  # a copy of an earlier --without-mask copy
        if not skip and up_to_date(subject, output, key):  # does not apply: it goes (below, as 'no-mask')
            meta = json.loads(sidecar_path(output).read_text())  # (up_to_date read it)
            record.status = "up-to-date"
            record.message = "; ".join(["output matches inputs, model and settings"] + list(meta.get("notes", [])))
            # what the output's own sidecar says (the last record may be of another run: one that failed, say)
            record.lesion_ml, record.seconds = meta.get("lesion_volume_ml"), _heal_seconds(meta)
            record.qc = _previous(out_root, subject.key).get("qc")  # checked below: drawn again when it is gone
            if settings.qc and not (record.qc and (out_root / "qc" / record.qc).is_file()):
                record.qc = _montage_of_earlier_heal(out_root, subject, output, settings)  # e.g. made with --no-qc
            return record
        recorded = None if skip else healed_elsewhere(output, subject, out_root, links)
        if recorded is not None:  # another study's scan with this scan's name: kept, this one fails
            record.message = _elsewhere_message(output, recorded)
            return record
        vol = read_volume(subject.image, "input image")  # every scan is opened: a broken file is reported
        if skip:
            record.status, record.message, record.output = "no-mask", "no lesion mask found; nothing written", None
            _drop_stale(output, record, subject, out_root, links)
            return record
        from USBLib.imaging.io import check_image_values

        check_image_values(vol, "input image")
        used = [subject.image] + ([subject.mask] if subject.mask is not None else [])
        extra = {"Description": "T1w with the lesion removed by USB (pathology -> healthy)", "batch_key": key,
                 "Sources": [source_uri(path, links or {}) for path in used]}
        if subject.mask is None:  # --without-mask copy
            return _copy_unchanged(output, vol, {"image": subject.image}, extra, "no lesion mask",
                                   "T1w without a lesion mask, copied unchanged", record)
        from USBLib.imaging.checks import threshold_mask

        mask = read_volume(subject.mask, "lesion mask")
        lesion = threshold_mask(mask.data, settings.mask_threshold)
        if not np.any(lesion):  # a segmentation that found no lesion (a control): the scan is its own heal
            record.lesion_ml = 0.0
            return _copy_unchanged(output, vol, {"image": subject.image, "mask": subject.mask},
                                   dict(extra, lesion_volume_ml=0.0), "the lesion mask is empty",
                                   "T1w whose lesion mask is empty, copied unchanged", record)
        result = editor.heal(vol.data, vol.affine, lesion, mask_affine=mask.affine, **settings.edit_options())
        lesion_ml = float(result.mask.sum() * abs(np.linalg.det(vol.affine[:3, :3])) / 1000.0)
        write_result(output, vol.as_in_file(result.image), vol.affine, vol.header, result.provenance,
                     {"image": subject.image, "mask": subject.mask}, dict(extra, lesion_volume_ml=round(lesion_ml, 4)))
        record.status, record.lesion_ml = "healed", lesion_ml
        record.message = "; ".join([f"edit region {result.provenance.get('edit_region_voxels', 0)} voxels"]
                                   + list(result.provenance.get("notes", [])))
        if settings.qc:
            record.qc = _montage(out_root, subject.key, np.asarray(vol.data), result.image, result.mask, vol.affine)
        return record
    except USBError as exc:
        record.status, record.message = "failed", " ".join(str(exc).split())
        record.cause = OUTPUT_CAUSE if isinstance(exc, OutputError) else None
        _drop_stale(output, record, subject, out_root, links)
        return record
    except Exception as exc:  # an unexpected failure of one scan must not stop the batch
        record.status, record.message = "failed", f"internal error: {type(exc).__name__}: {exc}"
        log = out_root / "qc" / "logs" / f"{subject.key}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(traceback.format_exc())
        _drop_stale(output, record, subject, out_root, links)
        return record
    finally:
        if record.status != "up-to-date":
            record.seconds = round(time.perf_counter() - started, 2)


# ----------------------------------------------------------------- running many
_WORKER_EDITOR = None


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity (what ``taskset``, SLURM's cpuset or a container's cpuset
    allow), not every CPU of the machine; ``os.cpu_count()`` where the platform has no affinity (macOS, Windows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_threads(jobs: int) -> Optional[int]:
    """Torch threads for each of ``jobs`` workers: the usable CPUs split between them, or None when the user set
    ``USB_THREADS`` (the workers inherit it, and ``threads_from_env`` checks and uses it as it is)."""
    if os.environ.get("USB_THREADS", "").strip():
        return None
    return max(1, usable_cpus() // max(1, jobs))


def worker_gpu(ordinal: int, visible: Optional[str]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of the worker given the ``ordinal``-th GPU this process sees: the ``ordinal``-th
    entry of this process's ``visible`` (``"2,3"``, GPU UUIDs: a scheduler's allocation) when it is set, else the
    ordinal itself."""
    entries = [entry.strip() for entry in (visible or "").split(",") if entry.strip()]
    return entries[ordinal] if ordinal < len(entries) else str(ordinal)


def _init_worker(model: Optional[str], device: str, registration: str, threads: Optional[int], gpus) -> None:
    """Pool initializer: one GPU per worker (when there are GPUs), SIGTERM as Ctrl-C (so that a terminated worker
    removes its temporary files), its torch threads (``threads``; None: the inherited ``USB_THREADS``), then the
    worker's own Editor."""
    global _WORKER_EDITOR
    from USBLib.apps.signals import terminate_as_interrupt

    terminate_as_interrupt()
    if gpus is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = worker_gpu(gpus.get(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if threads is not None:
        os.environ["USB_THREADS"] = str(threads)
    from USBLib.editor.editor import Editor, threads_from_env

    try:
        threads_from_env()
        _WORKER_EDITOR = Editor(model, device=device, registration=registration)
    except Exception as exc:  # noqa: BLE001 (an exception here would break the pool): each scan's record says why
        _WORKER_EDITOR = exc if isinstance(exc, USBError) else USBError(f"{type(exc).__name__}: {exc}")


def _work(args) -> Record:
    subject, out_root, settings, key, links = args
    if isinstance(_WORKER_EDITOR, USBError):
        return Record(subject.key, "failed", f"the worker process could not start: {_WORKER_EDITOR}",
                      str(subject.image), str(subject.mask) if subject.mask else None)
    return heal_subject(_WORKER_EDITOR, subject, out_root, settings, key, links)


def run_batch(subjects: Sequence[Subject], out_root: Path, settings: BatchSettings, key: str, jobs: int = 1,
              links: Optional[dict[str, Path]] = None, gpu_count: int = 0) -> Iterator[Record]:
    """Heal ``subjects``; yields each record as it finishes (and saves it). ``jobs`` > 1 runs worker processes,
    one GPU each when ``gpu_count`` > 0. ``links``: see ``heal_subject``.

    On Ctrl-C or SIGTERM (``KeyboardInterrupt``) the scans being worked on are recorded as ``cancelled`` and the
    interrupt goes on to the caller; a record that cannot be saved raises ``OutputError``."""
    if jobs <= 1:
        from USBLib.editor.editor import Editor

        editor = Editor(settings.model, device=settings.device, registration=settings.registration)
        for subject in subjects:
            try:
                record = heal_subject(editor, subject, out_root, settings, key, links)
            except KeyboardInterrupt:
                _save_cancelled(out_root, [subject])
                raise
            save_record(out_root, record)
            yield record
        return
    yield from _run_in_workers(subjects, out_root, settings, key, jobs, links, gpu_count)


WORKER_DIED = ("the worker process died while working on this scan (out of memory, or a crash); the other scans "
               "went on; rerun with fewer --jobs")


def died_record(subject: Subject, out_root: Path, key: str, links: Optional[dict[str, Path]] = None) -> Record:
    """The record of a scan whose worker process died: failed; an earlier output of other inputs or settings goes,
    as when a heal fails (one of these inputs and settings is kept: the scan is done)."""
    output = Path(out_root) / subject.out_dir / subject.output_name
    record = Record(subject.key, "failed", WORKER_DIED, str(subject.image),
                    str(subject.mask) if subject.mask else None, str(output))
    if not up_to_date(subject, output, key):
        _drop_stale(output, record, subject, out_root, links)
    return record


def _run_in_workers(subjects: Sequence[Subject], out_root: Path, settings: BatchSettings, key: str, jobs: int,
                    links: Optional[dict[str, Path]], gpu_count: int) -> Iterator[Record]:
    """``run_batch`` with ``jobs`` worker processes. At most ``jobs`` scans are handed out at a time, so the scans
    handed out are the ones being worked on. A worker process that dies (the out-of-memory killer, a crash in a
    library) breaks the pool, and the executor ends the other workers: the scans they were working on get no record
    here; the pool is rebuilt and the rest goes on. Each scan that was handed out is tried again alone
    (``suspects``; an idle worker the out-of-memory killer picked is no scan's fault): the one that dies again alone
    is recorded ``WORKER_DIED``, the others are healed. Scans not handed out yet are never recorded for a death."""
    import multiprocessing as mp
    import queue
    from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    gpus = ctx.Manager().Queue() if gpu_count > 0 else None
    threads = worker_threads(jobs)
    if threads is None:  # the user's USB_THREADS: a bad value is a usage error here, not a broken pool
        from USBLib.editor.editor import threads_from_env

        threads_from_env()
    device = "cuda" if gpu_count > 0 else settings.device
    pending = list(subjects)
    suspects: set[str] = set()  # scans being worked on when a worker died
    while pending:
        if gpus is not None:  # the GPUs for this pool's workers (a rebuilt pool's too)
            while True:
                try:
                    gpus.get_nowait()
                except queue.Empty:
                    break
            for i in range(jobs):
                gpus.put(i % gpu_count)
        died: list[Subject] = []
        broken = False
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker,
                                 initargs=(settings.model, device, settings.registration, threads, gpus)) as pool:
            running: dict[Future, Subject] = {}
            try:
                while (pending or running) and not broken:
                    while pending and len(running) < jobs and not suspects & {s.key for s in running.values()}:
                        if pending[0].key in suspects and running:
                            break  # a suspect is worked on alone
                        try:
                            future = pool.submit(_work, (pending[0], out_root, settings, key, links))
                        except BrokenProcessPool:  # a worker died between scans (idle): rebuild, nobody to blame
                            broken = True
                            break
                        running[future] = pending.pop(0)
                    if not running:
                        continue
                    done = wait(running, return_when=FIRST_COMPLETED).done
                    if any(isinstance(f.exception(), BrokenProcessPool) for f in done):
                        broken, done = True, wait(running).done  # every scan handed out ends now
                    for future in sorted(done, key=lambda f: running[f].key):
                        subject = running.pop(future)
                        if isinstance(future.exception(), BrokenProcessPool):
                            died.append(subject)
                            continue
                        try:
                            record = future.result()
                        except Exception as exc:  # e.g. a record that could not be sent back
                            record = Record(subject.key, "failed", f"worker process failed: {type(exc).__name__}: "
                                            f"{exc}", str(subject.image))
                        save_record(out_root, record)
                        yield record
            except BaseException:  # Ctrl-C, SIGTERM, or a record that cannot be written: stop the workers
                # the scans started and not finished, taken before the workers stop (which ends every future)
                unfinished = [s for f, s in running.items() if not f.done()]
                stop_workers(pool)
                _save_cancelled(out_root, unfinished)
                raise
        if len(died) == 1 and died[0].key in suspects:  # it died again, alone: it is the one
            record = died_record(died[0], out_root, key, links)
            save_record(out_root, record)
            yield record
        elif died:
            suspects.update(s.key for s in died)
            pending[:0] = died


STOP_WAIT_S = 30.0  # seconds a terminated worker has to end (remove its temporary files) before it is killed


def stop_workers(pool) -> None:
    """Cancel what ``pool`` (a ``ProcessPoolExecutor``) has not started and end its worker processes. Ctrl-C reaches
    the workers through the process group, SIGTERM only this process: it is passed on (the workers treat it as
    Ctrl-C and remove their temporary files). The executor has no public handle on its processes; ``_processes``
    is CPython's (present since 3.2), read before ``shutdown``, which sets it to None."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    # and wait until they have ended: the executor, shut down without waiting, no longer joins them, so the batch
    # could report (and exit) while a worker was still removing its temporary files or finishing a write. One wait
    # for all (not STOP_WAIT_S each: --jobs 8 workers stuck in a long native call would hold Ctrl-C for 4 minutes)
    _join_all(processes, STOP_WAIT_S)
    stuck = [process for process in processes if process.is_alive()]
    for process in stuck:
        process.kill()
    _join_all(stuck, STOP_WAIT_S)


def _join_all(processes: Sequence[Any], seconds: float) -> None:
    """Join ``processes`` until they have ended or, together, ``seconds`` have passed."""
    deadline = time.monotonic() + seconds
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))


def _save_cancelled(out_root: Path, subjects: Sequence[Subject]) -> None:
    """Record ``subjects`` as cancelled, as far as the disk allows (an interrupt must not turn into an error)."""
    for subject in subjects:
        try:
            save_record(out_root, cancelled_record(subject, out_root))
        except OutputError:
            return
