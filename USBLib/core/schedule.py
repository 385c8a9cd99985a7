"""Noise schedule and DDIM sampling steps (paper eq. 1-5, C.3-C.6).

The beta schedule comes from MONAI's ``DDPMScheduler`` (linear beta by default); the DDIM update is written out
here because USB's edits need explicit (t -> s) step pairs that start at an arbitrary step, and guidance acts on
the one-step clean estimate between the network call and the update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch


PREDICTION_TYPES = ("epsilon", "v_prediction")  # MONAI's names for what the U-Nets output


@dataclass(frozen=True)
class NoiseSchedule:
    """Cumulative signal rates ``alpha_bar[t]`` for t = 0..T-1; ``alpha_bar(-1)`` is 1 (clean).

    ``prediction_type``: what the U-Nets output. ``epsilon`` is the paper's eps_theta (eq. 10-11);
    ``v_prediction`` is v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (Salimans & Ho 2022), the same denoising objective
    reparameterised so that the clean estimate stays bounded near t = T, where eps-prediction divides its error
    by sqrt(a_t) ~ 0.006 (``split`` turns either output into the pair (x0_hat, eps_hat) that sampling uses).
    """

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "NoiseSchedule":
        from monai.networks.schedulers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1024)),
                              schedule=cfg.get("schedule", "linear_beta"),
                              beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)))
        prediction = str(cfg.get("prediction_type", "epsilon"))
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type '{prediction}' (known: {', '.join(PREDICTION_TYPES)})")
        return cls(alphas_cumprod=sched.alphas_cumprod.to(torch.float64), prediction_type=prediction)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def q_sample(self, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
        """Forward diffusion q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) (eq. 4-5)."""
        a = self.alpha_bar(t)
        return a ** 0.5 * x0 + (1.0 - a) ** 0.5 * noise

    def predict_x0(self, x_t: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
        """One-step clean estimate x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) (eq. C.3, C.5)."""
        a = self.alpha_bar(t)
        return (x_t - (1.0 - a) ** 0.5 * eps) / a ** 0.5

    def split(self, x_t: torch.Tensor, output: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) from a network output at step t: eps_hat = output for ``epsilon``; for
        ``v_prediction`` x0_hat = sqrt(a_t) x_t - sqrt(1 - a_t) v and eps_hat = sqrt(1 - a_t) x_t + sqrt(a_t) v.
        All tensors [B, C, I, J, K]."""
        if self.prediction_type == "v_prediction":
            a = self.alpha_bar(t)
            return a ** 0.5 * x_t - (1.0 - a) ** 0.5 * output, (1.0 - a) ** 0.5 * x_t + a ** 0.5 * output
        return self.predict_x0(x_t, output, t), output

    def ddim_step(self, x0_hat: torch.Tensor, eps: torch.Tensor, t: int, s: int, eta: float = 0.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM update from step t to s < t given the clean estimate and the noise estimate.

        ``eta = 0`` is deterministic DDIM; ``eta = 1`` matches DDPM's posterior variance.
        """
        a_t, a_s = self.alpha_bar(t), self.alpha_bar(s)
        sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5 if s >= 0 else 0.0
        out = a_s ** 0.5 * x0_hat + max(1 - a_s - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            out = out + sigma * torch.randn(out.shape, generator=generator, device="cpu").to(out)
        return out

    def log_snr_half(self, t: int) -> float:
        """lambda_t = log(sqrt(a_t) / sqrt(1 - a_t)), the half log signal-to-noise ratio (DPM-Solver's time)."""
        a = self.alpha_bar(t)
        return 0.5 * float(np.log(a / (1.0 - a)))

    def multistep_x0(self, x0_hat: torch.Tensor, x0_prev: torch.Tensor | None, t: int, s: int,
                     t_prev: int | None) -> torch.Tensor:
        """DPM-Solver++(2M) (Lu et al. 2022): the clean estimate to step with from t to s, corrected with the
        previous step's estimate ``x0_prev`` (made at ``t_prev`` > t). Feeding it to ``ddim_step`` with the noise
        it implies (``eps_from_x0(x_t, D, t)``) gives the second-order multistep update x_s = (sigma_s / sigma_t) x_t - alpha_s (e^-h - 1) D; without a previous
        estimate, or on the last step to clean (s < 0), it is ``x0_hat`` itself (first order = DDIM).

        Args:
            x0_hat: clean estimate at t; x0_prev: clean estimate at t_prev (or None).
            t, s: current and next timestep (s < t; s = -1 is clean).
        """
        if x0_prev is None or t_prev is None or s < 0:
            return x0_hat
        lam_prev, lam_t, lam_s = self.log_snr_half(t_prev), self.log_snr_half(t), self.log_snr_half(s)
        r = (lam_t - lam_prev) / (lam_s - lam_t)
        return (1.0 + 0.5 / r) * x0_hat - (0.5 / r) * x0_prev

    def solver_step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, eps: torch.Tensor, t: int, s: int,
                    sampler: str = "ddim", history: dict | None = None) -> torch.Tensor:
        """One deterministic step t -> s of ``sampler`` ("ddim" or "dpm++2m"); ``history`` is a dict the caller
        keeps per trajectory across steps (the multistep solver stores its previous estimate there)."""
        if sampler == "ddim":
            return self.ddim_step(x0_hat, eps, t, s)
        if sampler != "dpm++2m":
            raise ValueError(f"unknown sampler '{sampler}'")
        history = {} if history is None else history
        d = self.multistep_x0(x0_hat, history.get("x0"), t, s, history.get("t"))
        history.update(x0=x0_hat, t=t)
        return self.ddim_step(d, self.eps_from_x0(x_t, d, t), t, s)

    def eps_from_x0(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t: int) -> torch.Tensor:
        """Noise implied by a clean estimate at step t (inverse of ``predict_x0``)."""
        a = self.alpha_bar(t)
        return (x_t - a ** 0.5 * x0_hat) / (1.0 - a) ** 0.5


def timesteps(start: int, steps: int) -> list[tuple[int, int]]:
    """DDIM step pairs (t, s) from ``start`` down to clean, ``steps`` network calls, evenly spaced.

    The first call is at exactly ``start`` (the level the input was noised to) and the last pair ends at
    s = -1 (clean). Fewer distinct steps than asked are returned when ``start + 1 < steps``.
    """
    if start < 0:
        raise ValueError("start step must be >= 0")
    steps = max(1, min(int(steps), start + 1))
    ts = np.unique(np.round(np.linspace(start, 0, steps)).astype(int))[::-1].tolist()
    return list(zip(ts, ts[1:] + [-1]))


def start_step(strength: float, num_train_timesteps: int) -> int:
    """Edit start step for a strength in (0, 1]: 1 noises to the last training step (pure noise)."""
    return int(round(float(strength) * (num_train_timesteps - 1)))
