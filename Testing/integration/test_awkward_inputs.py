"""Inputs users really have (issue #22): scans with an intensity offset below zero, 0/255 and soft masks,
singleton 4-D scans, and an embed mask that reaches out of the brain."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

import phantoms
from conftest import SCAN_SHAPE, make_scan
from USBLib.apps.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory):
    return phantoms.make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-local", local=True, name="tiny-local")


def save(path, data, aff):
    nib.save(nib.Nifti1Image(data, aff), str(path))
    return path


def heal(capsys, bundle, image, mask, out, *extra):
    code, _, err = run(capsys, "heal", image, "--mask", mask, "-o", out, "--model", bundle.root, "--device", "cpu",
                       "--steps", "2", "--seed", "4", "--quiet", *extra)
    assert code == 0, err
    return np.asarray(nib.load(str(out)).dataobj)


def test_an_intensity_offset_and_scale_carry_through_the_heal(local_bundle, tmp_path, capsys):
    """a * x + b (a > 0) heals to a * heal(x) + b, also when the whole scan lies below zero (a T1 of values 0-300
    shifted by -500, as some pipelines write; it used to stop with an internal error in registration)."""
    img, mask, aff = make_scan(dtype=np.float32)
    a, b = 300.0 / float(img.max()), -500.0
    m = save(tmp_path / "m.nii.gz", mask, aff)
    plain = heal(capsys, local_bundle, save(tmp_path / "x.nii.gz", img, aff), m, tmp_path / "hx.nii.gz")
    shifted = heal(capsys, local_bundle, save(tmp_path / "y.nii.gz", a * img + b, aff), m, tmp_path / "hy.nii.gz")
    assert shifted.max() < 0  # (every voxel of the input is below zero)
    assert (plain != img).any()
    np.testing.assert_allclose(shifted, a * plain + b, atol=1e-3 * a * float(np.ptp(img)))


def test_a_fill_value_outside_the_field_of_view_does_not_change_the_heal(local_bundle, tmp_path, capsys):
    """A scan whose corner outside the field of view holds a fill value (-32768 in an int16 scan, as some
    conversions write) and with a few corrupt voxels (1e4 times the range) heals as the clean scan does: read as
    they were, the fill became the scan's zero point and compressed its contrast (the sample scan's heal came out
    3-8 % brighter, its registration stretched by up to 48 %). Those voxels are written back as they were."""
    img, mask, aff = make_scan(dtype=np.int16)
    m = save(tmp_path / "m.nii.gz", mask, aff)
    plain = heal(capsys, local_bundle, save(tmp_path / "x.nii.gz", img, aff), m, tmp_path / "hx.nii.gz")
    odd = img.copy()
    odd[:3, :3, :] = -32768                 # a fill value outside the field of view
    odd[-1, -1, -1] = 32767                 # and a corrupt voxel far from the lesion
    code, _, err = run(capsys, "heal", save(tmp_path / "y.nii.gz", odd, aff), "--mask", m, "-o", tmp_path / "hy.nii.gz",
                       "--model", local_bundle.root, "--device", "cpu", "--steps", "2", "--seed", "4", "--quiet")
    assert code == 0, err
    healed = np.asarray(nib.load(str(tmp_path / "hy.nii.gz")).dataobj)
    aside = np.zeros(img.shape, bool)
    aside[:3, :3, :] = True
    aside[-1, -1, -1] = True
    np.testing.assert_array_equal(healed[aside], odd[aside])  # written back bit for bit
    changed = plain != img
    assert changed.any()
    np.testing.assert_allclose(healed[changed].astype(float), plain[changed].astype(float), atol=2)
    sidecar = json.loads((tmp_path / "hy.json").read_text())
    assert any("far outside the scan's range" in note for note in sidecar["notes"])


def test_a_0_255_mask_is_a_binary_mask(local_bundle, tmp_path, capsys):
    img, mask, aff = make_scan()
    image = save(tmp_path / "x.nii.gz", img, aff)
    ones = heal(capsys, local_bundle, image, save(tmp_path / "m1.nii.gz", mask, aff), tmp_path / "h1.nii.gz")
    label = heal(capsys, local_bundle, image, save(tmp_path / "m255.nii.gz", (mask * 255).astype(np.uint8), aff),
                 tmp_path / "h255.nii.gz")
    np.testing.assert_array_equal(label, ones)


def test_a_soft_mask_is_refused_unless_a_threshold_is_given(local_bundle, tmp_path, capsys):
    img, mask, aff = make_scan()
    image = save(tmp_path / "x.nii.gz", img, aff)
    from scipy import ndimage

    soft = ndimage.gaussian_filter(mask.astype(np.float32), 1.0)  # a probability map around the lesion
    soft_path = save(tmp_path / "p.nii.gz", soft, aff)
    code, _, err = run(capsys, "heal", image, "--mask", soft_path, "-o", tmp_path / "h.nii.gz", "--model",
                       local_bundle.root, "--device", "cpu", "--quiet")
    assert code == 2 and "not binary" in err and "--mask-threshold" in err and len(err.strip().splitlines()) == 1
    binary = (soft >= 0.5).astype(np.uint8)
    by_threshold = heal(capsys, local_bundle, image, soft_path, tmp_path / "ht.nii.gz", "--mask-threshold", "0.5")
    by_mask = heal(capsys, local_bundle, image, save(tmp_path / "b.nii.gz", binary, aff), tmp_path / "hb.nii.gz")
    np.testing.assert_array_equal(by_threshold, by_mask)


def test_a_singleton_4d_scan_is_written_back_as_4d(local_bundle, tmp_path, capsys):
    img, mask, aff = make_scan()
    image = save(tmp_path / "x4.nii.gz", img[..., None], aff)
    out = tmp_path / "h4.nii.gz"
    healed = heal(capsys, local_bundle, image, save(tmp_path / "m.nii.gz", mask, aff), out)
    assert healed.shape == (*SCAN_SHAPE, 1)
    np.testing.assert_allclose(nib.load(str(out)).affine, aff, atol=1e-5)
    assert (healed[..., 0] != img).any()


def test_embed_keeps_the_lesion_in_the_brain_and_says_how_much_was_dropped(local_bundle, tmp_path, capsys):
    img, _, aff = make_scan(lesion=False)
    brain = phantoms.brain_mask(SCAN_SHAPE, aff) > 0
    stripped = (img * brain).astype(img.dtype)  # a skull-stripped scan: the air around the brain is 0
    i, j, k = np.argwhere(brain)[np.argmax(np.argwhere(brain)[:, 0])]  # a voxel on the brain's edge
    edge = aff[:3, :3] @ np.array([i, j, k], float) + aff[:3, 3]
    mask = phantoms.sphere_mask(SCAN_SHAPE, aff, tuple(edge), 12.0)
    assert (mask > 0)[~brain].sum() > 0.3 * mask.sum()  # much of it in the air
    out = tmp_path / "e.nii.gz"
    code, _, err = run(capsys, "embed", save(tmp_path / "s.nii.gz", stripped, aff), "--mask",
                       save(tmp_path / "m.nii.gz", mask, aff), "-o", out, "--model", local_bundle.root, "--device",
                       "cpu", "--steps", "2", "--quiet")
    assert code == 0, err
    assert "outside the brain and was dropped" in err and err.startswith("usb: note: ")
    result = np.asarray(nib.load(str(out)).dataobj)
    assert (result != stripped).any()
    assert np.array_equal(result[stripped == 0], stripped[stripped == 0])  # nothing painted into the air


def test_embed_refuses_a_mask_with_too_little_brain(local_bundle, tmp_path, capsys):
    img, _, aff = make_scan(lesion=False)
    brain = phantoms.brain_mask(SCAN_SHAPE, aff) > 0
    stripped = (img * brain).astype(img.dtype)
    mask = np.zeros(SCAN_SHAPE, np.uint8)
    mask[:6, :6, :6] = 1  # a corner of the air
    code, _, err = run(capsys, "embed", save(tmp_path / "s.nii.gz", stripped, aff), "--mask",
                       save(tmp_path / "m.nii.gz", mask, aff), "-o", tmp_path / "e.nii.gz", "--model",
                       local_bundle.root, "--device", "cpu", "--quiet")
    assert code == 2 and "outside the brain" in err and "needed to embed" in err
    assert not (tmp_path / "e.nii.gz").exists()


def test_an_8_mm3_mask_on_a_grid_of_slightly_less_than_1_mm_is_embedded_and_a_smaller_one_refused():
    """The 8 mm3 floor is not defeated by rounding (8 voxels of 0.99999 mm3 were refused as 'outside the brain');
    a mask wholly in the brain but too small says so."""
    from USBLib.editor.input_checks import confine_to_brain
    from USBLib.errors import InputError

    image = np.zeros((12, 12, 12), np.float32)
    image[2:10, 2:10, 2:10] = 100.0
    brain = image > 0
    affine = np.diag([0.99999 ** (1 / 3)] * 3 + [1.0])
    mask = np.zeros(image.shape, np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    kept, _, notes = confine_to_brain(image, affine, mask, brain)
    assert kept.sum() == 8 and not notes
    mask[5, 5, 5] = 0
    with pytest.raises(InputError, match="too small to embed"):
        confine_to_brain(image, affine, mask, brain)
