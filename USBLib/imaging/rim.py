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
A partial-volume rim fades outwards, so each step takes a voxel only when it is not darker than the region's voxels
beside it (their mean): a voxel darker than the lesion side next to it is other tissue, grey matter past a
white-matter lesion or the edge of a sulcus, not rim.

"The tissue around the lesion" is estimated per voxel from a reference shell beyond the growth limit
(``max_mm`` + 1 to + 4 mm from the mask): a normalised Gaussian average of the shell's values (2 mm), so that a
lesion between white and grey matter compares each side with its own tissue. The lesion's contrast (its sign: dark
or bright; ``darker_than_lesion``, ``lesion_contrasts``) leaves out the shell's voxels darker than the lesion itself
(CSF: a ventricle on either side of a callosal lesion), which are not the tissue it replaced.

``darker_than_lesion`` marks what a heal must never rewrite: the voxels around the mask darker than the lesion
itself (a ventricle or a sulcus beside it; a partial-volume rim is never darker than its lesion). The fill region
keeps its buffer voxel on them (the network was trained on such regions), but the fusion leaves them bit for bit:
painting tissue over the CSF next to a small lesion cost up to 11 dB on a small cortical lesion.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from scipy import ndimage

REFERENCE_SHELL_MM = (1.0, 4.0)  # beyond the growth limit: where the reference tissue level is measured
REFERENCE_SIGMA_MM = 2.0
DEFAULT_TAU = 0.1
MAX_BEYOND_LESION = 0.25  # a rim voxel may be darker than the lesion's median by at most this part of the contrast
MIN_CONTRAST_NOISE = 4.0  # no growth unless the lesion's contrast is this many noise SDs
FADE_NOISE = 0.0  # a grown voxel may be darker than the region beside it by at most this many noise SDs
SHELL_BELOW_LESION_NOISE = 2.0  # the contrast leaves out shell voxels darker than the lesion by more noise SDs (CSF)
MIN_TISSUE_SHARE = 0.25  # ... unless less than this share of the shell would be left (then the whole shell)


def rim_region(image: np.ndarray, mask: np.ndarray, brain: np.ndarray, spacing, max_mm: float,
               tau: float = DEFAULT_TAU, fade_noise: float | None = FADE_NOISE) -> np.ndarray:
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
        fade_noise: a voxel joins only when it is not darker than the mean of the region's voxels beside it
            (18-neighbourhood) by more than ``fade_noise`` noise SDs (None: no such test). Both sides are the
            image smoothed by half a voxel.
    """
    lesion = np.asarray(mask) > 0
    if max_mm <= 0 or not lesion.any():
        return lesion.copy()
    stats = _lesion_statistics(image, lesion, brain, spacing, max_mm)
    if stats is None:
        return lesion.copy()
    box, les, tissue, dist, smooth, reference, level, noise, _ = stats
    spacing = np.asarray(spacing, float)
    contrast = reference - level
    sign, size = np.sign(contrast), np.abs(contrast)
    lesion_like = ((reference - smooth) * sign > tau * size) & ((smooth - level) * sign > -MAX_BEYOND_LESION * size) \
        & (size > MIN_CONTRAST_NOISE * noise)
    within = tissue & (dist > 0) & (dist <= max_mm + 1e-6)
    candidates = within & (dist <= max_mm - spacing.min() + 1e-6) & lesion_like  # (the last voxel: the buffer)

    region = les.copy()
    step = ndimage.generate_binary_structure(3, 2)
    for _ in range(int(np.ceil(max_mm / spacing.min()))):
        grown = ndimage.binary_dilation(region, step) & candidates & ~region
        if fade_noise is not None and grown.any():
            grown &= (smooth - _mean_beside(smooth, region, step)) * sign >= -fade_noise * noise
        if not grown.any():
            break
        region |= grown
    region |= ndimage.binary_dilation(region, step) & within  # one voxel onto healthy tissue
    out = lesion.copy()
    out[box] = region
    return out


def _mean_beside(values: np.ndarray, region: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Per voxel, the mean of ``values`` over the ``region`` voxels in its ``step`` neighbourhood (itself included
    when in the region); 0 where there are none."""
    kernel = step.astype(np.float32)
    count = ndimage.convolve(region.astype(np.float32), kernel, mode="constant")
    total = ndimage.convolve(np.where(region, values, 0).astype(np.float32), kernel, mode="constant")
    return total / np.maximum(count, 1.0)


def _box_reach(spacing: np.ndarray, max_mm: float, reach_mm: float = 0.0) -> np.ndarray:
    """Voxels per axis around a lesion that ``_lesion_statistics`` reads: the reference shell and its smoothing,
    and at least ``reach_mm`` + 1 mm."""
    return np.ceil(max(max_mm + REFERENCE_SHELL_MM[1] + 2 * REFERENCE_SIGMA_MM, reach_mm + 1.0) / spacing).astype(int)


def _lesion_statistics(image, lesion, brain, spacing, max_mm: float, reach_mm: float = 0.0):
    """What ``rim_region`` measures around a lesion, on a box around it (at least ``reach_mm`` past the lesion):
    (box, lesion, tissue, distance from the lesion in mm, the image smoothed by 0.5 voxel, the reference tissue level
    per voxel, the lesion's level (median of its core), the noise SD, the reference level per voxel without the CSF
    beside the lesion (``_tissue_shell``)), or None when there is no reference shell."""
    spacing = np.asarray(spacing, float)
    reach = _box_reach(spacing, max_mm, reach_mm)
    found = ndimage.find_objects(lesion.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(found, reach, lesion.shape))
    les = lesion[box]
    tissue = (np.asarray(brain)[box] > 0) | les
    img = np.asarray(image, np.float32)[box]
    dist = ndimage.distance_transform_edt(~les, sampling=spacing)
    shell = tissue & (dist > max_mm + REFERENCE_SHELL_MM[0]) & (dist <= max_mm + REFERENCE_SHELL_MM[1])
    if not shell.any():
        return None
    depth = ndimage.distance_transform_edt(les, sampling=spacing)
    core = les & (depth >= 0.5 * depth.max())
    lesion_level = float(np.median(img[core]))
    smooth = ndimage.gaussian_filter(img, 0.5)  # one voxel's noise should not decide
    detail = img - ndimage.gaussian_filter(img, 1.0)
    noise = 1.4826 * float(np.median(np.abs(detail[shell] - np.median(detail[shell]))))
    sigma = REFERENCE_SIGMA_MM / spacing
    reference = _shell_level(img, shell, sigma)
    kept = _tissue_shell(shell, smooth, lesion_level, noise)
    tissue_reference = reference if kept is shell else _shell_level(img, kept, sigma)
    return box, les, tissue, dist, smooth, reference, lesion_level, noise, tissue_reference


def _shell_level(img: np.ndarray, shell: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Per voxel, the normalised Gaussian average (``sigma`` voxels) of ``img`` over the ``shell`` voxels; the
    shell's median where no shell voxel is near."""
    weight = ndimage.gaussian_filter(shell.astype(np.float32), sigma)
    level = ndimage.gaussian_filter(np.where(shell, img, 0.0).astype(np.float32), sigma)
    return np.where(weight > 1e-4, level / np.maximum(weight, 1e-4), float(np.median(img[shell])))


def _tissue_shell(shell: np.ndarray, smooth: np.ndarray, lesion_level: float, noise: float) -> np.ndarray:
    """The reference shell's voxels that can be the tissue a lesion replaced, for its contrast (``_contrast``):
    those not darker than the lesion itself by more than ``SHELL_BELOW_LESION_NOISE`` noise SDs (``smooth``: the
    image smoothed by half a voxel). CSF beside a lesion (a ventricle on two sides of a callosal lesion) is not that
    tissue: measured with it, a dark lesion between the lateral ventricles came out brighter than "the tissue around
    it", and its white matter was kept out of the heal as if it were CSF. When less than ``MIN_TISSUE_SHARE`` of
    the shell is left, ``shell`` itself: a lesion brighter than the tissue around it (a T1-bright lesion with a
    brighter vessel or slab on under a quarter of its shell stays bright; a callosal lesion's white matter is a
    third of its shell or more), and ``shell`` itself when nothing is left out. (The rim growth
    keeps the whole shell: measured without the CSF, the growth went into the partial-volume edges of sulci and
    ventricles, -0.4 to -1.4 dB at cortical, juxtacortical and periventricular tuning cases.)"""
    floor = SHELL_BELOW_LESION_NOISE * max(noise, 1e-3 * abs(lesion_level))  # a noise-free scan: rounding
    kept = shell & (smooth >= lesion_level - floor)
    count = int(kept.sum())
    return kept if MIN_TISSUE_SHARE * shell.sum() <= count < shell.sum() else shell


def darker_than_lesion(image: np.ndarray, mask: np.ndarray, brain: np.ndarray, spacing, max_mm: float,
                       reach_mm: float) -> np.ndarray:
    """Voxels outside the mask, within ``reach_mm`` of it, darker than the lesion itself (for a T1-hypointense
    lesion; brighter for a bright one) by more than ``MAX_BEYOND_LESION`` times its contrast plus two noise SDs: a
    ventricle or sulcus beside the lesion, which a heal must leave as it is (a partial-volume rim lies between the
    lesion's level and the tissue's, never beyond the lesion). bool [I, J, K].

    Each connected lesion of the mask is measured on its own, with the levels of ``rim_region`` (the lesion's: the
    median of its core; the tissue's: the reference shell's without the CSF beside the lesion (``_tissue_shell``),
    here its median within 2 mm of the lesion), and a voxel is kept only when it is beyond every lesion within
    ``reach_mm`` of it (the rim of a dark lesion is not "darker than" a paler lesion next to it). A lesion without
    contrast keeps nothing.

    Args:
        image, mask, brain, spacing, max_mm: as for ``rim_region``.
        reach_mm: how far from the mask to look, in mm (the fill region's growth plus its feather).
    """
    lesion = np.asarray(mask) > 0
    near_any = np.zeros(lesion.shape, bool)  # within reach of some lesion
    vetoed = np.zeros(lesion.shape, bool)    # not beyond some lesion within reach of it
    for box, stats in _each_lesion(image, lesion, brain, spacing, max_mm, reach_mm):
        _, _, _, dist, smooth, _, level, noise, _ = stats
        near = (dist > 0) & (dist <= reach_mm + 1e-6) & ~lesion[box]
        contrast = _contrast(stats)
        beyond = (level - smooth) * np.sign(contrast) > MAX_BEYOND_LESION * abs(contrast) + 2.0 * noise
        near_any[box] |= near
        vetoed[box] |= near & ~beyond
    return near_any & ~vetoed


def lesion_contrasts(image: np.ndarray, mask: np.ndarray, brain: np.ndarray, spacing,
                     max_mm: float) -> list[tuple[int, float, tuple[int, int, int]]]:
    """Each connected lesion's T1 contrast against the tissue around it, in noise SDs, measured as
    ``darker_than_lesion`` measures it: (the reference tissue level next to the lesion - the lesion's level) / the
    noise SD; positive for a lesion darker than its surroundings (T1-hypointense), negative for a brighter one.
    "Next to": within 2 mm, or one voxel on a scan coarser than that. The noise SD is floored at 0.1 % of the
    tissue's level, so that a noise-free (synthetic) scan gives finite, comparable numbers.

    Args:
        image, mask, brain, spacing, max_mm: as for ``rim_region``.

    Returns [(voxels, contrast, a lesion voxel nearest the lesion's centroid (i, j, k))], largest lesion first, for
    the lesions that have a reference shell (brain 1-4 mm past ``max_mm``); the others are left out.
    """
    spacing = np.asarray(spacing, float)
    out = []
    for box, stats in _each_lesion(image, np.asarray(mask) > 0, brain, spacing, max_mm):
        les, level, noise = stats[1], stats[6], stats[7]
        contrast = _contrast(stats, max(2.0, float(spacing.min())))
        if not np.isfinite(contrast):
            continue
        voxels = np.argwhere(les)
        nearest = voxels[np.argmin((((voxels - voxels.mean(0)) * spacing) ** 2).sum(1))]
        centre = tuple(int(b.start + v) for b, v in zip(box, nearest))
        out.append((len(voxels), contrast / max(noise, 1e-3 * abs(level + contrast), 1e-12), centre))
    return sorted(out, key=lambda item: -item[0])


def _each_lesion(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray, spacing, max_mm: float,
                 reach_mm: float = 0.0) -> Iterator[tuple[tuple[slice, ...], tuple]]:
    """Each connected lesion of ``lesion`` (bool [I, J, K]) measured on its own: yields (the box of
    ``_lesion_statistics`` on the whole scan's grid, its statistics with this lesion alone as ``les``), for the
    lesions that have a reference shell."""
    spacing = np.asarray(spacing, float)
    pad = _box_reach(spacing, max(max_mm, 0.0), reach_mm)
    labels, _ = ndimage.label(lesion, ndimage.generate_binary_structure(3, 3))
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        # this lesion alone, on a crop that holds everything _lesion_statistics reads
        crop = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(found, pad, lesion.shape))
        stats = _lesion_statistics(np.asarray(image)[crop], labels[crop] == index, np.asarray(brain)[crop], spacing,
                                   max(max_mm, 0.0), reach_mm)
        if stats is not None:
            inner = stats[0]
            yield tuple(slice(c.start + i.start, c.start + i.stop) for c, i in zip(crop, inner)), stats


def _contrast(stats: tuple, within_mm: float = 2.0) -> float:
    """A lesion's contrast from its ``_lesion_statistics``: the reference tissue level without the CSF beside it
    (``_tissue_shell``) within ``within_mm`` of it (median) minus its own level; positive for a dark lesion, NaN when
    no voxel lies that close."""
    dist, level, tissue_reference = stats[3], stats[6], stats[8]
    near = (dist > 0) & (dist <= within_mm + 1e-6)
    return float(np.median(tissue_reference[near])) - level if near.any() else float("nan")
