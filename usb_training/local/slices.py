"""Thick slices: what a scanner with ``factor`` times thicker slices along one grid axis measures (partial volume:
the mean over each block of ``factor`` 1 mm slices), and that scan back on the ~1 mm grid the local stage works on
(``USBLib.imaging.boxes.to_grid``, as ``USBLib.editor.local.stage`` resamples a thick scan's box).

The yardstick's thick-slice cases (``cases.thick_slices``) and the thick-slice training windows
(``windows.WindowMaker(thick_fraction=...)``) are both made with ``block_mean``.
"""
from __future__ import annotations

import numpy as np

from USBLib.imaging.boxes import to_grid

SLICE_FACTORS = (2, 3, 4, 5)  # training windows' slice thickness, mm (clinical thick T1: 3-5 mm)


def block_mean(volume: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """The mean of every ``factor`` consecutive slices of ``volume`` along ``axis`` (a remainder at the end is
    dropped), float32 [..., n // factor, ...]."""
    n = volume.shape[axis] // factor
    a = np.take(np.asarray(volume, np.float32), np.arange(n * factor), axis=axis)
    shape = list(a.shape)
    shape[axis:axis + 1] = [n, factor]
    return a.reshape(shape).mean(axis + 1)


def thick_on_fine_grid(volume: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """``volume`` [I, J, K] (1 mm) measured with ``factor`` mm slices along ``axis`` (``block_mean``) and resampled
    linearly back onto its own shape, as the local stage resamples a thick scan's box; float32 [I, J, K]."""
    return to_grid(block_mean(volume, axis, factor), volume.shape, 1)


def thick_mask_on_fine_grid(mask: np.ndarray, axis: int, factor: int) -> np.ndarray:
    """A 1 mm mask as a rater draws it on the thick slices (the block mean >= 0.5) and as the local stage resamples
    that thick mask (linear, >= 0.5); bool [I, J, K], empty when no block is half covered."""
    thick = block_mean(mask, axis, factor) >= 0.5
    return to_grid(thick.astype(np.float32), mask.shape, 1) >= 0.5
