"""Anatomy Consistency Guidance (paper eq. 12-13) and Lesion Consistency Guidance (eq. 14-15).

Pure tensor functions, batch-safe (every per-sample scalar is shaped to broadcast over channels and space).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def acg_alpha(alpha0: float, k: float, t: int, t_total: int) -> float:
    """alpha_t = alpha0 * exp(-k t / T) (eq. 12).

    T is the length of the reverse trajectory of the edit (its start step), so t / T runs from 1 to 0 and k sets
    how much freer the early steps are than the last ones, whatever the start step.
    """
    return alpha0 * math.exp(-k * t / max(t_total, 1))


def acg_weight(y0: torch.Tensor, y0_hat: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """lambda_diff = exp(-alpha_t |y0 - y0_hat|) (eq. 12), element-wise in latent space, values in (0, 1].

    ``alpha_t <= 0`` switches ACG off and returns zeros (no pull towards the input). The formula's own limit at
    alpha -> 0 would be lambda = 1 everywhere, i.e. the input returned unchanged, which no edit wants, so 0 is
    reserved as the off switch.
    """
    if alpha_t <= 0:
        return torch.zeros_like(y0)
    return torch.exp(-alpha_t * (y0 - y0_hat).abs())


def lesion_prior(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """x_lesion = AvgPool(x0) (eq. 14): the image-space binary mask [B,1,I,J,K] averaged over each latent voxel.

    Returns [B,1,I/f,J/f,K/f] in [0, 1], which broadcasts over the latent channels.
    """
    return F.avg_pool3d(mask.float(), kernel_size=factor, stride=factor)


def lcg_weight(prior: torch.Tensor, eta: float) -> torch.Tensor:
    """lambda_lesion = 1 - eta * x_lesion (eq. 14). eta = 0 disables LCG (all ones)."""
    return 1.0 - eta * prior


def apply_guidance(y0_hat: torch.Tensor, y0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pull the clean estimate towards the input: y0_hat + lambda (y0 - y0_hat).

    The sampler then takes its DDIM step from this guided estimate, which equals eq. 13/15,
    y_{t-1} <- y_{t-1} + lambda (y0 - y_{t-1}), with y0 taken to the noise level of y_{t-1} along the sampler's
    own trajectory, sqrt(a_{t-1}) y0 + sqrt(1 - a_{t-1}) eps_hat. At the last step (a = 1) the two are identical;
    before it, both sides of the blend carry the same noise level (upstream blended a noisy state towards the
    clean latent, which removes noise wherever lambda ~ 1).
    """
    return y0_hat + weight * (y0 - y0_hat)
