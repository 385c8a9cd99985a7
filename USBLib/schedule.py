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


@dataclass(frozen=True)
class NoiseSchedule:
    """Cumulative signal rates ``alpha_bar[t]`` for t = 0..T-1; ``alpha_bar(-1)`` is 1 (clean)."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "NoiseSchedule":
        from monai.networks.schedulers import DDPMScheduler

        sched = DDPMScheduler(num_train_timesteps=int(cfg.get("num_train_timesteps", 1024)),
                              schedule=cfg.get("schedule", "linear_beta"),
                              beta_start=float(cfg.get("beta_start", 1e-4)), beta_end=float(cfg.get("beta_end", 0.02)))
        return cls(alphas_cumprod=sched.alphas_cumprod.to(torch.float64))

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
