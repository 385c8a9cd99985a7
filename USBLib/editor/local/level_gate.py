"""The network's heal correction kept between the classical fill and the tissue around the fill region.

The local network corrects a biharmonic base (``conditioning``): the base is anchored on the voxels just outside
the fill region, and where those are darkened (a rim the mask missed, a ventricle beside the lesion) the base
sags and the network lifts it. Where the tissue around the region is the fill's own tissue, the base is already
at its level, and a lift has nothing to correct: on the tuning sources' deep grey nuclei and cerebellum with
label-driven contrast the network lifted such fills towards the template's brighter nuclei by 7-22 % (a thalamus
healed 11 % too bright, 14 dB below the base alone; docs/model.md, 2026-12-07).

The gate: for each connected part of the fill region, the network's mean correction over the part may move the
part's mean level towards the median of the scan ``RING_MM`` outside it (past the last voxels the rim growth may
have left darkened), not past it; a larger correction is scaled down as a whole (its pattern kept). A
correction towards the surroundings' level is never touched.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

RING_MM = (1.0, 3.0)  # the tissue level around a fill region: median of the scan this far outside it
RING_PERCENTILE = 50.0  # which level of that ring (percentile)
MIN_RING = 20         # voxels: fewer and the part's correction is left as it is


def limit_to_surroundings(correction: np.ndarray, image: np.ndarray, base: np.ndarray, region: np.ndarray,
                          spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The heal ``correction`` with each fill-region part's mean change limited to the way towards the tissue
    around it (see the module docstring).

    Args:
        correction: the network's correction of the base [samples, I, J, K] (model units; the heal = base +
            correction inside the region).
        image: the lesioned box [I, J, K] (model units), whose ring outside the region gives the tissue level.
        base: the classical fill of the box [I, J, K] (model units).
        region: the fill region [I, J, K] bool.
        spacing: voxel size in mm (3 values) of the box's grid.

    Returns a new array of ``correction``'s shape; each part's correction multiplied by a factor in [0, 1]."""
    region = np.asarray(region, bool)
    out = np.array(correction, np.float32, copy=True)
    if not region.any():
        return out
    spacing = np.asarray(spacing, float)
    outside = ndimage.distance_transform_edt(~region, sampling=spacing)
    ring_all = (outside > RING_MM[0]) & (outside <= RING_MM[1])
    parts, count = ndimage.label(region, ndimage.generate_binary_structure(3, 3))
    owner = None  # each ring voxel belongs to the nearest part
    if count > 1:
        _, nearest = ndimage.distance_transform_edt(parts == 0, sampling=spacing, return_indices=True)
        owner = parts[tuple(nearest)]
    for part in range(1, count + 1):
        inside = parts == part
        ring = ring_all if owner is None else ring_all & (owner == part)
        if int(ring.sum()) < MIN_RING:
            continue
        room = float(np.percentile(image[ring], RING_PERCENTILE)) - float(np.mean(base[inside]))
        change = float(np.mean(out[:, inside]))
        if change == 0.0 or change * room >= change * change:  # towards the surroundings, not past them
            continue
        factor = max(room / change, 0.0)
        out[:, inside] *= np.float32(factor)
    return out
