"""Paired crops for the local stage: healthy, lesioned (healthy + deviation) and a drawn mask that, like a real
one, misses or overshoots the partial-volume rim.

One crop: pick a lesion site (deep or periventricular white matter, juxtacortical, deep grey matter, any
tissue, or a large territorial lesion), cut a box around it from a native 1 mm anatomy, flip/permute its axes,
give it the template's contrast (gamma) or a label-driven one, paint a synthetic lesion (shape generators of
``usb_training.data.lesions``, divergence-free deformation, soft edge whose darkening reaches 1-2 voxels past
the 0.5 iso-surface), add the same scanner artefacts to both copies, then perturb the mask the user would draw
(eroded, dilated or shifted by 1-2 voxels). Sizes are in 1 mm voxels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from USBLib.editor.local.conditioning import HEAL, classical_fill, fill_region

from ..data.anatomy import synthesize_contrast
from ..data.lesions import SHAPES, divergence_free_flow
from ..data.pathology import lesion_deviation
from ..data.prepare import CSF, DEEP_GM, GM, WM, Anatomy
from ..data.warp import sampling_coords, warp

SITES = {"deep_wm": 0.25, "periventricular": 0.2, "juxtacortical": 0.2, "deep_gm": 0.08, "any_tissue": 0.15,
         "large": 0.12}
TISSUE = (GM, WM, DEEP_GM)
DILATION_P = {0: 0.15, 1: 0.3, 2: 0.35, 3: 0.2}
VISIBLE_P = 0.85              # share of lesions rescaled to a mean lesion/tissue ratio in VISIBLE_RATIO
VISIBLE_RATIO = (0.5, 0.9)
MAX_LEVEL = 1.5               # model units (the intensity map's clip)


@dataclass
class Crop:
    """One training triplet (model units, 1 mm): float32 images, uint8 masks; ``dilation`` of ``fill``."""

    healthy: np.ndarray
    lesioned: np.ndarray
    mask: np.ndarray      # the drawn (perturbed) mask
    soft: np.ndarray      # the true lesion extent (partial volume), for loss weights and metrics
    fill: np.ndarray      # biharmonic fill of ``lesioned`` over the mask dilated by ``dilation``
    dilation: int
    site: str


def _pool(labels: np.ndarray, brain: np.ndarray, site: str) -> np.ndarray:
    wm, gm = labels == WM, labels == GM
    if site == "periventricular":
        ventricles = (labels == CSF) & ndimage.binary_erosion(brain, iterations=12)
        near = ndimage.distance_transform_edt(~ventricles) <= 5 if ventricles.any() else wm
        pool = wm & near
    elif site == "juxtacortical":
        pool = wm & ndimage.binary_dilation(gm, iterations=2)
    elif site == "deep_gm":
        pool = labels == DEEP_GM
        if not pool.any():
            pool = wm & ndimage.binary_erosion(brain, iterations=20)
    elif site == "any_tissue":
        pool = np.isin(labels, TISSUE)
    else:
        pool = wm & ndimage.binary_erosion(brain, iterations=6)
    return pool if pool.any() else wm


def _box(arr: np.ndarray, start: np.ndarray, size: int) -> np.ndarray:
    out = np.zeros((size,) * 3, arr.dtype)
    src = tuple(slice(max(s, 0), min(s + size, n)) for s, n in zip(start, arr.shape))
    dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, start))
    out[dst] = arr[src]
    return out


def _perturb_mask(binary: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = rng.random()
    out = binary.copy()
    if r < 0.3:
        return out
    steps = int(rng.integers(1, 3))
    if r < 0.55:
        out = ndimage.binary_erosion(binary, iterations=steps)
    elif r < 0.8:
        out = ndimage.binary_dilation(binary, iterations=steps)
    else:
        out = np.roll(binary, int(rng.choice([-steps, steps])), axis=int(rng.integers(3)))
    return out if out.sum() >= 2 else binary.copy()


def _artefacts(images: list[np.ndarray], head: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """The same bias field, gamma, blur and Rician noise on each image (model units, values ~[0, 1.5])."""
    shape = images[0].shape
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    coeff = rng.normal(0, 0.04, (3,))
    bias = np.exp((coeff[:, None, None, None] * grid).sum(0) + rng.normal(0, 0.03) * (grid ** 2).sum(0))
    gamma = float(np.exp(rng.normal(0, 0.1)))
    sigma = rng.uniform(0, 0.8, 3) if rng.random() < 0.4 else None
    noise_std = rng.uniform(0.0, 0.045)
    n1, n2 = rng.standard_normal((2, *shape)).astype(np.float32) * noise_std
    scale = rng.uniform(0.92, 1.08)
    out = []
    for img in images:
        x = np.clip(img, 0, None) ** gamma * bias
        if sigma is not None:
            x = ndimage.gaussian_filter(x, sigma)
        x = np.sqrt((x + n1) ** 2 + n2 ** 2) * np.maximum(head, 0.0) if noise_std > 0 else x * head
        out.append((x * scale).astype(np.float32))
    return out


def paint_lesion(img: np.ndarray, lab: np.ndarray, centre: np.ndarray, site: str, rng: np.random.Generator,
                 max_fraction: float = 0.15) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(soft extent, binary mask, deviation) of one lesion of a ``site``'s kind at ``centre`` (voxels) in a
    tissue image ``img`` with classes ``lab`` (1 mm voxels); ``lesioned = img + deviation``. The deviation
    follows the soft extent, so the darkening reaches 1-2 voxels past the binary mask (soft >= 0.5)."""
    shape = img.shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    tissue = np.isin(lab, TISSUE)
    for _ in range(10):
        if site == "large":
            name, radius = str(rng.choice(["wedge", "blob", "cluster"])), float(rng.uniform(7, 13))
        elif site == "periventricular":
            name, radius = str(rng.choice(["periventricular", "blob"], p=[0.6, 0.4])), float(np.exp(rng.uniform(np.log(2), np.log(9))))
        else:
            name = str(rng.choice(["blob", "cluster"], p=[0.7, 0.3]))
            radius = float(np.exp(rng.uniform(np.log(1.5), np.log(12))))
        raw = SHAPES[name](grid, centre, radius, lab, rng)
        if not raw.any():
            continue
        flow = divergence_free_flow(shape, rng, rng.uniform(0.3, 1.0) * min(4.0, 0.5 * radius + 1), 8)
        moved = warp(raw.astype(np.float32), sampling_coords(shape, None, flow))
        soft = np.clip(ndimage.gaussian_filter(moved, rng.uniform(0.5, 1.5)), 0, 1)
        soft *= ndimage.gaussian_filter(tissue.astype(np.float32), 0.7)
        binary = soft >= 0.5
        if 3 <= binary.sum() <= max_fraction * binary.size:
            break
    else:
        raise _NoLesion()
    deviation = lesion_deviation(img, soft, binary, lab, rng)
    if rng.random() < VISIBLE_P:  # T1-hypointense lesions are 10-50 % darker than the tissue they replace
        ratio = float(np.mean((img + deviation)[binary]) / max(float(np.mean(img[binary])), 1e-6))
        want = rng.uniform(*VISIBLE_RATIO)
        if ratio < 0.97:  # rescale a real darkening only, and by a bounded factor
            deviation *= float(np.clip((1.0 - want) / (1.0 - ratio), 0.3, 3.0))
    deviation = np.clip(deviation, -img, MAX_LEVEL - img)  # lesioned stays within [0, MAX_LEVEL]
    return soft.astype(np.float32), binary, deviation.astype(np.float32)


def make_crop(anatomy: Anatomy, rng: np.random.Generator, size: int = 48) -> Crop:
    """One random triplet from one anatomy (see the module docstring); a new site is drawn when no lesion fits."""
    for _ in range(20):
        try:
            return _make_crop(anatomy, rng, size)
        except _NoLesion:
            continue
    raise RuntimeError(f"no lesion could be placed in {anatomy.name}")


class _NoLesion(Exception):
    pass


def _make_crop(anatomy: Anatomy, rng: np.random.Generator, size: int) -> Crop:
    site = str(rng.choice(list(SITES), p=list(SITES.values())))
    labels, brain = anatomy.labels, anatomy.brain > 0
    pool = np.flatnonzero(_pool(labels, brain, site))
    centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], labels.shape))
    offset = rng.integers(-6, 7, 3) if site != "large" else rng.integers(-3, 4, 3)
    start = centre - size // 2 + offset
    img, br, lab = (_box(a, start, size) for a in (anatomy.image, anatomy.brain, anatomy.labels))
    for axis in range(3):
        if rng.random() < 0.5:
            img, br, lab = (np.flip(a, axis) for a in (img, br, lab))
    perm = rng.permutation(3)
    img, br, lab = (np.ascontiguousarray(np.transpose(a, perm)) for a in (img, br, lab))
    br = br > 0
    if anatomy.name == "fsaverage" or rng.random() < 0.3:
        img = synthesize_contrast(lab, br, rng)
    else:
        img = np.clip(img, 0, None) ** float(np.exp(rng.normal(0, 0.12)))
    head = (img > 0.01) | br
    lesion_centre = np.array([size // 2] * 3, np.float32) - offset
    soft, binary, deviation = paint_lesion(img, lab, lesion_centre, site, rng)
    healthy, lesioned = _artefacts([img, np.clip(img + deviation, 0, None)], head.astype(np.float32), rng)
    drawn = _perturb_mask(binary, rng).astype(np.uint8)
    dilation = int(rng.choice(list(DILATION_P), p=list(DILATION_P.values())))
    fill = classical_fill(lesioned, fill_region(drawn, HEAL, dilation))
    return Crop(healthy, lesioned, drawn, soft.astype(np.float32), fill, dilation, site)
