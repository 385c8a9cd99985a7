"""Lesions painted into healthy tissue, and scanner artefacts shared by a healthy and a lesioned copy.

``paint_lesion`` makes one synthetic lesion of a site's kind (shape generators of ``usb_training.data.lesions``,
divergence-free deformation, soft edge whose darkening reaches 1-2 voxels past the 0.5 iso-surface);
``_artefacts`` puts the same bias field, gamma, blur and Rician noise on both copies. The local stage's training
windows (``windows``) and its native validation cases (``cases``) are built from them. Sizes are in 1 mm voxels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.lesions import SHAPES, divergence_free_flow
from ..data.pathology import lesion_deviation
from ..data.prepare import DEEP_GM, GM, WM
from ..data.warp import sampling_coords, warp

TISSUE = (GM, WM, DEEP_GM)
VISIBLE_P = 0.85              # share of lesions rescaled to a mean lesion/tissue ratio in VISIBLE_RATIO
VISIBLE_RATIO = (0.5, 0.9)
MAX_LEVEL = 1.5               # model units (the intensity map's clip)


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


class _NoLesion(Exception):
    """No lesion of the asked kind fits at the asked place (``paint_lesion``): draw another site."""
