"""USB's four tasks in latent space (paper sec. 3.1-3.2, eq. 6-15, C.1-C.6).

Every function takes latents shaped [B, C, I, J, K] and returns clean latents. ``tick()`` is called once per
network step so that callers can report progress and cancel.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from USBLib.core.guidance import acg_alpha, acg_weight, apply_guidance, lesion_guided
from USBLib.core.schedule import NoiseSchedule, timesteps

Tick = Callable[[], None]


def _noop() -> None:
    return None


@dataclass
class Denoisers:
    """The two U-Nets, the noise schedule and the inference-time stabilisation of clean estimates.

    Args:
        unet_lesion: USB_lesion, eps_x(x_t (+) y_t, t) (see ``networks.build_unet``).
        unet_brain: USB_brain, eps_y(y_t (+) c, t) with c a lesion condition latent.
        schedule: the bundle's noise schedule (cumulative signal rates alpha_bar_t).
        latent_clip: (min, max) in latent units that every one-step clean estimate is clamped to (the bundle's
            ``latent.clip``, the range seen in training), or None for no clamp.
    """

    unet_lesion: nn.Module
    unet_brain: nn.Module
    schedule: NoiseSchedule
    latent_clip: Optional[tuple[float, float]] = None

    def _eps(self, net: nn.Module, x_t: torch.Tensor, cond: torch.Tensor, t: int) -> torch.Tensor:
        """The network's raw output (eps or v, see ``NoiseSchedule.prediction_type``) for [x_t | cond] at t."""
        tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        return net(torch.cat([x_t, cond], dim=1), tt)

    def estimate(self, net: nn.Module, x_t: torch.Tensor, cond: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) of one network at step t; x0_hat is clamped to the latent range seen in training.

        When clamped, eps_hat is recomputed from the clamped x0_hat so the pair stays consistent with x_t. Both
        outputs are [B, C, I, J, K].

        Args:
            net: ``unet_lesion`` or ``unet_brain``.
            x_t: the noisy latent at step t (x_t or y_t), [B, C, I, J, K].
            cond: the condition latent concatenated to ``x_t`` on channels, [B, C, I, J, K].
            t: timestep, 0 .. T-1.
        """
        x0_hat, eps = self.schedule.split(x_t, self._eps(net, x_t, cond, t), t)
        if self.latent_clip is not None:
            x0_hat = x0_hat.clamp(*self.latent_clip)
            eps = self.schedule.eps_from_x0(x_t, x0_hat, t) if t >= 0 else eps
        return x0_hat, eps


def _noise(shape, generator: torch.Generator, like: torch.Tensor | None = None, device=None) -> torch.Tensor:
    z = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32)
    return z.to(device if like is None else like.device)


@torch.no_grad()
def generate(d: Denoisers, shape: tuple[int, ...], steps: int, generator: torch.Generator,
             device: torch.device, tick: Tick = _noop, sampler: str = "ddim") -> tuple[torch.Tensor, torch.Tensor]:
    """Unconditional paired generation (eq. 6-8): returns (lesion latent x0, brain latent y0).

    At each step the lesion model sees the noisy brain latent (the paper's approximation of eq. 7) and gives
    x0_hat; the brain model is conditioned on that one-step estimate x0_hat (eq. C.1-C.6). ``sampler``: "ddim" or
    "dpm++2m" (second-order multistep: the same network calls, a more accurate step, so fewer steps suffice).

    Both returned latents are the last step's clean estimates, [B, C, I, J, K] each.

    Args:
        d: the denoisers.
        shape: latent shape (B, C, I, J, K).
        steps: network calls per model, from t = T-1 (pure noise) to clean (see ``schedule.timesteps``).
        generator: CPU generator for the initial noise x_T, y_T (drawn on the CPU, so results do not depend on
            ``device``).
        device: where the latents and networks are.
        tick: called once per step.
        sampler: ``ddim`` or ``dpm++2m``.
    """
    x = _noise(shape, generator, device=device)
    y = _noise(shape, generator, device=device)
    x0_hat = y0_hat = x
    hx, hy = {}, {}
    for t, s in timesteps(d.schedule.num_train_timesteps - 1, steps):
        x0_hat, eps_x = d.estimate(d.unet_lesion, x, y, t)
        y0_hat, eps_y = d.estimate(d.unet_brain, y, x0_hat, t)
        x = d.schedule.solver_step(x, x0_hat, eps_x, t, s, sampler, hx)
        y = d.schedule.solver_step(y, y0_hat, eps_y, t, s, sampler, hy)
        tick()
    return x0_hat, y0_hat


@torch.no_grad()
def generate_from_mask(d: Denoisers, lesion_latent: torch.Tensor, steps: int, generator: torch.Generator,
                       tick: Tick = _noop, sampler: str = "ddim", guidance: float = 0.0,
                       empty_latent: torch.Tensor | None = None) -> torch.Tensor:
    """Brain latent for a given lesion-mask latent x0 (eq. 9), from pure noise with the brain model only.

    With ``guidance`` w > 0 (and ``empty_latent``, the empty-mask condition) every clean estimate is
    y0_hat = y0_hat(x0) + w (y0_hat(x0) - y0_hat(empty)): classifier-free guidance with the empty mask as the
    null condition, which strengthens what the mask changes (the lesion) and costs a second network call per step.
    w = 0 is the paper's eq. 9.

    Returns y0_hat, the last step's clean estimate, [B, C, I, J, K].

    Args:
        d: the denoisers.
        lesion_latent: x0, the condition latent [B, C, I, J, K] (an encoded mask, or the empty-mask latent); the
            noise is placed on its device.
        steps: network calls, from t = T-1 to clean.
        generator: CPU generator for the initial noise y_T.
        tick: called once per step.
        sampler: ``ddim`` or ``dpm++2m``.
        guidance: w >= 0, the lesion guidance factor.
        empty_latent: the empty-mask condition [1 or B, C, I, J, K]; required when ``guidance`` > 0.
    """
    if guidance < 0:
        raise ValueError("lesion guidance must be >= 0")
    guided = guidance > 0
    if guided and empty_latent is None:
        raise ValueError("lesion guidance needs the empty-mask condition")
    y = _noise(lesion_latent.shape, generator, like=lesion_latent)
    y0_hat = y
    history: dict = {}
    b = lesion_latent.shape[0]
    conds = torch.cat([lesion_latent, empty_latent.to(lesion_latent).expand_as(lesion_latent)]) if guided else None
    for t, s in timesteps(d.schedule.num_train_timesteps - 1, steps):
        if guided:  # both conditions in one batch
            x0_both, _ = d.estimate(d.unet_brain, torch.cat([y, y]), conds, t)
            y0_hat = lesion_guided(x0_both[:b], x0_both[b:], guidance)
            if d.latent_clip is not None:
                y0_hat = y0_hat.clamp(*d.latent_clip)
            eps = d.schedule.eps_from_x0(y, y0_hat, t)
        else:
            y0_hat, eps = d.estimate(d.unet_brain, y, lesion_latent, t)
        y = d.schedule.solver_step(y, y0_hat, eps, t, s, sampler, history)
        tick()
    return y0_hat


@torch.no_grad()
def generate_with_healthy_twin(d: Denoisers, lesion_latent: torch.Tensor, empty_latent: torch.Tensor,
                               prior: torch.Tensor, steps: int, generator: torch.Generator, tick: Tick = _noop,
                               sampler: str = "ddim", guidance: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A brain showing the mask's lesion and its healthy twin, from the same noise (eq. 9 localised).

    The twin follows the brain model under the empty-mask condition (a healthy brain for this noise). The lesioned
    trajectory uses y0_hat = y0_hat(empty) + (1 + w) P (y0_hat(mask) - y0_hat(empty)) (``guidance.lesion_guided``):
    the lesion model's estimate only where the lesion prior P is, the healthy estimate elsewhere, so the two
    brains differ at the lesion and hardly anywhere else (the caller fuses the difference at the mask, PathoSyn's
    additive deviation on stable anatomy). Three network calls per step, in one batch.

    Returns (lesioned y0_hat, healthy y0_hat), each [B, C, I, J, K].

    Args:
        d: the denoisers.
        lesion_latent: x0, the encoded mask [B, C, I, J, K]; the noise is placed on its device.
        empty_latent: the empty-mask condition [1 or B, C, I, J, K].
        prior: P, the lesion prior on the latent grid [B or 1, 1, I, J, K] in [0, 1] (``guidance.lesion_prior``).
        steps: network calls per trajectory, from t = T-1 to clean.
        generator: CPU generator for the initial noise (shared by both trajectories).
        tick: called once per step.
        sampler: ``ddim`` or ``dpm++2m``.
        guidance: w >= 0, how strongly the lesion is imprinted inside P.
    """
    if guidance < 0:
        raise ValueError("lesion guidance must be >= 0")
    b = lesion_latent.shape[0]
    empty = empty_latent.to(lesion_latent).expand_as(lesion_latent)
    conds = torch.cat([lesion_latent, empty, empty])
    prior = prior.to(lesion_latent)
    noise = _noise(lesion_latent.shape, generator, like=lesion_latent)
    y = torch.cat([noise, noise])  # [lesioned; healthy]
    y0_hat = y
    history: dict = {}
    for t, s in timesteps(d.schedule.num_train_timesteps - 1, steps):
        x0_all, _ = d.estimate(d.unet_brain, torch.cat([y[:b], y]), conds, t)
        lesioned = lesion_guided(x0_all[:b], x0_all[b:2 * b], guidance, prior)
        if d.latent_clip is not None:
            lesioned = lesioned.clamp(*d.latent_clip)
        y0_hat = torch.cat([lesioned, x0_all[2 * b:]])
        eps = d.schedule.eps_from_x0(y, y0_hat, t)
        y = d.schedule.solver_step(y, y0_hat, eps, t, s, sampler, history)
        tick()
    return y0_hat[:b], y0_hat[b:]


@torch.no_grad()
def edit(d: Denoisers, y0: torch.Tensor, condition: torch.Tensor, start: int, steps: int, alpha0: float, k: float,
         generator: torch.Generator, lesion_weight: torch.Tensor | None = None, tick: Tick = _noop,
         acg: bool = True) -> torch.Tensor:
    """Guided edit of a brain latent (sec. 3.2): noise y0 to ``start``, then denoise with the brain model.

    ``condition`` is the lesion latent the result should show (the empty-mask latent x_0 for healing).
    Each step forms lambda = lambda_diff (ACG, eq. 12) times ``lesion_weight`` (LCG, eq. 14, when given) and pulls
    the one-step estimate towards y0 (eq. 13/15, see ``guidance.apply_guidance``). ``acg=False`` switches the
    pull off (lambda = 0): the edit is tied to the input only through its start ``y_start = q(y0, start)``.

    Steps are always deterministic DDIM. Returns the edited brain latent (the last guided y0_hat), [B, C, I, J, K].

    Args:
        d: the denoisers.
        y0: the input's clean brain latent [B, C, I, J, K].
        condition: the lesion condition latent c [B, C, I, J, K].
        start: the timestep y0 is noised to and the first network call is made at (0 .. T-1; see
            ``schedule.start_step``).
        steps: network calls from ``start`` to clean (see ``schedule.timesteps``).
        alpha0: alpha_0 of ACG (eq. 12), >= 0.
        k: the decay of alpha_t over the edit (eq. 12, see ``guidance.acg_alpha``).
        generator: CPU generator for the start noise.
        lesion_weight: lambda_lesion [B, 1, I, J, K] in [0, 1] on the latent grid (``guidance.lcg_weight``),
            multiplied into lambda_diff; None for no LCG.
        tick: called once per step.
        acg: whether the guidance pull is applied at all.
    """
    y = d.schedule.q_sample(y0, start, _noise(y0.shape, generator, like=y0))
    y0_hat = y
    for t, s in timesteps(start, steps):
        y0_hat, eps = d.estimate(d.unet_brain, y, condition, t)
        if acg:
            weight = acg_weight(y0, y0_hat, acg_alpha(alpha0, k, t, start))
            if lesion_weight is not None:
                weight = weight * lesion_weight
            y0_hat = apply_guidance(y0_hat, y0, weight)
        y = d.schedule.ddim_step(y0_hat, eps, t, s)
        tick()
    return y0_hat


def heal(d: Denoisers, y0: torch.Tensor, empty_condition: torch.Tensor, start: int, steps: int, alpha0: float,
         k: float, generator: torch.Generator, lesion_weight: torch.Tensor | None = None,
         tick: Tick = _noop) -> torch.Tensor:
    """Pathology -> healthy: condition on the empty-mask latent, ACG towards the input (optionally LCG freedom
    inside a known lesion).

    ``edit`` with ``condition = empty_condition`` (ACG on); returns the healed brain latent [B, C, I, J, K].

    Args:
        y0: the input's clean brain latent [B, C, I, J, K].
        empty_condition: the empty-mask latent [B, C, I, J, K].
        lesion_weight: lambda_lesion [B, 1, I, J, K] of the known lesion, or None.
        d, start, steps, alpha0, k, generator, tick: as in ``edit``.
    """
    return edit(d, y0, empty_condition, start, steps, alpha0, k, generator, lesion_weight, tick)


def embed(d: Denoisers, y0: torch.Tensor, lesion_latent: torch.Tensor, lesion_weight: torch.Tensor, start: int,
          steps: int, alpha0: float, k: float, generator: torch.Generator, tick: Tick = _noop) -> torch.Tensor:
    """Healthy -> pathology: condition on the mask latent, ACG x LCG (eq. 15).

    ``edit`` with ``condition = lesion_latent`` (ACG on); returns the edited brain latent [B, C, I, J, K].

    Args:
        y0: the input's clean brain latent [B, C, I, J, K].
        lesion_latent: x0, the encoded target lesion mask [B, C, I, J, K].
        lesion_weight: lambda_lesion [B, 1, I, J, K] in [0, 1] of the target lesion (eq. 14).
        d, start, steps, alpha0, k, generator, tick: as in ``edit``.
    """
    return edit(d, y0, lesion_latent, start, steps, alpha0, k, generator, lesion_weight, tick)
