"""The local network's heal correction is kept within the level of the tissue around the fill region
(``USBLib.editor.local.level_gate``)."""
from __future__ import annotations

import numpy as np

from USBLib.editor.local.level_gate import limit_to_surroundings

SHAPE = (32, 32, 32)


def _ball(centre, radius: float) -> np.ndarray:
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(np.indices(SHAPE), centre)))
    return r <= radius


def _correction(region: np.ndarray, mean: float, seed: int = 0, samples: int = 2) -> np.ndarray:
    """A correction with a pattern (not a constant) and the given mean over ``region``, and a smaller one outside
    it (a network's correction reaches past the region): [samples, *SHAPE]."""
    rng = np.random.default_rng(seed)
    out = (rng.uniform(0.0, 0.2, (samples, *SHAPE)) * mean).astype(np.float32)
    for i in range(samples):
        values = rng.uniform(0.5, 1.5, int(region.sum())).astype(np.float32)
        out[i][region] = values / values.mean() * mean
    return out


def _stripes(low: float, high: float) -> np.ndarray:
    """A scan of alternating 2-voxel slabs at two levels (a ring around a ball has them as its quartiles)."""
    image = np.full(SHAPE, low, np.float32)
    image[(np.arange(SHAPE[0]) // 2) % 2 == 1] = high
    return image


def test_a_lift_inside_a_homogeneous_nucleus_is_taken_back():
    """A lesion inside a homogeneous nucleus whose base is already at the nucleus' level: no room to rise."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.55, np.float32)
    image[region] = 0.3  # the lesion
    base = np.full(SHAPE, 0.55, np.float32)
    out = limit_to_surroundings(_correction(region, 0.1), image, base, region)
    assert np.all(out == 0)


def test_a_sagging_fill_may_rise_to_the_band_of_its_surroundings_not_past_it():
    """Homogeneous tissue at 0.85 around a base at 0.75: a lift of 0.15 is scaled to 0.1 as a whole, inside the
    region and around it (its pattern kept, no seam at the region's edge); a lift of 0.06 is left bit for bit; a
    lowering, away from the band above the base, is taken back."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.85, np.float32)
    image[region] = 0.4
    base = image.copy()
    base[region] = 0.75
    big = _correction(region, 0.15)
    out = limit_to_surroundings(big, image, base, region)
    assert np.isclose(out[:, region].mean(), 0.1, atol=1e-4)
    assert np.allclose(out, big * (0.1 / 0.15), atol=1e-5)
    small = _correction(region, 0.06)
    assert np.array_equal(limit_to_surroundings(small, image, base, region), small)
    assert np.all(limit_to_surroundings(-small, image, base, region) == 0)  # the band is above the base


def test_the_band_widens_with_the_spread_of_the_tissue_around():
    """Tissue of two levels around the region (0.6 and 0.9 in slabs): the fill may rise further than with
    homogeneous tissue at the ring's median (median + IQR against the median), and a larger lift ends on the band's
    edge, its pattern kept."""
    region = _ball((16, 16, 16), 5)
    two_levels = _stripes(0.6, 0.9)
    base = two_levels.copy()
    base[region] = 0.75
    lift = _correction(region, 1.0)
    out = limit_to_surroundings(lift, two_levels, base, region)
    homogeneous = np.full(SHAPE, 0.9, np.float32)  # the two-level ring's median
    narrow = limit_to_surroundings(lift, homogeneous, base, region)
    assert np.isclose(narrow[:, region].mean(), 0.15, atol=1e-4)  # up to 0.9
    assert 0.3 < out[:, region].mean() < 1.0
    assert np.allclose(out[:, region], lift[:, region] * out[:, region].mean(), atol=1e-5)


def test_a_bright_fill_may_be_lowered_to_its_surroundings():
    """The same band below: a base above homogeneous tissue around it may be lowered to the tissue, not past it."""
    region = _ball((16, 16, 16), 5)
    image = np.full(SHAPE, 0.5, np.float32)
    base = image.copy()
    base[region] = 0.6
    out = limit_to_surroundings(_correction(region, -0.2), image, base, region)
    assert np.isclose(out[:, region].mean(), -0.1, atol=1e-4)


def test_each_part_of_the_region_is_judged_by_its_own_surroundings():
    """Two lesions in one box: one in a homogeneous nucleus at its base's level (its lift removed, also around it),
    one in white matter whose base sagged (its lift kept); each voxel belongs to the nearer part."""
    nucleus_lesion, wm_lesion = _ball((9, 16, 16), 3), _ball((23, 16, 16), 3)
    region = nucleus_lesion | wm_lesion
    image = np.full(SHAPE, 0.85, np.float32)
    image[_ball((9, 16, 16), 7)] = 0.5
    base = image.copy()
    base[wm_lesion] = 0.7
    correction = _correction(region, 0.1)
    out = limit_to_surroundings(correction, image, base, region)
    x = np.indices(SHAPE)[0]
    nearer_nucleus, nearer_wm = x < 16, x > 16  # the plane between the two lesions: either's
    assert np.all(out[:, nearer_nucleus] == 0) and correction[:, nearer_nucleus & ~region].any()
    assert np.array_equal(out[:, nearer_wm], correction[:, nearer_wm])
