"""A drawn lesion mask's edge is a guess within about a voxel: the masks a voxel smaller and a voxel larger.

A heal with ``boundary_average`` (``USBLib.settings``) averages the heals of the three masks ``boundary_masks``
gives: the drawn one, it eroded by one voxel (every lesion kept) and it grown by one voxel (never into the CSF
beside the lesion). The fill then does not
hinge on which side of the lesion's partial-volume edge the drawing ran (docs/model.md: +0.38 dB held out, every
kind of site better on the tuning source).

"One voxel" is the 6-neighbourhood step along the scan's fine axes: on a scan with thick slices (an axis more
than ``FINE_AXIS_RATIO`` times coarser than the finest) the edge moves in-plane only, so that a 5 mm slice does
not grow the mask by 5 mm.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

FINE_AXIS_RATIO = 1.5  # an axis coarser than this times the finest spacing keeps the mask's edge where it is


def neighbourhood(spacing=None) -> np.ndarray:
    """The 6-neighbourhood structuring element [3, 3, 3] bool, restricted to the axes whose voxel ``spacing`` (mm,
    3 values; None: isotropic) is at most ``FINE_AXIS_RATIO`` times the finest."""
    structure = ndimage.generate_binary_structure(3, 1)
    if spacing is None:
        return structure
    spacing = np.abs(np.asarray(spacing, float))
    for axis in np.flatnonzero(spacing > FINE_AXIS_RATIO * spacing.min()):
        index = [1, 1, 1]
        for side in (0, 2):
            index[axis] = side
            structure[tuple(index)] = False
    return structure


def grown(mask: np.ndarray, voxels: int, brain: np.ndarray | None = None) -> np.ndarray:
    """``mask`` [I, J, K] grown by ``voxels`` steps of the 26-neighbourhood, within ``brain`` when given. bool
    [I, J, K]. The region of the patch fill a heal blends in (``patch_blend``) and of the yardstick's fillers on
    the mask + N voxels, so that the two are the same fill."""
    out = np.asarray(mask) > 0
    if voxels > 0:
        out = ndimage.binary_dilation(out, ndimage.generate_binary_structure(3, 3), iterations=int(voxels))
    return out & (np.asarray(brain) > 0) if brain is not None else out


def ring(mask: np.ndarray, inner: int, outer: int, within: np.ndarray | None = None) -> np.ndarray:
    """The voxels more than ``inner`` and at most ``outer`` steps of the 26-neighbourhood (chessboard distance)
    outside ``mask`` [I, J, K], inside ``within`` when given. bool [I, J, K]. The tissue an embedded lesion's level
    is measured against (``lesion_level``) and the yardstick's rings (``usb_training.base.scores``)."""
    out = grown(mask, outer) & ~grown(mask, inner)
    return out & (np.asarray(within) > 0) if within is not None else out


def eroded_keeping_components(mask: np.ndarray, steps: int, structure: np.ndarray | None = None) -> np.ndarray:
    """``mask`` [I, J, K] eroded ``steps`` times (``structure``, default the 6-neighbourhood; the image faces do not
    erode it); a component that would vanish keeps its deepest voxels, as a hasty rater still marks every lesion.
    bool [I, J, K]."""
    m = np.asarray(mask) > 0
    structure = neighbourhood() if structure is None else structure
    out = ndimage.binary_erosion(m, structure, iterations=steps, border_value=1)
    labels, _ = ndimage.label(m)
    kept = ndimage.label(out)[0] > 0
    for comp, box in enumerate(ndimage.find_objects(labels), start=1):
        region = labels[box] == comp
        if not (kept[box] & region).any():
            depth = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1, 1:-1]
            out[box] |= region & (depth >= depth.max())
    return out


def boundary_masks(mask: np.ndarray, spacing=None,
                   keep_out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the drawn ``mask``, it eroded by one voxel with every lesion kept, it grown by one voxel), each [I, J, K]
    bool. ``spacing``: the voxel size in mm (3 values) that decides which axes the edge moves along
    (``neighbourhood``). ``keep_out`` [I, J, K] bool: voxels the grown mask must not take in (a heal passes the CSF
    beside the lesion, ``rim.darker_than_lesion``: a ventricle next to a drawn lesion is not its edge)."""
    drawn = np.asarray(mask) > 0
    structure = neighbourhood(spacing)
    grown = ndimage.binary_dilation(drawn, structure)
    if keep_out is not None:
        grown &= drawn | ~np.asarray(keep_out, bool)
    return drawn, eroded_keeping_components(drawn, 1, structure), grown
