"""Noise synthesis for heal's realism mode (``USBLib.imaging.texture``)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.texture import GRAIN_SCALE, high_pass, matched_noise, robust_sd


def _scan_with_smooth_fill(noise_sd: float = 0.04):
    rng = np.random.default_rng(0)
    shape = (40, 40, 40)
    image = (1.0 + rng.normal(0, noise_sd, shape)).astype(np.float32)
    zz, yy, xx = np.indices(shape)
    region = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 36
    image[region] = 1.0  # a perfectly smooth fill in a grainy scan
    return image, region


def test_the_fill_gets_the_calibrated_share_of_the_grain_of_the_ring_around_it():
    image, region = _scan_with_smooth_fill()
    noise = matched_noise(image, region, np.ones(image.shape, bool), (1, 1, 1), np.random.default_rng(1))
    textured = image + noise
    ring = (ndimage.distance_transform_edt(~region) > 1) & (ndimage.distance_transform_edt(~region) <= 5)
    inside, around = robust_sd(high_pass(textured)[region]), robust_sd(high_pass(textured)[ring])
    assert abs(inside / around - GRAIN_SCALE) < 0.1  # (a share of the ring's detail, which has tissue edges)
    assert abs(float(noise[region].mean())) < 0.01  # zero mean: the level of the fill stays
    far = ndimage.distance_transform_edt(~region) > 3
    assert not noise[far].any()


def test_noise_is_seeded_and_absent_where_the_fill_already_has_grain():
    image, region = _scan_with_smooth_fill()
    a = matched_noise(image, region, np.ones(image.shape, bool), (1, 1, 1), np.random.default_rng(5))
    b = matched_noise(image, region, np.ones(image.shape, bool), (1, 1, 1), np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    grainy = (1.0 + np.random.default_rng(2).normal(0, 0.04, image.shape)).astype(np.float32)
    extra = matched_noise(grainy, region, np.ones(image.shape, bool), (1, 1, 1), np.random.default_rng(5))
    assert robust_sd(extra[region]) < 0.3 * robust_sd(a[region])
