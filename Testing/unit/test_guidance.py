import math

import pytest
import torch

from USBLib.guidance import acg_alpha, acg_weight, apply_guidance, lcg_weight, lesion_prior


def test_acg_alpha_decays_with_t():
    assert acg_alpha(20.0, 0.5, 0, 300) == pytest.approx(20.0)
    assert acg_alpha(20.0, 0.5, 300, 300) == pytest.approx(20.0 * math.exp(-0.5))
    assert acg_alpha(20.0, 0.5, 150, 300) < acg_alpha(20.0, 0.5, 10, 300)
    assert acg_alpha(20.0, 0.0, 300, 300) == 20.0


def test_acg_weight_range_and_limits():
    gen = torch.Generator().manual_seed(1)
    y0 = torch.randn(2, 3, 4, 4, 4, generator=gen)
    y0_hat = y0 + torch.randn(y0.shape, generator=gen)
    lam = acg_weight(y0, y0_hat, 12.0)
    assert lam.shape == y0.shape and lam.min() > 0 and lam.max() <= 1
    assert torch.allclose(acg_weight(y0, y0, 12.0), torch.ones_like(y0))  # agreement -> full preservation
    far = acg_weight(y0, y0 + 10.0, 12.0)
    assert far.max() < 1e-40  # large difference (lesion) -> free to edit
    # larger alpha -> smaller weight where the estimate differs
    assert torch.all(acg_weight(y0, y0_hat, 30.0) <= acg_weight(y0, y0_hat, 5.0))


def test_alpha0_zero_is_no_guidance():
    y0, y0_hat = torch.zeros(1, 3, 2, 2, 2), torch.ones(1, 3, 2, 2, 2)
    lam = acg_weight(y0, y0_hat, acg_alpha(0.0, 0.5, 100, 300))
    assert torch.equal(lam, torch.zeros_like(y0))
    assert torch.equal(apply_guidance(y0_hat, y0, lam), y0_hat)


def test_apply_guidance_is_eq13_blend():
    y0, y0_hat = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 4.0)
    assert torch.allclose(apply_guidance(y0_hat, y0, torch.full_like(y0, 0.25)), torch.full_like(y0, 3.0))
    assert torch.equal(apply_guidance(y0_hat, y0, torch.ones_like(y0)), y0)


def test_lesion_prior_is_avgpool_to_latent_grid():
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[:, :, :4, :4, :4] = 1  # one full latent voxel
    mask[:, :, 4:6, :4, :4] = 1  # half of another
    prior = lesion_prior(mask, 4)
    assert prior.shape == (1, 1, 2, 2, 2)
    assert prior[0, 0, 0, 0, 0] == 1.0 and prior[0, 0, 1, 0, 0] == 0.5 and prior[0, 0, 0, 1, 0] == 0.0


def test_lcg_weight_range_and_eta_zero():
    prior = torch.rand(1, 1, 3, 3, 3)
    assert torch.equal(lcg_weight(prior, 0.0), torch.ones_like(prior))
    lam = lcg_weight(prior, 1.0)
    assert lam.min() >= 0 and lam.max() <= 1
    assert torch.allclose(lam, 1 - prior)


def test_batch_elements_are_independent():
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(3, 3, 4, 4, 4, generator=gen)
    y0_hat = torch.randn(3, 3, 4, 4, 4, generator=gen)
    together = acg_weight(y0, y0_hat, 15.0)
    for i in range(3):
        assert torch.equal(together[i], acg_weight(y0[i:i + 1], y0_hat[i:i + 1], 15.0)[0])
