"""The fill region of a heal grown into the lesion's dark rim only (not by a fixed distance).

A drawn lesion mask misses the partial-volume rim: the darkening goes on one to three voxels past it. A fixed
growth of the mask (the older default, 2 mm) rewrites the rim, but around a tight mask it also replaces healthy
tissue by a smooth guess, and around a hasty mask it is too short. Here the region grows from the mask, step by
step, into the neighbouring voxels that look like lesion: darker (for a T1-hypointense lesion) than the tissue
around the lesion by more than a fraction ``tau`` of the lesion's contrast, then by one voxel more all round, so
that the fill starts on flat healthy tissue (a drawn edge is rarely exact to the voxel): a biharmonic fill carries the slope of its boundary inwards, and a boundary
on the fading edge of the darkening makes the whole fill too dark. All of it within ``max_mm`` of the mask.
Voxels that look like the surrounding tissue stay as they are, and so do voxels darker than the lesion itself (a
ventricle or sulcus next to it: a partial-volume rim lies between the lesion's level and the tissue's). The
lesion's level is the median of the mask's core (its inner half), so a generously drawn mask is measured by its
lesion, not by the healthy tissue it also covers; a lesion with no contrast above the noise does not grow.

"The tissue around the lesion" is estimated per voxel from a reference shell beyond the growth limit
(``max_mm`` + 1 to + 4 mm from the mask): a normalised Gaussian average of the shell's values (2 mm), so that a
lesion between white and grey matter compares each side with its own tissue.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

REFERENCE_SHELL_MM = (1.0, 4.0)  # beyond the growth limit: where the reference tissue level is measured
REFERENCE_SIGMA_MM = 2.0
DEFAULT_TAU = 0.1
MAX_BEYOND_LESION = 0.25  # a rim voxel may be darker than the lesion's median by at most this part of the contrast
MIN_CONTRAST_NOISE = 4.0  # no growth unless the lesion's contrast is this many noise SDs


def rim_region(image: np.ndarray, mask: np.ndarray, brain: np.ndarray, spacing, max_mm: float,
               tau: float = DEFAULT_TAU) -> np.ndarray:
    """The mask grown into its lesion-like rim, at most ``max_mm`` from it. bool [I, J, K].

    Args:
        image: the scan [I, J, K] in its own units (any offset and scale; only differences are compared).
        mask: the drawn lesion mask [I, J, K] (> 0 = lesion).
        brain: brain mask [I, J, K] (> 0 = brain); the region never grows out of it.
        spacing: voxel size in mm along I, J, K (3 values).
        max_mm: how far past the mask the region may grow, in mm (0: the mask itself).
        tau: a rim voxel joins when it is darker than the reference tissue level by more than ``tau`` times the
            lesion's contrast (reference - lesion level), and not darker than the lesion level by more than
            ``MAX_BEYOND_LESION`` times it; the same with signs reversed for a bright lesion.
    """
    lesion = np.asarray(mask) > 0
    if max_mm <= 0 or not lesion.any():
        return lesion.copy()
    spacing = np.asarray(spacing, float)
    reach = np.ceil((max_mm + REFERENCE_SHELL_MM[1] + 2 * REFERENCE_SIGMA_MM) / spacing).astype(int)
    found = ndimage.find_objects(lesion.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(found, reach, lesion.shape))
    les = lesion[box]
    tissue = (np.asarray(brain)[box] > 0) | les
    img = np.asarray(image, np.float32)[box]

    dist = ndimage.distance_transform_edt(~les, sampling=spacing)
    shell = tissue & (dist > max_mm + REFERENCE_SHELL_MM[0]) & (dist <= max_mm + REFERENCE_SHELL_MM[1])
    if not shell.any():
        return lesion.copy()
    sigma = REFERENCE_SIGMA_MM / spacing
    weight = ndimage.gaussian_filter(shell.astype(np.float32), sigma)
    level = ndimage.gaussian_filter(np.where(shell, img, 0.0).astype(np.float32), sigma)
    reference = np.where(weight > 1e-4, level / np.maximum(weight, 1e-4), float(np.median(img[shell])))
    depth = ndimage.distance_transform_edt(les, sampling=spacing)
    core = les & (depth >= 0.5 * depth.max())
    level = float(np.median(img[core]))
    contrast = reference - level
    smooth = ndimage.gaussian_filter(img, 0.5)  # one voxel's noise should not decide
    detail = img - ndimage.gaussian_filter(img, 1.0)
    noise = 1.4826 * float(np.median(np.abs(detail[shell] - np.median(detail[shell]))))
    sign, size = np.sign(contrast), np.abs(contrast)
    lesion_like = ((reference - smooth) * sign > tau * size) & ((smooth - level) * sign > -MAX_BEYOND_LESION * size) \
        & (size > MIN_CONTRAST_NOISE * noise)
    within = tissue & (dist > 0) & (dist <= max_mm + 1e-6)
    candidates = within & (dist <= max_mm - spacing.min() + 1e-6) & lesion_like  # (the last voxel: the buffer)

    region = les.copy()
    step = ndimage.generate_binary_structure(3, 2)
    for _ in range(int(np.ceil(max_mm / spacing.min()))):
        grown = ndimage.binary_dilation(region, step) & candidates & ~region
        if not grown.any():
            break
        region |= grown
    region |= ndimage.binary_dilation(region, step) & within  # one voxel onto healthy tissue
    out = lesion.copy()
    out[box] = region
    return out
