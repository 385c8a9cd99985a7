"""The local stage's training pipeline on a phantom anatomy: paired crops (healthy, lesioned, drawn mask),
shards, a short resumable training run, export into a bundle that the engine then runs."""
from __future__ import annotations

import json

import numpy as np

import phantoms
from usb_training.local.crops import VISIBLE_RATIO, make_crop
from usb_training.local.export import export_local
from usb_training.local.shards import load_shards, write_shards
from usb_training.local.train import LOCAL_CONFIG, train
from USBLib.editor.editor import Editor

TINY = json.loads(json.dumps(LOCAL_CONFIG))
TINY["network"] = {"channels": [8, 16], "num_res_blocks": 1, "attention_levels": [False, False], "norm_num_groups": 8}
TINY["train"].update({"batch": 2, "window": 16, "warmup": 1, "checkpoint_minutes": 0.0})


def _anatomy():
    anatomy, _ = phantoms.phantom_anatomy(shape=(64, 72, 64), spacing=2.5)
    return anatomy


def test_crops_pair_a_healthy_and_a_lesioned_brain_with_a_drawn_mask():
    rng = np.random.default_rng(0)
    anatomy = _anatomy()
    crops = [make_crop(anatomy, rng, size=32) for _ in range(4)]
    for c in crops:
        lesion = c.soft >= 0.5
        assert c.mask.any() and lesion.any()
        assert c.lesioned[lesion].mean() < c.healthy[lesion].mean()  # hypointense
        far = c.soft == 0
        assert np.allclose(c.lesioned[far], c.healthy[far], atol=1e-5)  # the same artefacts on both copies
        rim = (c.soft > 0.05) & (c.soft < 0.5)
        assert rim.any()  # darkening past the 0.5 iso-surface
        assert c.dilation in (0, 1, 2, 3)
    ratios = [c.lesioned[c.soft >= 0.5].mean() / c.healthy[c.soft >= 0.5].mean() for c in crops]
    assert min(ratios) < VISIBLE_RATIO[1] + 0.05


def test_shards_train_resume_export_and_run(tmp_path, tiny_bundle):
    work = tmp_path / "run"
    written = write_shards([_anatomy()], work / "crops", seed=1, count=4, shard_size=2, size=32)
    assert len(written) == 2 and len(load_shards(work / "crops", {})) == 2
    out = train(work, steps=2, cfg=TINY, log_every=1)
    meta_first = json.loads((out / "history.json").read_text())
    assert meta_first["train"][-1]["step"] == 2
    train(work, steps=3, cfg=TINY, log_every=1)  # resumes from the checkpoint: one more step
    assert json.loads((out / "history.json").read_text())["train"][-1]["step"] == 3
    bundle = export_local(tiny_bundle.root, out, tmp_path / "with-local", training={"steps": 3})
    assert bundle.has_local and bundle.config["local"]["training"]["steps"] == 3
    from conftest import make_scan

    img, mask, aff = make_scan("axial")
    res = Editor(bundle, device="cpu").heal(img, aff, mask, seed=0)
    assert res.provenance["settings"]["stages"] == "local" and res.image.shape == img.shape
