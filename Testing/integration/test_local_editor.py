"""Heal and embed with a bundle that carries the local stage (schema 2), end to end through the Python API and
the CLI, with random-init networks: geometry, the edit region, stage selection and provenance."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import phantoms
from conftest import make_scan
from USBLib.core import bundle as bundle_mod
from USBLib.apps.cli import main as usb_main
from USBLib.errors import InputError
from USBLib.editor.editor import Editor

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run


@pytest.fixture(scope="module")
def local_bundle(tmp_path_factory):
    return phantoms.make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-local", local=True, name="tiny-local")


@pytest.fixture(scope="module")
def local_editor(local_bundle):
    return Editor(local_bundle, device="cpu")


def _reach(mask, aff, mm):
    return ndimage.distance_transform_edt(mask == 0, sampling=np.linalg.norm(aff[:3, :3], axis=0)) <= mm + 1e-6


@pytest.mark.parametrize("stages", ["local", "both", "latent"])
@pytest.mark.parametrize("task", ["heal", "embed"])
def test_every_stage_keeps_geometry_and_the_outside(local_editor, stages, task):
    img, mask, aff = make_scan("oblique")
    run = local_editor.heal if task == "heal" else local_editor.embed
    res = run(img, aff, mask, stages=stages, dilation_mm=3.0, margin_mm=4.0, seed=1, steps=2)
    assert res.image.dtype == img.dtype and res.image.shape == img.shape
    np.testing.assert_allclose(res.affine, aff)
    changed = res.image != img
    assert changed.any()
    assert not changed[~_reach(mask, aff, 3.0 + 4.0)].any()  # the edit region is mask + dilation + feather
    assert res.provenance["settings"]["stages"] == stages
    if stages != "latent":
        assert res.provenance["local_boxes"] == 1


@pytest.fixture
def registrations(monkeypatch) -> list:
    """The registrations the Editor runs from now on (one entry per call of ``register``)."""
    import USBLib.editor.editor as editor_mod

    calls = []
    original = editor_mod.register

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(editor_mod, "register", counting)
    return calls


def test_a_scan_that_comes_again_is_not_registered_again(local_bundle, monkeypatch, registrations):
    """Going back and forth between scans (Slicer, a script) reuses their registrations; another seed or an edited
    scan is registered afresh, and the least recently used registration is the one let go."""
    import USBLib.editor.editor as editor_mod

    calls = registrations
    monkeypatch.setattr(editor_mod, "MAPPINGS_KEPT", 2)
    monkeypatch.setenv("USB_CACHE_DIR", "")  # the Editor's memory alone (the disk cache: the next test)
    editor = Editor(local_bundle, device="cpu")
    a, mask_a, aff_a = make_scan("oblique")
    b, mask_b, aff_b = make_scan("axial")
    first = editor.heal(a, aff_a, mask_a, stages="local", seed=1)
    editor.embed(b, aff_b, mask_b, stages="local", seed=1)
    again = editor.heal(a, aff_a, mask_a, stages="local", seed=1)
    assert len(calls) == 2
    np.testing.assert_array_equal(first.image, again.image)
    editor._map(a, aff_a, None, 2)  # the registration is seeded: a new one, and b (used least recently) goes
    editor._map(a, aff_a, None, 1)
    assert len(calls) == 3
    editor._map(b, aff_b, None, 1)
    edited = a.copy()
    edited[mask_a > 0] += 1
    editor._map(edited, aff_a, None, 1)
    assert len(calls) == 5


def test_a_registration_is_kept_on_disk_for_the_next_process(local_bundle, monkeypatch, tmp_path, registrations):
    """A Slicer run or a ``usb`` command is a new process: a scan registered before is read back from the disk cache
    (``registration_cache``), exactly as registered; another seed is registered afresh, a damaged entry is
    registered again and rewritten, and ``USB_CACHE_DIR`` set empty writes nothing."""
    calls = registrations
    monkeypatch.setenv("USB_CACHE_DIR", str(tmp_path / "cache"))
    scan, _, aff = make_scan("oblique")
    first = Editor(local_bundle, device="cpu")._map(scan, aff, None, 1)
    entries = list((tmp_path / "cache" / "registrations").glob("*.json"))
    assert len(calls) == 1 and len(entries) == 1
    again = Editor(local_bundle, device="cpu")._map(scan, aff, None, 1)  # a new process would make a new Editor
    assert len(calls) == 1
    np.testing.assert_array_equal(again.model_to_native, first.model_to_native)
    Editor(local_bundle, device="cpu")._map(scan, aff, None, 2)
    assert len(calls) == 2
    entries[0].write_text('{"version": 2, "model_to_native": [[1, 2]]}')
    damaged = Editor(local_bundle, device="cpu")._map(scan, aff, None, 1)
    assert len(calls) == 3
    np.testing.assert_array_equal(damaged.model_to_native, first.model_to_native)
    assert Editor(local_bundle, device="cpu")._map(scan, aff, None, 1) is not None and len(calls) == 3  # rewritten
    monkeypatch.setenv("USB_CACHE_DIR", "")
    Editor(local_bundle, device="cpu")._map(scan, aff, None, 3)
    assert len(calls) == 4 and len(list((tmp_path / "cache" / "registrations").glob("*"))) == 2


def test_the_package_s_registrations_are_read_when_the_cache_has_none(local_bundle, monkeypatch, tmp_path,
                                                                     registrations):
    """The package's own entries (``registration_cache.SHIPPED``: the sample's, to the default model) are read after
    the user's cache (which comes first) and not with the disk cache disabled (a benchmark of a first run); a key
    that is not there (another seed, another model) is registered as before; nothing is ever written into the
    package's folder by an edit."""
    from USBLib.editor import registration_cache

    shipped = tmp_path / "package"
    monkeypatch.setattr(registration_cache, "SHIPPED", shipped)
    scan, _, aff = make_scan("oblique")
    editor = Editor(local_bundle, device="cpu")
    carried = np.diag([1.0, 1.0, 1.0, 1.0])
    carried[:3, 3] = [2.0, -3.0, 0.5]
    registration_cache.save(editor.registration_key(scan, aff, None, 1), carried, shipped)
    monkeypatch.setenv("USB_CACHE_DIR", str(tmp_path / "cache"))
    np.testing.assert_array_equal(Editor(local_bundle, device="cpu")._map(scan, aff, None, 1).model_to_native,
                                  carried)
    assert registrations == []
    Editor(local_bundle, device="cpu")._map(scan, aff, None, 2)  # another seed: not the package's entry
    assert len(registrations) == 1
    own = carried.copy()
    own[0, 3] = 7.0
    registration_cache.save(editor.registration_key(scan, aff, None, 1), own)
    np.testing.assert_array_equal(Editor(local_bundle, device="cpu")._map(scan, aff, None, 1).model_to_native, own)
    assert len(registrations) == 1
    monkeypatch.setenv("USB_CACHE_DIR", "")  # disabled: every scan is registered, the package's entry unread
    assert not np.array_equal(Editor(local_bundle, device="cpu")._map(scan, aff, None, 1).model_to_native, carried)
    assert len(registrations) == 2 and len(list(shipped.glob("*"))) == 1


def test_local_stage_on_a_coarse_scan_runs_on_a_1mm_box(local_editor):
    img, mask, aff = make_scan("axial")  # 3.5 mm voxels: boxes are resampled to about 1 mm and back
    res = local_editor.embed(img, aff, mask, stages="local", local_mode="realism", samples=2, seed=3)
    assert res.uncertainty is not None and res.uncertainty.shape == img.shape
    assert res.uncertainty[mask > 0].max() > 0 and not res.uncertainty[~_reach(mask, aff, 2.0 + 8.0)].any()
    assert res.provenance["texture"].startswith("noise synthesis")  # embed's realism gets the scan's grain too
    healed = local_editor.heal(img, aff, mask, stages="local", local_mode="realism", seed=3)
    assert healed.provenance["texture"].startswith("noise synthesis")


def test_defaults_come_from_the_bundle_and_heal_without_mask_is_latent(local_editor):
    img, mask, aff = make_scan("axial")
    res = local_editor.heal(img, aff, mask, seed=0)
    assert res.provenance["settings"]["stages"] == "local"
    assert res.provenance["settings"]["local_mode"] == "fidelity"
    assert np.all(res.image >= img)  # the heal of a drawn lesion brightens only (``stage_rules.signed_effect``)
    whole = local_editor.heal(img, aff, None, seed=0, steps=2)
    assert whole.provenance["settings"]["stages"] == "latent"
    assert (whole.image < img).any()  # a whole-brain latent edit is not one-sided: mostly healthy tissue
    assert local_editor.interactive_local_mode() == "realism"


def test_a_schema_1_bundle_runs_the_latent_stage_and_refuses_the_local_one(editor):
    assert not editor.bundle.has_local
    img, mask, aff = make_scan("axial")
    res = editor.heal(img, aff, mask, seed=0, steps=2)
    assert res.provenance["settings"]["stages"] == "latent"
    with pytest.raises(InputError, match="no local stage"):
        editor.embed(img, aff, mask, stages="local")


def test_bad_stage_settings_are_input_errors(local_editor):
    img, mask, aff = make_scan("axial")
    with pytest.raises(InputError, match="stages must be one of"):
        local_editor.heal(img, aff, mask, stages="all")
    with pytest.raises(InputError, match="local mode"):
        local_editor.heal(img, aff, mask, local_mode="pretty")
    with pytest.raises(InputError, match="dilation_mm must be between"):
        local_editor.heal(img, aff, mask, dilation_mm=-1.0)


def test_mask_on_the_background_of_a_skull_stripped_scan_is_refused(local_editor):
    img, _, aff = make_scan("axial")
    brain = phantoms.brain_mask(img.shape, aff)
    stripped = (img * brain).astype(img.dtype)
    corner = np.zeros(img.shape, np.uint8)
    corner[:3, :3, :3] = 1
    with pytest.raises(InputError, match="outside the brain"):
        local_editor.embed(stripped, aff, corner)


def test_bundle_schema_2_round_trip_and_info(local_bundle, capsys):
    b = bundle_mod.load(local_bundle.root)
    assert b.has_local and b.config["schema_version"] == 2
    assert "local" in b.parameter_counts()
    assert usb_main(["info", "--model", str(b.root)]) == 0
    out = capsys.readouterr().out
    assert "local stage" in out and "latent + local" in out
    cfg = json.loads((b.root / "bundle.json").read_text())
    (b.root / cfg["local"]["weights"]).write_bytes(b"broken")
    with pytest.raises(bundle_mod.BundleError, match="checksum"):
        bundle_mod.load(b.root)


def test_cli_stage_options_and_provenance(tmp_path, scan_files):
    b = phantoms.make_bundle(tmp_path / "tiny-local-cli", local=True)
    out = tmp_path / "healed.nii.gz"
    code = usb_main(["heal", str(scan_files["image"]), "--mask", str(scan_files["mask"]), "-o", str(out),
                     "--model", str(b.root), "--stages", "local", "--local-mode", "realism", "--local-steps", "2",
                     "--dilation", "1", "--margin", "2", "--quiet"])
    assert code == 0
    side = json.loads(out.with_name("healed.json").read_text())
    assert side["settings"]["stages"] == "local" and side["settings"]["local_mode"] == "realism"
    assert side["settings"]["dilation_mm"] == 1.0 and side["settings"]["margin_mm"] == 2.0
    src = nib.load(str(scan_files["image"]))
    res = nib.load(str(out))
    np.testing.assert_allclose(res.affine, src.affine)


# ---------------------------------------------------------------------------------------------------------------
# A bundle whose local network reads the template's tissue prior (``local.inputs`` with prior channels)

PRIOR_INPUTS = ["mask", "region", "fill", "prior_t1", "prior_csf", "prior_gm", "prior_wm"]


@pytest.fixture(scope="module")
def prior_bundle(local_bundle, tmp_path_factory):
    """The random-init local bundle with a 7-input local network and a tissue-prior file on its model grid."""
    from USBLib.editor.local.network import build_local_unet

    root = tmp_path_factory.mktemp("bundles") / "tiny-prior"
    config = json.loads(json.dumps(local_bundle.config))
    template = np.asarray(nib.load(str(local_bundle.path("template"))).dataobj, np.float32)
    brain = np.asarray(nib.load(str(local_bundle.path("brain_mask"))).dataobj) > 0
    tissue = np.stack([brain & (template < 0.6), brain & (template >= 0.6) & (template < 0.9),
                       brain & (template >= 0.9)], -1).astype(np.float32)
    root.mkdir(parents=True)
    nib.save(nib.Nifti1Image(tissue, local_bundle.grid_affine), str(root / "tissue_prior.nii.gz"))
    config["local"].update({"inputs": PRIOR_INPUTS, "prior": {"tissue": "tissue_prior.nii.gz", "t1": "template"}})
    torch.manual_seed(0)
    net = build_local_unet(config["local"]["network"], len(PRIOR_INPUTS))
    with torch.no_grad():  # a non-zero output layer, so that the prior can change the result
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {name: local_bundle.load_state_dict(name) for name in bundle_mod.NETWORK_NAMES}
    state["local"] = net.state_dict()
    extra = {name: local_bundle.root / name for name in config["files"] if not name.endswith(".safetensors")}
    extra["tissue_prior.nii.gz"] = root / "tissue_prior.nii.gz"
    return bundle_mod.write(root, config, state, extra)


def test_a_prior_bundle_reads_the_registered_template_maps_in_each_box(prior_bundle, monkeypatch):
    from USBLib.editor.local.stage import LocalStage
    from USBLib.imaging.boxes import Box, lesion_boxes

    editor = Editor(prior_bundle, device="cpu")
    assert editor.local.needs_prior
    seen = {}
    original = LocalStage.deviation

    def spy(self, *args, **kwargs):
        seen["prior"] = kwargs.get("prior")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LocalStage, "deviation", spy)
    img, mask, aff = make_scan("oblique")
    res = editor.heal(img, aff, mask, seed=2, dilation_mm=2.0, margin_mm=2.0)
    assert res.image.shape == img.shape and (res.image != img).any()
    prior = seen["prior"]
    mapping = editor._map(img, aff, None, 2)  # the same registration (cached for this scan)
    np.testing.assert_allclose(prior.mapping.model_to_native, mapping.model_to_native)
    maps = np.concatenate([editor.space["template"][None],
                           np.moveaxis(np.asarray(nib.load(str(prior_bundle.path("local_prior"))).dataobj), -1, 0)])
    box = lesion_boxes(mask, [4, 4, 4], 1, min_side=[4, 4, 4])[0][0]
    # the stage ran on the edit's window of the scan (``stage_rules.edit_window``): its prior reads the window's
    # voxels
    origin = np.rint(np.linalg.solve(aff, prior.mapping.native_affine[:, 3])[:3]).astype(int)
    np.testing.assert_allclose(prior.mapping.native_affine[:3, :3], aff[:3, :3])
    in_window = Box(tuple(int(s) for s in np.asarray(box.start) - origin), box.shape, box.label)
    whole = np.stack([mapping.to_native(m) for m in maps])
    window = tuple(slice(max(s, 0), s + n) for s, n in zip(box.start, box.shape))
    inside = tuple(slice(w.start - s, w.stop - s) for w, s in zip(window, box.start))
    got = prior.read(in_window)[(slice(None),) + inside]
    np.testing.assert_allclose(got, whole[(slice(None),) + window], atol=1e-5)
    assert got[1:].max() > 0.5  # the tissue maps reach the lesion's box


def test_a_prior_bundle_refuses_a_local_stage_without_its_prior(prior_bundle):
    editor = Editor(prior_bundle, device="cpu")
    img, mask, aff = make_scan("axial")
    from USBLib.editor.local.stage import LocalSettings

    with pytest.raises(ValueError, match="tissue prior"):
        editor.local.deviation(img.astype(np.float32) / img.max(), mask, (3.5, 3.5, 3.5), "heal", LocalSettings(),
                               torch.Generator().manual_seed(0))


def test_only_the_heal_of_a_drawn_lesion_is_one_sided_and_its_grain_goes_where_its_edit_is():
    """``stage_rules.signed_effect``: a heal with a mask keeps only its brightening (each sample on its own); an embed
    and a heal without a mask keep their deviations. ``stage_rules.with_grain``: a heal's synthesized grain only where
    its edit is not zero (a voxel left as the scan has the scan's own grain); an embed's everywhere it is given."""
    from USBLib.editor.stage_rules import signed_effect, with_grain

    edit = np.array([[[[-2.0, 0.0, 3.0]]], [[[1.0, -1.0, 0.5]]]], np.float32)  # [samples, I, J, K]
    mask = np.ones(edit.shape[1:], np.uint8)
    assert np.array_equal(signed_effect("heal", mask, edit), np.maximum(edit, 0))
    assert np.array_equal(signed_effect("embed", mask, edit), edit)
    assert np.array_equal(signed_effect("heal", None, edit), edit)
    grain = np.full_like(edit, 0.25)
    healed = with_grain("heal", signed_effect("heal", mask, edit), grain)
    assert np.array_equal(healed, [[[[0.0, 0.0, 3.25]]], [[[1.25, 0.0, 0.75]]]])
    assert np.array_equal(with_grain("embed", edit, grain), edit + grain)


def test_an_edit_cut_to_its_lesion_neighbourhood_is_the_whole_scan_edit(prior_bundle, monkeypatch):
    """After the registration, an edit runs on a window of the scan around its lesion (``stage_rules.edit_window``).
    On a 1 mm scan, where every stage runs (boundary average and rim growth; the prior anchor of a deep lesion; the
    patch blend at a lesion on the scan's face; the mirror blend, which reads the other hemisphere outside the
    window; realism's noise and grain in the embed), the heals and the embed are bit for bit those of the whole
    scan."""
    from USBLib.editor import stage_rules

    shape = (100, 110, 90)
    aff = phantoms.grid_affine(shape, 1.0, center=(20.0, -5.0, 10.0))
    deep = phantoms.sphere_mask(shape, aff, (28.0, 5.0, 20.0), 10.0)
    img = phantoms.phantom(shape, aff, lesion_center=(28.0, 5.0, 20.0), lesion_radius=9.0, noise=0.02)
    img = img.astype(np.int16)
    face = np.zeros(shape, np.uint8)
    face[:4, 50:56, 40:47] = 1  # a lesion cut by the scan's first face
    img[face > 0] = (img[face > 0] * 0.6).astype(np.int16)
    beside = phantoms.sphere_mask(shape, aff, (-18.0, -5.0, 6.0), 5.0)  # beside a ventricle
    img[beside > 0] = (img[beside > 0] * 0.5).astype(np.int16)
    heal = dict(growth="rim", dilation_mm=3.0, margin_mm=3.0, boundary_average=True, patch_blend=0.45,
                prior_anchor=True, stages="local")
    editor = Editor(prior_bundle, device="cpu")
    runs = {"deep": lambda: editor.heal(img, aff, deep, seed=3, **dict(heal, patch_blend=0.0)),  # (its 3 s)
            "face": lambda: editor.heal(img, aff, face, seed=3, **heal),
            "mirror": lambda: editor.heal(img, aff, beside, seed=3, **dict(heal, patch_blend=0.0, mirror_blend=1.0)),
            "embed": lambda: editor.embed(img, aff, deep, seed=3, stages="local", local_mode="realism")}
    windows = []
    cut = stage_rules.edit_window
    monkeypatch.setattr(stage_rules, "edit_window", lambda *args: windows.append(cut(*args)) or windows[-1])
    windowed = {name: run() for name, run in runs.items()}
    assert windowed["face"].provenance["patch_blend"] == 0.45 and "texture" in windowed["embed"].provenance
    assert all(part["used"] for part in windowed["mirror"].provenance["mirror"]["parts"])  # it reads the other side
    sizes = [np.prod([s.stop - s.start for s in w]) for w in windows]
    assert max(sizes) < 0.8 * img.size, sizes  # each window is a part of the scan
    assert windows[1][0].start == 0  # the face lesion's window ends at the scan's face
    whole_scan = lambda mask, affine, settings, shape: tuple(slice(0, n) for n in shape)  # noqa: E731
    monkeypatch.setattr(stage_rules, "edit_window", whole_scan)
    for name, run in runs.items():
        whole = run()
        assert (windowed[name].image != img).any(), name
        assert np.array_equal(windowed[name].image, whole.image), name
        assert windowed[name].provenance["edit_region_voxels"] == whole.provenance["edit_region_voxels"]
