"""USBEditorLib on a real MRML scene (slicer-core): the four tasks, inputs kept intact, geometry, cancel, errors.

Nodes come from NIfTI files through Slicer's own readers. The worker is the real background process
(``python -m USBLib.apps.worker``) running a tiny random-init bundle; one test uses the shipped default model.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[1] / "USBEditor")]  # Slicer puts a module's folder on the path

import phantoms  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from conftest import make_scan  # noqa: E402  (Testing/conftest.py: phantom scans)
from headless import load_nifti, segmentation_from_mask  # noqa: E402

from USBEditorLib.logic import (Device, LocalMode, RunCancelled, RunSettings, Stages, Task,  # noqa: E402
                                USBEditorError, default_settings, describe_model, ijk_to_ras, installed_models,
                                load_mask, load_sample, mask_from_node, mask_in_own_space, missing_input,
                                new_lesion_segmentation, panel_bundle, resolved_stages, runs_once,
                                segment_choices, segment_editor_node)

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run

FAST = RunSettings(steps=3, strength=0.5)


@pytest.fixture(scope="session")
def tiny_model(tiny_bundle) -> str:
    """Folder of the session's tiny random-init bundle, as a user would pick it."""
    return str(tiny_bundle.root)


def fingerprint(node) -> tuple[str, bytes]:
    """Voxels and geometry of a volume node, to prove it was not modified."""
    return (hashlib.sha1(slicer.util.arrayFromVolume(node).tobytes()).hexdigest(), ijk_to_ras(node).tobytes())


def node_ids(scene) -> set[str]:
    """Data nodes of the scene (display/storage helpers and singletons that Slicer makes on its own left out)."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return {n.GetID() for n in nodes if not (n.IsA("vtkMRMLDisplayNode") or n.IsA("vtkMRMLStorageNode")
                                               or n.IsA("vtkMRMLSubjectHierarchyNode") or n.GetSingletonTag())}


@pytest.fixture
def t1(scene, tmp_path):
    """A phantom T1 with a lesion on an oblique grid, loaded from NIfTI, and its lesion as a segment."""
    img, mask, aff = make_scan("oblique")
    volume = load_nifti(tmp_path, "T1", img, aff)
    seg, segment_id = segmentation_from_mask("Segmentation", mask, volume)
    return volume, seg, segment_id, mask, aff


def test_heal_with_segment_keeps_input_geometry_and_outside_voxels(t1, logic, tiny_model, scene):
    volume, seg, segment_id, mask, aff = t1
    before = fingerprint(volume)
    steps = []
    out = logic.run(Task.HEAL, volume, seg, segment_id, FAST, model=tiny_model, device=Device.CPU,
                    progress=lambda d, t, m: steps.append((d, t)))
    assert out.volume.GetName() == "T1 healed"
    assert out.volume is not volume and fingerprint(volume) == before
    np.testing.assert_allclose(ijk_to_ras(out.volume), aff, atol=1e-4)
    result, original = slicer.util.arrayFromVolume(out.volume), slicer.util.arrayFromVolume(volume)
    assert result.dtype == original.dtype and result.shape == original.shape
    changed = (result != original).transpose(2, 1, 0)
    assert changed.any(), "the edit changed nothing"
    # only near the lesion: every changed voxel is within the lesion grown by the margin (6 mm) + feather
    ijk = np.argwhere(changed)
    lesion_ras = (aff[:3, :3] @ np.argwhere(mask).T).T + aff[:3, 3]
    changed_ras = (aff[:3, :3] @ ijk.T).T + aff[:3, 3]
    nearest = np.min(np.linalg.norm(changed_ras[:, None] - lesion_ras[None], axis=2), axis=1)
    assert nearest.max() < 6.0 * 2 + 4.0
    assert steps and steps[-1][0] == steps[-1][1], "progress never reached the end"
    assert out.uncertainty is None and out.provenance["task"] == "heal"
    assert out.provenance["settings"]["steps"] == 3


def test_a_volume_with_voxels_without_a_value_is_healed_and_keeps_them(logic, tiny_model, scene, tmp_path):
    """A float volume with NaN where it has no value (outside a normalised scan's box) heals, its NaN kept in the
    result and a note about them in the provenance; a volume with no value at all is an error."""
    img, mask, aff = make_scan("oblique")
    volume = load_nifti(tmp_path, "T1 nan", img.astype(np.float32), aff)
    voxels = slicer.util.arrayFromVolume(volume)  # [K, J, I]; set in the node (the file reader reads NaN as 0)
    voxels[:3] = np.nan
    slicer.util.arrayFromVolumeModified(volume)
    seg, segment_id = segmentation_from_mask("Segmentation", mask, volume)
    out = logic.run(Task.HEAL, volume, seg, segment_id, FAST, model=tiny_model, device=Device.CPU)
    result = slicer.util.arrayFromVolume(out.volume).transpose(2, 1, 0)
    assert np.isnan(result[:, :, :3]).all() and np.isfinite(result[:, :, 3:]).all()
    assert any("without a value" in note for note in out.notes)
    empty = load_nifti(tmp_path, "T1 empty", img.astype(np.float32), aff)
    slicer.util.arrayFromVolume(empty)[:] = np.nan
    slicer.util.arrayFromVolumeModified(empty)
    with pytest.raises(USBEditorError, match="no voxel with a value"):
        logic.run(Task.HEAL, empty, seg, segment_id, FAST, model=tiny_model, device=Device.CPU)


def test_embed_with_labelmap_on_another_grid(t1, logic, tiny_model, tmp_path):
    volume, _, _, _, aff = t1
    # the lesion drawn on a finer, axis-aligned grid covering the same place: resampled onto the scan
    fine = np.diag([2.0, 2.0, 2.0, 1.0])
    fine[:3, 3] = aff[:3, 3] - 10.0
    shape = (60, 70, 60)
    label = phantoms.sphere_mask(shape, fine, (-25.0, -10.0, 15.0), 9.0) * 3  # label value 3
    labelmap = load_nifti(tmp_path, "lesion label", label.astype(np.uint8), fine, labelmap=True)
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode")
    before = fingerprint(volume)
    out = logic.run(Task.EMBED, volume, labelmap, None, FAST, model=tiny_model, device=Device.CPU)
    assert out.volume.GetName() == "T1 + lesion"
    np.testing.assert_allclose(ijk_to_ras(out.volume), aff, atol=1e-4)
    assert fingerprint(volume) == before
    assert out.provenance["mask_voxels"] > 0


def test_segment_on_a_cropped_copy_of_the_grid_needs_no_resampling(t1, tmp_path):
    """The mask the worker is given (``mask_from_node``, what ``start`` writes into the job): the segment's
    voxels in place on the scan's grid."""
    volume, _, _, mask, aff = t1
    crop = aff.copy()
    crop[:3, 3] = aff[:3, :3] @ np.array([10, 15, 8]) + aff[:3, 3]  # same voxels, starting at (10, 15, 8)
    sub = load_nifti(tmp_path, "crop", np.ones((30, 30, 30), np.int16), crop)
    seg, sid = segmentation_from_mask("Cropped", mask[10:40, 15:45, 8:38], sub)
    data, name = mask_from_node(seg, sid, volume, resample=False)
    expected = np.zeros_like(mask)
    expected[10:40, 15:45, 8:38] = mask[10:40, 15:45, 8:38]
    assert name == "lesion" and np.array_equal(data > 0, expected > 0)
    # under a transform that leaves it in place the segment is still on the scan's voxels; moved half a voxel by
    # one, it lies between them: resampled, so refused without resampling
    shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    seg.SetAndObserveTransformNodeID(shift.GetID())
    assert np.array_equal(mask_from_node(seg, sid, volume, resample=False)[0] > 0, expected > 0)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 0.5 * float(np.linalg.norm(aff[:3, 0])))
    shift.SetMatrixTransformToParent(matrix)
    with pytest.raises(USBEditorError, match="drawn on another image grid"):
        mask_from_node(seg, sid, volume, resample=False)
    volume.SetAndObserveTransformNodeID(shift.GetID())  # both under it: on the scan's voxels again
    assert np.array_equal(mask_from_node(seg, sid, volume, resample=False)[0] > 0, expected > 0)
    volume.SetAndObserveTransformNodeID(None)


def test_segment_drawn_on_another_grid_is_resampled_onto_the_scan(t1, tmp_path):
    volume, _, _, mask, aff = t1
    fine, shape = np.diag([2.0, 2.0, 2.0, 1.0]), (100, 110, 100)
    fine[:3, 3] = aff[:3, 3] - 10.0
    other = load_nifti(tmp_path, "fine", np.ones(shape, np.int16), fine)
    seg, sid = segmentation_from_mask("Fine", phantoms.sphere_mask(shape, fine, (28.0, 5.0, 20.0), 9.0), other)
    data, _ = mask_from_node(seg, sid, volume)
    # the same 9 mm sphere, now on the scan's 3.5 mm grid: about the scan's own lesion mask
    assert data.shape == mask.shape
    overlap = ((data > 0) & (mask > 0)).sum()
    assert 2 * overlap / ((data > 0).sum() + (mask > 0).sum()) > 0.7


def test_heal_names_its_output_uniquely(t1, logic, tiny_model, scene):
    volume, seg, segment_id, _, _ = t1
    taken = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 healed")  # as an earlier heal left it
    name = logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=2), model=tiny_model).volume.GetName()
    assert name != taken.GetName() and name.startswith("T1 healed")


def test_a_mask_that_covers_the_rim_is_healed_without_growth(t1, logic, tmp_path):
    """The panel's "mask covers the lesion's dark rim" box reaches the engine as a heal with no growth of the mask
    (``dilation_mm`` 0 where the model grows it by 2 mm: a FLAIR-made or dilated mask healed as drawn); nothing
    changes beyond the feather."""
    volume, seg, segment_id, mask, aff = t1
    model = phantoms.make_bundle(tmp_path / "tiny-local", local=True, name="tiny-local")
    assert model.defaults("heal")["dilation_mm"] == 2.0
    out = logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=2, mask_covers_rim=True),
                    model=str(model.root))
    settings = out.provenance["settings"]
    assert settings["dilation_mm"] == 0.0
    changed = (slicer.util.arrayFromVolume(out.volume) != slicer.util.arrayFromVolume(volume)).transpose(2, 1, 0)
    assert changed.any()
    lesion_ras = (aff[:3, :3] @ np.argwhere(mask).T).T + aff[:3, 3]
    changed_ras = (aff[:3, :3] @ np.argwhere(changed).T).T + aff[:3, 3]
    nearest = np.min(np.linalg.norm(changed_ras[:, None] - lesion_ras[None], axis=2), axis=1)
    assert nearest.max() <= settings["margin_mm"] + 1e-3  # the mask and its feather, no growth


def test_samples_give_an_uncertainty_volume(t1, logic, tiny_model):
    volume, seg, segment_id, _, aff = t1
    out = logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=2, samples=2), model=tiny_model)
    assert out.uncertainty is not None and out.uncertainty.GetName() == "T1 healed uncertainty"
    np.testing.assert_allclose(ijk_to_ras(out.uncertainty), aff, atol=1e-4)
    assert slicer.util.arrayFromVolume(out.uncertainty).max() > 0


def test_progression_series_is_a_sequence_of_growing_lesions(t1, logic, tiny_model, scene):
    volume, seg, segment_id, _, aff = t1
    out = logic.run(Task.EMBED, volume, seg, segment_id, RunSettings(steps=2), model=tiny_model, frames=3)
    assert out.sequence.IsA("vtkMRMLSequenceNode") and out.sequence.GetNumberOfDataNodes() == 3
    assert out.sequence.GetName() == "T1 lesion progression"
    original = slicer.util.arrayFromVolume(volume).astype(np.float64)
    changes = []
    for i in range(3):
        frame = out.sequence.GetNthDataNode(i)
        np.testing.assert_allclose(ijk_to_ras(frame), aff, atol=1e-4)
        changes.append(int((slicer.util.arrayFromVolume(frame) != original).sum()))
    assert changes[0] <= changes[1] <= changes[2] and changes[2] > 0
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(out.sequence.GetNthDataNode(2)),
                                  slicer.util.arrayFromVolume(out.volume))
    browsers = scene.GetNodesByClass("vtkMRMLSequenceBrowserNode")
    assert browsers.GetNumberOfItems() == 1


def test_a_progression_frame_that_cannot_be_read_leaves_no_sequence_behind(t1, logic, scene, tmp_path):
    import nibabel as nib

    volume, _, _, mask, aff = t1
    nib.save(nib.Nifti1Image(mask.astype(np.float32), aff), str(tmp_path / "frame1.nii.gz"))
    (tmp_path / "frame2.nii.gz").write_bytes(b"not a volume")
    before = node_ids(scene)
    with pytest.raises(Exception):
        logic._add_sequence([tmp_path / "frame1.nii.gz", tmp_path / "frame2.nii.gz"], "T1 lesion progression",
                            volume, None)
    assert node_ids(scene) == before


def test_a_segment_held_as_a_closed_surface_is_read_on_the_scan_s_grid(t1, scene):
    """A lesion loaded as a surface (a model or an STL: the segmentation's source representation is a closed
    surface) is rasterised on the scan's grid; the user's segmentation is left as it was and no helper node
    stays. Without a volume or a reference grid it is refused in one line."""
    volume, _, _, mask, aff = t1
    centre = (aff @ np.r_[np.argwhere(mask).mean(0), 1.0])[:3]
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*centre)
    sphere.SetRadius(10.0)
    sphere.SetThetaResolution(48)
    sphere.SetPhiResolution(48)
    sphere.Update()
    surf = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Surface")
    surf.GetSegmentation().SetSourceRepresentationName("Closed surface")
    surf_id = surf.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "lesion")
    before = node_ids(scene)
    data, name = mask_from_node(surf, surf_id, volume)
    ijk = np.stack(np.meshgrid(*map(np.arange, mask.shape), indexing="ij"), -1)
    inside = np.linalg.norm(ijk @ aff[:3, :3].T + aff[:3, 3] - centre, axis=-1) <= 10.0  # voxel centres in it
    assert name == "lesion" and data.shape == mask.shape
    assert 2 * ((data > 0) & inside).sum() / ((data > 0).sum() + inside.sum()) > 0.85
    assert node_ids(scene) == before
    assert not surf.GetSegmentation().ContainsRepresentation("Binary labelmap")  # the user's node untouched
    with pytest.raises(USBEditorError, match="surfaces without an image grid") as err:
        mask_in_own_space(surf, surf_id)
    assert "\n" not in str(err.value)


def every_node_id(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def test_reading_a_mask_leaves_nothing_in_the_scene(t1, scene, tmp_path):
    """A mask read through temporary labelmaps (a segment without a volume; a segment or labelmap on another grid)
    leaves no node behind: the exported segment's colour table stayed (visible in the Data module, saved with the
    scene), and the temporary labelmaps' display nodes too."""
    volume, seg, segment_id, mask, aff = t1
    coarse = aff.copy()
    coarse[:3, :3] *= 1.5
    other = load_nifti(tmp_path, "Coarse", np.zeros(mask.shape, np.float32), coarse)
    label = load_nifti(tmp_path, "Label", mask.astype(np.uint8), aff, labelmap=True)
    before = every_node_id(scene)
    data, _, _ = mask_in_own_space(seg, segment_id)
    assert data.sum() == mask.sum()
    assert mask_from_node(seg, segment_id, other)[0].any()
    assert mask_from_node(label, None, other)[0].any()
    assert every_node_id(scene) == before


def test_a_labelmap_is_placed_where_the_views_show_it_under_a_transform(scene, tmp_path):
    """The T1 under a linear transform (8 mm to the right): a labelmap mask is taken where it is shown, as a
    segment is: on the T1's grid but not under its transform it lands 4 voxels (8 mm) off the T1's voxels; under the
    same transform, voxel for voxel, on that grid or on a finer one."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = -40.0
    volume = load_nifti(tmp_path, "T1", np.ones((40, 40, 40), np.float32), aff)
    shift = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 8.0)
    shift.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(shift.GetID())
    mask = np.zeros((40, 40, 40), np.uint8)
    mask[16:22, 18:24, 20:26] = 1
    fine_aff = np.diag([1.0, 1.0, 1.0, 1.0])
    fine_aff[:3, 3] = -40.5  # the 2 mm voxels' corners
    fine = np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2)
    plain = load_nifti(tmp_path, "plain", mask, aff, labelmap=True)
    same = load_nifti(tmp_path, "same", mask, aff, labelmap=True)
    finer = load_nifti(tmp_path, "finer", fine, fine_aff, labelmap=True)
    for node in (same, finer):
        node.SetAndObserveTransformNodeID(shift.GetID())
    assert np.array_equal(mask_from_node(plain, None, volume)[0], np.roll(mask, -4, axis=0))
    assert np.array_equal(mask_from_node(same, None, volume)[0], mask)
    assert np.array_equal(mask_from_node(finer, None, volume)[0], mask)


def test_generate_from_mask_on_reference_and_in_model_space(t1, logic, tiny_model):
    volume, seg, segment_id, _, aff = t1
    on_scan = logic.run(Task.GENERATE_FROM_MASK, volume, seg, segment_id, RunSettings(steps=2), model=tiny_model)
    assert on_scan.volume.GetName() == "USB brain for lesion"
    # in the reference's data type, as `usb generate-from-mask --reference` writes it
    assert slicer.util.arrayFromVolume(on_scan.volume).dtype == slicer.util.arrayFromVolume(volume).dtype == np.int16
    np.testing.assert_allclose(ijk_to_ras(on_scan.volume), aff, atol=1e-4)
    alone = logic.run(Task.GENERATE_FROM_MASK, None, seg, segment_id, RunSettings(steps=2), model=tiny_model)
    from USBLib.core.bundle import load

    bundle = load(tiny_model)
    assert alone.volume.GetImageData().GetDimensions() == bundle.grid_shape
    np.testing.assert_allclose(ijk_to_ras(alone.volume), bundle.grid_affine, atol=1e-4)
    assert alone.volume.GetTransformNodeID() is None
    # a mask under a transform: the brain generated in the mask's own space is shown where the mask is
    shift = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    seg.SetAndObserveTransformNodeID(shift.GetID())
    moved = logic.run(Task.GENERATE_FROM_MASK, None, seg, segment_id, RunSettings(steps=2, samples=2),
                      model=tiny_model)
    assert moved.volume.GetTransformNodeID() == moved.uncertainty.GetTransformNodeID() == shift.GetID()


def test_generate_pairs_give_brains_and_lesion_segmentations(scene, logic, tiny_model):
    out = logic.run(Task.GENERATE, settings=RunSettings(steps=2, samples=2, sampler="dpm++2m"), model=tiny_model)
    assert out.provenance["settings"]["sampler"] == "dpm++2m"  # the panel's sampler reached the engine
    names = [n.GetName() for n in out.nodes]
    assert names == ["USB generated brain 1", "USB generated lesion 1", "USB generated brain 2", "USB generated lesion 2"]
    assert out.lesion.IsA("vtkMRMLSegmentationNode")
    assert out.lesion.GetSegmentation().GetSegment("lesion") is not None
    assert slicer.util.arrayFromVolume(out.volume).max() > 0


@pytest.mark.parametrize("case, message", [
    ("no volume", "Select an input volume"),
    ("no mask", "Select the lesion"),
    ("empty segment", "is empty"),
    ("other place", "does not overlap volume"),
    ("empty labelmap", "is empty"),
    ("progression heal", "progression series"),
    ("other grid, no resampling", "drawn on another image grid"),
])
def test_bad_inputs_raise_clear_errors(t1, logic, tiny_model, tmp_path, scene, case, message):
    volume, seg, segment_id, mask, aff = t1
    before_nodes = node_ids(scene)
    task, args, frames = Task.EMBED, (volume, seg, segment_id), 0
    if case == "no volume":
        args = (None, seg, segment_id)
    elif case == "no mask":
        args = (volume, None, None)
    elif case == "empty segment":
        empty_seg, empty_id = segmentation_from_mask("Empty", np.zeros_like(mask), volume)
        args = (volume, empty_seg, empty_id)
    elif case == "other place":  # a segment drawn on a scan 500 mm away
        far = aff.copy()
        far[:3, 3] += 500.0
        other = load_nifti(tmp_path, "other", np.ones(mask.shape, np.int16), far)
        far_seg, far_id = segmentation_from_mask("Far", mask, other)
        args = (volume, far_seg, far_id)
    elif case == "empty labelmap":
        args = (volume, load_nifti(tmp_path, "empty", np.zeros(mask.shape, np.uint8), aff, labelmap=True), None)
    elif case == "progression heal":
        task, frames = Task.HEAL, 3
    resample = True
    if case == "other grid, no resampling":  # the same lesion drawn on a 2 mm axis-aligned grid
        fine = np.diag([2.0, 2.0, 2.0, 1.0])
        fine[:3, 3] = aff[:3, 3] - 10.0
        shape = (100, 110, 100)
        other = load_nifti(tmp_path, "fine", np.ones(shape, np.int16), fine)
        moved, moved_id = segmentation_from_mask("Fine", phantoms.sphere_mask(shape, fine, (28.0, 5.0, 20.0), 9.0), other)
        args, resample = (volume, moved, moved_id), False
    before_nodes = node_ids(scene)
    with pytest.raises(USBEditorError, match=message) as err:
        logic.run(task, *args, settings=FAST, model=tiny_model, frames=frames, resample_mask=resample)
    assert "\n" not in str(err.value)
    assert node_ids(scene) == before_nodes


@pytest.mark.parametrize("task", [Task.HEAL, Task.EMBED])
@pytest.mark.parametrize("stages", [Stages.DEFAULT, Stages.LOCAL, Stages.LATENT, Stages.BOTH])
@pytest.mark.parametrize("mode", [LocalMode.DEFAULT, LocalMode.REALISM, LocalMode.FIDELITY])
def test_the_panel_s_run_once_rule_is_the_engine_s(task, stages, mode):
    """The panel greys out Samples exactly where the engine refuses several samples (``check_sampling``): the
    rule it shows is the one that runs, "Model default" included (the shipped model's: the local stage)."""
    from USBLib.core.bundle import load
    from USBLib.editor.input_checks import check_sampling
    from USBLib.errors import InputError

    try:
        check_sampling(load(None), task.value, 2, stages.value or None, mode.value or None)
        refused = False
    except InputError:
        refused = True
    assert runs_once(task, stages, mode) is refused


@pytest.mark.parametrize("stages", [Stages.DEFAULT, Stages.LOCAL])
def test_a_heal_without_a_mask_shows_the_latent_stage_it_runs(t1, logic, stages):
    """A heal's mask is optional; without one the engine heals the whole brain with the latent stage, whatever the
    stages asked for. The panel shows that run (steps and strength live, Samples open): it greyed them out and sent
    one sample, from the local stage a mask-less heal never runs."""
    volume = t1[0]
    assert resolved_stages(Task.HEAL, stages, LocalMode.DEFAULT, has_mask=False)[0] is Stages.LATENT
    assert resolved_stages(Task.HEAL, stages, LocalMode.DEFAULT)[0] is Stages.LOCAL  # the shipped model, a mask
    assert runs_once(Task.HEAL, stages, LocalMode.DEFAULT) and not runs_once(Task.HEAL, stages, LocalMode.DEFAULT,
                                                                             has_mask=False)
    out = logic.run(Task.HEAL, volume, None, None, RunSettings(steps=2, samples=2, stages=stages.value))
    assert out.provenance["settings"]["stages"] == "latent" and out.uncertainty is not None


def test_the_panel_reads_a_model_once_per_version_of_its_bundle_json(tiny_bundle, tmp_path, monkeypatch):
    """The panel asks for the model's defaults on every change of a setting; each load checks the sha256 of every
    weight file. It is read once, and again when its bundle.json changes (a model retrained into the same folder)."""
    import json
    import os

    import USBLib.core.bundle as bundle_module

    folder = tmp_path / "model"
    folder.mkdir()
    for item in tiny_bundle.root.iterdir():
        (folder / item.name).symlink_to(item)
    (folder / "bundle.json").unlink()
    config = json.loads((tiny_bundle.root / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps(config))
    loads = []
    real_load = bundle_module.load
    monkeypatch.setattr(bundle_module, "load", lambda model=None: loads.append(model) or real_load(model))
    first = panel_bundle(str(folder))
    assert panel_bundle(str(folder)) is first and resolved_stages(Task.EMBED, Stages.DEFAULT, LocalMode.DEFAULT,
                                                                   str(folder)) is not None
    assert len(loads) == 1
    config["defaults"]["heal"]["steps"] = 7
    (folder / "bundle.json").write_text(json.dumps(config))
    os.utime(folder / "bundle.json", ns=(1, 1))  # a different version, whatever the clock's resolution
    assert panel_bundle(str(folder)).defaults("heal")["steps"] == 7 and len(loads) == 2
    with pytest.raises(USBEditorError, match="no bundle.json"):
        (folder / "bundle.json").unlink()
        panel_bundle(str(folder))


def test_a_labelmap_with_negative_labels_gives_all_its_non_zero_voxels(t1, tmp_path):
    """A labelmap's lesion is every non-zero voxel (docs/slicer.md), negative labels too: a -1 lesion read as empty
    (the run said the mask was empty) and a +1/-1 one lost its -1 half, on the scan's grid, resampled from another
    grid, and without a volume."""
    volume, _, _, mask, aff = t1
    negative = load_nifti(tmp_path, "negative", (-mask).astype(np.int8), aff, labelmap=True)
    alternate = np.where(np.arange(mask.size).reshape(mask.shape) % 2 == 0, 1, -1)
    mixed = load_nifti(tmp_path, "mixed", np.where(mask > 0, alternate, 0).astype(np.int8), aff, labelmap=True)
    for node in (negative, mixed):
        assert np.array_equal(mask_from_node(node, None, volume)[0], mask > 0), node.GetName()
        assert np.array_equal(mask_in_own_space(node, None)[0], mask > 0), node.GetName()
    fine_aff = aff.copy()
    fine_aff[:3, :3] /= 2  # the same lesion on a grid twice as fine, from the same corner
    fine_aff[:3, 3] = aff[:3, 3] - (aff[:3, :3] @ np.full(3, 0.25))
    fine = -np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2).astype(np.int8)
    resampled = mask_from_node(load_nifti(tmp_path, "fine", fine, fine_aff, labelmap=True), None, volume)[0]
    assert np.array_equal(resampled, mask > 0)


def test_the_worker_is_given_the_model_s_folder_not_its_name(t1, logic, tiny_bundle, monkeypatch):
    """The panel lists models from this process's ``USB_MODELS``, the worker runs in Slicer's startup environment,
    which may not have it: a model chosen by name ran into "neither a bundle folder nor an installed bundle". The
    job names the bundle's folder."""
    import os

    from USBEditorLib import process

    volume, seg, segment_id, _, _ = t1
    name = tiny_bundle.root.name
    monkeypatch.setenv("USB_MODELS", str(tiny_bundle.root.parent))  # set in Slicer (e.g. .slicerrc.py)
    monkeypatch.setattr(process, "base_environment",
                        lambda: {k: v for k, v in os.environ.items() if k != "USB_MODELS"})  # startupEnvironment()
    assert name in installed_models()
    out = logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=2), model=name, device=Device.CPU)
    assert out.provenance["model"]["name"] == tiny_bundle.name


def test_other_folder_without_a_folder_is_an_error_not_the_default_model():
    from USBEditorLib.logic import OTHER_MODEL, chosen_model

    with pytest.raises(USBEditorError, match="Choose the model folder"):
        chosen_model(OTHER_MODEL, "")
    assert chosen_model(OTHER_MODEL, "/models/mine") == "/models/mine"
    assert chosen_model("usb-tiny", "/models/mine") == "usb-tiny" and chosen_model("", "") is None


def test_a_failed_run_without_a_worker_message_says_how_it_ended():
    """Without a USB-ERROR line the message said only "exit code N": now the worker's last line of output, and for
    a worker killed by a signal (the out-of-memory killer's SIGKILL) that it was killed."""
    from USBEditorLib.logic import failure_message

    assert failure_message(1, "the lesion mask is empty", ["x"]) == "the lesion mask is empty"
    message = failure_message(-9, None, ["loading", "MemoryError: cannot allocate", "  "])
    assert "killed by signal 9" in message and "out of memory" in message and "MemoryError" in message
    assert failure_message(1, None, ["Traceback", "ModuleNotFoundError: No module named 'numpy'", ""]) == \
        "the worker stopped with exit code 1; its last output: ModuleNotFoundError: No module named 'numpy'"
    assert failure_message(3, None, []) == "the worker stopped with exit code 3"


def test_worker_errors_come_back_as_one_line(t1, logic, tmp_path, scene):
    volume, seg, segment_id, _, _ = t1
    before_nodes = node_ids(scene)
    with pytest.raises(USBEditorError, match="neither a bundle folder nor an installed bundle"):
        logic.run(Task.HEAL, volume, seg, segment_id, FAST, model=str(tmp_path / "no-such-model"))
    assert node_ids(scene) == before_nodes


def test_model_helpers():
    assert installed_models()[0] == "usb-tiny"
    assert "usb-tiny (tiny tier" in describe_model(None)
    defaults = default_settings(Task.EMBED)
    assert defaults.strength == 0.6 and defaults.steps == 50 and defaults.samples == 1
    heal = default_settings(Task.HEAL)
    assert heal.strength == 0.3
    # the shipped model has a local stage: the panel shows its realism mode (a person looks at the result)
    assert heal.local_mode == "realism" and heal.stages == "local"
    assert heal.for_task(Task.HEAL)["local_mode"] == "realism" and heal.for_task(Task.HEAL)["stages"] == "local"
    # the lesion darkness goes to an embed only, and only when a person asked for one
    assert "lesion_level" not in defaults.for_task(Task.EMBED)
    dark = RunSettings(lesion_level=0.5)
    assert dark.for_task(Task.EMBED)["lesion_level"] == 0.5 and "lesion_level" not in dark.for_task(Task.HEAL)
    with pytest.raises(USBEditorError, match="neither a bundle folder"):
        describe_model("/nonexistent/model")


def test_shipped_model_heals_the_sample(scene, logic):
    """One real run: the default model on the bundled 1 mm sample scan and its lesion mask."""
    from USBLib.resources import sample_files

    files = sample_files()
    volume = slicer.util.loadVolume(str(files["image"]))
    label = slicer.util.loadLabelVolume(str(files["lesion"]))
    before = fingerprint(volume)
    out = logic.run(Task.HEAL, volume, label, None, RunSettings(steps=10, strength=0.3, alpha0=20, k=2, eta=1))
    assert out.volume.GetName() == "sample_T1w healed" and fingerprint(volume) == before
    result = slicer.util.arrayFromVolume(out.volume).astype(np.float64)
    original = slicer.util.arrayFromVolume(volume).astype(np.float64)
    lesion = slicer.util.arrayFromVolume(label) > 0
    assert result[lesion].mean() > original[lesion].mean(), "healing should brighten the T1-dark lesion"
    assert out.provenance["model"]["name"] == "usb-tiny"


def test_panel_helpers_on_real_nodes(t1, tmp_path, scene):
    volume, seg, segment_id, mask, aff = t1
    assert missing_input(Task.HEAL, None, None, "") == "Select an input volume."
    assert missing_input(Task.HEAL, volume, None, "") is None  # heal without a mask: inside the whole brain
    assert missing_input(Task.EMBED, volume, None, "") == "Select or paint the lesion."
    assert missing_input(Task.EMBED, volume, seg, "") == "Select the lesion segment."
    assert missing_input(Task.EMBED, volume, seg, segment_id) is None
    assert missing_input(Task.GENERATE_FROM_MASK, None, seg, segment_id) is None
    assert missing_input(Task.GENERATE, None, None, "") is None
    assert segment_choices(seg) == [("lesion", segment_id)] and segment_choices(None) == []

    painted, sid = new_lesion_segmentation(volume)
    assert painted.GetName() == "T1 lesion" and segment_choices(painted) == [("lesion", sid)]
    with pytest.raises(USBEditorError, match="Select the input volume first"):
        new_lesion_segmentation(None)

    labelmap = load_mask(str(save_mask(tmp_path / "m.nii.gz", mask, aff)))
    assert labelmap.IsA("vtkMRMLLabelMapVolumeNode") and slicer.util.arrayFromVolume(labelmap).sum() == mask.sum()
    seg.AddDefaultStorageNode()
    seg.GetStorageNode().SetFileName(str(tmp_path / "lesion.seg.nrrd"))
    assert seg.GetStorageNode().WriteData(seg)
    loaded = load_mask(str(tmp_path / "lesion.seg.nrrd"))
    assert loaded.IsA("vtkMRMLSegmentationNode") and len(segment_choices(loaded)) == 1
    with pytest.raises(USBEditorError, match="Could not read 'missing.nii.gz'"):
        load_mask(str(tmp_path / "missing.nii.gz"))

    sample, sample_lesion = load_sample()
    assert sample.GetName() == "sample_T1w" and sample_lesion.IsA("vtkMRMLLabelMapVolumeNode")
    assert sample.GetImageData().GetDimensions() == (181, 217, 181) and slicer.util.arrayFromVolume(sample_lesion).any()

    editor_node = segment_editor_node()
    assert editor_node.IsA("vtkMRMLSegmentEditorNode") and segment_editor_node() is editor_node


def save_mask(path: Path, mask: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(path))
    return path


# last: these end the warm workers that the runs above share (the cancels the default device's, then
# the warm-worker test ends its own and every other)
def _ended(pid: int, timeout: float = 60.0) -> bool:
    """Whether process ``pid`` is gone within ``timeout`` seconds (the worker's reader thread reaps it)."""
    import os
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_worker_that_cannot_start_says_why(t1, tmp_path, tiny_model, monkeypatch):
    """A worker that cannot start (a module missing from its Python; a bad ``USB_THREADS``) said only "The worker
    stopped with exit code 1": the cause was a traceback in the log."""
    import os

    from USBEditorLib.logic import EditorLogic

    volume, seg, segment_id, _, _ = t1
    fake = tmp_path / "no-torch"
    fake.mkdir()
    (fake / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    with monkeypatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(fake), os.environ.get("PYTHONPATH")) if p))
        with pytest.raises(USBEditorError, match="cannot start: the Python module 'torch' is missing") as err:
            EditorLogic(threads=1).run(Task.HEAL, volume, seg, segment_id, FAST, model=tiny_model)
    assert "\n" not in str(err.value)
    monkeypatch.setenv("USB_THREADS", "abc")
    with pytest.raises(USBEditorError, match="cannot start: USB_THREADS must be a whole number"):
        EditorLogic().run(Task.HEAL, volume, seg, segment_id, FAST, model=tiny_model)


def test_a_worker_killed_during_a_run_is_reported_as_killed(t1, logic, tiny_model):
    import os
    import signal
    import time

    volume, seg, segment_id, _, _ = t1
    run = logic.start(Task.EMBED, volume, seg, segment_id, RunSettings(steps=200, stages="latent"),
                      model=tiny_model, device=Device.CPU)
    deadline = time.monotonic() + 300
    while not any(event.kind == "progress" for event in run.process.poll()):  # at work (the model loaded)
        assert run.process.running and time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(run.process.pid, signal.SIGKILL)  # what the kernel's out-of-memory killer does
    run.process.wait()
    with pytest.raises(USBEditorError, match=r"killed by signal 9 .*out of memory\?"):
        logic.finish(run)
    assert not run.job_dir.exists()


@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_a_progress_callback_that_raises_stops_the_worker_and_removes_the_job(t1, logic, tiny_model, monkeypatch,
                                                                              error):
    """A ``progress`` callback that raised (or Ctrl+C) left ``run`` without a cancel: the worker went on computing
    and the job's folder, the patient's scan in it, stayed in the temporary folder."""
    volume, seg, segment_id, _, _ = t1
    runs = []
    start = logic.start
    monkeypatch.setattr(logic, "start", lambda *args, **kwargs: runs.append(start(*args, **kwargs)) or runs[-1])

    def fail(done, total, message):
        raise error("the callback failed")

    with pytest.raises(error, match="the callback failed"):
        logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=20), model=tiny_model, device=Device.CPU,
                  progress=fail)
    (run,) = runs
    assert run.process.cancelled and not run.process.running and not run.job_dir.exists()
    assert _ended(run.process.pid)


def test_a_job_after_an_unexpected_failure_runs_on_a_new_worker(t1, tiny_model, tmp_path):
    """After an unexpected failure (exit code 1) the serving worker prints ``USB-DONE 1`` and ends; the next job was
    written to it meanwhile and lost ("The worker stopped with exit code 1", no message)."""
    from USBLib.apps.worker import write_job
    from USBEditorLib.process import WorkerProcess

    _, _, _, mask, aff = t1
    img = make_scan("oblique")[0]

    def job(name: str, broken: bool = False) -> WorkerProcess:
        folder = tmp_path / name
        write_job(folder, "heal", {"steps": 2}, image=(img, aff), mask=(mask, aff), model=tiny_model, device="cpu")
        if broken:
            (folder / "image.npz").unlink()  # the worker fails unexpectedly (FileNotFoundError: exit code 1)
        return WorkerProcess(folder, device="cpu", threads=1)

    first = job("good")
    assert first.wait() == 0
    broken = job("broken", broken=True)
    assert broken.wait() == 1 and broken.pid == first.pid
    broken.poll()
    assert "unexpected failure: FileNotFoundError" in broken.error
    after = job("after")
    code = after.wait()
    after.poll()
    assert code == 0, after.error
    assert after.pid != broken.pid and after.result is not None


def test_cancel_leaves_the_scene_as_it_was(t1, logic, tiny_model, scene):
    volume, seg, segment_id, _, _ = t1
    before_nodes, before = node_ids(scene), fingerprint(volume)
    seen = []

    def cancel_at_denoising(done, total, message):
        seen.append(message)
        return "denoising" not in message

    with pytest.raises(RunCancelled):
        logic.run(Task.HEAL, volume, seg, segment_id, RunSettings(steps=20), model=tiny_model,
                  progress=cancel_at_denoising)
    assert any("denoising" in m for m in seen)
    assert node_ids(scene) == before_nodes and fingerprint(volume) == before


def test_started_run_can_be_cancelled_and_its_files_go(t1, logic, tiny_model, scene):
    volume, seg, segment_id, _, _ = t1
    before_nodes = node_ids(scene)
    run = logic.start(Task.EMBED, volume, seg, segment_id, RunSettings(steps=50), model=tiny_model)
    assert run.job_dir.is_dir()
    logic.cancel(run)
    assert not run.process.running and not run.job_dir.exists()
    assert node_ids(scene) == before_nodes


def test_a_second_run_reuses_the_warm_worker_and_idleness_cleanup_or_cancel_ends_it(t1, logic, tiny_model,
                                                                                     monkeypatch):
    from USBEditorLib.process import close_warm_workers

    volume, seg, segment_id, _, _ = t1

    def heal(settings=FAST):
        return logic.start(Task.HEAL, volume, seg, segment_id, settings, model=tiny_model, device=Device.CPU)

    def finish(run):
        assert run.process.wait() == 0
        return slicer.util.arrayFromVolume(logic.finish(run).volume)

    first = heal()
    healed = finish(first)
    second = heal()
    assert second.process.pid == first.process.pid  # no new process: torch, MONAI and the model stay loaded
    np.testing.assert_array_equal(finish(second), healed)  # and the kept model heals alike
    monkeypatch.setenv("USB_WORKER_IDLE_S", "0")  # sent away as soon as it is idle (read by this process)
    third = heal()
    assert third.process.pid == first.process.pid
    finish(third)
    assert _ended(third.process.pid)
    monkeypatch.delenv("USB_WORKER_IDLE_S")
    fourth = heal()
    assert fourth.process.pid != first.process.pid  # the next run starts a fresh one
    close_warm_workers()  # the module's cleanup (Slicer closing) during a run: the run finishes, then the worker goes
    np.testing.assert_array_equal(finish(fourth), healed)
    assert _ended(fourth.process.pid)
    fifth = heal(RunSettings(steps=50))
    logic.cancel(fifth)  # a cancel kills the worker
    assert _ended(fifth.process.pid)
