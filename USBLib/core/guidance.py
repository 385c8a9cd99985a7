"""Anatomy Consistency Guidance (paper eq. 12-13) and Lesion Consistency Guidance (eq. 14-15).

Pure tensor functions, batch-safe (every per-sample scalar is shaped to broadcast over channels and space).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def acg_alpha(alpha0: float, k: float, t: int, t_total: int) -> float:
    """alpha_t = alpha_0 * exp(-k t / T) (eq. 12).

    Args:
        alpha0: alpha_0 >= 0, the guidance sharpness at the last step (t = 0).
        k: the decay. T is the edit's start step, so t / T runs from 1 (first, noisiest step) to 0 (last step):
            the first step uses alpha_0 e^-k. Because lambda = exp(-alpha_t |y0 - y0_hat|), a *smaller* alpha_t
            holds the estimate *closer* to the input: a larger k holds the early steps more tightly to the input
            (the paper's appendix C: "larger k values strengthen constraints from the original image"); k < 0
            frees the early steps more than the last ones; k = 0 keeps alpha_0 throughout.
        t: current timestep; t_total: T.
    """
    return alpha0 * math.exp(-k * t / max(t_total, 1))


def acg_weight(y0: torch.Tensor, y0_hat: torch.Tensor, alpha_t: float) -> torch.Tensor:
    """lambda_diff = exp(-alpha_t |y0 - y0_hat|) (eq. 12), element-wise, values in (0, 1].

    Continuous in alpha_t: alpha_t = 0 gives lambda = 1 everywhere (the input held exactly). Switching ACG off is
    a separate, explicit choice (the ``acg`` setting), not a slider value.

    Args:
        y0: the input's clean latent [B, C, I, J, K]; y0_hat: the one-step clean estimate, same shape.
        alpha_t: from ``acg_alpha``, >= 0.
    """
    return torch.exp(-max(alpha_t, 0.0) * (y0 - y0_hat).abs())


def lesion_prior(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """x_lesion of eq. 14 on the latent grid: the largest (partial-volume) mask value inside each latent voxel.

    The paper pools the mask by averaging (AvgPool). On an 8 mm latent voxel a 5 mm lesion averages to <= 0.17,
    so LCG would hardly free the voxel that must change and small lesions could not be embedded. Max-pooling frees
    every latent voxel the lesion touches, fully where it is solid, as the paper's smoothing intends.

    Args:
        mask: [B, 1, I, J, K] mask in [0, 1] on the image (model) grid.
        factor: the autoencoder's downsampling factor f.
    Returns:
        [B, 1, I/f, J/f, K/f] in [0, 1]; broadcasts over the latent channels.
    """
    return F.max_pool3d(mask.float(), kernel_size=factor, stride=factor)


def lcg_weight(prior: torch.Tensor, eta: float) -> torch.Tensor:
    """lambda_lesion = 1 - eta * x_lesion (eq. 14), clamped to [0, 1] so that no eta gives a negative weight
    (a push away from the input). eta = 0 disables LCG (all ones); eta = 1 frees a solid lesion fully."""
    return (1.0 - eta * prior).clamp(0.0, 1.0)


def apply_guidance(y0_hat: torch.Tensor, y0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Pull the clean estimate towards the input: y0_hat + lambda (y0 - y0_hat).

    The sampler then takes its DDIM step from this guided estimate, which equals eq. 13/15,
    y_{t-1} <- y_{t-1} + lambda (y0 - y_{t-1}), with y0 taken to the noise level of y_{t-1} along the sampler's
    own trajectory, sqrt(a_{t-1}) y0 + sqrt(1 - a_{t-1}) eps_hat. At the last step (a = 1) the two are identical;
    before it, both sides of the blend carry the same noise level (upstream blended a noisy state towards the
    clean latent, which removes noise wherever lambda ~ 1).
    """
    return y0_hat + weight * (y0 - y0_hat)


def lesion_guided(with_mask: torch.Tensor, empty: torch.Tensor, guidance: float,
                  prior: torch.Tensor | None = None) -> torch.Tensor:
    """Clean estimate of a brain that shows the mask's lesion, from the brain model's two estimates on the same
    noisy latent: y0_hat = y0_hat(empty) + (1 + w) P (y0_hat(mask) - y0_hat(empty)).

    With P = 1 everywhere (``prior`` None) this is y0_hat(mask) + w (y0_hat(mask) - y0_hat(empty)):
    classifier-free guidance with the empty mask as the null condition, and w = 0 is the paper's eq. 9. With the
    lesion prior P (``lesion_prior``, 1 on every latent voxel the lesion touches) the mask's estimate counts only
    there: elsewhere the brain follows the empty-mask (healthy) estimate, so the lesion does not drift the rest of
    the anatomy.

    Args:
        with_mask: y0_hat(x0), the estimate conditioned on the mask latent, [B, C, I, J, K].
        empty: y0_hat(empty), the estimate conditioned on the empty-mask latent, same shape.
        guidance: w >= 0.
        prior: P, [B, 1, I, J, K] in [0, 1] on the latent grid, or None for P = 1.
    """
    change = with_mask - empty
    if prior is not None:
        change = prior * change
    return empty + (1.0 + guidance) * change
