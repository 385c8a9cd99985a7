"""Seam-aware fusion: blend an edit into the original scan inside a feathered region, exact elsewhere.

The edit arrives as an additive deviation (PathoSyn's view of pathology: a residual on top of anatomy) on the
scan's own grid. Its weight ramps smoothly from 1 in the core of the edit region to 0 at its border over a
distance in millimetres, so no seam appears; outside the region the output is the input, bit for bit.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .io import cast_like


def dilate_mm(mask: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """Binary dilation by a physical radius (Euclidean distance on the voxel grid)."""
    mask = np.asarray(mask) > 0
    if radius_mm <= 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def feather_weight(region: np.ndarray, spacing, width_mm: float) -> np.ndarray:
    """Weight in [0, 1]: 0 outside ``region``, rising with the distance from its border, 1 beyond ``width_mm``.

    The ramp is a smoothstep of the distance, so the weight and its first derivative are continuous at both ends.
    """
    region = np.asarray(region) > 0
    if not region.any():
        return np.zeros(region.shape, np.float32)
    if width_mm <= 0:
        return region.astype(np.float32)
    padded = np.pad(region, 1)  # the volume's edge counts as border too
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    r = np.clip(dist / width_mm, 0.0, 1.0)
    return (r * r * (3.0 - 2.0 * r)).astype(np.float32) * region


def edit_region(mask: np.ndarray | None, brain: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    """The region an edit may touch: the lesion mask grown by ``margin_mm`` plus the feather, kept within the
    brain (grown by ``margin_mm``, so a mask at the brain's edge is still covered); without a mask, the brain."""
    brain = np.asarray(brain) > 0
    if mask is None or not np.any(mask):
        return brain
    return dilate_mm(mask, spacing, 2.0 * margin_mm) & dilate_mm(brain | (np.asarray(mask) > 0), spacing, margin_mm)


def fuse(original: np.ndarray, deviation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``original + weight * deviation`` inside ``weight > 0``, cast to the original dtype; outside, the original
    array's own values (bit for bit)."""
    out = np.array(original, copy=True)
    inside = weight > 0
    out[inside] = cast_like(np.asarray(original, dtype=np.float64)[inside] + weight[inside] * deviation[inside],
                            out.dtype)
    return out
