"""The patch KL autoencoder (tiny tier): PCA start, black background, shapes, and its place in bundles."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from Testing.phantoms import grid_affine, phantom
from USBLib.core.bundle import autoencoder_factor
from USBLib.core.networks import build_autoencoder, downsampling_factor
from USBLib.errors import BundleError

CFG = {"kind": "patch_kl", "patch": 4, "latent_channels": 8, "refine_channels": 8, "refine_blocks": 1}
SHAPE = (40, 48, 40)


def _volumes(n: int = 3) -> np.ndarray:
    vols = [phantom(SHAPE, grid_affine(SHAPE, 4.0, center=(2.0 * s, -10.0, 5.0 - s)), skull=False, scale=1.0)
            for s in range(n)]
    return np.stack(vols).astype(np.float32)


def _psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a[where] - b[where]) ** 2)))


def test_pca_start_beats_downsampling_and_keeps_background_black():
    torch.manual_seed(0)
    ae = build_autoencoder(CFG).eval()
    train, test = _volumes(3)[:2], _volumes(4)[3]
    ae.initialise_from_patches(train)
    x = torch.from_numpy(test)[None, None]
    with torch.no_grad():
        mu, sigma = ae.encode(x)
        recon = ae.decode(mu)[0, 0].numpy()
    assert mu.shape == (1, 8, 10, 12, 10) and sigma.shape == mu.shape
    assert float(sigma.max()) < 1e-2  # the posterior starts narrow: the latent carries the image
    brain = test > 0
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool3d(x, 4), scale_factor=4,
                                              mode="trilinear")[0, 0].numpy()
    assert _psnr(recon, test, brain) > _psnr(blurred, test, brain) + 3.0
    assert np.abs(recon[~brain]).mean() < 0.02  # black background
    with torch.no_grad():  # an all-black volume is exactly zero in the latent and out of the decoder
        zero_mu, _ = ae.encode(torch.zeros(1, 1, *SHAPE))
        assert float(zero_mu.abs().max()) == 0.0
        assert float(ae.decode(zero_mu).abs().max()) == 0.0


def test_refinement_learns_and_factor_is_the_patch():
    torch.manual_seed(0)
    ae = build_autoencoder(CFG)
    vols = _volumes(2)
    ae.initialise_from_patches(vols)
    x = torch.from_numpy(vols)[:, None, 8:32, 12:36, 8:32]  # the middle 24³ voxels (on the 4-voxel patch grid)
    with torch.no_grad():
        before = float((ae(x)[0] - x).abs().mean())
    refinement = [p for name, p in ae.named_parameters() if name.startswith("refine")]
    opt = torch.optim.Adam(refinement, 1e-3)
    for _ in range(60):  # the PCA start is near optimal: the loss dips below it after about 40 steps
        loss = (ae(x)[0] - x).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float((ae(x)[0] - x).abs().mean())
    assert after < before
    assert autoencoder_factor(CFG) == 4
    assert downsampling_factor({"autoencoder": CFG}) == 4
    assert downsampling_factor({"autoencoder": {"channels": [8, 16, 16]}}) == 4


@pytest.mark.parametrize("cfg, message", [
    ({**CFG, "kind": "vq"}, "unknown kind"),
    ({**CFG, "channels": [8, 16]}, "unknown hyper-parameters"),
])
def test_bad_autoencoder_sections_are_refused(cfg, message):
    with pytest.raises(BundleError, match=message):
        build_autoencoder(cfg)
