"""Finding the scans of a batch and their lesion masks: a BIDS dataset, a plain folder, or a CSV of pairs.

BIDS: every ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``. Its mask is looked up in the mask root (``--masks``;
default: the dataset itself and each ``derivatives/*`` folder) in the same ``sub-*/[ses-*/]anat`` folder as
``<entities>_label-lesion_mask``, ``<entities>_desc-lesion_mask`` or ``<entities>_label-lesion_roi``, where
``<entities>`` is the T1w file name without ``_T1w`` (e.g. ``sub-01_ses-1_run-1``); without one of these, a name
with the scan's entities (in any order) plus entities that derivatives add (``DERIVED_ENTITIES``: ``space``,
``desc``, ...), e.g. ``sub-01_run-1_space-orig_label-lesion_mask`` or ``sub-01_label-lesion_desc-manual_mask``.
Several such names are a guess, refused for that scan. ``--mask-pattern`` replaces that rule with a path template
(relative to the mask root; ``*`` wildcards allowed) using ``{sub}``, ``{ses}``, ``{entities}`` and ``{anat}``
(the scan's folder relative to the dataset). A mask that is a link to nothing (a DataLad / git-annex file not
fetched) fails its scan with a reason of its own (``unfetched``), rather than making it a scan without a mask.

Plain folder: every NIfTI/MGZ/NRRD file that is not itself a mask; its mask is ``<name>_mask`` or
``<name>_lesion`` (same extensions) in the mask folder (default: the same folder).
CSV: a header row with ``image`` and ``mask`` (and optionally ``id``); relative paths are relative to the CSV.
"""
from __future__ import annotations

import csv
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from USBLib.errors import InputError
from USBLib.imaging.io import suffix_of

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd", ".nhdr")  # every input format `usb` reads
BIDS_MASK_SUFFIXES = ("_label-lesion_mask", "_desc-lesion_mask", "_label-lesion_roi")
PLAIN_MASK_SUFFIXES = ("_mask", "_lesion")
_T1W = re.compile(r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
_BIDS_MASK = re.compile(r"^(?P<entities>[a-zA-Z]+-[A-Za-z0-9]+(?:_[a-zA-Z]+-[A-Za-z0-9]+)*)_(?P<suffix>mask|roi)"
                        r"\.nii(?:\.gz)?$")
_DESC = re.compile(r"desc-[A-Za-z0-9]+")
# entities a derivative adds to its source's (BIDS derivatives: common, imaging and segmentation entities)
DERIVED_ENTITIES = frozenset({"space", "res", "den", "label", "desc", "atlas", "roi", "seg", "hemi", "model"})


@dataclass(frozen=True)
class Subject:
    """One scan to heal: where it is, its mask (None when none was found) and where its output goes."""

    key: str  # unique in the batch, e.g. "sub-01_ses-1" (the BIDS entities) or the file name's stem
    image: Path
    mask: Optional[Path]
    out_dir: Path  # relative to the derivatives root, e.g. sub-01/ses-1/anat
    participant: str = ""  # BIDS subject label without "sub-"
    problem: str = ""  # why this subject cannot run (e.g. two masks match), recorded as its failure

    @property
    def output_name(self) -> str:
        """``<key>_desc-healed_T1w.nii.gz``; a key that has a ``desc`` entity already (fMRIPrep's
        ``sub-01_desc-preproc``) gets ``healed`` added to its value in place (``sub-01_desc-preprochealed_T1w``):
        BIDS allows one ``desc`` per name."""
        parts = self.key.split("_")
        desc = next((i for i, part in enumerate(parts) if _DESC.fullmatch(part)), None)
        if desc is None:
            return f"{self.key}_desc-healed_T1w.nii.gz"
        parts[desc] += "healed"
        return "_".join(parts) + "_T1w.nii.gz"


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))] if suffix_of(path) else path.stem


def _one(matches: list[Path], what: str) -> Optional[Path]:
    matches = sorted(set(matches))
    if len(matches) > 1:
        raise InputError(f"several masks match {what}: {', '.join(m.name for m in matches)}; keep one, or name it "
                         "with --mask-pattern")
    return matches[0] if matches else None


def unfetched(path: Path) -> bool:
    """True for a link to nothing: a DataLad / git-annex file whose content was not fetched (``datalad get``)."""
    return path.is_symlink() and not path.exists()


def unfetched_problem(path: Path, what: str = "mask") -> str:
    """The failure reason of a scan whose ``what`` (mask or image) is ``unfetched``."""
    return f"{what} not fetched (broken link): {path}; datalad get it"


def _present(path: Path) -> bool:
    """A file, or a link to a file not fetched yet (reported as such rather than passed over)."""
    return path.is_file() or unfetched(path)


def _entities(text: str) -> Optional[dict[str, str]]:
    """``sub-01_ses-1`` as ``{"sub": "01", "ses": "1"}``; None when an entity appears twice."""
    pairs = [part.split("-", 1) for part in text.split("_")]
    found = {k: v for k, v in pairs}
    return found if len(found) == len(pairs) else None


def _lesion_mask_extras(name: str, scan: dict[str, str]) -> Optional[frozenset[str]]:
    """When ``name`` is a lesion mask of the scan whose entities are ``scan``: the entities it has beyond the scan's
    and beyond the one that marks it as a lesion mask (``label-lesion``; ``desc-lesion`` of a ``_mask`` without a
    label), which must all be ``DERIVED_ENTITIES`` (empty for the accepted ``BIDS_MASK_SUFFIXES`` names); else None."""
    match = _BIDS_MASK.match(name)
    mask = _entities(match["entities"]) if match else None
    if mask is None or any(mask.get(k) != v for k, v in scan.items()):
        return None
    if mask.get("label") == "lesion":
        marker = "label"
    elif match["suffix"] == "mask" and mask.get("desc") == "lesion" and "label" not in mask:
        marker = "desc"
    else:
        return None
    extras = frozenset(mask) - frozenset(scan) - {marker}
    return extras if extras <= DERIVED_ENTITIES else None


def _bids_candidates(folder: Path, entities: str) -> list[Path]:
    """The lesion masks of the scan ``entities`` in ``folder``: those with the accepted names when there are any,
    else every mask with the scan's entities plus derived ones (``_lesion_mask_extras``)."""
    scan = _entities(entities)
    if scan is None:  # a name with an entity twice matches no mask (an empty dict would match every one)
        return []
    exact: list[Path] = []
    extended: list[Path] = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        extras = _lesion_mask_extras(path.name, scan)
        if extras is not None and _present(path):
            (extended if extras else exact).append(path)
    return exact or extended


PATTERN_FIELDS = ("sub", "ses", "entities", "anat")


def check_mask_pattern(pattern: Optional[str]) -> None:
    """Refuse a ``--mask-pattern`` that names a field other than ``PATTERN_FIELDS``, does not parse, or is not
    relative to the mask folder, with a one-line ``InputError``."""
    if pattern is None:
        return
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as exc:
        raise InputError(f"--mask-pattern '{pattern}': {exc}") from None
    unknown = sorted(fields - set(PATTERN_FIELDS))
    if unknown:
        raise InputError(f"--mask-pattern '{pattern}': unknown field {{{unknown[0]}}}; use "
                         + ", ".join("{" + f + "}" for f in PATTERN_FIELDS))
    if Path(pattern).is_absolute() or Path(pattern).anchor:
        raise InputError(f"--mask-pattern '{pattern}' must be relative to the mask folder (--masks)")


def _glob(folder: Path, pattern: str) -> list[Path]:
    """The files ``pattern`` names under ``folder``, links to files not fetched included (a pattern without
    wildcards is looked up directly: ``Path.glob`` passes over a link to nothing there)."""
    if not any(c in pattern for c in "*?["):
        return [folder / pattern] if _present(folder / pattern) else []
    return [p for p in folder.glob(pattern) if _present(p) and not p.name.startswith(".")]  # (not macOS's ._x)


def lies_under(path: Path, folders: Sequence[Path]) -> bool:
    """True when ``path`` lies in one of ``folders`` (compared as written and with links followed)."""
    spelled = Path(os.path.abspath(path))
    if any(spelled.is_relative_to(os.path.abspath(folder)) for folder in folders):
        return True
    try:
        return any(path.resolve().is_relative_to(folder.resolve()) for folder in folders)
    except (OSError, RuntimeError):  # a link loop
        return False


def _same_file(a: Path, b: Path) -> bool:
    """True when ``a`` and ``b`` are one file (as written, or with links followed)."""
    if os.path.abspath(a) == os.path.abspath(b):
        return True
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a link loop
        return False


def _bids_mask(root: Path, image: Path, entities: str, mask_roots: Sequence[Path],
               pattern: Optional[str], exclude: Sequence[Path] = ()) -> Optional[Path]:
    """The scan's mask: in the first mask root that has one (two there: ``InputError``); ``InputError`` too when
    several mask roots have different ones (which would be a guess). One file found from two roots (a ``**``
    pattern from the dataset reaches into ``derivatives/*``) is one mask; files under ``exclude`` (the output
    folder) are never masks."""
    anat = image.parent.relative_to(root)
    hits: list[tuple[Path, Path]] = []  # (mask root, its match)
    for mask_root in mask_roots:
        if pattern:
            sub = entities.split("_")[0][4:]
            ses = next((e[4:] for e in entities.split("_") if e.startswith("ses-")), "")
            found = _glob(mask_root, pattern.format(sub=sub, ses=ses, entities=entities, anat=anat.as_posix()))
        else:
            found = _bids_candidates(mask_root / anat, entities)
        found = [path for path in found if not lies_under(path, exclude)]
        if found:
            match = _one(found, image.name)
            if all(not _same_file(match, earlier) for _, earlier in hits):
                hits.append((mask_root, match))
    if len(hits) > 1:
        raise InputError(f"several masks match {image.name}, in " + ", ".join(str(r) for r, _ in hits)
                         + "; choose the folder with --masks")
    return hits[0][1] if hits else None


def _bids(root: Path, masks: Optional[Path], pattern: Optional[str], exclude: Sequence[Path]) -> list[Subject]:
    excluded = [e.resolve() for e in exclude]
    mask_roots = [masks] if masks else [root] + sorted(d for d in (root / "derivatives").glob("*")
                                                       if d.is_dir() and d.resolve() not in excluded)
    subjects = []
    for image in sorted(list(root.glob("sub-*/anat/*_T1w.nii*")) + list(root.glob("sub-*/ses-*/anat/*_T1w.nii*"))):
        match = _T1W.match(image.name)
        if not match:
            continue
        entities = match["entities"]
        try:
            mask, problem = _bids_mask(root, image, entities, mask_roots, pattern, exclude), ""
        except InputError as exc:
            mask, problem = None, str(exc)
        problem = _unfetched_problem(image, mask) or problem
        subjects.append(Subject(entities, image, mask, image.parent.relative_to(root), entities.split("_")[0][4:],
                                problem))
    return subjects


def _unfetched_problem(image: Path, mask: Optional[Path]) -> str:
    """The failure reason of a scan whose image or mask is a link to nothing (not fetched), else ""."""
    if unfetched(image):
        return unfetched_problem(image, "image")
    return unfetched_problem(mask) if mask is not None and unfetched(mask) else ""


def _is_image(path: Path) -> bool:
    """An image file of a plain folder, or a link to one not fetched yet (which then fails its scan, as documented)."""
    return _present(path) and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


_PLAIN_MASK_ENDINGS = frozenset(s + x for s in PLAIN_MASK_SUFFIXES for x in IMAGE_SUFFIXES)


def _plain(folder: Path, masks: Optional[Path], pattern: Optional[str]) -> list[Subject]:
    """The scans of a plain folder. Hidden files (macOS's ``._scan.nii`` beside ``scan.nii``) are not scans; a
    mask is ``<stem>_mask`` or ``<stem>_lesion`` with an image suffix in any case (``P01_mask.NII.GZ``), as the
    scans' suffixes are."""
    mask_dir = masks or folder
    names = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and _is_image(p)]
    images = [p for p in names
              if not any(_stem(p).lower().endswith(s.lower()) for s in PLAIN_MASK_SUFFIXES + BIDS_MASK_SUFFIXES)]
    in_mask_dir = [p for p in sorted(mask_dir.iterdir()) if not p.name.startswith(".") and _present(p)]
    subjects = []
    for image in images:
        stem = _stem(image)
        if pattern:
            candidates = _glob(mask_dir, pattern.format(sub=stem, ses="", entities=stem, anat="."))
        else:
            candidates = [p for p in in_mask_dir
                          if p.name.startswith(stem) and p.name[len(stem):].lower() in _PLAIN_MASK_ENDINGS]
        try:
            mask, problem = _one(candidates, image.name), ""
        except InputError as exc:
            mask, problem = None, str(exc)
        problem = _unfetched_problem(image, mask) or problem
        subjects.append(Subject(stem, image, mask, Path("."), problem=problem))
    return subjects


def _csv_path(csv_file: Path, cell: str) -> Path:
    """A CSV cell's path: ``~`` expanded, relative to the CSV's folder, made absolute without following links (a
    DataLad file is a link into the annex; not fetched: to nothing)."""
    return Path(os.path.abspath(csv_file.parent / os.path.expanduser(cell.strip())))


def _csv(path: Path) -> list[Subject]:
    """The CSV's rows as subjects; its header names are read without surrounding spaces (``image, mask``) and a
    spreadsheet's byte-order mark is skipped. An ``id`` names the output file, so it may not be a path. Errors
    name the row's line in the file (``path:line``; blank lines count)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [(reader.line_num, {(k or "").strip().lower(): v for k, v in row.items()}) for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows or not {"image", "mask"} <= set(rows[0][1]):
        raise InputError(f"{path}: a CSV of scans needs a header row with 'image' and 'mask' columns")
    subjects, keys = [], set()
    for n, row in rows:
        if not (row.get("image") or "").strip():
            raise InputError(f"{path}:{n}: empty 'image'")
        image = _csv_path(path, row["image"])
        mask = _csv_path(path, row["mask"]) if (row.get("mask") or "").strip() else None
        try:
            suffix_of(image)
        except InputError as exc:
            raise InputError(f"{path}:{n}: {exc}") from None
        key = (row.get("id") or "").strip() or _stem(image)
        if "/" in key or "\\" in key or key.startswith("."):
            raise InputError(f"{path}:{n}: id '{key}' is a path; an id names the output file (no '/', '\\' or "
                             "leading '.')")
        if key in keys:
            raise InputError(f"{path}:{n}: '{key}' appears twice; give each row a unique 'id'")
        keys.add(key)
        subjects.append(Subject(key, image, mask, Path("."), problem=_unfetched_problem(image, mask)))
    return subjects


def _unique_keys(subjects: Sequence[Subject]) -> None:
    """Refuse two scans with one key (``scan.nii`` beside ``scan.nii.gz``): they would share one output."""
    seen: dict[str, Path] = {}
    for subject in subjects:
        if subject.key in seen:
            raise InputError(f"two scans would write one output '{subject.key}': {seen[subject.key]} and "
                             f"{subject.image}; keep one of them")
        seen[subject.key] = subject.image


def is_bids(source: Path) -> bool:
    """True when the folder ``source`` is read as a BIDS dataset: it has a ``dataset_description.json`` or a
    ``sub-*`` folder (a flat folder of ``sub-*`` files is a plain folder of scans)."""
    return source.is_dir() and ((source / "dataset_description.json").is_file()
                                or any(p.is_dir() for p in source.glob("sub-*")))


def find_subjects(source: Path, masks: Optional[Path] = None, mask_pattern: Optional[str] = None,
                  participants: Sequence[str] = (), exclude: Sequence[Path] = ()) -> list[Subject]:
    """The batch's scans (sorted by key) from a BIDS dataset, a plain folder or a CSV file."""
    source = Path(source)
    if not source.exists():
        raise InputError(f"{source}: no such file or folder")
    if masks is not None and not Path(masks).is_dir():
        raise InputError(f"{masks}: the mask folder does not exist")
    check_mask_pattern(mask_pattern)
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise InputError(f"{source}: give a BIDS dataset, a folder of scans or a .csv of image,mask pairs")
        subjects = _csv(source)
    elif is_bids(source):
        subjects = _bids(source, masks, mask_pattern, exclude)
    else:
        subjects = _plain(source, masks, mask_pattern)
    _unique_keys(subjects)
    if participants:
        wanted = {p[4:] if p.startswith("sub-") else p for p in participants}
        subjects = [s for s in subjects if (s.participant or s.key) in wanted]
        missing = sorted(wanted - {s.participant or s.key for s in subjects})
        if subjects and missing:  # (none found at all: the message below)
            raise InputError(f"{source}: no T1w scans for participant label(s) {', '.join(missing)}")
    if not subjects:
        raise InputError(f"{source}: no T1w scans found"
                         + (" for the given participant labels" if participants else ""))
    return sorted(subjects, key=lambda s: s.key)


def shard(subjects: Sequence[Subject], spec: str) -> list[Subject]:
    """The part ``i/n`` (1-based) of the sorted subject list: every n-th subject, starting at the i-th."""
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise InputError(f"--shard must look like i/n with 1 <= i <= n (e.g. 3/10), got '{spec}'")
    i, n = int(match[1]), int(match[2])
    return list(subjects)[i - 1::n]
