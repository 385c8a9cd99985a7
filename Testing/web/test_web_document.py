"""The web page's document on a real MRML scene (slicer-core, headless as in Testing/slicer): the sample with its
lesion, masks on another grid resampled or refused as in the Slicer module, unreadable and MGZ scans, and the
download (NIfTI + sidecar, no server path). No browser, no worker run."""
from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("slicer", reason="the web page's logic needs slicer-core (pip install -e '.[test]')")

import phantoms  # noqa: E402
import slicer  # noqa: E402
from conftest import SCAN_SHAPE, make_scan  # noqa: E402

from USBEditorLib import logic as L  # noqa: E402
from USBLib.resources import sample_files  # noqa: E402
from USBWeb.document import Document, Result  # noqa: E402


@pytest.fixture
def doc(scene):
    return Document()


@pytest.fixture
def phantom_files(tmp_path):
    """A phantom scan, its lesion on the same grid, the lesion on a coarser grid, and a mask far away."""
    img, mask, aff = make_scan()
    coarse = aff.copy()
    coarse[:3, :3] *= 2.0
    shape = tuple(s // 2 for s in SCAN_SHAPE)
    far = np.eye(4)
    far[:3, 3] = 900.0  # a metre away from the scan
    files = {"scan": (img, aff), "mask": (mask, aff),
             "coarse": (phantoms.sphere_mask(shape, coarse, (28.0, 5.0, 20.0), 9.0), coarse),
             "far": (np.ones((4, 4, 4), np.uint8), far)}
    paths = {}
    for name, (data, affine) in files.items():
        paths[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(paths[name]))
    return paths


def test_sample_comes_with_its_lesion_and_its_own_name(doc):
    volume = doc.load_sample()
    expected = int((np.asarray(nib.load(str(sample_files()["lesion"])).dataobj) > 0).sum())
    assert volume.GetName() == "sample_T1w" and doc.lesion_voxels() == expected
    assert doc.source["name"] == "sample_T1w.nii.gz" and len(doc.source["sha256"]) == 64
    assert slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLLabelMapVolumeNode") is None  # the mask went into the segment
    doc.load_sample()
    assert doc.volume.GetName() == "sample_T1w"  # the previous one is gone, so no "_1"
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    doc.clear_lesion()
    assert doc.lesion_voxels() == 0


def test_masks_on_another_grid_are_resampled_or_refused_as_in_slicer(doc, phantom_files):
    doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    same = doc.import_mask(phantom_files["mask"])
    assert same == int(nib.load(str(phantom_files["mask"])).get_fdata().sum())
    assert doc.import_mask(phantom_files["coarse"], resample=True) > 0
    with pytest.raises(L.USBEditorError, match="another image grid"):
        doc.import_mask(phantom_files["coarse"], resample=False)
    with pytest.raises(L.USBEditorError, match="does not overlap"):
        doc.import_mask(phantom_files["far"], resample=True)
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0  # refused masks leave nothing


def test_a_seg_nrrd_mask_is_read_into_the_lesion_segment(doc, tmp_path, phantom_files):
    """A Slicer segmentation file (``.seg.nrrd``), as the page's mask upload accepts it, puts its lesion into the
    lesion segment (its reader returned two values where three were unpacked: every such upload failed)."""
    doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    painted = doc.import_mask(phantom_files["mask"])
    doc.segmentation.AddDefaultStorageNode()
    doc.segmentation.GetStorageNode().SetFileName(str(tmp_path / "lesion.seg.nrrd"))
    assert doc.segmentation.GetStorageNode().WriteData(doc.segmentation)
    doc.clear_lesion()
    assert doc.lesion_voxels() == 0
    assert doc.import_mask(tmp_path / "lesion.seg.nrrd", source_name="lesion.seg.nrrd") == painted > 0
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1  # the file's node went again


def test_unreadable_scan_is_one_line_and_keeps_the_current_scan(doc, tmp_path, phantom_files):
    doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    bad = tmp_path / "upload-7" / "broken.nii.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a NIfTI file" * 50)
    with pytest.raises(L.USBEditorError) as info:
        doc.load_scan(bad, "broken.nii.gz")
    assert str(info.value) == "Could not read 'broken.nii.gz' as a scan: it is not a NIfTI, NRRD or MGZ image."
    assert doc.volume.GetName() == "T1" and slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_scans_and_masks_are_read_as_usb_heal_reads_them(doc, tmp_path, phantom_files):
    """The engine's reader for every format: a one-frame 4-D scan is a 3-D scan in the file's own geometry; a 4-D
    scan or mask with several frames is refused with the reason (Slicer's reader took the first frame, mirrored),
    in one line naming the file as the browser named it, and the current scan and lesion stay."""
    img, mask, _aff = make_scan()
    aff = np.diag([3.5, 3.5, 3.5, 1.0])
    files = {"one frame.nii.gz": img[..., None], "4d.nii.gz": np.stack([img, img], axis=-1),
             "mask4d.nii.gz": np.stack([mask, mask], axis=-1)}
    for name, data in files.items():
        nib.save(nib.Nifti1Image(data, aff), str(tmp_path / name.replace(" ", "_")))
    volume = doc.load_scan(tmp_path / "one_frame.nii.gz", "one frame.nii.gz")
    np.testing.assert_allclose(L.ijk_to_ras(volume), aff, atol=1e-6)
    np.testing.assert_array_equal(L.volume_to_array(volume)[0], img)
    lesion = doc.import_mask(phantom_files["mask"], resample=True)
    with pytest.raises(L.USBEditorError) as info:
        doc.load_scan(tmp_path / "4d.nii.gz", "4d.nii.gz")
    assert str(info.value) == ("Could not read '4d.nii.gz' as a scan: it has shape (48, 60, 48, 2); a 3D volume "
                               "is needed.")
    with pytest.raises(L.USBEditorError) as info:
        doc.import_mask(tmp_path / "mask4d.nii.gz", source_name="lesion 4d.nii.gz")
    assert str(info.value) == ("Could not read 'lesion 4d.nii.gz' as a mask: it has shape (48, 60, 48, 2); a 3D "
                               "volume is needed.")
    assert doc.volume is volume and doc.volume.GetName() == "one_frame" and doc.lesion_voxels() == lesion
    assert doc.header["qform_code"] == nib.load(str(tmp_path / "one_frame.nii.gz")).header["qform_code"]
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0


SCAN_REFUSALS = {  # file name: (voxels from the phantom scan, the reason the page gives)
    "slice.nii.gz": (lambda img: img[:, :, :1], "it has shape (48, 60, 1); a 3D volume is needed, not a 2D slice"),
    "flat.nii": (lambda img: img[:, :, 0], "it has shape (48, 60); a 3D volume is needed"),
    "zeros.nii.gz": (lambda img: np.zeros(img.shape, np.float32), "it is constant (0.0); nothing to edit"),
    "nan.nii.gz": (lambda img: np.full(img.shape, np.nan, np.float32), "it has no voxel with a value (all NaN or Inf)"),
}


@pytest.mark.parametrize("name", sorted(SCAN_REFUSALS))
def test_an_image_usb_heal_refuses_is_refused_with_the_reason(doc, tmp_path, phantom_files, name):
    """A 2-D NIfTI (one slice, or two axes only) is a readable image: the message says why it cannot be used (it
    said that the file was no NIfTI); a constant scan, or one with no voxel with a value, has nothing to edit:
    refused at upload with the CLI's reason (it was accepted). The current scan stays."""
    img, _mask, aff = make_scan()
    doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    voxels, reason = SCAN_REFUSALS[name]
    nib.save(nib.Nifti1Image(voxels(img), aff), str(tmp_path / name))
    with pytest.raises(L.USBEditorError) as info:
        doc.load_scan(tmp_path / name, name)
    assert str(info.value) == f"Could not read '{name}' as a scan: {reason}."
    assert doc.volume.GetName() == "T1" and slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1


def test_nrrd_scan_is_placed_as_usb_heal_places_it(doc, tmp_path):
    """NRRD (LPS on disk) through the engine's reader: the same voxels and world placement as ``read_volume``."""
    import SimpleITK as sitk

    from USBLib.imaging.io import read_volume, write_volume

    img, _mask, aff = make_scan("oblique")
    path = write_volume(tmp_path / "T1.nrrd", img, aff)
    assert sitk.ReadImage(str(path)).GetDimension() == 3
    volume = doc.load_scan(path, "T1.nrrd")
    expected = read_volume(path, "scan")
    np.testing.assert_allclose(L.ijk_to_ras(volume), expected.affine, atol=1e-4)
    np.testing.assert_array_equal(L.volume_to_array(volume)[0], expected.data)
    assert doc.header is None


def test_mgz_scan_is_read_with_its_geometry(doc, tmp_path, phantom_files):
    img, _mask, aff = make_scan("oblique")
    path = tmp_path / "T1.mgz"
    nib.save(nib.MGHImage(img.astype(np.float32), aff), str(path))
    volume = doc.load_scan(path, "T1.mgz")
    np.testing.assert_allclose(L.ijk_to_ras(volume), aff, atol=1e-4)
    np.testing.assert_allclose(L.volume_to_array(volume)[0], img)


def test_download_is_nifti_with_a_sidecar_and_no_server_path(doc, tmp_path, phantom_files):
    volume = doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    data, affine = L.volume_to_array(volume)
    node = slicer.util.addVolumeFromArray(np.ascontiguousarray((data + 1).transpose(2, 1, 0)), ijkToRAS=affine,
                                          name="T1 healed")
    mask = (nib.load(str(phantom_files["mask"])).get_fdata() > 0).astype(np.uint8)
    spread = slicer.util.addVolumeFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0).astype(np.float32)),
                                            ijkToRAS=affine, name="T1 healed uncertainty")
    provenance = {"task": "heal", "model": {"name": "usb-tiny", "path": "/opt/models/usb-tiny"}, "seed": 0}
    outputs = L.Outputs(volume=node, uncertainty=spread, nodes=[node, spread], provenance=provenance)
    doc.set_result(Result(outputs, L.Task.HEAL, (mask, affine)))
    assert spread.GetDisplayNode().GetApplyThreshold()  # zero spread is transparent over the scan
    archive = doc.export_result(tmp_path)
    with zipfile.ZipFile(archive) as zf:
        names = sorted(zf.namelist())
        sidecar = json.loads(zf.read("T1_healed.json"))
        zf.extractall(tmp_path / "out")
    assert names == ["T1_healed.json", "T1_healed.nii.gz", "T1_healed_lesion_mask.nii.gz",
                     "T1_healed_uncertainty.json", "T1_healed_uncertainty.nii.gz"]
    out = nib.load(str(tmp_path / "out" / "T1_healed.nii.gz"))
    np.testing.assert_allclose(out.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.dataobj), data + 1)
    assert sidecar["task"] == "heal" and sidecar["inputs"]["image"]["name"] == "T1.nii.gz"
    text = json.dumps(sidecar)
    assert "/opt/" not in text and str(tmp_path) not in text and sidecar["model"]["path"] == "usb-tiny"
    doc.clear_result()
    assert not slicer.mrmlScene.IsNodePresent(node) and not slicer.mrmlScene.IsNodePresent(spread)


def test_download_is_written_with_the_scans_header(doc, tmp_path, phantom_files):
    """As ``usb heal`` writes it: a qform-only int16 scan stored with a slope gives a result in int16 with that slope,
    the scan's codes, units and affine, and an uncertainty map in float32 with the scan's codes (it was written with
    no header: float32, nibabel's codes)."""
    img, _mask, aff = make_scan("oblique")
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    scan = nib.Nifti1Image(img.astype(np.int16), None, header)
    scan.set_data_dtype(np.int16)
    scan.set_qform(aff, code=1)
    scan.set_sform(None, code=0)
    scan.header.set_slope_inter(0.5, 10.0)
    path = tmp_path / "qform only.nii.gz"
    nib.save(scan, str(path))
    volume = doc.load_scan(path, "qform only.nii.gz")
    data, affine = L.volume_to_array(volume)
    lesion = (nib.load(str(phantom_files["mask"])).get_fdata() > 0).astype(np.uint8)
    healed = data + 5.0 * lesion  # ten stored units more in the lesion: still on the scan's stored grid
    nodes = [slicer.util.addVolumeFromArray(np.ascontiguousarray(values.transpose(2, 1, 0)), ijkToRAS=affine,
                                            name=name)
             for values, name in ((healed, "qform only healed"), (lesion.astype(np.float32), "spread"))]
    outputs = L.Outputs(volume=nodes[0], uncertainty=nodes[1], nodes=nodes, provenance={"task": "heal"})
    doc.set_result(Result(outputs, L.Task.HEAL, (lesion, affine)))
    with zipfile.ZipFile(doc.export_result(tmp_path)) as zf:
        zf.extractall(tmp_path / "out")
    source = nib.load(str(path))
    out = nib.load(str(tmp_path / "out" / "qform_only_healed.nii.gz"))
    spread = nib.load(str(tmp_path / "out" / "qform_only_healed_uncertainty.nii.gz"))
    for image, dtype in ((out, np.int16), (spread, np.float32)):
        assert image.get_data_dtype() == dtype
        assert [int(image.header[c]) for c in ("qform_code", "sform_code")] == [1, 0]
        assert image.header.get_xyzt_units() == ("mm", "sec")
        np.testing.assert_allclose(image.affine, source.affine, atol=1e-5)
    assert (out.dataobj.slope, out.dataobj.inter) == (0.5, 10.0)
    np.testing.assert_array_equal(np.asarray(out.dataobj.get_unscaled()),
                                  np.asarray(source.dataobj.get_unscaled()) + 10 * lesion)
    np.testing.assert_allclose(np.asarray(spread.dataobj), lesion)


def test_a_one_frame_4d_scan_downloads_as_one_frame_4d(doc, tmp_path, phantom_files):
    """A scan stored as [I, J, K, 1] (some converters write one) comes back in that shape, as ``usb heal`` writes
    it; a later 3-D scan downloads 3-D."""
    img, _mask, aff = make_scan()
    for name, shape in (("t4d.nii.gz", (*img.shape, 1)), ("t3d.nii.gz", img.shape)):
        nib.save(nib.Nifti1Image(img.reshape(shape), aff), str(tmp_path / name))
        volume = doc.load_scan(tmp_path / name, name)
        data, affine = L.volume_to_array(volume)
        node = slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), ijkToRAS=affine,
                                              name=f"{name[:3]} healed")
        doc.set_result(Result(L.Outputs(volume=node, nodes=[node], provenance={"task": "heal"}), L.Task.HEAL, None))
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        with zipfile.ZipFile(doc.export_result(folder)) as zf:
            zf.extractall(folder)
        assert nib.load(str(folder / f"{name[:3]}_healed.nii.gz")).shape == shape


def test_a_cut_short_scan_a_probability_mask_and_a_scan_too_large_unpacked_are_one_line_each(scene, tmp_path,
                                                                                          phantom_files):
    """As `usb heal` reads them: a .nii.gz cut short says so (it was called "not a NIfTI, NRRD or MGZ image"); a mask
    of several non-zero values (a probability map) is refused (it was taken as lesion wherever it was non-zero); and a
    server's size limit holds for the voxels unpacked, before they are read (a small .nii.gz can hold gigabytes)."""
    doc = Document(max_bytes=2**20)
    doc.load_scan(phantom_files["scan"], "T1.nii.gz")
    whole = phantom_files["scan"].read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(L.USBEditorError) as info:
        doc.load_scan(cut, "T1_cut.nii.gz")
    assert str(info.value) == "Could not read 'T1_cut.nii.gz' as a scan: the file ends early (an incomplete upload?)."
    img, aff = nib.load(str(phantom_files["mask"])).get_fdata(), nib.load(str(phantom_files["mask"])).affine
    probability = tmp_path / "p.nii.gz"
    nib.save(nib.Nifti1Image((img * np.linspace(0.2, 1.0, img.size).reshape(img.shape)).astype(np.float32), aff),
             str(probability))
    with pytest.raises(L.USBEditorError) as info:
        doc.import_mask(probability, source_name="prob.nii.gz")
    assert str(info.value).startswith("Could not read 'prob.nii.gz' as a mask: it is not binary (values 0, ")
    assert doc.lesion_voxels() == 0
    big = tmp_path / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((128, 128, 64), np.float32), np.eye(4)), str(big))
    assert big.stat().st_size < 2**20
    with pytest.raises(L.USBEditorError, match=r"^Could not read 'zeros.nii.gz' as a scan: it holds 4 MB of voxels "
                                               r"\(128 x 128 x 64\); at most 1 MB are read here\.$"):
        doc.load_scan(big, "zeros.nii.gz")
    import SimpleITK as sitk

    segmentation = tmp_path / "zeros.seg.nrrd"  # a few KB of .seg.nrrd, 2 MB of voxels: refused before it is read
    sitk.WriteImage(sitk.Image([128, 128, 128], sitk.sitkUInt8), str(segmentation), True)
    with pytest.raises(L.USBEditorError, match=r"^Could not read 'zeros.seg.nrrd' as a mask: it holds 2 MB of voxels"):
        doc.import_mask(segmentation, source_name="zeros.seg.nrrd")
    assert doc.volume.GetName() == "T1"
