"""Template sources at their own ~1 mm resolution (no model-grid resampling): image, brain mask, tissue classes.

MNI sources keep their whole head (scalp and skull are in real scans, so crops near the cortex see them);
fsaverage gives labels only (its T1 is a blurred average); IXI555 (held out) is a skull-stripped 0.5 mm template
averaged to 1 mm. Images are normalised like inference does: the 99th percentile inside the brain = 1.
Cached as ``<cache>/prepared/native1mm/<source>.npz``.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from USBLib.imaging.intensity import IntensityMap

from ..base.config import INTENSITY
from ..data.prepare import CSF, Anatomy, _native
from ..data.sources import fetch


def _on_image_grid(labels: np.ndarray, laff: np.ndarray, shape, aff: np.ndarray) -> np.ndarray:
    vox = np.linalg.inv(laff) @ aff
    return ndimage.affine_transform(labels, vox[:3, :3], vox[:3, 3], output_shape=tuple(shape), order=0)


def native_anatomy(name: str, paths: dict[str, Path]) -> tuple[Anatomy, np.ndarray]:
    """One source on a 1 mm grid, cropped to its head/brain with a 4-voxel border, and the crop's affine."""
    native = _native(name, paths)
    image, aff = native["image"]
    brain = native["brain"][0] > 0
    labels, laff = native["labels"]
    if labels.shape != image.shape or not np.allclose(laff, aff):
        labels = _on_image_grid(labels.astype(np.uint8), laff, image.shape, aff)
    if name in ("mni2009a", "mni2009c"):  # whole head
        image = np.clip(nib.load(str(paths["t1"])).get_fdata(dtype=np.float32), 0, None)
    labels = labels.astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    imap = IntensityMap.fit(image, brain, INTENSITY)
    image = imap.to_model(image)
    head = image > 0.02 if name in ("mni2009a", "mni2009c") else brain
    box = tuple(slice(max(s.start - 4, 0), s.stop + 4) for s in ndimage.find_objects(head.astype(np.uint8))[0])
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in box]
    return Anatomy(name, image[box].astype(np.float32), brain[box].astype(np.uint8), labels[box]), aff @ shift


def native_anatomies(cache: Path, names: list[str]) -> dict[str, Anatomy]:
    """Native 1 mm anatomies of the named sources, prepared once into the cache."""
    out_dir = Path(cache) / "prepared" / "native1mm"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = None
    out = {}
    for name in names:
        target = out_dir / f"{name}.npz"
        if not target.is_file() or "affine" not in np.load(target).files:
            paths = paths or fetch(cache)
            anatomy, affine = native_anatomy(name, paths[name])
            np.savez_compressed(target, image=anatomy.image, brain=anatomy.brain, labels=anatomy.labels,
                                affine=affine)
        out[name] = Anatomy.load(target)
        out[name].name = name
    return out


def native_affine(cache: Path, name: str) -> np.ndarray:
    """Voxel-to-RAS affine of a prepared native anatomy (see ``native_anatomies``)."""
    with np.load(Path(cache) / "prepared" / "native1mm" / f"{name}.npz") as z:
        return z["affine"].astype(np.float64)
