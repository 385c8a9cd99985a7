"""Non-local patch-based filling of a region from the scan's own tissue around it.

The method of NiftySeg's ``seg_FillLesions`` (Prados et al. 2016, "A multi-time-point modality-agnostic patch-based
method for lesion filling in multiple sclerosis", NeuroImage 139), written from the paper's description: the region
is filled from its edge inwards, one layer of voxels at a time, and each voxel of a layer takes the mean centre value
of the patches near it, wholly outside the region, whose values best match the known part of its own patch. It needs
no template and no training: the fill is made of the person's own tissue, grain included. A heal blends it into the
network's fill (``patch_blend``, ``USBLib.editor.editor.Editor._patch_blend_stage``); the heal yardstick counts it
among the classical fillers (``usb_training.base.baselines``, ``usb_training.evaluation.native``).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

STRUCT26 = ndimage.generate_binary_structure(3, 3)
PATCH = 2     # patch radius, voxels (5^3 patches)
SEARCH = 10   # search radius around each filled voxel, voxels (Chebyshev)
BEST = 5      # best-matching patches averaged per voxel
BLOCK = 6     # a layer's voxels are matched in spatial blocks of this side, each against the candidates near it


def patch_fill(image: np.ndarray, region: np.ndarray, patch: int = PATCH, search: int = SEARCH, best: int = BEST,
               ) -> np.ndarray:
    """``image`` with ``region`` filled from the tissue around it, patch by patch (the module's method).

    Each connected part of ``region`` is filled from its edge inwards, one layer of voxels at a time (a layer: the
    unfilled voxels touching a known one, 26-neighbourhood). A voxel takes the mean centre value of the ``best``
    candidate patches whose values match its own patch best, by the mean squared difference over the patch voxels
    already known (outside ``region``, or filled in an earlier layer). Candidates are the patches within ``search``
    voxels that hold no voxel of ``region``; past the volume's faces the scan goes on as at the face.

    Args:
        image: [I, J, K] scan, any real dtype.
        region: [I, J, K] voxels to fill (non-zero).
        patch: patch radius in voxels (side 2 * patch + 1).
        search: search radius in voxels around each filled voxel.
        best: patches averaged per voxel.

    Returns:
        float32 [I, J, K]: ``image`` with only ``region`` rewritten (bit for bit equal elsewhere).
    """
    out = np.asarray(image, np.float32).copy()
    unknown = np.asarray(region) > 0
    labels, _ = ndimage.label(unknown, STRUCT26)
    reach = search + patch
    for index, part in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(slice(max(s.start - reach, 0), min(s.stop + reach, n)) for s, n in zip(part, out.shape))
        out[box] = _fill_part(out[box], unknown[box], labels[box] == index, patch, search, best)
    return out


def _patch_rows(padded: np.ndarray, centres: np.ndarray, radius: int) -> np.ndarray:
    """The (2r+1)^3 patches of ``padded`` (padded by ``radius`` on every side) at ``centres`` [N, 3] (unpadded
    coordinates), as rows [N, (2r+1)^3] float32."""
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1,) * 3)
    return windows[centres[:, 0], centres[:, 1], centres[:, 2]].reshape(len(centres), -1).astype(np.float32)


def _fill_part(box: np.ndarray, unknown: np.ndarray, part: np.ndarray, patch: int, search: int, best: int
               ) -> np.ndarray:
    """One connected ``part`` of the region filled inside its ``box`` (float32, returned changed only at
    ``part``); ``unknown``: every region voxel in the box (other parts are neither used nor candidates)."""
    inside = tuple(slice(patch, patch + n) for n in box.shape)
    touches_region = ndimage.binary_dilation(np.pad(unknown, patch), np.ones((2 * patch + 1,) * 3, bool))[inside]
    candidates = np.argwhere(~touches_region)
    if len(candidates) == 0:
        return box
    values = np.pad(box, patch, mode="edge")
    known = np.pad(~unknown, patch, constant_values=True).astype(np.float32)
    rows = _patch_rows(values, candidates, patch)
    matcher = _Matcher(candidates, rows, search, best)
    remaining = part.copy()
    while remaining.any():
        known_now = ~unknown | (part & ~remaining)
        layer = remaining & ndimage.binary_dilation(known_now, STRUCT26)
        if not layer.any():
            layer = remaining
        targets = np.argwhere(layer)
        fill = matcher.fill(targets, _patch_rows(values, targets, patch), _patch_rows(known, targets, patch))
        values[tuple((targets + patch).T)] = fill
        known[tuple((targets + patch).T)] = 1.0
        remaining &= ~layer
    return np.ascontiguousarray(values[inside])


class _Matcher:
    """The candidate patches of one part and the search for the best of them."""

    def __init__(self, centres: np.ndarray, rows: np.ndarray, search: int, best: int):
        self.centres, self.rows, self.squares = centres, rows, rows ** 2
        self.values = rows[:, rows.shape[1] // 2]
        self.search, self.best = search, best

    def fill(self, targets: np.ndarray, values: np.ndarray, known: np.ndarray) -> np.ndarray:
        """Fill values [T] for ``targets`` [T, 3] with patch ``values`` and ``known`` weights (rows [T, P])."""
        fill = np.empty(len(targets), np.float32)
        keys = targets // BLOCK
        order = np.lexsort(keys.T[::-1])
        _, starts = np.unique(keys[order], axis=0, return_index=True)
        for group in np.split(order, starts[1:]):
            fill[group] = self._fill_block(targets[group], values[group], known[group])
        return fill

    def _fill_block(self, targets: np.ndarray, values: np.ndarray, known: np.ndarray) -> np.ndarray:
        low, high = targets.min(0) - self.search, targets.max(0) + self.search
        near = np.flatnonzero(np.all((self.centres >= low) & (self.centres <= high), axis=1))
        weighted = known * values
        fallback = weighted.sum(1) / np.maximum(known.sum(1), 1.0)  # nothing to copy: the patch's known mean
        if near.size == 0:
            return fallback.astype(np.float32)
        own = (weighted * values).sum(1)[:, None]
        # np.take: the same rows as ``rows[near]``, gathered several times faster (the block's main cost)
        distance = own - 2.0 * weighted @ np.take(self.rows, near, 0).T + known @ np.take(self.squares, near, 0).T
        distance /= np.maximum(known.sum(1), 1.0)[:, None]
        centres, targets = np.take(self.centres, near, 0).astype(np.int32), targets.astype(np.int32)
        far = np.zeros(distance.shape, bool)
        for axis in range(3):  # Chebyshev distance > search, one axis at a time (no [T, N, 3] temporary)
            far |= np.abs(targets[:, axis, None] - centres[None, :, axis]) > self.search
        distance[far] = np.inf
        k = min(self.best, near.size)
        pick = np.argpartition(distance, k - 1, axis=1)[:, :k]
        usable = np.isfinite(np.take_along_axis(distance, pick, 1))
        chosen = np.take(self.values, near)[pick]
        mean = (chosen * usable).sum(1) / np.maximum(usable.sum(1), 1)
        return np.where(usable.any(1), mean, fallback).astype(np.float32)
