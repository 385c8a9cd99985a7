"""Bring every template source into model space: T1 image, brain mask and a tissue-class map on the model grid.

fsaverage's T1 is a very blurred average: it is used for its aseg labels only (label-driven contrast, see
``anatomy.LABELS_ONLY``). Classes: 0 background, 1 CSF, 2 cortical/cerebellar grey matter, 3 white matter (incl. brainstem), 4 deep grey
matter. MNI sources are already in MNI152 space (identity map); fsaverage (MNI305) and IXI555 are registered to
the model template with USBLib's affine registration. Images are normalised like inference does (99th
percentile inside the brain = 1).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from USBLib.imaging.intensity import IntensityMap
from USBLib.imaging.spatial import SpaceMapping, register

from ..base.config import INTENSITY, grid_affine
from .sources import SOURCES, fetch

CSF, GM, WM, DEEP_GM = 1, 2, 3, 4
CLASS_NAMES = {CSF: "CSF", GM: "grey matter", WM: "white matter", DEEP_GM: "deep grey matter"}
ASEG_CLASSES = {
    WM: (2, 41, 7, 46, 16, 28, 60, 77, 85, 251, 252, 253, 254, 255),
    GM: (3, 42, 8, 47, 17, 53, 18, 54),
    CSF: (4, 5, 14, 15, 24, 43, 44, 31, 63),
    DEEP_GM: (10, 11, 12, 13, 26, 49, 50, 51, 52, 58),
}


@dataclass
class Anatomy:
    """One healthy brain on the model grid: normalised T1 (0 outside the brain), brain mask, tissue classes."""

    name: str
    image: np.ndarray
    brain: np.ndarray
    labels: np.ndarray

    def save(self, path: Path) -> None:
        np.savez_compressed(path, image=self.image.astype(np.float32), brain=self.brain.astype(np.uint8),
                            labels=self.labels.astype(np.uint8))

    @classmethod
    def load(cls, path: Path) -> "Anatomy":
        with np.load(path) as z:
            return cls(Path(path).stem, z["image"], z["brain"], z["labels"])


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj, dtype=np.float32), img.affine.astype(np.float64)


def _classes_from_tissue(csf: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    labels = (np.argmax(np.stack([csf, gm, wm]), axis=0) + 1).astype(np.uint8)
    return labels * brain.astype(np.uint8)


def _clean_brain(mask: np.ndarray) -> np.ndarray:
    mask = ndimage.binary_closing(mask, iterations=2)
    lab, n = ndimage.label(mask)
    if n > 1:
        mask = lab == (np.argmax(np.bincount(lab.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(mask)


def _native(name: str, paths: dict[str, Path]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """image, brain and labels arrays of one source on their native grids, as (array, affine)."""
    t1, aff = _read(paths["t1"])
    if name == "mni2009a":
        gm, wm = _read(paths["gm"])[0] / 255.0, _read(paths["wm"])[0] / 255.0
        brain = _clean_brain((t1 > 0) & (gm + wm > 0.05) | (gm + wm > 0.5))
        labels = _classes_from_tissue(np.clip(1 - gm - wm, 0, 1), gm, wm, brain)
        return {"image": (t1 * brain, aff), "brain": (brain, aff), "labels": (labels, aff)}
    if name == "mni2009c":
        brain = _read(paths["brain"])[0] > 0.5
        tissue = [_read(paths[k])[0] for k in ("csf", "gm", "wm")]
        labels = _classes_from_tissue(*tissue, brain)
        return {"image": (t1 * brain, aff), "brain": (brain, aff), "labels": (labels, aff)}
    if name == "fsaverage":
        aseg, _ = _read(paths["aseg"])
        labels = np.zeros(aseg.shape, np.uint8)
        for cls, values in ASEG_CLASSES.items():
            labels[np.isin(aseg, values)] = cls
        brain = _clean_brain(labels > 0)  # brain.mgz keeps a wide non-brain rim; aseg does not
        labels[brain & (labels == 0)] = CSF
        return {"image": (t1 * brain, aff), "brain": (brain, aff), "labels": (labels, aff)}
    if name == "ixi555":
        crop = tuple(slice(0, (s // 2) * 2) for s in t1.shape)
        t1 = t1[crop].reshape(t1.shape[0] // 2, 2, t1.shape[1] // 2, 2, t1.shape[2] // 2, 2).mean((1, 3, 5))
        aff = aff @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 2, 0.5], [0, 0, 0, 1.0]])
        tissue, taff = _read(paths["tissue"])
        gm, wm = tissue[..., 0], tissue[..., 1]
        csf = np.clip(1 - gm - wm - tissue[..., 2], 0, 1)
        tbrain = (gm + wm + csf) > 0.5
        return {"image": (t1, aff), "brain": (_clean_brain(t1 > 0.05), aff),
                "labels": (_classes_from_tissue(csf, gm, wm, tbrain), taff)}
    raise KeyError(name)


def model_space(shape, spacing: float, paths: dict[str, Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model template (MNI 2009a T1, brain only, normalised), its brain mask and the grid affine."""
    affine = np.asarray(grid_affine(shape, spacing))
    native = _native("mni2009a", paths)
    anatomy = _to_model(native, np.eye(4), tuple(shape), affine, "mni2009a")
    return anatomy.image, anatomy.brain, affine


def _to_model(native: dict, model_to_native: np.ndarray, shape, affine: np.ndarray, name: str) -> Anatomy:
    def mapped(key: str, order: int) -> np.ndarray:
        data, aff = native[key]
        mapping = SpaceMapping(data.shape, aff, shape, affine, model_to_native)
        return mapping.to_model(data.astype(np.float32), order=order, antialias=order > 0)

    brain = mapped("brain", 1) > 0.5
    image = mapped("image", 1)
    labels = mapped("labels", 0).astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    imap = IntensityMap.fit(image, brain, INTENSITY)
    return Anatomy(name, imap.to_model(image) * brain, brain.astype(np.uint8), labels.astype(np.uint8))


def prepare(cache: Path, shape, spacing: float, seed: int = 0) -> dict[str, Path]:
    """Fetch all sources and write ``<cache>/prepared/<grid>/<source>.npz`` plus the model template and mask."""
    cache = Path(cache)
    tag = f"{'x'.join(str(s) for s in shape)}_{spacing:g}mm"
    out = cache / "prepared" / tag
    ready = {"template": out / "template.nii.gz", "brain_mask": out / "brain_mask.nii.gz",
             **{name: out / f"{name}.npz" for name in SOURCES}}
    if all(p.is_file() for p in ready.values()):  # prepared before (or carried to an offline machine)
        return ready
    paths = fetch(cache)
    out.mkdir(parents=True, exist_ok=True)
    template, brain, affine = model_space(shape, spacing, paths["mni2009a"])
    nib.save(nib.Nifti1Image(template.astype(np.float32), affine), str(out / "template.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(out / "brain_mask.nii.gz"))
    written = {"template": out / "template.nii.gz", "brain_mask": out / "brain_mask.nii.gz"}
    for name in SOURCES:
        target = out / f"{name}.npz"
        if not target.is_file():
            native = _native(name, paths[name])
            transform = np.eye(4)
            if name in ("fsaverage", "ixi555"):
                img, aff = native["image"]
                transform = register(img, aff, template, affine, brain, native["brain"][0].astype(np.uint8),
                                     "affine", seed)
            _to_model(native, transform, tuple(shape), affine, name).save(target)
        written[name] = target
    return written
