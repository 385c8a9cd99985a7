import numpy as np
from scipy import ndimage

from USBLib.imaging.fusion import dilate_mm, edit_weight, fuse


def _mask(shape=(40, 40, 40), center=(20, 20, 20), r=5):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (np.linalg.norm(ijk - np.array(center), axis=-1) <= r).astype(np.uint8)


def test_outside_region_is_bit_for_bit_and_inside_changes():
    rng = np.random.default_rng(0)
    original = rng.integers(-500, 3000, size=(40, 40, 40)).astype(np.int16)
    mask = _mask()
    spacing = (1.0, 1.0, 1.2)
    weight = edit_weight(mask, np.ones_like(mask), spacing, 0.0, 4.0)
    deviation = rng.normal(0, 200, size=original.shape)
    out = fuse(original, deviation, weight)
    assert out.dtype == original.dtype
    outside = weight == 0
    assert 0.5 * outside.size < outside.sum() < outside.size
    assert np.array_equal(out[outside], original[outside])
    core = mask > 0
    assert np.all(weight[core] == 1.0)
    np.testing.assert_array_equal(out[core], np.clip(np.rint(original[core] + deviation[core]), -32768, 32767))


def test_float_nan_free_and_integer_range_clipped():
    original = np.full((10, 10, 10), 32000, np.int16)
    weight = np.zeros((10, 10, 10), np.float32)
    weight[4:6, 4:6, 4:6] = 1
    out = fuse(original, np.full(original.shape, 5000.0), weight)
    assert out.max() == 32767 and out.dtype == np.int16


def test_seam_is_continuous():
    mask = _mask(r=6)
    spacing = (1.0, 1.0, 1.0)
    width = 5.0
    weight = edit_weight(mask, np.ones_like(mask), spacing, 1.0, width)
    # the weight never jumps: neighbouring voxels differ by at most ~1.5/width (smoothstep slope), also at the border
    for axis in range(3):
        assert np.abs(np.diff(weight, axis=axis)).max() <= 1.5 / width + 1e-6
    # so a constant deviation enters the image without a step at the region's edge
    out = fuse(np.zeros(mask.shape, np.float32), np.full(mask.shape, 100.0), weight)
    for axis in range(3):
        assert np.abs(np.diff(out, axis=axis)).max() <= 100 * 1.5 / width + 1e-3


def test_dilate_mm_respects_anisotropic_spacing():
    mask = np.zeros((21, 21, 21), np.uint8)
    mask[10, 10, 10] = 1
    grown = dilate_mm(mask, (1.0, 1.0, 3.0), 3.0)
    assert grown[7, 10, 10] and not grown[6, 10, 10]  # 3 mm along i
    assert grown[10, 10, 11] and not grown[10, 10, 12]  # one 3 mm voxel along k


def test_a_heal_shell_keeps_full_weight_one_voxel_past_the_core_within_the_same_edit_region():
    mask = _mask(r=6)
    brain = np.ones_like(mask)
    plain = edit_weight(mask, brain, (1.0, 1.0, 1.0), 0.0, 3.0)
    shell = edit_weight(mask, brain, (1.0, 1.0, 1.0), 0.0, 3.0, shell=True)
    faces = ndimage.binary_dilation(mask > 0) & (mask == 0)
    assert np.all(shell[faces] == 1.0) and np.all(plain[faces] < 1.0)
    assert np.all(plain[shell > 0] > 0)  # isotropic: the edit region is no larger
    for axis in range(3):  # and no seam: the ramp is steeper, over the 2 mm left
        assert np.abs(np.diff(shell, axis=axis)).max() <= 1.5 / 2.0 + 1e-6
    # a feather shorter than two voxels has no room for a shell: the weight is the plain one
    assert np.array_equal(edit_weight(mask, brain, (1.0, 1.0, 1.0), 0.0, 1.5, shell=True),
                          edit_weight(mask, brain, (1.0, 1.0, 1.0), 0.0, 1.5))


def test_on_thick_slices_the_heal_shell_takes_the_next_slice_whole():
    """3 mm slices and a 3 mm feather: the plain weight is 0 on the next slice (no feather along it at all); the
    shell gives it full weight on the core's footprint, ramping off in-plane."""
    mask = np.zeros((30, 30, 12), np.uint8)
    mask[12:18, 12:18, 5:7] = 1
    brain = np.ones_like(mask)
    plain = edit_weight(mask, brain, (1.0, 1.0, 3.0), 0.0, 3.0)
    shell = edit_weight(mask, brain, (1.0, 1.0, 3.0), 0.0, 3.0, shell=True)
    assert np.all(plain[:, :, 4] == 0) and np.all(plain[:, :, 7] == 0)
    assert np.all(shell[12:18, 12:18, 4] == 1.0) and np.all(shell[12:18, 12:18, 7] == 1.0)
    assert np.all(shell[:, :, :4] == 0) and np.all(shell[:, :, 8:] == 0)
    assert np.abs(np.diff(shell[:, :, 7], axis=0)).max() <= 1.5 / 2.0 + 1e-6
