"""The training objective of the paired U-Nets: targets, one-step estimates and min-SNR weights agree with the
schedule used at sampling time, for eps- and v-prediction."""
from __future__ import annotations

import pytest
import torch

from USBLib.core.schedule import NoiseSchedule
from usb_training.latent.train_diffusion import q_sample, snr_weight, target_and_x0


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_a_perfect_output_gives_back_the_clean_latent(prediction):
    sched = NoiseSchedule.from_config({"prediction_type": prediction})
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, 4, generator=g) * 2, torch.randn(3, 2, 4, 4, 4, generator=g)
    t = torch.tensor([0, 400, 1000])
    x_t = q_sample(sched, x0, t, noise)
    target, _ = target_and_x0(sched, x0, x_t, noise, torch.zeros_like(x0), t)
    _, x0_hat = target_and_x0(sched, x0, x_t, noise, target, t)
    assert torch.allclose(x0_hat, x0, atol=1e-3)
    for i, step in enumerate(t.tolist()):  # the sampler's split of the same output agrees
        x0_s, eps_s = sched.split(x_t[i:i + 1], target[i:i + 1], step)
        assert torch.allclose(x0_s, x0[i:i + 1], atol=1e-3) and torch.allclose(eps_s, noise[i:i + 1], atol=1e-4)


def test_min_snr_weights_equal_min_snr_on_the_clean_error():
    """eps loss x min(SNR, g)/SNR and v loss x min(SNR, g)/(SNR + 1) are both min(SNR, g) x |x0_hat - x0|^2."""
    t = torch.tensor([5, 300, 1000])
    for prediction, factor in (("epsilon", lambda snr: snr), ("v_prediction", lambda snr: snr + 1)):
        sched = NoiseSchedule.from_config({"prediction_type": prediction})
        abar = sched.alphas_cumprod[t].float()
        snr = abar / (1 - abar)
        assert torch.allclose(snr_weight(sched, t, 5.0), torch.clamp(snr, max=5.0) / factor(snr))
        assert torch.equal(snr_weight(sched, t, 0.0), torch.ones(3))


def test_the_snr_floor_keeps_the_noisiest_steps_in_the_v_loss():
    """min-SNR alone weighs the v loss at t = 1000 by ~SNR (5e-5): the clean estimate from near-pure noise is not
    learnt. With the floor (truncated SNR) the x0 weight is at least the floor there; the cap at gamma is unchanged."""
    sched = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    t = torch.tensor([1000, 700, 5])
    abar = sched.alphas_cumprod[t].float()
    snr = abar / (1 - abar)
    plain, floored = snr_weight(sched, t, 5.0), snr_weight(sched, t, 5.0, floor=1.0)
    assert plain[0] < 1e-3 and floored[0] > 0.99  # the noisiest step: from almost nothing to the plain v loss
    assert torch.allclose(floored * (snr + 1), torch.clamp(torch.clamp(snr, max=5.0), min=1.0))
    assert floored[2] == pytest.approx(plain[2])  # nearly clean: the min-SNR cap as before
    with pytest.raises(ValueError, match="v prediction"):
        snr_weight(NoiseSchedule.from_config({"prediction_type": "epsilon"}), t, 5.0, floor=1.0)
