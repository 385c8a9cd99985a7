"""``patch_blend``: a heal's fill moved towards a non-local patch fill of the mask grown by 2 voxels
(``Editor._patch_blend_stage``), only there, never darker than the scan, never over the CSF beside the lesion."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.editor.editor import Editor
from USBLib.editor.stage_rules import (PATCH_BLEND_CSF_LEVEL, PATCH_BLEND_DOWN_SHARE, PATCH_BLEND_GROWTH,
                                       PATCH_BLEND_MAX_PULL, blends_patches)

SHAPE = (40, 40, 40)
TISSUE, LESION, CSF = 100.0, 60.0, 20.0


def _scene(csf_gap: int | None):
    """Tissue with grain and a dark spherical lesion (the mask); with ``csf_gap``, a CSF slab that many voxels past
    the lesion's edge."""
    rng = np.random.default_rng(0)
    image = (TISSUE + 2.0 * rng.standard_normal(SHAPE)).astype(np.float32)
    zz, yy, xx = np.indices(SHAPE)
    mask = (zz - 20) ** 2 + (yy - 20) ** 2 + (xx - 20) ** 2 <= 16
    image[mask] = LESION
    csf = np.zeros(SHAPE, bool)
    if csf_gap is not None:
        csf = (xx >= 25 + csf_gap) & (xx <= 30 + csf_gap) & (abs(zz - 20) <= 6) & (abs(yy - 20) <= 6)
        image[csf] = CSF
    return image, mask.astype(np.uint8), csf


def _blend(image, mask, weight=0.5, fill=30.0):
    effect = np.zeros((1, *SHAPE), np.float32)
    effect[0][mask > 0] = fill  # the network's fill (30: 10 below the tissue it should reach)
    reach = ndimage.binary_dilation(mask > 0, iterations=6)
    settings = {"patch_blend": weight, "dilation_mm": 3.0, "margin_mm": 3.0}
    p99 = float(np.percentile(image.astype(np.float32), 99))  # the whole scan's (here: all brain)
    out, out_reach = Editor._patch_blend_stage(image, np.eye(4), mask, np.ones(SHAPE, bool), effect, reach, settings,
                                               p99)
    assert np.array_equal(out_reach, reach)
    return effect, out


def test_the_blend_moves_the_fill_towards_the_patch_fill_only_near_the_mask():
    image, mask, _ = _scene(None)
    effect, out = _blend(image, mask)
    grown = ndimage.binary_dilation(mask > 0, ndimage.generate_binary_structure(3, 3), iterations=PATCH_BLEND_GROWTH)
    assert np.array_equal(out[:, ~grown], effect[:, ~grown])  # nothing changes past the grown mask
    inside = out[0][mask > 0]
    # the patch fill is tissue (about 100, a deviation of about 40): half-way from 30 to 40
    assert 34.0 < inside.mean() < 36.0 and inside.std() < 1.0, (inside.mean(), inside.std())
    assert out.min() >= 0.0  # brightening only


def test_a_patch_fill_below_the_fill_pulls_it_down_by_a_share_of_the_weight():
    """Where the patch fill is darker than the network's fill, the fill moves ``PATCH_BLEND_DOWN_SHARE`` of the
    weight towards it (the network errs dark more often than bright), not the whole weight."""
    image, mask, _ = _scene(None)
    _, out = _blend(image, mask, weight=0.6, fill=46.0)  # 6 above the patch fill's deviation of about 40
    inside = out[0][mask > 0]
    expected = 46.0 - 0.6 * PATCH_BLEND_DOWN_SHARE * 6.0
    assert abs(inside.mean() - expected) < 0.3 and inside.mean() > 46.0 - 0.6 * 6.0 + 1.0, inside.mean()


def test_beside_csf_the_fill_moves_up_by_a_share_of_the_weight_only():
    """A voxel whose 3x3x3 neighbourhood reaches CSF (``PATCH_BLEND_CSF_LEVEL``) is pulled up by
    ``PATCH_BLEND_DOWN_SHARE`` of the weight at most: a full up-pull there paints tissue onto a ventricle's edge."""
    image, mask, _ = _scene(-1)  # CSF over the lesion's outermost layer on one side
    effect, out = _blend(image, mask, weight=0.6)
    scale = float(np.percentile(image, 99))
    near = (ndimage.minimum_filter(image, size=3) < PATCH_BLEND_CSF_LEVEL * scale) & (image == LESION)
    far = (ndimage.minimum_filter(image, size=3) >= PATCH_BLEND_CSF_LEVEL * scale) & (mask > 0)
    assert near.sum() >= 5 and far.sum() >= 5
    moved = out[0] - effect[0]
    assert 0.6 * 10.0 * 0.8 < moved[far].mean() < 0.6 * 10.0 * 1.2, moved[far].mean()  # the full weight, up
    assert moved[near].max() <= 0.6 * PATCH_BLEND_DOWN_SHARE * (TISSUE - LESION - 30.0 + 8.0), moved[near].max()


def test_a_patch_fill_that_copies_csf_darkens_the_fill_by_little_and_leaves_the_csf():
    """A patch fill whose grown region reaches CSF copies CSF inwards, layer by layer; the blend counts a patch
    fill far below the fill as only ``PATCH_BLEND_MAX_PULL`` of the range below it (and moves a share of the weight
    towards it), and the CSF keeps its values."""
    for gap in (1, 2):
        image, mask, csf = _scene(gap)
        effect, out = _blend(image, mask)
        assert np.array_equal(out[:, csf], effect[:, csf])
        scale = float(np.percentile(image, 99))
        inside = mask > 0
        floor = 0.5 * PATCH_BLEND_DOWN_SHARE * PATCH_BLEND_MAX_PULL * scale  # weight x share x the bounded pull
        assert (out[0][inside] >= effect[0][inside] - floor - 1e-4).all()
        assert (out[0][inside] < effect[0][inside]).any()  # the pull is there, bounded


def test_the_blend_runs_on_heals_of_1mm_scans_with_a_weight_only():
    mask = np.zeros(SHAPE, np.uint8)
    on = {"patch_blend": 0.45}
    assert blends_patches("heal", mask, on, np.eye(4))
    assert not blends_patches("heal", mask, {"patch_blend": 0.0}, np.eye(4))
    assert not blends_patches("embed", mask, on, np.eye(4))
    assert not blends_patches("heal", None, on, np.eye(4))
    assert not blends_patches("heal", mask, on, np.diag([1.0, 1.0, 3.0, 1.0]))  # thick slices: not measured there
