import numpy as np
import pytest
import torch

from USBLib.schedule import NoiseSchedule, start_step, timesteps

CFG = {"num_train_timesteps": 1024, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02}


def test_alpha_bar_is_cumulative_product_of_linear_betas():
    sched = NoiseSchedule.from_config(CFG)
    betas = np.linspace(1e-4, 0.02, 1024)
    expected = np.cumprod(1 - betas)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), expected, rtol=1e-5)
    assert sched.alpha_bar(0) == pytest.approx(1 - 1e-4)
    assert sched.alpha_bar(-1) == 1.0
    assert sched.alpha_bar(299) == pytest.approx(expected[299], rel=1e-5)
    assert 0.3 < sched.alpha_bar(300) < 0.45  # the paper's heal start leaves ~40 % signal power
    assert np.all(np.diff(sched.alphas_cumprod.numpy()) < 0)


@pytest.mark.parametrize("start,steps", [(1023, 50), (300, 300), (500, 17), (10, 3)])
def test_ddim_with_true_noise_recovers_x0_exactly(start, steps):
    sched = NoiseSchedule.from_config(CFG)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 4, 5, 4, generator=gen, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    x = sched.q_sample(x0, start, eps)
    for t, s in timesteps(start, steps):
        # a perfect model: the noise that, at level t, separates x from x0
        eps_hat = sched.eps_from_x0(x, x0, t)
        x0_hat = sched.predict_x0(x, eps_hat, t)
        torch.testing.assert_close(x0_hat, x0)
        x = sched.ddim_step(x0_hat, eps_hat, t, s)
    torch.testing.assert_close(x, x0)


def test_timesteps_start_at_start_and_end_clean():
    pairs = timesteps(300, 50)
    assert pairs[0][0] == 300 and pairs[-1] == (0, -1)
    assert len(pairs) == 50
    assert all(t > s for t, s in pairs)
    assert all(pairs[i][1] == pairs[i + 1][0] for i in range(len(pairs) - 1))
    assert timesteps(3, 10) == [(3, 2), (2, 1), (1, 0), (0, -1)]  # never more steps than levels


def test_start_step_from_strength():
    assert start_step(1.0, 1024) == 1023
    assert start_step(0.3, 1024) == 307
    with pytest.raises(ValueError):
        timesteps(-1, 5)
