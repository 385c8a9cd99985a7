"""Data shipped inside the package (wheel, sdist, Slicer extension): the sample scan and its lesion masks.

The sample is made from nilearn's MNI152 2009a template by ``python -m usb_training.data.sample`` (see its
docstring); it is a demo input, not evaluation data.
"""
from __future__ import annotations

from pathlib import Path

from USBLib.errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"
SAMPLE_IMAGE = "sample_T1w.nii.gz"
SAMPLE_LESION = "sample_lesion_mask.nii.gz"
SAMPLE_EMBED = "sample_embed_mask.nii.gz"


def sample_files(folder: Path = SAMPLE_DIR) -> dict[str, Path]:
    """Paths of the sample scan, its lesion mask and the mask to embed; an ``InputError`` names what is missing."""
    files = {"image": folder / SAMPLE_IMAGE, "lesion": folder / SAMPLE_LESION, "embed": folder / SAMPLE_EMBED}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"sample data missing: {', '.join(missing)}")
    return files
