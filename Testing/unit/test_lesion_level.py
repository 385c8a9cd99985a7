"""``USBLib.imaging.lesion_level``: an embed's darkening scaled, lesion by lesion, to the level asked for."""
import numpy as np
import pytest
from scipy import ndimage

from USBLib.imaging.lesion_level import MAX_SCALE, level_scales, lesion_surround_ratio


def _scan_with_two_lesions():
    """Tissue at 100 with noise, two separate ball lesions, and an embed-like edit: a smooth darkening of each ball
    (one to about 0.8 of the tissue, the other to about 0.9) that reaches a voxel or two past it."""
    rng = np.random.default_rng(0)
    shape = (40, 40, 30)
    scan = 100.0 + rng.normal(0, 2.0, shape)
    grid = np.indices(shape).transpose(1, 2, 3, 0)
    mask = np.zeros(shape, bool)
    effect = np.zeros(shape)
    for centre, depth in (((12, 12, 15), 20.0), ((28, 28, 15), 10.0)):
        ball = np.linalg.norm(grid - np.array(centre), axis=-1) <= 4
        mask |= ball
        effect -= depth * ndimage.gaussian_filter(ball.astype(float), 1.0)
    return scan, effect, mask


@pytest.mark.parametrize("level", [0.5, 0.95])
def test_each_lesion_reaches_the_level_asked_for_with_its_own_factor(level):
    scan, effect, mask = _scan_with_two_lesions()
    brain = np.ones(scan.shape, bool)
    scales, records = level_scales(scan, effect, mask, brain, level)
    labels, count = ndimage.label(mask, ndimage.generate_binary_structure(3, 3))
    assert count == 2 and len(records) == 2
    out = scan + scales * effect
    for index, record in enumerate(records, start=1):
        lesion = labels == index
        assert lesion_surround_ratio(out, lesion) == pytest.approx(level, abs=1e-6)
        assert record["ratio"] == pytest.approx(level, abs=1e-3) and record["voxels"] == int(lesion.sum())
    assert records[0]["scale"] != records[1]["scale"]  # each lesion its own factor (they were drawn 0.8 and 0.9)
    # every voxel takes the factor of its nearest lesion, so each edit's edge follows its own lesion
    to_first, to_second = ndimage.distance_transform_edt(labels != 1), ndimage.distance_transform_edt(labels != 2)
    assert np.allclose(scales[to_first < to_second - 1], records[0]["scale"], atol=1e-3)
    assert np.allclose(scales[to_second < to_first - 1], records[1]["scale"], atol=1e-3)
    assert np.array_equal(scales * effect == 0, effect == 0)  # no voxel the edit left alone is changed


def test_a_lesion_the_edit_does_not_darken_keeps_its_edit_and_a_faint_one_is_capped():
    scan, effect, mask = _scan_with_two_lesions()
    brain = np.ones(scan.shape, bool)
    scales, records = level_scales(scan, np.zeros_like(effect), mask, brain, 0.5)
    assert np.all(scales == 1) and all(r["scale"] == 1 for r in records)
    scales, records = level_scales(scan, effect * 1e-3, mask, brain, 0.2)
    assert all(r["scale"] == MAX_SCALE and r["ratio"] > 0.9 for r in records)
    assert level_scales(scan, effect, np.zeros_like(mask), brain, 0.5)[1] == []


def test_the_engine_floors_the_darkening_inside_the_brain_only_and_says_when_a_level_is_missed():
    """``Editor._lesion_level_stage``: no brain voxel goes below the scan's darkest brain voxel (here 60), voxels
    outside the brain keep the scaled edit as it is (never turned into a brightening), the reached level is measured
    after that floor, and a lesion that misses the level asked for gets a note."""
    from USBLib.editor.editor import Editor

    scan, effect, mask = _scan_with_two_lesions()
    scan[35:, 35:, 20:] = 60.0  # the brain's darkest voxels (CSF, far from both lesions)
    brain = np.ones(scan.shape, bool)
    brain[:, :, :3] = False
    scan[:, :, :3] = 10.0  # background darker than the brain's darkest voxel
    effect[:, :, :3] = -1.0
    extra: dict = {}
    scaled, _ = Editor._lesion_level_stage(scan, np.eye(4), mask, brain, effect[None], effect[None], 0.05, extra)
    out = scan + scaled[0]
    assert out[brain].min() >= scan[brain].min() - 1e-4
    assert np.all(scaled[0][~brain] <= 0)  # outside the brain the edit still only darkens
    assert all(r["ratio"] > 0.5 for r in extra["lesion_levels"])  # the floor (60) kept them far above 0.05
    assert len(extra["notes"]) == 2 and "not the 0.05 asked" in extra["notes"][0]
    extra = {}
    Editor._lesion_level_stage(scan, np.eye(4), mask, brain, effect[None], effect[None], 0.7, extra)
    assert "notes" not in extra and all(abs(r["ratio"] - 0.7) < 0.02 for r in extra["lesion_levels"])
