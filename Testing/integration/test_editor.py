"""The four tasks end to end through the Python API with a tiny random-init bundle."""
import numpy as np
import pytest

from conftest import AFFINES, SCAN_SHAPE, make_scan
from USBLib.errors import Cancelled, InputError


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_heal_with_mask_keeps_geometry_and_outside_voxels(editor, kind):
    img, mask, aff = make_scan(kind)
    res = editor.heal(img, aff, mask, seed=1)
    image, affine = res  # the (array, affine) contract
    assert image.shape == img.shape and image.dtype == img.dtype
    np.testing.assert_allclose(affine, aff, atol=1e-5)
    region = res.provenance["edit_region_voxels"]
    assert 0 < region < img.size / 4
    changed = image != img
    assert changed.any()
    # every changed voxel is within the grown mask: voxels far from the lesion are bit-for-bit the input
    from scipy import ndimage

    far = ndimage.distance_transform_edt(mask == 0, sampling=np.linalg.norm(aff[:3, :3], axis=0)) > 16.0 + 1e-6
    assert np.array_equal(image[far], img[far])
    assert res.provenance["settings"]["alpha0"] == 20.0 and res.provenance["start_step"] == 307


def test_prefill_replaces_the_lesion_before_diffusion_and_keeps_the_rest(editor):
    img, mask, aff = make_scan("oblique")
    plain = editor.heal(img, aff, mask, seed=2, prefill="none", steps=3)
    filled = editor.heal(img, aff, mask, seed=2, prefill="biharmonic", steps=3)
    assert filled.image.dtype == img.dtype and filled.provenance["settings"]["prefill"] == "biharmonic"
    lesion = mask > 0
    # the phantom's lesion is dark: a fill from the surrounding tissue brightens it well beyond the random-init edit
    assert filled.image[lesion].mean() > plain.image[lesion].mean() + 0.2 * (img[~lesion & (img > 0)].mean() - img[lesion].mean())
    untouched = (plain.image == img) & (filled.image == img)
    assert untouched.sum() > 0.9 * img.size  # both leave the same outside untouched
    with pytest.raises(InputError, match="prefill must be one of"):
        editor.heal(img, aff, mask, prefill="median")


def test_heal_without_mask_edits_inside_brain_only(editor):
    img, _, aff = make_scan()
    res = editor.heal(img, aff, seed=0)
    assert (res.image != img).any()
    from scipy import ndimage

    import phantoms

    brain = phantoms.brain_mask(SCAN_SHAPE, aff)
    outside = ndimage.distance_transform_edt(brain == 0, sampling=np.linalg.norm(aff[:3, :3], axis=0)) > 8.0
    assert outside.sum() > 0.3 * img.size
    assert np.array_equal(res.image[outside], img[outside])  # skull and background untouched
    assert res.provenance["mask_voxels"] == 0


def test_embed_changes_only_near_mask_and_is_seeded(editor):
    img, mask, aff = make_scan(lesion=False, dtype=np.float32)  # float: random-init edits are small
    a = editor.embed(img, aff, mask, seed=5)
    b = editor.embed(img, aff, mask, seed=5)
    c = editor.embed(img, aff, mask, seed=6)
    assert np.array_equal(a.image, b.image)
    assert not np.array_equal(a.image, c.image)
    assert (a.image[mask > 0] != img[mask > 0]).any()


def test_samples_give_mean_and_uncertainty(editor):
    img, mask, aff = make_scan()
    res = editor.embed(img, aff, mask, samples=3, seed=2)
    assert res.uncertainty is not None and res.uncertainty.shape == img.shape
    from scipy import ndimage

    far = ~ndimage.binary_dilation(mask > 0, iterations=6)  # beyond dilation + feather of every stage
    assert res.uncertainty[mask > 0].max() > 0  # the samples differ where the edit acts
    assert np.all(res.uncertainty[far] == 0) and np.array_equal(res.image[far], img[far])  # and nowhere else
    assert res.provenance["samples"] == 3


def test_settings_override_defaults_and_are_validated(editor):
    img, mask, aff = make_scan()
    res = editor.heal(img, aff, mask, steps=2, strength=0.5, alpha0=0.0, k=1.0)
    assert res.provenance["network_steps"] == 2 and res.provenance["start_step"] == 512
    with pytest.raises(InputError, match="strength"):
        editor.heal(img, aff, mask, strength=1.5)
    with pytest.raises(InputError, match="eta"):
        editor.embed(img, aff, mask, eta=-1)


def test_cancel_raises_and_reports_progress(editor):
    img, mask, aff = make_scan()
    seen = []

    def progress(step, total, message):
        seen.append((step, total, message))
        return step < 3

    with pytest.raises(Cancelled):
        editor.heal(img, aff, mask, progress=progress)
    assert seen[0][0] == 0 and seen[-1][0] == 3 and all(t == seen[0][1] for _, t, _ in seen)


@pytest.mark.parametrize("case,message", [
    ("nan", "without a value"), ("constant", "constant"), ("nonbinary", "not binary"), ("grid", "different grid"),
    ("outside", "outside the brain"), ("empty", "empty"), ("whole", "is it a brain mask")])
def test_bad_inputs(editor, case, message):
    img, mask, aff = make_scan()
    if case == "nan":  # inside the lesion; elsewhere such voxels are kept (below)
        img = img.astype(np.float32)
        img[tuple(np.argwhere(mask > 0)[0])] = np.nan
    elif case == "constant":
        img = np.full_like(img, 7)
    elif case == "nonbinary":  # two lesion labels: which one is the lesion is not for the engine to guess
        mask = mask * 2
        mask[tuple(np.argwhere(mask)[0])] = 1
    elif case == "grid":
        mask = mask[:-1]
    elif case == "outside":
        mask = np.zeros_like(mask)
        mask[:3, :3, :3] = 1
    elif case == "empty":
        mask = np.zeros_like(mask)
    elif case == "whole":  # a brain mask given as the lesion mask: its "heal" would rewrite the brain for minutes
        mask = np.ones_like(mask)
    with pytest.raises(InputError, match=message):
        editor.embed(img, aff, mask)
    if case == "whole":
        with pytest.raises(InputError, match=message):
            editor.heal(img, aff, mask)
    if case == "empty":  # a heal too: without a mask it would edit the whole brain, which an empty one did not ask
        with pytest.raises(InputError, match="no lesion to heal"):
            editor.heal(img, aff, mask)


def test_voxels_without_a_value_stay_so_and_the_rest_is_the_edit_of_the_filled_scan(editor):
    """A scan with NaN/Inf where it has no value (SPM writes NaN outside a normalised scan's box): the edit reads
    them as the scan's darkest value, writes them back as they were, says so in a note, and is elsewhere the edit of
    the scan with them filled in."""
    img, mask, aff = make_scan()
    img = img.astype(np.float32)
    holes = np.zeros(img.shape, bool)
    holes[:, :, :4] = True
    filled = img.copy()
    filled[holes] = img[~holes].min()
    img[holes] = np.nan
    img[0, 0, 0] = np.inf
    for run in (editor.heal, editor.embed):
        got = run(img, aff, mask, seed=0)
        want = run(filled, aff, mask, seed=0)
        assert np.isnan(got.image[holes & ~np.isinf(img)]).all() and np.isinf(got.image[0, 0, 0])
        assert np.array_equal(got.image[~holes], want.image[~holes])
        assert any("without a value" in note for note in got.provenance["notes"])
    assert np.isnan(img[holes & ~np.isinf(img)]).all()  # the caller's array is untouched


def test_mask_on_other_grid_can_be_resampled(editor):
    img, mask, aff = make_scan()
    fine_aff = aff.copy()
    fine_aff[:3, :3] = aff[:3, :3] / 2
    fine = np.repeat(np.repeat(np.repeat(mask, 2, 0), 2, 1), 2, 2)
    fine_aff[:3, 3] = aff[:3, 3] - aff[:3, :3] @ np.array([0.25, 0.25, 0.25])
    res = editor.embed(img, aff, fine, mask_affine=fine_aff, resample_mask=True)
    assert np.array_equal(res.mask, mask)


def test_generate_pairs(editor):
    out = editor.generate(2, seed=3)
    assert len(out) == 2
    for res in out:
        assert res.image.shape == editor.bundle.grid_shape and res.image.dtype == np.float32
        assert set(np.unique(res.mask)) <= {0, 1}
        assert np.all(res.mask[~editor.space["brain"]] == 0)
        np.testing.assert_allclose(res.affine, editor.bundle.grid_affine)
    assert not np.array_equal(out[0].image, out[1].image)
    # each pair is one sample (its sidecar said "samples": 2), and says which of the run's pairs it is
    assert [(r.provenance["samples"], r.provenance["index"], r.provenance["n"]) for r in out] == [(1, 0, 2), (1, 1, 2)]


def test_generate_from_mask_in_model_space_and_reference_space(editor):
    img, mask, aff = make_scan()
    res = editor.generate_from_mask(mask, aff, seed=1)  # mask taken as template-space
    assert res.image.shape == editor.bundle.grid_shape
    ref = editor.generate_from_mask(mask, aff, img, aff, seed=1, samples=2)
    assert ref.image.shape == SCAN_SHAPE
    np.testing.assert_allclose(ref.affine, aff)
    assert ref.uncertainty is not None


def test_lesion_fusion_changes_the_healthy_twin_only_at_the_mask(editor):
    """With lesion fusion the brain for a mask is the empty-mask brain of the same noise outside the grown,
    feathered mask; without it (the paper's eq. 9) the condition reaches the whole brain."""
    import torch
    from scipy import ndimage

    from USBLib.core import tasks

    _, mask, aff = make_scan()
    fused = editor.generate_from_mask(mask, aff, seed=3, lesion_guidance=1.0, lesion_fusion=True, margin_mm=4.0,
                                      dilation_mm=0.0)
    whole = editor.generate_from_mask(mask, aff, seed=3, lesion_guidance=1.0)  # the fallback: eq. 9
    settings = fused.provenance["settings"]
    healthy = tasks.generate_from_mask(editor._denoisers(), editor.empty_condition(), settings["steps"],
                                       torch.Generator().manual_seed(3), sampler=settings["sampler"])
    twin = np.clip(editor.decode(healthy)[0], 0, None) * editor.space["brain"]
    lesion = fused.mask > 0
    spacing = np.linalg.norm(editor.bundle.grid_affine[:3, :3], axis=0)
    far = ndimage.distance_transform_edt(~lesion, sampling=spacing) > 4.0 + 1e-6
    np.testing.assert_allclose(fused.image[far], twin[far], atol=1e-4)  # (batched vs single network calls)
    assert np.abs(fused.image[lesion] - twin[lesion]).max() > 1e-3  # the lesion is there
    assert np.abs(whole.image[far] - twin[far]).max() > 1e-3  # eq. 9 moves the rest of the brain too
    assert settings["lesion_fusion"] is True and settings["margin_mm"] == 4.0 and settings["dilation_mm"] == 0.0
    assert whole.provenance["settings"]["lesion_fusion"] is False and "margin_mm" not in whole.provenance["settings"]


def test_stages_run_alone(editor):
    """Each named stage of an edit can be called on its own: registration refuses a mask off the brain; the edit
    weight and the fusion add the mean deviation inside the edit region only and report the samples' spread there."""
    from USBLib.editor.editor import _Progress

    img, mask, aff = make_scan()
    prog = _Progress(None, 10)
    mapping, brain, imap = editor._registration_stage("heal", img, aff, mask, None, 0, prog)
    assert brain.shape == img.shape and brain[mask > 0].all() and imap.high > imap.low
    off = np.zeros_like(mask)
    off[0, 0, 0] = 1
    with pytest.raises(InputError, match="outside the brain"):
        editor._registration_stage("heal", img, aff, off, None, 0, prog)
    deviation = np.stack([np.full(img.shape, 10.0, np.float32), np.full(img.shape, 30.0, np.float32)])
    settings = editor._settings("embed")
    weight = editor._edit_weight("embed", img, aff, mask, brain, settings)
    result, uncertainty = editor._fusion_stage(img, weight * deviation, weight > 0, prog)
    assert np.array_equal(result[weight == 0], img[weight == 0])
    inside = (weight == 1) & (mask > 0)
    assert inside.any() and np.allclose(result[inside], img[inside] + 20.0, atol=1)
    assert np.allclose(uncertainty[inside], 10.0) and np.all(uncertainty[weight == 0] == 0)


def test_a_heal_on_thick_slices_takes_the_next_slice_whole_and_a_1_mm_heal_keeps_its_feather(editor):
    """A heal's fusion weight on a scan whose boxes the local stage resamples is 1 on its region's one-voxel
    shell (``stage_rules.heal_shell``): on 3 mm slices the next slice, which the 3 mm feather gave weight 0, is healed.
    On a 1 mm grid the weight is the plain feathered one; an embed never gets the shell."""
    from USBLib.imaging.fusion import edit_weight

    img = np.full((40, 40, 14), 100.0, np.float32)
    brain = np.ones(img.shape, np.uint8)
    mask = np.zeros(img.shape, np.uint8)
    mask[16:24, 16:24, 6:8] = 1
    thick = np.diag([1.0, 1.0, 3.0, 1.0])
    settings = editor._settings("heal", growth="fixed", dilation_mm=0.0, margin_mm=3.0)
    weight = editor._edit_weight("heal", img, thick, mask, brain, settings)
    assert np.all(weight[16:24, 16:24, 5] == 1.0) and np.all(weight[16:24, 16:24, 8] == 1.0)
    assert np.all(weight[:, :, :5] == 0) and np.all(weight[:, :, 9:] == 0)
    plain = edit_weight(mask, brain, (1.0, 1.0, 3.0), 0.0, 3.0)
    assert np.all(plain[:, :, 5] == 0)
    iso = np.eye(4)
    assert np.array_equal(editor._edit_weight("heal", img, iso, mask, brain, settings),
                          edit_weight(mask, brain, (1.0, 1.0, 1.0), 0.0, 3.0))
    embed = editor._edit_weight("embed", img, thick, mask, brain, editor._settings("embed", margin_mm=3.0))
    assert np.all(embed[:, :, 5] == 0)


def test_an_editor_sizes_torch_threads_from_usb_threads(tiny_bundle, monkeypatch):
    """``USB_THREADS`` (``usb batch`` sets it for its workers) is honoured wherever an Editor is made: the CLI no
    longer sets it up front, so that a bad input is refused before torch loads."""
    import torch
    from USBLib import Editor

    before = torch.get_num_threads()
    monkeypatch.setenv("USB_THREADS", str(before + 1))
    try:
        Editor(tiny_bundle, device="cpu")
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)
