import math

import pytest
import torch

from USBLib.core.guidance import acg_alpha, acg_weight, apply_guidance, lcg_weight, lesion_prior


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


def test_alpha0_is_continuous_down_to_zero():
    """alpha0 -> 0 tends to lambda = 1 (the input held), and alpha0 = 0 gives exactly that: no jump on the slider."""
    y0, y0_hat = torch.zeros(1, 3, 2, 2, 2), torch.ones(1, 3, 2, 2, 2)
    at_zero = acg_weight(y0, y0_hat, acg_alpha(0.0, 0.5, 100, 300))
    near_zero = acg_weight(y0, y0_hat, acg_alpha(1e-4, 0.5, 100, 300))
    assert torch.equal(at_zero, torch.ones_like(y0))
    assert torch.allclose(near_zero, at_zero, atol=1e-4)
    assert torch.equal(apply_guidance(y0_hat, y0, at_zero), y0)


def test_larger_k_holds_the_early_steps_closer_to_the_input():
    """The direction the docs state: alpha_t = alpha0 exp(-k t/T) is smallest at the first step (t = T) for a large
    k, and a small alpha_t means lambda near 1, i.e. the estimate pulled onto the input."""
    y0, y0_hat = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 0.2)
    first = {k: acg_weight(y0, y0_hat, acg_alpha(20.0, k, 300, 300)).mean().item() for k in (-2.0, 0.0, 2.0, 5.0)}
    assert first[-2.0] < first[0.0] < first[2.0] < first[5.0]
    last = {k: acg_weight(y0, y0_hat, acg_alpha(20.0, k, 0, 300)).mean().item() for k in (-2.0, 5.0)}
    assert last[-2.0] == pytest.approx(last[5.0])  # at t = 0 every k gives alpha0
    guided = {k: apply_guidance(y0_hat, y0, acg_weight(y0, y0_hat, acg_alpha(20.0, k, 300, 300))) for k in (0.0, 5.0)}
    assert guided[5.0].abs().max() < guided[0.0].abs().max()  # closer to y0 = 0


def test_apply_guidance_is_eq13_blend():
    y0, y0_hat = torch.zeros(1, 1, 2, 2, 2), torch.full((1, 1, 2, 2, 2), 4.0)
    assert torch.allclose(apply_guidance(y0_hat, y0, torch.full_like(y0, 0.25)), torch.full_like(y0, 3.0))
    assert torch.equal(apply_guidance(y0_hat, y0, torch.ones_like(y0)), y0)


def test_lesion_prior_frees_every_latent_voxel_a_lesion_touches():
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[:, :, :4, :4, :4] = 1  # one full latent voxel
    mask[:, :, 4:6, :4, :4] = 1  # half of another
    mask[:, :, 6, 6, 6] = 0.6  # one partial-volume voxel of a third
    prior = lesion_prior(mask, 4)
    assert prior.shape == (1, 1, 2, 2, 2)
    assert prior[0, 0, 0, 0, 0] == 1.0 and prior[0, 0, 1, 0, 0] == 1.0 and prior[0, 0, 0, 1, 0] == 0.0
    assert prior[0, 0, 1, 1, 1] == pytest.approx(0.6)


def test_small_lesion_is_freed_by_lcg():
    """A 5 mm lesion (2-3 voxels of 2 mm) inside one 8 mm latent voxel: average pooling would free it by <= 17 %,
    the prior frees it fully, so eta = 1 releases the anatomy guidance there."""
    mask = torch.zeros(1, 1, 8, 8, 8)
    mask[:, :, 1:3, 1:3, 1:3] = 1  # 2 x 2 x 2 voxels = 8 of 64
    assert torch.nn.functional.avg_pool3d(mask, 4).max() == pytest.approx(0.125)
    lam = lcg_weight(lesion_prior(mask, 4), 1.0)
    assert lam[0, 0, 0, 0, 0] == 0.0 and lam[0, 0, 1, 1, 1] == 1.0


def test_lcg_weight_range_and_eta_zero():
    prior = torch.rand(1, 1, 3, 3, 3)
    assert torch.equal(lcg_weight(prior, 0.0), torch.ones_like(prior))
    lam = lcg_weight(prior, 1.0)
    assert lam.min() >= 0 and lam.max() <= 1
    assert torch.allclose(lam, 1 - prior)
    strong = lcg_weight(prior, 3.0)  # an eta above 1 cannot push away from the input
    assert strong.min() == 0.0 and strong.max() <= 1


def test_batch_elements_are_independent():
    gen = torch.Generator().manual_seed(3)
    y0 = torch.randn(3, 3, 4, 4, 4, generator=gen)
    y0_hat = torch.randn(3, 3, 4, 4, 4, generator=gen)
    together = acg_weight(y0, y0_hat, 15.0)
    for i in range(3):
        assert torch.equal(together[i], acg_weight(y0[i:i + 1], y0_hat[i:i + 1], 15.0)[0])


class _PullAway(torch.nn.Module):
    """A stand-in denoiser whose clean estimate is always 'the input + 1' (an edit that changes everything)."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def forward(self, x, t):
        x_t = x[:, : x.shape[1] // 2]
        abar = self.schedule.alphas_cumprod[int(t[0])]
        target = torch.ones_like(x_t)
        return (x_t - abar.sqrt() * target) / (1 - abar).sqrt()


def test_edit_acg_switch_and_alpha0_limit():
    from USBLib.core.schedule import NoiseSchedule
    from USBLib.core.tasks import Denoisers, edit

    sched = NoiseSchedule.from_config({"num_train_timesteps": 1024, "schedule": "linear_beta",
                                       "beta_start": 1e-4, "beta_end": 0.02})
    d = Denoisers(_PullAway(sched), _PullAway(sched), sched)
    y0 = torch.zeros(1, 2, 4, 4, 4)

    def run(**kw):
        return edit(d, y0, y0, 400, 5, generator=torch.Generator().manual_seed(0), **kw)

    held = run(alpha0=0.0, k=2.0)  # ACG on at alpha0 = 0: lambda = 1, the input comes back
    assert torch.allclose(held, y0, atol=1e-6)
    free = run(alpha0=0.0, k=2.0, acg=False)  # ACG off: the network's estimate
    assert torch.allclose(free, torch.ones_like(y0), atol=1e-4)
    partial = run(alpha0=1.0, k=2.0)  # |y0 - y0_hat| = 1: lambda = exp(-alpha_t) at every step
    assert 0.3 < partial.mean().item() < 0.9


class _ConditionEcho(torch.nn.Module):
    """A v-prediction 'brain model' whose clean estimate is its condition channels plus ``mix`` times the noisy
    input (``mix`` = 0: the condition, whatever the input)."""

    def __init__(self, schedule, channels: int, mix: float = 0.0):
        super().__init__()
        self.schedule, self.channels, self.mix = schedule, channels, mix

    def forward(self, x, t):
        y_t, cond = x[:, :self.channels], x[:, self.channels:]
        a = torch.tensor([self.schedule.alpha_bar(int(v)) for v in t]).view(-1, 1, 1, 1, 1)
        x0 = cond + self.mix * y_t
        return (a.sqrt() * y_t - x0) / (1 - a).sqrt()  # v such that x0_hat = sqrt(a) y_t - sqrt(1-a) v = x0


def _echo_case(mix: float = 0.0):
    """Denoisers whose brain model echoes its condition (plus ``mix`` x its input), a cube lesion latent and an
    empty-mask latent."""
    from USBLib.core.schedule import NoiseSchedule
    from USBLib.core.tasks import Denoisers

    schedule = NoiseSchedule.from_config({"num_train_timesteps": 100, "schedule": "linear_beta",
                                          "prediction_type": "v_prediction"})
    d = Denoisers(torch.nn.Identity(), _ConditionEcho(schedule, 2, mix), schedule, latent_clip=(-5.0, 5.0))
    lesion = torch.zeros(1, 2, 4, 4, 4)
    lesion[..., 1:3, 1:3, 1:3] = 1.0
    empty = torch.full((1, 2, 4, 4, 4), 0.2)
    return d, lesion, empty


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_lesion_guidance_pushes_away_from_the_empty_mask(sampler):
    """generate_from_mask with guidance w: y0 = y0(mask) + w (y0(mask) - y0(empty)); w = 0 is eq. 9."""
    from USBLib.core.tasks import generate_from_mask

    d, lesion, empty = _echo_case()
    run = lambda w: generate_from_mask(d, lesion, 5, torch.Generator().manual_seed(0), sampler=sampler,  # noqa: E731
                                       guidance=w, empty_latent=empty if w else None)
    assert torch.allclose(run(0.0), lesion, atol=1e-5)
    assert torch.allclose(run(2.0), lesion + 2.0 * (lesion - empty), atol=1e-5)
    assert torch.allclose(run(10.0), (lesion + 10.0 * (lesion - empty)).clamp(-5.0, 5.0), atol=1e-5)  # clip holds
    with pytest.raises(ValueError, match="empty-mask"):
        generate_from_mask(d, lesion, 5, torch.Generator().manual_seed(0), guidance=1.0)


def test_lesion_guided_is_cfg_without_a_prior_and_healthy_outside_it():
    """y0 = e + (1 + w) P (m - e): P = 1 is y0(mask) + w (y0(mask) - y0(empty)); P = 0 is the healthy estimate."""
    from USBLib.core.guidance import lesion_guided

    m, e = torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 4, 4, 4)
    assert torch.allclose(lesion_guided(m, e, 2.0), m + 2.0 * (m - e), atol=1e-6)
    assert torch.allclose(lesion_guided(m, e, 0.0), m, atol=1e-6)
    prior = torch.zeros(2, 1, 4, 4, 4)
    prior[..., :2] = 1.0
    out = lesion_guided(m, e, 1.5, prior)
    assert torch.equal(out[..., 2:], e[..., 2:])
    assert torch.allclose(out[..., :2], (m + 1.5 * (m - e))[..., :2], atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "dpm++2m"])
def test_healthy_twin_is_the_empty_mask_brain_and_the_lesion_stays_in_its_prior(sampler):
    """The batched twin equals two trajectories run one by one from the same noise: the healthy one is plain
    generation with the empty mask, the lesioned one uses e + (1 + w) P (m - e) on its own noisy latent."""
    from USBLib.core.guidance import lesion_guided
    from USBLib.core.schedule import timesteps
    from USBLib.core.tasks import generate_from_mask, generate_with_healthy_twin

    d, lesion, empty = _echo_case(mix=0.3)  # the estimates depend on each trajectory's own noisy latent
    prior = (lesion[:, :1] > 0).float()
    lesioned, healthy = generate_with_healthy_twin(d, lesion, empty, prior, 5, torch.Generator().manual_seed(0),
                                                   sampler=sampler, guidance=2.0)
    alone = generate_from_mask(d, empty, 5, torch.Generator().manual_seed(0), sampler=sampler)
    assert torch.allclose(healthy, alone, atol=1e-5)
    y, history = torch.randn(lesion.shape, generator=torch.Generator().manual_seed(0)), {}
    for t, s in timesteps(d.schedule.num_train_timesteps - 1, 5):  # the lesioned trajectory alone
        m, _ = d.estimate(d.unet_brain, y, lesion, t)
        e, _ = d.estimate(d.unet_brain, y, empty, t)
        y0 = lesion_guided(m, e, 2.0, prior).clamp(-5.0, 5.0)
        y = d.schedule.solver_step(y, y0, d.schedule.eps_from_x0(y, y0, t), t, s, sampler, history)
    assert torch.allclose(lesioned, y0, atol=1e-5)
    inside = prior.expand_as(lesion) > 0
    assert torch.allclose(lesioned[~inside], healthy[~inside], atol=1e-5)  # healthy outside the prior
    assert (lesioned[inside] - healthy[inside]).abs().min() > 0.5  # the lesion inside it
    with pytest.raises(ValueError, match=">= 0"):
        generate_with_healthy_twin(d, lesion, empty, prior, 5, torch.Generator().manual_seed(0), guidance=-1.0)
