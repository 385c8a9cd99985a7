"""Native-space evaluation and validation cases: a whole scan with one lesion, as a user would bring it.

A case is a healthy brain from one source put onto an oblique 1 mm scanner grid (random rotation up to 10 deg
and shift), with one synthetic lesion at a chosen site whose darkening reaches past the drawn mask (soft
partial-volume edge; the drawn mask is the 0.5 iso-surface), the same bias field / gamma / Rician noise on the
healthy and lesioned versions, stored as int16 scanner units like a real scan. The lesion-free scan is the
ground truth for healing; the lesioned one is the generator's reference lesion for embedding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..data.prepare import CSF, GM, WM, Anatomy
from .crops import _NoLesion, _artefacts, paint_lesion

SITES = ("deep_wm", "periventricular", "juxtacortical", "thalamus", "cerebellum", "large")
SHAPE = (176, 208, 176)
UNITS = 1000.0  # model unit -> scanner units


@dataclass
class NativeCase:
    """One scan (int16-valued float32 arrays on ``affine``'s grid) with its truth."""

    name: str
    site: str
    healthy: np.ndarray
    lesioned: np.ndarray
    mask: np.ndarray     # drawn mask, uint8
    soft: np.ndarray     # true lesion extent in [0, 1]
    brain: np.ndarray    # uint8
    labels: np.ndarray   # tissue classes (prepare.CSF/GM/WM/DEEP_GM)
    affine: np.ndarray


def _site_pool(labels: np.ndarray, brain: np.ndarray, ras: np.ndarray, site: str) -> np.ndarray:
    wm, gm = labels == WM, labels == GM
    depth = ndimage.distance_transform_edt(brain)
    if site == "periventricular":
        ventricles = (labels == CSF) & (depth > 15)
        pool = wm & (ndimage.distance_transform_edt(~ventricles) <= 4) if ventricles.any() else wm & (depth > 20)
    elif site == "juxtacortical":
        pool = wm & ndimage.binary_dilation(gm, iterations=2) & (depth > 6) & (ras[..., 2] > 0)
    elif site == "thalamus":  # deep grey matter next to the third ventricle: central, GM-like, deep
        pool = (gm | (labels == 4)) & (depth > 25) & (np.abs(ras[..., 0]) < 18) & (np.abs(ras[..., 2]) < 15)
    elif site == "cerebellum":
        pool = (gm | wm) & (ras[..., 2] < -25) & (ras[..., 1] < -45) & (depth > 6)
    elif site == "large":
        pool = wm & (depth > 18) & (ras[..., 2] > 5)
    else:
        pool = wm & (depth > 10) & ~(ndimage.binary_dilation(labels == CSF, iterations=4))
    return pool if pool.any() else wm & (depth > 10)


def native_case(anatomy: Anatomy, anatomy_affine: np.ndarray, site: str, seed: int, shape=SHAPE) -> NativeCase:
    """A scan of ``anatomy`` with one lesion at ``site`` (see module docstring); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    rot = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    com = np.array(ndimage.center_of_mass(anatomy.brain > 0))
    centre_ras = (anatomy_affine @ np.append(com, 1.0))[:3] + rng.uniform(-4, 4, 3)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre_ras - rot @ ((np.asarray(shape) - 1) / 2.0)
    to_anat = np.linalg.inv(anatomy_affine) @ affine
    sample = lambda a, order: ndimage.affine_transform(a.astype(np.float32), to_anat[:3, :3], to_anat[:3, 3],  # noqa: E731
                                                       output_shape=shape, order=order)
    brain = sample(anatomy.brain, 1) > 0.5
    image = np.clip(sample(anatomy.image, 1), 0, None)
    labels = sample(anatomy.labels, 0).astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    ras = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    pool = np.flatnonzero(_site_pool(labels, brain, ras, site))
    size = 80 if site == "large" else 64
    for _ in range(30):
        centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], shape))
        lo = np.clip(centre - size // 2, 0, np.asarray(shape) - size)
        box = tuple(slice(a, a + size) for a in lo)
        try:
            soft_b, _, dev_b = paint_lesion(image[box], labels[box], (centre - lo).astype(np.float32),
                                            "large" if site == "large" else
                                            "periventricular" if site == "periventricular" else "deep_wm",
                                            rng, max_fraction=0.12)
        except _NoLesion:
            continue
        if soft_b[soft_b.shape[0] // 2 - 12:soft_b.shape[0] // 2 + 12].max() > 0 and (soft_b >= 0.5).sum() >= 8:
            break
    else:
        raise RuntimeError(f"no {site} lesion could be placed")
    soft = np.zeros(shape, np.float32)
    deviation = np.zeros(shape, np.float32)
    soft[box], deviation[box] = soft_b, dev_b
    healthy, lesioned = _artefacts([image, np.clip(image + deviation, 0, None)], brain.astype(np.float32), rng)
    healthy, lesioned = (np.clip(np.rint(x * UNITS), 0, 32767).astype(np.float32) for x in (healthy, lesioned))
    mask = (soft >= 0.5).astype(np.uint8)
    return NativeCase(f"{anatomy.name}-{site}-{seed}", site, healthy, lesioned, mask, soft,
                      brain.astype(np.uint8), labels, affine)


def native_cases(anatomy: Anatomy, anatomy_affine: np.ndarray, per_site: int, seed: int,
                 sites=SITES) -> list[NativeCase]:
    """``per_site`` cases at each site, seeds ``seed``, ``seed + 1``, ..."""
    return [native_case(anatomy, anatomy_affine, site, seed + i * len(sites) + j)
            for i in range(per_site) for j, site in enumerate(sites)]
