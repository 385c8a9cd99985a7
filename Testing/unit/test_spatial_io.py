"""Geometry: file round trips, model-space round trips and registration, on oblique and LPS grids."""
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import phantoms
from conftest import AFFINES, SCAN_SHAPE
from USBLib.errors import InputError
from USBLib.imaging.io import float_map_header, read_volume, write_volume
from USBLib.imaging.spatial import SpaceMapping, register, resample_mask_to


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".mgz", ".nrrd"])
@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_file_round_trip_keeps_affine_and_values(tmp_path, kind, suffix):
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, size=(12, 14, 10)).astype(np.int16)
    path = write_volume(tmp_path / f"v{suffix}", data, AFFINES[kind])
    vol = read_volume(path)
    np.testing.assert_allclose(vol.affine, AFFINES[kind], atol=1e-5)
    np.testing.assert_array_equal(vol.data, data)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_integers_stored_with_a_slope_are_written_as_they_were_stored(tmp_path):
    """A NIfTI of integers with scl_slope/scl_inter (as scanners and converters write them) is read in its scaled
    units, and an edit of it is written as it was stored: the same integer type, slope and intercept, the input's
    own voxels bit for bit in the file, the edited ones rounded to the slope's step; an unscaled file stays
    unscaled."""
    rng = np.random.default_rng(0)
    raw = rng.integers(-2000, 30000, size=(12, 14, 10)).astype(np.int16)
    img = nib.Nifti1Image(raw, AFFINES["oblique"])
    img.header.set_slope_inter(0.25, 10.0)  # set after construction: nibabel keeps it for integer data
    nib.save(img, tmp_path / "scaled.nii.gz")

    vol = read_volume(tmp_path / "scaled.nii.gz")
    assert np.issubdtype(vol.data.dtype, np.floating)
    np.testing.assert_allclose(vol.data, raw * 0.25 + 10.0)
    edited = np.array(vol.data, dtype=np.float64)
    edited[4:7, 5:8, 3:6] += 123.4
    write_volume(tmp_path / "edited.nii.gz", edited, vol.affine, vol.header)

    out = nib.load(tmp_path / "edited.nii.gz")
    assert out.get_data_dtype() == np.int16 and (out.dataobj.slope, out.dataobj.inter) == (0.25, 10.0)
    stored = np.asarray(out.dataobj.get_unscaled())
    inside = np.zeros(raw.shape, bool)
    inside[4:7, 5:8, 3:6] = True
    np.testing.assert_array_equal(stored[~inside], raw[~inside])
    np.testing.assert_allclose(np.asarray(out.dataobj)[inside], edited[inside], atol=0.125 + 1e-9)

    nib.save(nib.Nifti1Image(raw, AFFINES["oblique"]), tmp_path / "plain.nii.gz")
    plain = read_volume(tmp_path / "plain.nii.gz")
    write_volume(tmp_path / "plain_out.nii.gz", plain.data, plain.affine, plain.header)
    again = nib.load(tmp_path / "plain_out.nii.gz")
    assert again.get_data_dtype() == np.int16 and (again.dataobj.slope, again.dataobj.inter) == (1.0, 0.0)
    np.testing.assert_array_equal(np.asarray(again.dataobj), raw)


def test_an_mgz_output_keeps_the_input_s_header_and_a_type_mgh_cannot_hold_is_stored_without_loss(tmp_path):
    """FreeSurfer's MGZ: the output carries the input's header (TR, TE, TI, flip angle), and values of a type the
    format has no code for (float64, int8) are written as the nearest it has (float32, int32), not refused after
    the edit has run."""
    img = nib.MGHImage(np.arange(12 * 14 * 10, dtype=np.int32).reshape(12, 14, 10).astype(np.uint8),
                       AFFINES["oblique"])
    for field, value in (("tr", 2300.0), ("te", 2.98), ("ti", 900.0), ("flip_angle", 0.157)):
        img.header[field] = value
    nib.save(img, tmp_path / "in.mgz")
    vol = read_volume(tmp_path / "in.mgz")
    write_volume(tmp_path / "out.mgz", vol.data, vol.affine, vol.header)
    out = nib.load(tmp_path / "out.mgz")
    for field in ("tr", "te", "ti", "flip_angle"):
        assert float(out.header[field]) == pytest.approx(float(img.header[field]))
    assert out.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(out.dataobj), vol.data)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-5)
    for values, stored in ((vol.data.astype(np.float64) + 0.5, np.float32), (vol.data.astype(np.int8) - 3, np.int32)):
        write_volume(tmp_path / "cast.mgz", values, vol.affine, vol.header)
        cast = nib.load(tmp_path / "cast.mgz")
        assert cast.get_data_dtype().type is stored and np.array_equal(np.asarray(cast.dataobj), values)


@pytest.mark.parametrize("suffix", [".mgz", ".nrrd"])
def test_a_4d_one_volume_scan_is_written_as_3d_where_the_format_takes_it_so(tmp_path, suffix):
    data = np.arange(12 * 14 * 10, dtype=np.int16).reshape(12, 14, 10, 1)
    back = read_volume(write_volume(tmp_path / f"v{suffix}", data, AFFINES["oblique"]))
    assert back.data.shape == (12, 14, 10) and np.array_equal(back.data, data[..., 0])


def test_a_4d_nrrd_with_one_volume_is_read_as_3d(tmp_path):
    import SimpleITK as sitk

    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    flat = sitk.GetImageFromArray(data)
    flat.SetSpacing((1.0, 2.0, 3.0))
    flat.SetOrigin((5.0, 6.0, 7.0))
    sitk.WriteImage(flat, str(tmp_path / "flat.nrrd"))
    sitk.WriteImage(sitk.JoinSeries([flat]), str(tmp_path / "t4d.nrrd"))
    single, plain = read_volume(tmp_path / "t4d.nrrd"), read_volume(tmp_path / "flat.nrrd")
    assert single.data.shape == plain.data.shape == (4, 3, 2)
    assert np.array_equal(single.data, plain.data) and np.allclose(single.affine, plain.affine)


@pytest.mark.parametrize("codes", [(2, 0), (0, 1), (1, 1), (0, 0)])
def test_an_edit_keeps_the_input_s_sform_and_qform_codes(tmp_path, codes):
    """Geometry is the input's: its sform/qform codes come back as they were (a qform the input left unset stays
    unset, so a reader that prefers the qform cannot read a sheared scan's output elsewhere), and so does the affine
    every reader sees."""
    sheared = AFFINES["oblique"].copy()
    sheared[0, 1] += 0.05  # a shear no quaternion holds
    img = nib.Nifti1Image(np.arange(12 * 14 * 10, dtype=np.int16).reshape(12, 14, 10), None)
    img.set_sform(sheared, code=codes[0])
    img.set_qform(AFFINES["oblique"] if codes[1] else None, code=codes[1])
    nib.save(img, tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    write_volume(tmp_path / "out.nii.gz", vol.data, vol.affine, vol.header)
    before, after = nib.load(tmp_path / "in.nii.gz"), nib.load(tmp_path / "out.nii.gz")
    assert (int(after.header["sform_code"]), int(after.header["qform_code"])) == codes
    np.testing.assert_allclose(after.affine, before.affine, atol=1e-6)


def test_a_qform_unlike_the_sform_comes_back_as_it_was(tmp_path):
    """After an FSL or ANTs registration a scan's qform may differ from its sform. nibabel reads the sform, ITK (and
    so Slicer) the qform: rebuilt from the sform, the output's qform moved the scan in Slicer (6 mm in a probe).
    Both forms come back field for field."""
    moved = AFFINES["oblique"].copy()
    moved[:3, 3] += [5.0, -3.0, 2.0]
    img = nib.Nifti1Image(np.arange(12 * 14 * 10, dtype=np.int16).reshape(12, 14, 10), None)
    img.set_sform(AFFINES["oblique"], code=2)
    img.set_qform(moved, code=1)
    nib.save(img, tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    edited = vol.data.astype(np.float64)
    edited[4:6, 4:6, 4:6] += 50
    write_volume(tmp_path / "out.nii.gz", edited, vol.affine, vol.header)
    before, after = nib.load(tmp_path / "in.nii.gz").header, nib.load(tmp_path / "out.nii.gz").header
    for field in ("sform_code", "qform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                  "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim"):
        np.testing.assert_array_equal(after[field], before[field], err_msg=field)


def test_floats_stored_with_a_slope_are_written_as_they_were_stored(tmp_path):
    """float32 with scl_slope/scl_inter: nibabel reads it as float64; the output was float64, unscaled (a larger
    file of another type than the input's). It is written as stored, float32 with the input's scaling, its own
    voxels bit for bit in the file."""
    raw = np.random.default_rng(1).normal(100, 30, size=(12, 14, 10)).astype(np.float32)
    img = nib.Nifti1Image(raw, AFFINES["lps"])
    img.header.set_data_dtype(np.float32)
    img.header["scl_slope"], img.header["scl_inter"] = 2.0, -3.0
    nib.save(img, tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    np.testing.assert_allclose(vol.data, raw.astype(np.float64) * 2.0 - 3.0, rtol=1e-6)
    edited = np.array(vol.data, np.float64)
    edited[2:5, 2:5, 2:5] += 40.0
    write_volume(tmp_path / "out.nii.gz", edited, vol.affine, vol.header)
    out = nib.load(tmp_path / "out.nii.gz")
    assert out.get_data_dtype() == np.float32 and (out.dataobj.slope, out.dataobj.inter) == (2.0, -3.0)
    inside = np.zeros(raw.shape, bool)
    inside[2:5, 2:5, 2:5] = True
    np.testing.assert_array_equal(np.asarray(out.dataobj.get_unscaled())[~inside], raw[~inside])
    np.testing.assert_allclose(np.asarray(out.dataobj)[inside], edited[inside], rtol=1e-6)


def test_a_float_map_beside_a_scan_keeps_its_codes_and_is_not_rounded(tmp_path):
    """An uncertainty map written beside a qform-only scan stored as integers with a slope: the scan's codes (sform
    unset, qform scanner), float32 values as they were (not rounded to the scan's stored type), the scan's affine."""
    img = nib.Nifti1Image(np.arange(12 * 14 * 10, dtype=np.int16).reshape(12, 14, 10), None)
    img.set_sform(None, code=0)
    img.set_qform(AFFINES["oblique"], code=1)
    img.header.set_slope_inter(0.5, 10.0)
    nib.save(img, tmp_path / "in.nii.gz")
    vol = read_volume(tmp_path / "in.nii.gz")
    spread = np.random.default_rng(0).random(vol.data.shape).astype(np.float32) * 0.3
    write_volume(tmp_path / "unc.nii.gz", spread, vol.affine, float_map_header(vol.header))
    out = nib.load(tmp_path / "unc.nii.gz")
    assert (int(out.header["sform_code"]), int(out.header["qform_code"])) == (0, 1)
    assert out.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asarray(out.dataobj), spread)
    np.testing.assert_allclose(out.affine, vol.affine, atol=1e-5)
    assert vol.header.get_data_dtype() == np.int16  # the scan's own header is not touched


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_model_space_round_trip(kind):
    aff = AFFINES[kind]
    img = phantoms.phantom(SCAN_SHAPE, aff, skull=False, scale=1.0)
    model_aff = phantoms.grid_affine((64, 80, 64), 2.5)
    mapping = SpaceMapping(SCAN_SHAPE, aff, (64, 80, 64), model_aff, np.eye(4))
    back = mapping.to_native(mapping.to_model(img, antialias=False))
    inner = phantoms.brain_mask(SCAN_SHAPE, aff) > 0
    assert np.abs(back - img)[inner].mean() < 0.05  # only interpolation blur remains
    # the model grid sees the same physical object
    expected = phantoms.phantom((64, 80, 64), model_aff, skull=False, scale=1.0)
    assert np.abs(mapping.to_model(img, antialias=False) - expected)[expected > 0].mean() < 0.1


def _rotation(deg_z, deg_x):
    out = np.eye(4)
    for axis, deg in ((2, deg_z), (0, deg_x)):
        a = np.deg2rad(deg)
        i, j = [(1, 2), (0, 2), (0, 1)][axis]
        r = np.eye(4)
        r[i, i] = r[j, j] = np.cos(a)
        r[i, j], r[j, i] = -np.sin(a), np.sin(a)
        out = out @ r
    return out


@pytest.mark.parametrize("name,skull", [("identity", False), ("rotated", False), ("scaled", False),
                                        ("identity", True), ("rotated", True)])
def test_registration_recovers_known_transform(name, skull):
    """Skull-on scans against the skull-stripped template: rigid poses are recovered; an anisotropic scale with a
    skull is not reliable on this coarse phantom (known limitation, see the issue note)."""
    shape = (32, 40, 32)
    taff = phantoms.grid_affine(shape, 5.0)
    tmask = phantoms.brain_mask(shape, taff)
    template = phantoms.phantom(shape, taff, skull=False, scale=1.0) * tmask
    truth = {"identity": np.eye(4), "rotated": _rotation(12, -8), "scaled": np.diag([1.08, 0.95, 1.04, 1.0])}[name]
    truth = truth.copy()
    truth[:3, 3] += [5.0, -7.0, 4.0]
    scan_aff = AFFINES["oblique"]
    scan = phantoms.phantom(SCAN_SHAPE, np.linalg.inv(truth) @ scan_aff, skull=skull, noise=0.02)  # scan = T(phantom)
    found = register(scan, scan_aff, template, taff, tmask)
    pts = phantoms.ras_coords(shape, taff)[tmask > 0]
    err = np.linalg.norm(pts @ (found - truth)[:3, :3].T + (found - truth)[:3, 3], axis=1)
    assert err.mean() < 3.0, f"mean error {err.mean():.2f} mm"


def test_mask_resampling_needs_overlap():
    aff = AFFINES["axial"]
    mask = np.zeros((10, 10, 10), np.uint8)
    mask[4:6, 4:6, 4:6] = 1
    far = np.eye(4)
    far[:3, 3] = 5000
    with pytest.raises(InputError, match="overlap"):
        resample_mask_to(mask, far, SCAN_SHAPE, aff)
    same = resample_mask_to(mask, aff, (10, 10, 10), aff)
    np.testing.assert_array_equal(same, mask)


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_a_mask_in_another_axis_order_or_direction_is_moved_onto_the_image_grid_exactly(kind):
    """A mask saved with its axes flipped (LPS for an RAS scan) or permuted covers the same voxel centres: it is
    moved onto the image's grid by transposes and flips, without --resample-mask and without any change; a mask
    one voxel off, or with another voxel size, is not (it needs resampling), and a brain mask is never resampled."""
    from USBLib.imaging.checks import check_mask
    from USBLib.imaging.spatial import reoriented_to

    aff = AFFINES[kind]
    shape = (9, 11, 7)
    rng = np.random.default_rng(1)
    mask = (rng.random(shape) > 0.7).astype(np.uint8)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])
    flip[0, 3], flip[2, 3] = shape[0] - 1, shape[2] - 1
    flipped = mask[::-1, :, ::-1]
    turn = np.zeros((4, 4))
    turn[3, 3] = turn[0, 1] = turn[1, 2] = turn[2, 0] = 1.0  # stored index (p, q, r) is image index (q, r, p)
    permuted = np.transpose(mask, (2, 0, 1))
    for stored, stored_aff in ((flipped, aff @ flip), (permuted, aff @ turn)):
        np.testing.assert_array_equal(reoriented_to(stored, stored_aff, shape, aff), mask)
        np.testing.assert_array_equal(check_mask(stored, shape, stored_aff, aff, False), mask)
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, 0]  # one voxel along I
    assert reoriented_to(mask, shifted, shape, aff) is None
    finer = aff @ np.diag([0.5, 1.0, 1.0, 1.0])
    assert reoriented_to(mask, finer, shape, aff) is None
    tilt = np.eye(4)
    tilt[:2, :2] = [[np.cos(0.02), -np.sin(0.02)], [np.sin(0.02), np.cos(0.02)]]  # 1.1 degrees: a tenth of a voxel
    assert reoriented_to(mask, aff @ tilt, shape, aff) is None
    assert reoriented_to(mask, np.zeros((4, 4)), shape, aff) is None
    with pytest.raises(InputError, match=r"same shape, another position.*--resample-mask"):
        check_mask(mask, shape, shifted, aff, False)
    with pytest.raises(InputError, match="brain mask is on a different grid.*must be on the image's grid"):
        check_mask(mask, shape, shifted, aff, False, "brain mask")


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"), ("corrupt", "cannot read"), ("2d", "3D volume"), ("4d", "3D volume"),
    ("txt", "unsupported file type")])
def test_bad_files_raise_one_line_input_errors(tmp_path, case, message):
    path = tmp_path / ("x.txt" if case == "txt" else "x.nii.gz")
    if case == "corrupt":
        path.write_bytes(b"\x1f\x8b not really gzip")
    elif case == "2d":
        nib.save(nib.Nifti1Image(np.ones((10, 10), np.float32), np.eye(4)), str(path))
    elif case == "4d":
        nib.save(nib.Nifti1Image(np.ones((5, 5, 5, 3), np.float32), np.eye(4)), str(path))
    elif case == "txt":
        path.write_text("hello")
    with pytest.raises(InputError, match=message) as info:
        read_volume(path)
    assert "\n" not in str(info.value)


def test_a_detached_nrrd_output_names_its_own_data_file(tmp_path):
    """A ``.nhdr`` output is a header plus a data file it names: both under the output's name, nothing hidden left,
    and a second write replaces both."""
    data = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    affine = np.diag([2.0, 1.0, 1.5, 1.0])
    for name, values in (("out.nhdr", data), ("out.nhdr", data * 2), ("UP.NHDR", data)):
        write_volume(tmp_path / name, values, affine)
        stem = name.split(".")[0]
        assert {f"{stem}.raw.gz", name} <= {f.name for f in tmp_path.iterdir()}
        assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]
        assert f"data file: {stem}.raw.gz" in (tmp_path / name).read_text(errors="replace")
        back = read_volume(tmp_path / name)
        assert np.array_equal(back.data, values) and np.allclose(back.affine, affine)


def test_an_interrupted_command_takes_its_files_and_only_the_folders_it_made(tmp_path, monkeypatch):
    """all_or_nothing: a .nhdr output's data file and sidecar go with it, and so do the folders the writes made,
    but not a folder the user made, however the path names it ('a/../mine')."""
    from USBLib.imaging.io import all_or_nothing, write_json

    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    data = np.zeros((3, 4, 5), np.float32)
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing() as written:
            written.append(write_volume(Path("new/deep/out.nhdr"), data, np.eye(4)))
            write_json(Path("new/deep/out.json"), {"task": "heal"})
            written.append(write_volume(Path("a/../mine/x.nii.gz"), data, np.eye(4)))
            raise KeyboardInterrupt
    assert sorted(f.name for f in tmp_path.iterdir()) == ["mine"] and not list((tmp_path / "mine").iterdir())


def test_a_nifti2_input_is_written_back_as_nifti2_without_a_word(tmp_path, capfd):
    """A NIfTI-2 scan (large-image converters write them): its edit is NIfTI-2 again, with its header's geometry, and
    nothing is printed (its header in a NIfTI-1 image made nibabel print 'sizeof_hdr should be 348')."""
    data = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    affine = np.diag([1.0, 1.2, 0.9, 1.0])
    nib.save(nib.Nifti2Image(data, affine), str(tmp_path / "in.nii.gz"))
    vol = read_volume(tmp_path / "in.nii.gz")
    write_volume(tmp_path / "out.nii.gz", vol.data * 2, vol.affine, vol.header)
    out = nib.load(str(tmp_path / "out.nii.gz"))
    assert isinstance(out, nib.Nifti2Image) and np.allclose(out.affine, affine)
    assert np.array_equal(np.asarray(out.dataobj), data * 2)
    assert capfd.readouterr() == ("", "")


def test_a_failed_command_puts_back_the_files_its_outputs_had_replaced(tmp_path):
    """Rerunning into existing outputs, the second output fails: the first output and its sidecar are the old ones
    again, byte for byte, and no backup is left; a command that succeeds leaves no backup either."""
    from USBLib.imaging.io import all_or_nothing, write_json

    data = np.zeros((3, 4, 5), np.float32)
    old = write_volume(tmp_path / "out.nii.gz", data + 1, np.eye(4))
    write_json(tmp_path / "out.json", {"task": "heal", "run": "old"})
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}
    with pytest.raises(KeyboardInterrupt):
        with all_or_nothing() as written:
            written.append(write_volume(old, data + 2, np.eye(4)))
            write_json(tmp_path / "out.json", {"task": "heal", "run": "new"})
            raise KeyboardInterrupt  # e.g. the uncertainty map's disk is full
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before
    with all_or_nothing() as written:
        written.append(write_volume(old, data + 3, np.eye(4)))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out.json", "out.nii.gz"]
    assert np.array_equal(read_volume(old).data, data + 3)


def test_a_sidecar_that_fails_after_its_image_replaced_an_output_leaves_neither_old_nor_new(tmp_path):
    """usb batch (no all_or_nothing): an output healed again whose sidecar cannot be written (an input deleted
    meanwhile) takes the new image and the old sidecar, which described the replaced output; neither is left."""
    from USBLib.imaging.io import sidecar_path, write_result

    data = np.zeros((3, 4, 5), np.float32)
    scan = write_volume(tmp_path / "scan.nii.gz", data, np.eye(4))
    out = tmp_path / "out.nii.gz"
    write_result(out, data + 1, np.eye(4), None, {"task": "heal"}, {"image": scan})
    assert sidecar_path(out).is_file()
    with pytest.raises(InputError, match="moved or deleted"):
        write_result(out, data + 2, np.eye(4), None, {"task": "heal"}, {"image": tmp_path / "gone.nii.gz"})
    assert sorted(f.name for f in tmp_path.iterdir()) == ["scan.nii.gz"]


def test_a_big_endian_mgz_keeps_its_type_in_any_output_and_a_mixed_case_suffix_is_written(tmp_path):
    """MGZ stores big-endian: an int16 MGZ came back int32 (the MGH type check compared '>i2' with int16) and a
    .nrrd output of it failed after the whole edit (SimpleITK refuses big-endian arrays). 'out.Nii': nibabel wrote
    'out.nii' beside the temporary file, so the output was empty and a hidden file was left."""
    data = (np.arange(5 * 6 * 7).reshape(5, 6, 7) % 300).astype(np.int16)
    affine = np.diag([1.0, 1.2, 0.9, 1.0])
    nib.save(nib.MGHImage(data, affine), str(tmp_path / "in.mgz"))
    vol = read_volume(tmp_path / "in.mgz")
    assert vol.data.dtype == np.int16 and vol.data.dtype.isnative
    write_volume(tmp_path / "out.mgz", vol.data, vol.affine, vol.header)
    assert nib.load(str(tmp_path / "out.mgz")).get_data_dtype() == np.dtype(">i2")
    for name in ("out.nrrd", "out.Nii", "OUT.Nii.Gz"):
        back = read_volume(write_volume(tmp_path / name, vol.data, vol.affine))
        assert np.array_equal(back.data, data) and np.allclose(back.affine, affine, atol=1e-5), name
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_sidecar_records_an_nhdr_input_with_its_data_file_and_a_cut_short_raw_nrrd_says_so(tmp_path):
    """The sha256 a sidecar records for a .nhdr covers its data file (header only: a changed data file went
    unnoticed, and usb batch skipped the scan as up to date); a raw .nrrd cut short reads as "ends early"."""
    import SimpleITK as sitk

    from USBLib.imaging.io import nrrd_data_files, read_volume, sidecar_path, volume_sha256, write_result

    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    scan = write_volume(tmp_path / "scan.nhdr", data, np.eye(4))
    out = tmp_path / "out.nii.gz"
    recorded = write_result(out, data, np.eye(4), None, {"task": "heal"}, {"image": scan})["inputs"]["image"]
    assert recorded["sha256"] == volume_sha256(scan)
    write_volume(tmp_path / "other.nhdr", data + 1, np.eye(4))
    (tmp_path / "other.raw.gz").replace(tmp_path / "scan.raw.gz")  # the header is the same, the data are not
    assert volume_sha256(scan) != recorded["sha256"] and sidecar_path(out).is_file()
    spaced = write_volume(tmp_path / "my scan.nhdr", data, np.eye(4))  # ITK writes 'data file: my scan.raw.gz'
    assert nrrd_data_files(spaced) == [tmp_path / "my scan.raw.gz"]
    detached = tmp_path / "detached.nrrd"  # a .nrrd may be a detached header too
    detached.write_text(spaced.read_text())
    assert nrrd_data_files(detached) == [tmp_path / "my scan.raw.gz"]
    assert nrrd_data_files(write_volume(tmp_path / "attached.nrrd", data, np.eye(4))) == []
    vector = tmp_path / "vector.nrrd"  # 8 KB on disk, 8 MB of voxels: the cap counts every component
    sitk.WriteImage(sitk.Image([32, 32, 32], sitk.sitkVectorFloat32, 64), str(vector), True)
    with pytest.raises(InputError, match="holds 8 MB of voxels"):
        read_volume(vector, max_bytes=2**20)
    scaled = nib.Nifti1Image(np.zeros((64, 64, 64), np.int16), np.eye(4))  # 0.5 MB stored, 2 MB read (float64)
    scaled.header.set_slope_inter(0.5, 0.0)
    nib.save(scaled, str(tmp_path / "scaled.nii.gz"))
    with pytest.raises(InputError, match="holds 2 MB of voxels"):
        read_volume(tmp_path / "scaled.nii.gz", max_bytes=2**20)
    raw = tmp_path / "raw.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((40, 40, 40), np.int16)), str(raw), False)
    raw.write_bytes(raw.read_bytes()[:-5000])
    with pytest.raises(InputError, match="the file ends early"):
        read_volume(raw)


def test_far_out_voxels_are_only_fill_values_and_corrupt_voxels():
    """``checks.far_out_voxels`` marks a fill value outside the field of view and a corrupt voxel, and nothing of an
    ordinary head scan: its background, a bright fat rim at 1.6 times the brain's top, a scan shifted below zero."""
    from USBLib.imaging.checks import fill_missing, far_out_voxels

    img = phantoms.phantom(SCAN_SHAPE, AFFINES["axial"], lesion_center=None, noise=0.01).astype(np.float32)
    head = img.copy()
    head[:2] = 1.6 * float(np.percentile(img, 99.9))  # a bright slab: scalp fat
    low_contrast = np.zeros((64, 64, 64), np.int16)  # a zero background far below a brain of 800-1200
    low_contrast[16:48, 16:48, 16:48] = np.random.default_rng(0).normal(1000.0, 60.0, (32, 32, 32)).astype(np.int16)
    for ordinary in (img, head, head - 500.0, low_contrast):
        assert far_out_voxels(ordinary) is None
    odd = head.copy()
    odd[-3:, -3:, :] = -32768.0
    odd[5, 5, 5] = 1e6
    far = far_out_voxels(odd)
    expected = np.zeros(odd.shape, bool)
    expected[-3:, -3:, :] = True
    expected[5, 5, 5] = True
    np.testing.assert_array_equal(far, expected)
    filled, aside = fill_missing(odd)
    assert aside.far_out == int(expected.sum()) and filled.min() >= head.min() and filled.max() <= head.max()
    np.testing.assert_array_equal(aside.where, expected)
    np.testing.assert_array_equal(aside.values, odd[expected])
