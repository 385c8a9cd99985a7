"""The network's heal correction kept within the level of the tissue around the fill region.

The local network corrects a biharmonic base (``conditioning``): the base is anchored on the voxels just outside
the fill region, and where those are darkened (a rim the mask missed, a ventricle beside the lesion) the base
sags and the network lifts it. Where the tissue around the region is homogeneous and the base already at its
level, a lift has nothing to correct: on the tuning sources' deep grey nuclei with label-driven contrast the
network lifted such fills towards the template's brighter nuclei (a thalamus lesion healed 11 % too bright,
22 dB below a biharmonic fill of the mask; docs/model.md, 2026-12-07).

The gate: for each connected part of the fill region, the network's mean correction over the part may bring the
part's mean level anywhere within the band of the tissue around it (the median of the scan ``RING_MM`` outside
the region, plus or minus ``SPREAD`` times its interquartile range), or leave it where the base has it; a
correction that would take it past the band is scaled down as a whole (its pattern kept) to end on the band's
edge. Around a white-matter lesion beside cortex or a ventricle the band is wide and the network is free; inside
a homogeneous nucleus it is narrow, and a lift the tissue around does not show is taken back. The factor applies
to the part's whole cell of the box (the voxels nearer to it than to another part), so that the correction the
fusion writes on the region's shell and feather is scaled with the region's and no bright rim is left at its edge.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

RING_MM = (1.0, 2.0)  # the tissue around a fill region: the scan this far outside it
SPREAD = 1.0          # the band: the ring's median +- this many interquartile ranges
MIN_RING = 20         # voxels: fewer and the part's correction is left as it is


def limit_to_surroundings(correction: np.ndarray, image: np.ndarray, base: np.ndarray, region: np.ndarray,
                          spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The heal ``correction`` with each fill-region part's mean change kept within the band of the tissue around
    it (see the module docstring).

    Args:
        correction: the network's correction of the base [samples, I, J, K] in model units, the image's (the
            heal = base + correction inside the region, the scan + correction outside it); one factor per part
            serves every sample (their spread kept).
        image: the lesioned box [I, J, K] (model units), whose ring outside the region gives the band.
        base: the classical fill of the box [I, J, K] (model units).
        region: the fill region [I, J, K] bool.
        spacing: voxel size in mm (3 values) of the box's grid.

    Returns a new array of ``correction``'s shape; each part's cell multiplied by a factor in [0, 1].
    """
    region = np.asarray(region, bool)
    out = np.array(correction, np.float32, copy=True)
    if not region.any():
        return out
    spacing = np.asarray(spacing, float)
    outside = ndimage.distance_transform_edt(~region, sampling=spacing)
    ring_all = (outside > RING_MM[0]) & (outside <= RING_MM[1])
    parts, count = ndimage.label(region, ndimage.generate_binary_structure(3, 3))
    owner = None  # with several parts, each voxel belongs to the nearest: the part's cell
    if count > 1:
        _, nearest = ndimage.distance_transform_edt(parts == 0, sampling=spacing, return_indices=True)
        owner = parts[tuple(nearest)]
    for part in range(1, count + 1):
        inside = parts == part
        cell = np.ones(region.shape, bool) if owner is None else owner == part
        ring = ring_all & cell
        if int(ring.sum()) < MIN_RING:
            continue
        q1, median, q3 = np.percentile(image[ring], [25, 50, 75])
        level = float(np.mean(base[inside]))
        upper = max(float(median + SPREAD * (q3 - q1)) - level, 0.0)  # the most the part's mean may rise
        lower = min(float(median - SPREAD * (q3 - q1)) - level, 0.0)  # ... and fall
        change = float(np.mean(out[:, inside]))
        if change > upper:
            out[:, cell] *= np.float32(upper / change)
        elif change < lower:
            out[:, cell] *= np.float32(lower / change)
    return out
