"""The local stage's training pipeline on a phantom anatomy: windows shaped like inference boxes (healthy,
lesioned, drawn mask, fill region, classical fill, template prior) from deformed scenes, shards, batches, the loss,
a short resumable training run, export into a bundle that the engine then runs with its tissue prior."""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

import phantoms
from usb_training.base.common import module_weights
from usb_training.data.prepare import CSF, GM, WM
from usb_training.local.__main__ import _thick_share, data_summary, training_facts
from usb_training.local.__main__ import main as local_main
from usb_training.local.batches import Batch, WindowPool, loss_terms, make_batch
from usb_training.local.crops import MAX_LEVEL, VISIBLE_RATIO
from usb_training.local.export import export_local
from usb_training.local.priors import LICENCE_FILE, TISSUE_FILE
from usb_training.local.slices import SLICE_FACTORS
from usb_training.local.shards import ShardView, load_shards, write_shard, write_shards
from usb_training.local.train import LOCAL_CONFIG, train
from usb_training.local.windows import MAX_SIDE, Source, WindowMaker
from USBLib.core.schedule import NoiseSchedule
from USBLib.editor.editor import Editor
from USBLib.editor.local.conditioning import classical_fill

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run

TINY = json.loads(json.dumps(LOCAL_CONFIG))
TINY["network"] = {"channels": [8, 8, 16], "num_res_blocks": 1, "attention_levels": [False, False, False],
                   "norm_num_groups": 8}  # three levels: the middle block attends at 1/4 resolution (phantoms.TINY_LOCAL)
TINY["train"].update({"batch": 2, "batch_voxels": 2 * 32 ** 3, "warmup": 1, "checkpoint_minutes": 0.0})


def _one_hot_prior(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """T1, CSF, GM, WM and deep grey matter (here: the grey matter of the phantom's central third)."""
    central = np.zeros(labels.shape, bool)
    central[tuple(slice(s // 3, 2 * s // 3) for s in labels.shape)] = True
    return np.stack([image, labels == CSF, labels == GM, labels == WM, (labels == GM) & central]).astype(np.float32)


@pytest.fixture(scope="module")
def maker():
    anatomy, affine = phantoms.phantom_anatomy(shape=(64, 72, 64), spacing=2.5)
    source = Source(anatomy, np.zeros(anatomy.labels.shape, np.uint8), affine)
    return WindowMaker([source], {"phantom": (_one_hot_prior(anatomy.image, anatomy.labels), affine)}, 4)


@pytest.fixture(scope="module")
def windows(maker):
    return list(maker.windows(np.random.default_rng(0), 6, per_scene=3))


def test_windows_are_inference_boxes_with_a_paired_lesion_a_fill_and_a_prior(windows):
    ratios = []
    for w in windows:
        shape = w.healthy.shape
        assert all(s % 4 == 0 and 32 <= s <= MAX_SIDE for s in shape), shape
        assert w.mask.any() and not (w.mask & ~w.region).any()  # the fill region holds the drawn mask
        lesion = w.soft >= 0.5
        assert w.lesioned[lesion].mean() < w.healthy[lesion].mean()  # hypointense
        ratios.append(w.lesioned[lesion].mean() / w.healthy[lesion].mean())
        far = ~ndimage.binary_dilation(w.soft > 0, iterations=3)  # (past the artefacts' blur)
        np.testing.assert_allclose(w.lesioned[far], w.healthy[far], atol=1e-5)  # the same artefacts on both
        np.testing.assert_allclose(w.fill[~w.region], np.clip(w.lesioned, 0, MAX_LEVEL)[~w.region], atol=1e-6)
        if list(shape) == [-(-s // 4) * 4 for s in w.info["box"]]:  # a whole box: the stage's own fill
            np.testing.assert_allclose(w.fill, classical_fill(np.clip(w.lesioned, 0, MAX_LEVEL), w.region), atol=1e-5)
        assert w.prior.shape == (5, *shape) and 0 <= w.prior[1:].min() and w.prior[1:].max() <= 1
        assert {"site", "source", "prior", "contrast", "mask_kind", "region_kind", "box"} <= set(w.info)
        assert w.info["slice_mm"] == 1  # the shipped recipe: 1 mm windows only
    assert min(ratios) < VISIBLE_RATIO[1] + 0.05


def test_thick_slice_windows_are_smooth_along_their_slice_axis_and_keep_a_drawn_mask(maker, tmp_path):
    """``data --thick-fraction 1``: every window is measured with 2-5 mm slices along one axis and brought back to
    1 mm as the stage resamples a thick box: along that axis the image (noise included) varies less than in-plane,
    and the drawn mask, drawn on the thick slices, is still inside the fill region."""
    thick = WindowMaker(maker.sources, maker.priors, 4, thick_fraction=1.0)
    windows = list(thick.windows(np.random.default_rng(0), 6, per_scene=3))
    assert {w.info["slice_axis"] for w in windows} == {0, 1, 2}
    for w in windows:
        assert w.info["slice_mm"] in SLICE_FACTORS
        roughness = [np.abs(np.diff(w.healthy, 2, axis=a)).mean() for a in range(3)]
        along = roughness.pop(w.info["slice_axis"])
        assert along < 0.75 * min(roughness), (w.info, roughness, along)
        assert w.mask.any() and not (w.mask & ~w.region).any()
    write_shard(windows, tmp_path / "windows" / "shard_0_0000")
    summary = data_summary(tmp_path / "windows")  # what the bundle's training facts say of the data
    assert sum(summary["slice_mm"].values()) == 6 and "1" not in summary["slice_mm"]
    assert "6 of them measured with 2-5 mm slices" in _thick_share(summary)
    with pytest.raises(ValueError, match="thick_fraction"):
        WindowMaker(maker.sources, maker.priors, 4, thick_fraction=1.5)
    with pytest.raises(SystemExit) as refused:  # the command line says so in one line, before any work
        local_main(["data", "--work", str(tmp_path / "run"), "--thick-fraction", "1.5"])
    assert refused.value.code == 2 and not (tmp_path / "run").exists()


def test_site_weights_steer_the_lesion_sites_and_bad_weights_are_refused(maker):
    """``data --sites``: a data round aimed at some sites (e.g. deep grey matter) draws only from the weights given."""
    from usb_training.local.__main__ import _site_weights
    from usb_training.local.sites import SITES

    only = {site: 0.0 for site in SITES} | {"cortical": 1.0}
    aimed = WindowMaker(maker.sources, maker.priors, 4, only)
    assert {w.info["site"] for w in aimed.windows(np.random.default_rng(1), 3, per_scene=3)} == {"cortical"}
    mixed = WindowMaker(maker.sources, maker.priors, 4, _site_weights("deep_gm=0.35,cortical=0.15"))
    assert sum(mixed.site_weights.values()) == pytest.approx(1.0)
    assert mixed.site_weights["deep_gm"] > SITES["deep_gm"] and mixed.site_weights["deep_wm"] < SITES["deep_wm"]
    with pytest.raises(ValueError, match="site weights"):
        WindowMaker(maker.sources, maker.priors, 4, {"thalamus": 1.0})


def test_shards_keep_windows_of_every_shape(windows, tmp_path):
    write_shard(windows, tmp_path / "windows" / "shard_0_0000")
    views = load_shards(tmp_path / "windows", {})
    view = views["shard_0_0000"]
    assert isinstance(view, ShardView) and len(view) == len(windows)
    for i, w in enumerate(windows):
        got = view.window(i)
        assert view.shape(i) == w.healthy.shape
        np.testing.assert_allclose(got["healthy"], w.healthy, atol=2e-3)
        np.testing.assert_allclose(got["prior"], w.prior, atol=3e-3)
        assert np.array_equal(got["mask"], w.mask) and np.array_equal(got["region"], w.region)
        assert view.info[i] == w.info
    # a shard written before the deep grey prior (four prior channels) still reads, with its four
    old = [dataclasses.replace(w, prior=w.prior[:4]) for w in windows]
    write_shard(old, tmp_path / "windows" / "shard_1_0000")
    got = load_shards(tmp_path / "windows", {})["shard_1_0000"].window(0)["prior"]
    assert got.shape == (4, *windows[0].healthy.shape)
    np.testing.assert_allclose(got, windows[0].prior[:4], atol=3e-3)
    with pytest.raises(ValueError, match="priors of 5"):  # one shard, one prior layout
        write_shard(old[:1] + windows[1:2], tmp_path / "windows" / "shard_2_0000")
    from usb_training.local.batches import refreshed_pool
    from usb_training.local.train import DEEP_GREY_INPUTS, INPUTS

    assert len(refreshed_pool(tmp_path / "windows", {}, None, "biharmonic", INPUTS)) == 2 * len(windows)
    with pytest.raises(ValueError, match="before the deep grey prior"):  # not at a random step later on
        refreshed_pool(tmp_path / "windows", {}, None, "biharmonic", DEEP_GREY_INPUTS)


def test_batches_have_one_shape_and_mostly_heal_fidelity(windows, tmp_path):
    write_shard(windows, tmp_path / "shard_0_0000")
    pool = WindowPool(load_shards(tmp_path, {}))
    schedule = NoiseSchedule.from_config(TINY["schedule"])
    rng = np.random.default_rng(0)
    heal_det = []
    for _ in range(60):
        batch = make_batch(pool, rng, TINY, schedule)
        assert batch.x.shape[1] == 1 + len(TINY["inputs"]) and batch.x.shape[0] <= TINY["train"]["batch"]
        assert batch.x.shape[2:] == batch.target.shape[2:] == batch.mask.shape[2:]
        assert np.prod(batch.x.shape[2:]) * batch.x.shape[0] <= max(TINY["train"]["batch_voxels"],
                                                                   np.prod(batch.x.shape[2:]))
        heal_det += [d == 0 and k for d, k in zip(batch.directions, batch.deterministic)]
        for i, det in enumerate(batch.deterministic):
            if det:
                assert not batch.x[i, 0].any() and int(batch.t[i]) == schedule.num_train_timesteps - 1
    assert 0.45 < np.mean(heal_det) < 0.8  # 0.75 x 0.85 = 64 % heal-fidelity windows


def test_a_prior_base_pool_gives_the_prior_fill_of_each_window(windows, tmp_path):
    from USBLib.editor.local.conditioning import prior_fill
    from usb_training.local.crops import MAX_LEVEL

    write_shard(windows, tmp_path / "shard_0_0000")
    shards = load_shards(tmp_path, {})
    stored, pool = WindowPool(shards), WindowPool(shards, "prior")
    w = pool.window(0)
    expected = prior_fill(np.clip(w["lesioned"], 0.0, MAX_LEVEL), w["region"], w["prior"])
    np.testing.assert_array_equal(w["fill"], expected)
    assert not np.array_equal(w["fill"], stored.window(0)["fill"])  # not the stored biharmonic fill
    assert pool.window(0)["fill"] is pool.window(0)["fill"]  # made once
    with pytest.raises(ValueError, match="unknown base"):
        WindowPool(shards, "atlas")


def test_the_mean_level_term_is_the_squared_error_of_the_mask_mean():
    target = torch.zeros(2, 1, 4, 4, 4)
    mask = torch.zeros_like(target)
    mask[0, 0, 1:3, 1:3, 1:3] = 1.0  # the second window has no mask voxels: it adds nothing
    pred = target + 0.3 * mask
    batch = Batch(torch.zeros(2, 2, 4, 4, 4), torch.zeros(2), torch.zeros(2), target, torch.ones_like(target),
                  mask, [0, 0], [True, True])
    voxel, level = loss_terms(pred, batch)
    assert level.item() == pytest.approx(0.09)
    assert voxel.item() == pytest.approx((8 * (0.09 + 0.15)) / 128)


def _prior_files(bundle, folder, deep_grey: bool = False):
    template = np.asarray(nib.load(str(bundle.path("template"))).dataobj, np.float32)
    brain = np.asarray(nib.load(str(bundle.path("brain_mask"))).dataobj) > 0
    classes = [brain & (template < 0.6), brain & (template >= 0.6) & (template < 0.9), brain & (template >= 0.9)]
    if deep_grey:
        classes.append(classes[1] & (np.abs(np.indices(template.shape)[0] - template.shape[0] // 2) < 8))
    tissue = np.stack(classes, -1).astype(np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(tissue, bundle.grid_affine), str(folder / TISSUE_FILE))
    (folder / LICENCE_FILE).write_text("phantom prior, for tests only\n")
    return {TISSUE_FILE: folder / TISSUE_FILE, LICENCE_FILE: folder / LICENCE_FILE}


def test_shards_train_resume_export_and_run(maker, tmp_path, tiny_bundle):
    work = tmp_path / "run"
    written = write_shards(maker, work / "windows", seed=1, count=4, shard_size=2, per_scene=2)
    assert len(written) == 2 and len(load_shards(work / "windows", {})) == 2
    out = train(work, steps=2, cfg=TINY, log_every=1)
    assert json.loads((out / "history.json").read_text())["train"][-1]["step"] == 2
    train(work, steps=3, cfg=TINY, log_every=1)  # resumes from the checkpoint: one more step
    assert json.loads((out / "history.json").read_text())["train"][-1]["step"] == 3
    other = json.loads(json.dumps(TINY))
    other["inputs"] = ["image", "mask", "region", "fill"]
    with pytest.raises(ValueError, match="another inputs"):  # never continue another network's weights or EMA
        train(work, steps=4, cfg=other)
    bundle = export_local(tiny_bundle.root, out, tmp_path / "with-local", training={"steps": 3},
                          prior_files=_prior_files(tiny_bundle, tmp_path / "prior"))
    local = bundle.config["local"]
    assert bundle.has_local and local["training"]["steps"] == 3 and local["inputs"] == TINY["inputs"]
    assert local["prior"]["tissue"] == TISSUE_FILE and bundle.path("local_prior").is_file()
    assert TISSUE_FILE in bundle.config["files"] and LICENCE_FILE in bundle.config["files"]
    # a new run folder warm-started from the exported network: its weights at its step, then on from there
    warm = tmp_path / "warm"
    shutil.copytree(work / "windows", warm / "windows")
    warm_out = train(warm, steps=3, cfg=TINY, warm_from=bundle.root)  # already at step 3: no step to take
    shipped = bundle.load_state_dict("local")
    for name in ("model", "ema"):
        kept = module_weights(warm_out, name)
        assert kept.keys() == shipped.keys() and all(torch.equal(kept[k], shipped[k]) for k in shipped)
    train(warm, steps=4, cfg=TINY, log_every=1, warm_from=bundle.root)
    history = json.loads((warm_out / "history.json").read_text())
    assert history["warm_start"]["step"] == 3 and [row["step"] for row in history["train"]] == [4]
    facts = training_facts(warm)  # what an export of this run writes into the bundle
    assert facts["steps"] == 4 and "warm restart" in facts["note"] and "step 3" in facts["ema"]
    assert facts["windows"]["slice_mm"] == {"1": 4} and "slices" not in facts["data"]
    assert not torch.equal(module_weights(warm_out, "model")["conv_in.conv.weight"], shipped["conv_in.conv.weight"])
    with pytest.raises(ValueError, match="another inputs"):  # never start from another network's weights
        train(tmp_path / "warm-other", steps=4, cfg=other, warm_from=bundle.root)
    from conftest import make_scan

    img, mask, aff = make_scan("oblique")
    editor = Editor(bundle, device="cpu")
    res = editor.heal(img, aff, mask, seed=0)
    assert res.provenance["settings"]["stages"] == "local" and res.image.shape == img.shape
    assert editor.local.needs_prior
    emb = editor.embed(img, aff, mask, seed=0, local_mode="realism", local_steps=2)
    assert emb.image.shape == img.shape


def test_a_deep_grey_run_reads_the_fifth_prior_map_and_its_bundle_ships_four_tissue_classes(maker, tmp_path,
                                                                                           tiny_bundle):
    """``train --deep-grey``: the network reads the prior's deep grey nuclei too; its bundle's tissue prior has the
    fourth class, and the engine carries all four into each box."""
    from usb_training.local.__main__ import _train_config
    from usb_training.local.train import DEEP_GREY_INPUTS

    cfg = json.loads(json.dumps(TINY))
    cfg["inputs"] = _train_config(argparse.Namespace(channels=None, batch=None, deep_grey=True))["inputs"]
    assert cfg["inputs"] == DEEP_GREY_INPUTS and cfg["inputs"][-1] == "prior_deep_gm"
    work = tmp_path / "deep"
    write_shards(maker, work / "windows", seed=3, count=2, shard_size=2, per_scene=2)
    out = train(work, steps=1, cfg=cfg, log_every=1)
    assert module_weights(out, "model")["conv_in.conv.weight"].shape[1] == 1 + len(DEEP_GREY_INPUTS)
    bundle = export_local(tiny_bundle.root, out, tmp_path / "with-deep", training={"steps": 1},
                          prior_files=_prior_files(tiny_bundle, tmp_path / "prior4", deep_grey=True))
    assert bundle.config["local"]["prior"]["classes"] == ["csf", "gm", "wm", "deep_gm"]
    assert bundle.config["local"]["inputs"][-1] == "prior_deep_gm"
    from conftest import make_scan

    img, mask, aff = make_scan("oblique")
    editor = Editor(bundle, device="cpu")
    res = editor.heal(img, aff, mask, seed=0)
    assert editor._prior_maps.shape[0] == 5 and res.image.shape == img.shape and np.isfinite(res.image).all()
    # the same network with a prior file of three classes is refused: its fifth input would be missing
    with pytest.raises(ValueError, match="4 classes"):
        export_local(tiny_bundle.root, out, tmp_path / "with-three", training={"steps": 1},
                     prior_files=_prior_files(tiny_bundle, tmp_path / "prior3"))


def test_export_refuses_an_out_it_would_lose_and_a_failed_export_leaves_the_old_bundle(maker, tmp_path,
                                                                                        tiny_bundle):
    """``export`` never deletes a folder that is not a bundle (nor the run folder, nor one holding the source), and
    an in-place update builds the new bundle aside: a failure leaves the old one whole."""
    from USBLib.core import bundle as bundle_mod

    work = tmp_path / "run"
    write_shards(maker, work / "windows", seed=4, count=2, shard_size=2, per_scene=2)
    out = train(work, steps=1, cfg=TINY, log_every=1)
    user = tmp_path / "notes"
    user.mkdir()
    (user / "thesis.txt").write_text("mine\n")
    source = tmp_path / "src"
    shutil.copytree(tiny_bundle.root, source)
    cli = ["export", "--work", str(work), "--source", str(source)]
    for args in (cli, cli[:3] + ["--out", str(user)], cli + ["--out", str(user)], cli + ["--out", str(work)],
                 cli + ["--out", str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_info:
            local_main(args)
        assert exit_info.value.code == 2, args
    assert (user / "thesis.txt").read_text() == "mine\n" and (out / "config.json").is_file()
    prior = _prior_files(tiny_bundle, tmp_path / "prior")
    bundle = export_local(source, out, tmp_path / "with-local", training={"steps": 1}, prior_files=prior)
    before = {p.name: p.read_bytes() for p in bundle.root.iterdir()}
    with pytest.raises(FileNotFoundError):  # fails after the prior files of the previous export would be gone
        export_local(source, out, bundle.root, training={"steps": 2},
                     prior_files={TISSUE_FILE: tmp_path / "missing.nii.gz", LICENCE_FILE: prior[LICENCE_FILE]})
    assert {p.name: p.read_bytes() for p in bundle.root.iterdir()} == before
    assert bundle_mod.load(bundle.root).has_local and sorted(tmp_path.iterdir()) == sorted(
        tmp_path / n for n in ("run", "notes", "src", "prior", "with-local"))  # no temporary folder left
    again = export_local(source, out, bundle.root, training={"steps": 2}, prior_files=prior)  # in place
    assert again.root == bundle.root and again.config["local"]["training"]["steps"] == 2


def test_batches_from_loader_processes_train_and_a_gpu_run_comes_back_as_an_exportable_run(maker, tmp_path,
                                                                                           monkeypatch):
    """``train --loader-workers`` (the GPU machine's batch makers) trains; ``device_carry pack`` / ``unpack`` carry a
    run's EMA weights (split into parts), config, history and windows' summary back into a run folder that
    ``training_facts`` (the export) reads as it was."""
    from usb_training.local import device_carry

    work = tmp_path / "machine" / "a"
    write_shards(maker, work / "windows", seed=2, count=4, shard_size=2, per_scene=2)
    out = train(work, steps=2, cfg=TINY, log_every=1, loader_workers=1)
    history = json.loads((out / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == [1, 2] and "CPU" in history["hardware"]
    with pytest.raises(ValueError, match="wall-time budget"):
        train(tmp_path / "unbudgeted", steps=1, cfg=TINY, fit_schedule=True)
    monkeypatch.setattr(device_carry, "PART_BYTES", 4096)  # several parts, as a large network's are
    carried = device_carry.pack(tmp_path / "machine", tmp_path / "carried")
    assert len([p for p in carried if p.name.startswith("a_ema_")]) > 1
    (run,) = device_carry.unpack(tmp_path / "carried", tmp_path / "here")
    ema = module_weights(out, "ema")
    kept = module_weights(run / "train", "ema")
    assert kept.keys() == ema.keys() and all(torch.equal(kept[k], ema[k]) for k in ema)
    facts = training_facts(run)
    assert facts["steps"] == 2 and facts["windows"]["windows"] == 4 and facts["hardware"] == history["hardware"]
