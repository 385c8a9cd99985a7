"""The local network's heal correction is kept between the classical fill and the tissue around the fill region
(``USBLib.editor.local.level_gate``)."""
from __future__ import annotations

import numpy as np

from USBLib.editor.local.level_gate import limit_to_surroundings

SHAPE = (32, 32, 32)


def _ball(centre, radius: float) -> np.ndarray:
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(SHAPE), centre)))
    return r <= radius


def _correction(region: np.ndarray, pattern_seed: int = 0, mean: float = 0.1, samples: int = 2) -> np.ndarray:
    """A correction with a pattern (not a constant) and the given mean over ``region``: [samples, *SHAPE]."""
    rng = np.random.default_rng(pattern_seed)
    out = np.zeros((samples, *SHAPE), np.float32)
    for i in range(samples):
        values = rng.uniform(0.5, 1.5, int(region.sum())).astype(np.float32)
        out[i][region] = values / values.mean() * mean
    return out


def test_a_fill_at_the_level_of_its_surroundings_is_not_lifted():
    """A lesion inside a homogeneous nucleus: the base already has the nucleus' level, so a lift is removed."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.55, np.float32)
    image[region] = 0.3  # the lesion
    base = np.full(SHAPE, 0.55, np.float32)
    out = limit_to_surroundings(_correction(region), image, base, region)
    assert np.all(out == 0)


def test_a_sagging_fill_may_rise_to_its_surroundings_not_past_them():
    """A base 0.1 below the tissue around it: a lift of 0.15 is scaled to 0.1 as a whole (its pattern kept); a lift
    of 0.06 is left bit for bit; a lowering (away from the surroundings) is removed."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.85, np.float32)
    image[region] = 0.4
    base = image.copy()
    base[region] = 0.75
    big = _correction(region, mean=0.15)
    out = limit_to_surroundings(big, image, base, region)
    assert np.allclose(out[:, region].mean(), 0.1, atol=1e-4)
    assert np.allclose(out[:, region], big[:, region] * (0.1 / 0.15), atol=1e-5)
    small = _correction(region, mean=0.06)
    assert np.array_equal(limit_to_surroundings(small, image, base, region), small)
    assert np.all(limit_to_surroundings(-small, image, base, region) == 0)


def test_a_bright_lesion_may_be_lowered_to_its_surroundings():
    """The same rule with the signs reversed: a base above the tissue around it may be lowered to it."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.5, np.float32)
    base = image.copy()
    base[region] = 0.6
    out = limit_to_surroundings(_correction(region, mean=-0.2), image, base, region)
    assert np.allclose(out[:, region].mean(), -0.1, atol=1e-4)


def test_each_part_of_the_region_is_judged_by_its_own_surroundings():
    """Two lesions in one box: one in a nucleus at its base's level (its lift removed), one in white matter whose
    base sagged (its lift kept); the ring voxels belong to the nearer part."""
    nucleus_lesion, wm_lesion = _ball((9, 16, 16), 3), _ball((23, 16, 16), 3)
    region = nucleus_lesion | wm_lesion
    image = np.full(SHAPE, 0.85, np.float32)
    image[_ball((9, 16, 16), 7)] = 0.5
    base = image.copy()
    base[wm_lesion] = 0.7
    correction = _correction(region, mean=0.1)
    out = limit_to_surroundings(correction, image, base, region)
    assert np.all(out[:, nucleus_lesion] == 0)
    assert np.array_equal(out[:, wm_lesion], correction[:, wm_lesion])
    assert np.all(out[:, ~region] == correction[:, ~region])
