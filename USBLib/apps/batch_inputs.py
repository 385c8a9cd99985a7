"""Finding the scans of a batch and their lesion masks: a BIDS dataset, a plain folder, or a CSV of pairs.

BIDS: every ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``. Its mask is looked up in the mask root (``--masks``;
default: the dataset itself and each ``derivatives/*`` folder) in the same ``sub-*/[ses-*/]anat`` folder as
``<entities>_label-lesion_mask``, ``<entities>_desc-lesion_mask`` or ``<entities>_label-lesion_roi``, where
``<entities>`` is the T1w file name without ``_T1w`` (e.g. ``sub-01_ses-1_run-1``). ``--mask-pattern`` replaces
that rule with a path template (relative to the mask root; ``*`` wildcards allowed) using ``{sub}``, ``{ses}``,
``{entities}`` and ``{anat}`` (the scan's folder relative to the dataset).

Plain folder: every NIfTI/MGZ/NRRD file that is not itself a mask; its mask is ``<name>_mask`` or
``<name>_lesion`` (same extensions) in the mask folder (default: the same folder).
CSV: a header row with ``image`` and ``mask`` (and optionally ``id``); relative paths are relative to the CSV.
"""
from __future__ import annotations

import csv
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from USBLib.errors import InputError
from USBLib.imaging.io import suffix_of

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz", ".mgh", ".nrrd")
BIDS_MASK_SUFFIXES = ("_label-lesion_mask", "_desc-lesion_mask", "_label-lesion_roi")
PLAIN_MASK_SUFFIXES = ("_mask", "_lesion")
_T1W = re.compile(r"^(?P<entities>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")


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
        return f"{self.key}_desc-healed_T1w.nii.gz"


def _stem(path: Path) -> str:
    return path.name[: -len(suffix_of(path))] if suffix_of(path) else path.stem


def _one(matches: list[Path], what: str) -> Optional[Path]:
    matches = sorted(set(matches))
    if len(matches) > 1:
        raise InputError(f"several masks match {what}: {', '.join(m.name for m in matches)}")
    return matches[0] if matches else None


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


def _bids_mask(root: Path, image: Path, entities: str, mask_roots: Sequence[Path], pattern: Optional[str]) -> Optional[Path]:
    """The scan's mask: in the first mask root that has one (two there: ``InputError``); ``InputError`` too when
    several mask roots have one (which would be a guess)."""
    anat = image.parent.relative_to(root)
    hits: list[tuple[Path, Path]] = []  # (mask root, its match)
    for mask_root in mask_roots:
        found: list[Path] = []
        if pattern:
            sub = entities.split("_")[0][4:]
            ses = next((e[4:] for e in entities.split("_") if e.startswith("ses-")), "")
            rel = pattern.format(sub=sub, ses=ses, entities=entities, anat=anat.as_posix())
            found += [p for p in mask_root.glob(rel) if p.is_file()]
        else:
            folder = mask_root / anat
            found += [folder / f"{entities}{s}{x}" for s in BIDS_MASK_SUFFIXES for x in (".nii.gz", ".nii")
                      if (folder / f"{entities}{s}{x}").is_file()]
        if found:
            hits.append((mask_root, _one(found, image.name)))
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
            mask, problem = _bids_mask(root, image, entities, mask_roots, pattern), ""
        except InputError as exc:
            mask, problem = None, str(exc)
        subjects.append(Subject(entities, image, mask, image.parent.relative_to(root), entities.split("_")[0][4:],
                                problem))
    return subjects


def _is_image(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in IMAGE_SUFFIXES)


def _plain(folder: Path, masks: Optional[Path], pattern: Optional[str]) -> list[Subject]:
    mask_dir = masks or folder
    names = [p for p in sorted(folder.iterdir()) if _is_image(p)]
    images = [p for p in names if not any(_stem(p).endswith(s) for s in PLAIN_MASK_SUFFIXES + BIDS_MASK_SUFFIXES)]
    subjects = []
    for image in images:
        stem = _stem(image)
        if pattern:
            candidates = [p for p in mask_dir.glob(pattern.format(sub=stem, ses="", entities=stem, anat=".")) if p.is_file()]
        else:
            candidates = [mask_dir / f"{stem}{s}{x}" for s in PLAIN_MASK_SUFFIXES for x in IMAGE_SUFFIXES
                          if (mask_dir / f"{stem}{s}{x}").is_file()]
        try:
            mask, problem = _one(candidates, image.name), ""
        except InputError as exc:
            mask, problem = None, str(exc)
        subjects.append(Subject(stem, image, mask, Path("."), problem=problem))
    return subjects


def _csv(path: Path) -> list[Subject]:
    """The CSV's rows as subjects; its header names are read without surrounding spaces (``image, mask``) and a
    spreadsheet's byte-order mark is skipped. An ``id`` names the output file, so it may not be a path."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [{(k or "").strip().lower(): v for k, v in row.items()} for row in csv.DictReader(f)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: not a readable UTF-8 CSV ({exc})") from None
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise InputError(f"{path}: a CSV of scans needs a header row with 'image' and 'mask' columns")
    subjects, keys = [], set()
    for n, row in enumerate(rows, start=2):
        if not (row.get("image") or "").strip():
            raise InputError(f"{path}:{n}: empty 'image'")
        image = (path.parent / row["image"].strip()).resolve()
        mask = (path.parent / row["mask"].strip()).resolve() if (row.get("mask") or "").strip() else None
        key = (row.get("id") or "").strip() or _stem(image)
        if "/" in key or "\\" in key or key.startswith("."):
            raise InputError(f"{path}:{n}: id '{key}' is a path; an id names the output file (no '/', '\\' or "
                             "leading '.')")
        if key in keys:
            raise InputError(f"{path}:{n}: '{key}' appears twice; give each row a unique 'id'")
        keys.add(key)
        subjects.append(Subject(key, image, mask, Path(".")))
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
        raise InputError(f"{source}: no T1w scans found" + (" for the given participant labels" if participants else ""))
    return sorted(subjects, key=lambda s: s.key)


def shard(subjects: Sequence[Subject], spec: str) -> list[Subject]:
    """The part ``i/n`` (1-based) of the sorted subject list: every n-th subject, starting at the i-th."""
    match = re.fullmatch(r"(\d+)/(\d+)", spec.strip())
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        raise InputError(f"--shard must look like i/n with 1 <= i <= n (e.g. 3/10), got '{spec}'")
    i, n = int(match[1]), int(match[2])
    return list(subjects)[i - 1::n]
