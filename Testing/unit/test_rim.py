"""The fill region of a heal grown into the lesion's dark rim only (``USBLib.imaging.rim``)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.rim import darker_than_lesion, lesion_contrasts, rim_region

SHAPE = (48, 48, 48)


def _lesion(radius_mask: float, rim: float, noise: float = 0.02, seed: int = 0):
    """White matter (1.0) with a dark lesion (0.5) whose darkening fades out over ``rim`` voxels past a ball of
    ``radius_mask`` voxels; the drawn mask is that ball."""
    zz, yy, xx = np.indices(SHAPE)
    r = np.sqrt((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2)
    darkening = np.clip((radius_mask + rim - r) / rim, 0.0, 1.0) if rim > 0 else (r <= radius_mask).astype(float)
    image = 1.0 - 0.5 * darkening + np.random.default_rng(seed).normal(0, noise, SHAPE)
    return image.astype(np.float32), (r <= radius_mask).astype(np.uint8), r


def test_the_region_follows_a_dark_rim_and_stops_at_healthy_tissue():
    image, mask, r = _lesion(6.0, 3.0)
    brain = np.ones(SHAPE, bool)
    region = rim_region(image, mask, brain, (1.0, 1.0, 1.0), max_mm=4.0)
    assert region[mask > 0].all()
    assert region[(r > 6.0) & (r <= 8.0)].mean() > 0.9   # the darkened rim is rewritten
    assert not region[r > 10.5].any()                     # healthy tissue beyond the rim (and its buffer) stays


def test_a_mask_drawn_larger_than_the_lesion_grows_by_the_one_voxel_buffer_only():
    image, _, r = _lesion(5.0, 0.0)
    big = (r <= 8.0).astype(np.uint8)  # drawn generously: the tissue around it is healthy
    region = rim_region(image, big, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), max_mm=3.0)
    assert region[big > 0].all() and not region[r > 8.0 + np.sqrt(2) + 1e-6].any()


def test_dark_tissue_next_to_the_lesion_is_not_taken_for_rim():
    """A ventricle (CSF, darker than the lesion) beside the lesion: it is not grown into (past the buffer voxel)."""
    image, mask, r = _lesion(5.0, 2.0, noise=0.01)
    csf = np.zeros(SHAPE, bool)
    csf[:, :, 31:] = True  # a dark slab 2 voxels from the lesion's edge, reaching past the reference shell
    image[csf] = 0.2
    region = rim_region(image, mask, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), max_mm=4.0)
    assert not (region & csf & ~rim_region(image, mask, np.ones(SHAPE, bool), (1, 1, 1), 4.0, tau=10.0)).any()
    assert (region & ~csf & ~(mask > 0)).any()  # while the rim on the other sides is taken


def test_no_growth_limit_gives_the_mask_and_outside_the_brain_nothing_grows():
    image, mask, r = _lesion(6.0, 3.0)
    assert np.array_equal(rim_region(image, mask, np.ones(SHAPE, bool), (1, 1, 1), 0.0), mask > 0)
    brain = np.ones(SHAPE, bool)
    brain[:, :, 28:] = False
    region = rim_region(image, mask, brain, (1, 1, 1), 4.0)
    assert not (region & ~brain & ~(mask > 0)).any()


def test_a_ventricle_beside_the_lesion_is_marked_to_keep_and_the_rim_is_not():
    """``darker_than_lesion``: the CSF slab next to the lesion (darker than the lesion) is kept out of the edit,
    within the reach only; the lesion's partial-volume rim (between the lesion's level and the tissue's) is not."""
    image, mask, r = _lesion(5.0, 2.0, noise=0.01)
    csf = np.zeros(SHAPE, bool)
    csf[:, :, 31:] = True
    image[csf] = 0.2
    keep = darker_than_lesion(image, mask, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), 3.0, reach_mm=6.0)
    dist = ndimage.distance_transform_edt(mask == 0)
    assert keep[csf & (dist <= 6.0)].all()
    assert not keep[~csf].any()  # neither the lesion nor its rim nor the white matter
    assert not keep[dist > 6.0 + 1e-6].any()
    bright = 2.0 - image  # the same scene with a bright lesion: the slab (under a quarter of the shell) is brighter
    assert np.array_equal(darker_than_lesion(bright, mask, np.ones(SHAPE, bool), (1, 1, 1), 3.0, 6.0), keep)
    assert lesion_contrasts(bright, mask, np.ones(SHAPE, bool), (1, 1, 1), 3.0)[0][1] < -4  # still a bright lesion


def test_a_dark_lesion_between_ventricles_is_measured_against_white_matter_not_csf():
    """A lesion in a white-matter column with CSF on four sides (a callosal lesion between the lateral ventricles,
    most of its reference shell CSF): the tissue it replaced is the white matter, so it is dark (measured with the
    CSF it came out brighter than "the tissue around it" and its white matter was kept as if it were CSF); the CSF
    is what a heal must keep, and the rim is grown into on the white-matter sides."""
    image, mask, r = _lesion(5.0, 2.0, noise=0.01)
    _, yy, xx = np.indices(SHAPE)
    csf = (np.abs(xx - 24) >= 7) | (np.abs(yy - 24) >= 7)
    image[csf] = 0.2
    brain = np.ones(SHAPE, bool)
    (_, contrast, _), = lesion_contrasts(image, mask, brain, (1.0, 1.0, 1.0), 3.0)
    assert contrast > 10  # 0.5 darker than the white matter, noise 0.01 (smoothed): measured 13.5 (with CSF: -1.8)
    keep = darker_than_lesion(image, mask, brain, (1.0, 1.0, 1.0), 3.0, reach_mm=6.0)
    near = ndimage.distance_transform_edt(mask == 0) <= 6.0
    assert not keep[~csf].any() and keep[csf & near].all()
    region = rim_region(image, mask, brain, (1.0, 1.0, 1.0), max_mm=4.0)
    assert region[(r > 5.0) & (r <= 6.5) & ~csf].mean() > 0.8


def test_the_rim_of_a_dark_lesion_is_not_kept_beside_a_paler_one():
    """Several lesions in one mask, one much darker than the other: each is measured on its own, so the dark one's
    partial-volume rim (darker than the pale lesion, not than its own) is rewritten, not kept."""
    zz, yy, xx = np.indices(SHAPE)
    image = np.full(SHAPE, 1.0, np.float32) + np.random.default_rng(1).normal(0, 0.01, SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    rims = np.zeros(SHAPE, bool)
    for centre, depth in (((24, 24, 14), 0.15), ((24, 24, 32), 0.6)):
        r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
        image *= 1 - depth * np.clip((6.0 - r) / 2.0, 0, 1)  # core r <= 4, rim fading to 6
        mask[r <= 4.0] = 1
        if depth > 0.5:
            rims = (r > 4.0) & (r < 5.5)
    keep = darker_than_lesion(image, mask, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), 3.0, reach_mm=6.0)
    assert not keep[rims].any()


def test_each_lesion_s_contrast_is_measured_in_noise_sds_with_its_sign():
    """``lesion_contrasts``: a dark lesion far above the noise, the same ball bright (negative), a ball over plain
    tissue near zero; each connected lesion on its own, largest first."""
    image, mask, r = _lesion(5.0, 0.0)          # 0.5 in 1.0, noise 0.02: 25 noise SDs
    brain = np.ones(SHAPE, bool)
    (voxels, dark, centre), = lesion_contrasts(image, mask, brain, (1.0, 1.0, 1.0), 3.0)
    assert voxels == int(mask.sum()) and 15 < dark < 40 and centre == (24, 24, 24)
    bright = np.where(mask > 0, 1.5, image).astype(np.float32)
    assert lesion_contrasts(bright, mask, brain, (1, 1, 1), 3.0)[0][1] < -15
    plain = np.random.default_rng(1).normal(1.0, 0.02, SHAPE).astype(np.float32)
    second = np.zeros(SHAPE, np.uint8)
    second[4:7, 4:7, 4:7] = 1                  # a second, smaller lesion in a corner
    found = lesion_contrasts(plain, np.maximum(mask, second), brain, (1, 1, 1), 3.0)
    assert [v for v, _, _ in found] == [int(mask.sum()), 27] and all(abs(c) < 4 for _, c, _ in found)


def test_contrasts_of_a_noise_free_or_coarse_scan_are_finite_and_a_centre_lies_in_its_lesion():
    """No noise: a finite contrast (the noise floored at 0.1 % of the tissue's level), here negative: the masked
    tissue is brighter than the grey tissue around it, which a heal (brightening only) leaves as it is; a 3 mm scan
    (no voxel within 2 mm of the lesion) is measured one voxel out; the centre of a C-shaped lesion is one of its
    voxels."""
    zz, yy, xx = np.indices(SHAPE)
    r = np.sqrt((zz - 24) ** 2 + (yy - 24) ** 2 + (xx - 24) ** 2)
    image = np.where(r <= 7.0, 1.0, 0.6).astype(np.float32)   # mask r <= 5 over plain tissue, grey 2 voxels out
    (_, contrast, _), = lesion_contrasts(image, (r <= 5.0).astype(np.uint8), np.ones(SHAPE, bool), (1, 1, 1), 3.0)
    assert np.isfinite(contrast) and -2000 < contrast < -4
    dark, mask, _ = _lesion(4.0, 0.0)
    (_, coarse, _), = lesion_contrasts(dark, mask, np.ones(SHAPE, bool), (3.0, 3.0, 3.0), 3.0)
    assert np.isfinite(coarse) and coarse > 4
    ring = ((r >= 5.0) & (r <= 7.0) & (np.abs(zz - 24) <= 1) & (xx < 28)).astype(np.uint8)  # a C in one slab
    (_, _, centre), = lesion_contrasts(dark, ring, np.ones(SHAPE, bool), (1, 1, 1), 3.0)
    assert ring[centre]


def test_grey_matter_past_the_rim_is_not_taken_for_rim():
    """A partial-volume rim fades outwards: a band of darker tissue just past it (grey matter beyond a white-matter
    lesion, brighter than the lesion but darker than the faded rim beside it) is not grown into, past the buffer
    voxel, though it is darker than the reference tissue; without the fading test it is."""
    image, mask, r = _lesion(5.0, 3.0, noise=0.01)
    zz, yy, xx = np.indices(SHAPE)
    band = (xx >= 32) & (xx < 35) & (r < 11)  # 3 voxels of grey matter (0.7) where the rim has faded to 0.83
    image[band] = 0.7
    brain = np.ones(SHAPE, bool)
    plain = rim_region(image, mask, brain, (1.0, 1.0, 1.0), max_mm=6.0, fade_noise=None)
    fading = rim_region(image, mask, brain, (1.0, 1.0, 1.0), max_mm=6.0)
    rest = fading & ~band
    assert (plain & band).sum() > 2 * (fading & band).sum()
    assert not (fading & band & ~ndimage.binary_dilation(rest, ndimage.generate_binary_structure(3, 2))).any()
    assert fading[(r > 5.0) & (r <= 7.0) & ~band].mean() > 0.9  # the rim itself is still taken
