"""The shipped default model on the bundled sample scan: every task runs, geometry and the outside region are
kept, and the trained model moves intensities the right way (healing brightens the hypointense lesion towards
the surrounding white matter; embedding darkens the target region)."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from USBLib import bundle as bundle_mod
from USBLib.demo import sample_files
from USBLib.fusion import dilate_mm
from USBLib.io import read_volume
from USBLib.pipeline import Editor

STEPS = 20  # fewer than the defaults, to keep CI short; the direction of the edit must already be right


@pytest.fixture(scope="module")
def shipped():
    b = bundle_mod.load(None)  # the default model must be installed: no skip
    return Editor(b, device="cpu")


@pytest.fixture(scope="module")
def sample():
    files = sample_files()
    return {k: read_volume(p, k) for k, p in files.items()}


def _ring(mask: np.ndarray, width: int = 3) -> np.ndarray:
    m = mask > 0
    return ndimage.binary_dilation(m, iterations=width) & ~ndimage.binary_dilation(m, iterations=1)


def _outside(mask: np.ndarray, spacing, margin_mm: float) -> np.ndarray:
    return ~dilate_mm(mask > 0, spacing, 2 * margin_mm + 2 * max(spacing))


def test_default_model_card_and_metrics(shipped):
    b = shipped.bundle
    assert b.tier == "tiny"
    card = (b.root / "MODEL_CARD.md").read_text()
    for needle in ("Training data", "held out", "hardware", "PSNR"):
        assert needle in card
    assert b.config["metrics"]["heal"], "the shipped bundle carries its evaluation"


def test_heal_brightens_the_lesion_and_keeps_everything_else(shipped, sample):
    img, lesion = sample["image"], sample["lesion"]
    res = shipped.heal(img.data, img.affine, lesion.data, steps=STEPS, seed=0)
    assert res.image.shape == img.data.shape and np.allclose(res.affine, img.affine)
    outside = _outside(lesion.data, img.spacing, shipped.bundle.defaults("heal")["margin_mm"])
    assert np.array_equal(res.image[outside], img.data[outside])
    inside, ring = lesion.data > 0, _ring(lesion.data)
    before, after, target = img.data[inside].mean(), res.image[inside].mean(), img.data[ring].mean()
    assert after - before > 0.25 * (target - before), (before, after, target)


def test_embed_darkens_the_target_region(shipped, sample):
    img, target = sample["image"], sample["embed"]
    res = shipped.embed(img.data, img.affine, target.data, steps=STEPS, seed=0)
    inside = target.data > 0
    outside = _outside(target.data, img.spacing, shipped.bundle.defaults("embed")["margin_mm"])
    assert np.array_equal(res.image[outside], img.data[outside])
    assert res.image[inside].mean() < 0.95 * img.data[inside].mean()


def test_generation_tasks_give_brains_and_masks(shipped, sample):
    pair = shipped.generate(1, steps=STEPS, seed=0)[0]
    brain = shipped.space["brain"]
    assert pair.image.shape == shipped.bundle.grid_shape
    assert pair.image[brain].mean() > 0.3 and np.all(pair.image[~brain] == 0)
    assert set(np.unique(pair.mask)) <= {0, 1}
    mask = sample["embed"]
    gen = shipped.generate_from_mask(mask.data, mask.affine, steps=STEPS, seed=0)
    assert gen.image.shape == shipped.bundle.grid_shape and np.isfinite(gen.image).all()
