"""Lesion boxes on the scan's own grid, and their resampling to about 1 mm when the scan is far from it.

A box holds one group of lesion components (components closer than twice the context are one group), grown by
``context_vox`` voxels and rounded up to the network's size multiple; boxes may reach past the volume's edge
(zero padding). Scans with a spacing outside 0.8-1.2 mm or anisotropy above 1.3 are resampled box by box to
1 mm along each voxel axis (the network is orientation-agnostic: it was trained with axis flips and
permutations) and the result is resampled back.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Box:
    """Voxel window ``start`` .. ``start + shape`` (may extend past the volume) and its group label.

    Args:
        start: voxel index (i, j, k) of the window's first corner; may be negative.
        shape: window size in voxels per axis.
        label: the group's label in the map returned by ``group_labels`` / ``lesion_boxes``.
    """

    start: tuple[int, int, int]
    shape: tuple[int, int, int]
    label: int

    def read(self, volume: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """The window's voxels, padded with ``fill`` where it leaves the volume; returns [shape] in ``volume``'s dtype.

        Args:
            volume: array [I, J, K] on the grid the box was made on.
            fill: value of window voxels outside the volume.
        """
        out = np.full(self.shape, fill, dtype=volume.dtype)
        src, dst = self._slices(volume.shape)
        out[dst] = volume[src]
        return out

    def read_mirrored(self, volume: np.ndarray) -> np.ndarray:
        """The window's voxels, continued past the volume's face by mirroring the volume at it (not zeros, not the
        face voxels repeated): a lesion cut by the face becomes a closed hole in mirrored tissue, so that a fill near
        the image border sees tissue all round it, as the prefill's mirrored face does. Repeating the face voxels
        ran the lesion on to the window's end (an open region whose far side kept lesion values): on 20 border
        cases per tuning source the mirror gained +0.42 dB [+0.13, +0.81] (MNI2009c) and +0.24 [+0.07, +0.44]
        (fsaverage) (docs/model.md, "A lesion cut by the field of view"). Returns [shape] in ``volume``'s dtype.

        Args:
            volume: array [I, J, K] on the grid the box was made on; the window must overlap it.
        """
        src, dst = self._slices(volume.shape)
        pad = [(d.start, n - d.stop) for d, n in zip(dst, self.shape)]
        return np.pad(volume[src], pad, mode="symmetric")

    def add_into(self, volume: np.ndarray, values: np.ndarray, where: np.ndarray) -> None:
        """``volume[window][where] += values[where]`` for the part of the window inside the volume (in place).

        Args:
            volume: array [I, J, K] to add into, modified in place.
            values: window values [shape].
            where: bool [shape], the window voxels to add.
        """
        src, dst = self._slices(volume.shape)
        sel = where[dst]
        volume[src][sel] += values[dst][sel]

    def _slices(self, shape) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        src = tuple(slice(max(s, 0), min(s + n, m)) for s, n, m in zip(self.start, self.shape, shape))
        dst = tuple(slice(a.start - s, a.stop - s) for a, s in zip(src, self.start))
        return src, dst


def group_labels(mask: np.ndarray, context_vox: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels of lesion groups: components whose context regions touch are one group. ``context_vox`` per axis.

    Each group's label covers its lesions grown by the context (computed on the mask's bounding box only).

    Returns (labels, n): int32 [I, J, K] with 0 outside every group and 1..n inside, and the number of groups.

    Args:
        mask: lesion mask [I, J, K] (> 0 = lesion).
        context_vox: context radius in voxels per axis (3 values; values below 1 count as 1); a voxel belongs to
            a group when it lies within the ellipsoid of these radii around one of the group's lesion voxels.
    """
    mask = np.asarray(mask) > 0
    labels = np.zeros(mask.shape, np.int32)
    if not mask.any():
        return labels, 0
    radius = np.maximum(np.asarray(context_vox, float), 1.0)
    found = ndimage.find_objects(mask.astype(np.uint8))[0]
    reach = np.ceil(radius).astype(int) + 1
    box = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(found, reach, mask.shape))
    dist = ndimage.distance_transform_edt(~mask[box], sampling=1.0 / radius)
    labels[box], n = ndimage.label(dist <= 1.0)
    return labels, int(n)


def lesion_boxes(mask: np.ndarray, context_vox, multiple: int, min_side: int = 32) -> tuple[list[Box], np.ndarray]:
    """One ``Box`` per lesion group and the group label map (0 = no group), on the mask's grid.

    ``context_vox``: voxels of context per axis on each side; sides are at least ``min_side`` voxels (on the
    network's ~1 mm grid, converted by the caller) and multiples of ``multiple``.

    Returns (boxes, labels): one ``Box`` per group, centred on its label region, and the int32 label map [I, J, K].

    Args:
        mask: lesion mask [I, J, K] (> 0 = lesion) on the scan's grid.
        context_vox: context in voxels per axis, a scalar or 3 values (see ``group_labels``).
        multiple: box sides are rounded up to a multiple of this (the network's size multiple).
        min_side: smallest box side in voxels, a scalar or 3 values.
    """
    context = np.broadcast_to(np.asarray(context_vox, float), (3,))
    labels, n = group_labels(mask, context)
    boxes = []
    for label, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None:
            continue
        lo = np.array([s.start for s in found])
        hi = np.array([s.stop for s in found])
        side = np.maximum(hi - lo, 1)
        want = np.maximum(np.asarray(min_side), side)
        want = -(-want // multiple) * multiple
        start = lo - (want - side) // 2
        boxes.append(Box(tuple(int(v) for v in start), tuple(int(v) for v in want), label))
    return boxes, labels


def needs_resampling(spacing, low: float = 0.8, high: float = 1.2, anisotropy: float = 1.3) -> bool:
    """Whether a scan's voxel spacing (mm per axis) is far enough from 1 mm isotropic to resample its boxes.

    Args:
        spacing: voxel size in mm per axis, 3 values.
        low, high: the accepted range of every voxel size, in mm.
        anisotropy: the largest accepted ratio of largest to smallest voxel size.
    """
    spacing = np.asarray(spacing, float)
    return bool(spacing.min() < low or spacing.max() > high or spacing.max() / spacing.min() > anisotropy)


def to_grid(volume: np.ndarray, shape, order: int, low_pass: bool = True) -> np.ndarray:
    """``volume`` resampled to ``shape`` over the same physical extent (voxel-centre aligned), float32.

    Axes that get coarser are low-pass filtered first (Gaussian, sigma 0.4 x the factor), so a thick voxel takes
    the mean over its thickness rather than the value at its centre plane; ``low_pass`` False skips that, for a
    volume whose content along those axes came from ``shape``'s grid by linear interpolation (sampling it at that
    grid's voxel centres is then the exact way back).

    The first and last voxel centres of each axis map onto each other; values beyond the edge repeat the edge.

    Args:
        volume: values [I, J, K].
        shape: target shape, 3 ints.
        order: interpolation order, 0 nearest neighbour (no filtering) or 1 linear.
        low_pass: filter the axes that get coarser (order 1 only).
    """
    factors = [(n - 1) / max(m - 1, 1) for n, m in zip(volume.shape, shape)]
    sigma = [0.4 * f if f > 1.01 else 0.0 for f in factors]
    if order > 0 and low_pass and any(sigma):
        volume = ndimage.gaussian_filter(np.asarray(volume, np.float32), sigma)
    coords = np.meshgrid(*[np.arange(m, dtype=np.float32) * f for m, f in zip(shape, factors)], indexing="ij")
    return ndimage.map_coordinates(np.asarray(volume, np.float32), coords, order=order, mode="nearest")


def work_shape(box_shape, spacing, multiple: int, target_mm: float = 1.0) -> tuple[int, int, int]:
    """Shape of a box on the ~``target_mm`` working grid, rounded up to ``multiple``.

    Args:
        box_shape: box size in native voxels per axis, 3 ints.
        spacing: native voxel size in mm per axis, 3 values.
        multiple: every side is at least this and a multiple of it.
        target_mm: voxel size of the working grid, in mm.
    """
    size = np.ceil(np.asarray(box_shape) * np.asarray(spacing, float) / target_mm).astype(int)
    size = np.maximum(size, multiple)
    return tuple(int(v) for v in -(-size // multiple) * multiple)
