"""Deviation estimates of the local network with ACG and LCG (paper eq. 12-15 applied in deviation space).

The network's variable is a deviation d from a base image (the condition's classical-fill channel: for heal the
scan with its fill region biharmonically filled, for embed the scan itself). The input scan is d_in = input -
base (zero outside the fill region), so ACG's pull towards the input is lambda_diff = exp(-alpha_t |d_in -
d_hat|) and d_hat + lambda (d_in - d_hat): small spurious changes are pulled back (outside the lesion it returns
the input), while a large, confident deviation passes. LCG frees the lesion: lambda_lesion = clamp(1 - eta *
x_lesion, 0, 1) with x_lesion the smoothed fill region (``conditioning.lesion_prior``). The guided estimate is
d_hat + lambda (d_in - d_hat), lambda = lambda_diff * lambda_lesion, as in ``USBLib.core.guidance.apply_guidance``.

Two modes:
- ``fidelity``: one deterministic pass (the network's conditional-mean estimate), guided at alpha_0.
- ``realism``: the fidelity estimate is diffused to ``strength`` x T (forward process, eq. 4-5) and denoised with
  ``steps`` guided DDIM steps (x0-prediction), which gives a sample with the texture and heterogeneity of the
  training deviations; clean estimates are clamped to the deviation range seen in training, and the sample's
  mean level over the fill region is set to the fidelity estimate's (inference-time stabilisation: the few
  deterministic steps from ``strength`` x T drift darker than the conditional mean, 0.06-0.10 of the surround
  for embedded lesions; the sample keeps its heterogeneity, the level is the network's best estimate).

Boxes with a side above ``WINDOW`` voxels are run through the network in overlapping windows (MONAI's
``sliding_window_inference``, Gaussian blending): the U-Net's middle block attends over all its voxels, whose
memory grows with the square of the box volume (a 160 x 200 x 160 box asked for 62 GB in one call).
"""
from __future__ import annotations

import torch

from USBLib.core.guidance import acg_alpha, acg_weight, apply_guidance
from USBLib.core.schedule import NoiseSchedule, timesteps
from USBLib.editor.local.network import class_label

MODES = ("fidelity", "realism")
X0_CLIP = (-3.0, 3.0)  # scaled deviation range (|d| <= 1.5 model units)
WINDOW = 64          # largest network window side in voxels (~1 mm); the largest training window side too
WINDOW_OVERLAP = 0.5  # overlap of neighbouring windows (fraction of the window side)


def predict_x0(net: torch.nn.Module, x: torch.Tensor, t: int, label: int, window: int = WINDOW) -> torch.Tensor:
    """The network's clean estimate for input channels ``x`` [B, C, I, J, K] at step ``t`` with class ``label``.

    Sides above ``window`` voxels are covered by overlapping windows of at most ``window`` voxels per side,
    blended with Gaussian weights; a smaller input goes through in one call. Sides must be multiples of the
    network's size multiple (the windows are then too when ``window`` is).
    """
    def run(inputs: torch.Tensor) -> torch.Tensor:
        n = inputs.shape[0]
        return net(inputs, torch.full((n,), int(t), device=inputs.device, dtype=torch.long),
                   class_labels=torch.full((n,), int(label), device=inputs.device, dtype=torch.long))

    if all(side <= window for side in x.shape[2:]):
        return run(x)
    from monai.inferers import sliding_window_inference

    roi = tuple(min(int(side), int(window)) for side in x.shape[2:])
    return sliding_window_inference(x, roi, 1, run, overlap=WINDOW_OVERLAP, mode="gaussian")


def _guided(x0_hat: torch.Tensor, reference: torch.Tensor, alpha_t: float, lesion_weight: torch.Tensor | None,
            acg: bool) -> torch.Tensor:
    x0_hat = x0_hat.clamp(*X0_CLIP)
    weight = acg_weight(reference, x0_hat, alpha_t) if acg else torch.zeros_like(x0_hat)
    if lesion_weight is not None:
        weight = weight * lesion_weight
    return apply_guidance(x0_hat, reference, weight)


@torch.no_grad()
def sample_deviation(net: torch.nn.Module, schedule: NoiseSchedule, cond: torch.Tensor, direction: int, *,
                     mode: str, alpha0: float, k: float, eta_weight: torch.Tensor | None, steps: int,
                     strength: float, generator: torch.Generator, acg: bool = True,
                     noise: torch.Tensor | None = None, reference: torch.Tensor | None = None,
                     window: int = WINDOW, level_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled deviation x0 [B, 1, I, J, K] for condition channels ``cond`` [B, C, I, J, K] (the network's inputs
    after x_t, ``conditioning.network_input``).

    ``eta_weight``: LCG weight lambda_lesion [B or 1, 1, I, J, K] in [0, 1] (None = no LCG).
    ``alpha0``, ``k``: ACG (eq. 12); alpha_t = alpha0 exp(-k t / T) with T the first sampling step.
    ``noise``: the realism mode's starting noise [B, 1, I, J, K] (default: drawn from ``generator``).
    ``reference``: the input scan in the same (scaled deviation) variable, which ACG holds the estimate to
    (default 0: the network's base is the input itself).
    ``window``: largest side of one network call in voxels (``predict_x0``).
    ``level_weight``: realism only, weights w [1, 1, I, J, K] in [0, 1] of the fill region (e.g. the lesion prior
    x_lesion): each sample gets m w added, m the w-weighted mean of (fidelity estimate - sample), so its level
    over the region is the fidelity estimate's (``anchor_level``). None: the sample as drawn.
    """
    if mode not in MODES:
        raise ValueError(f"unknown local mode '{mode}'")
    b = cond.shape[0]
    t_last = schedule.num_train_timesteps - 1
    shape = (b, 1, *cond.shape[2:])
    x_zero = torch.zeros(shape, device=cond.device)
    ref = x_zero if reference is None else reference.to(cond.device).expand(shape)
    x0 = predict_x0(net, torch.cat([x_zero, cond], 1), t_last, class_label(direction, True), window)
    x0 = _guided(x0, ref, acg_alpha(alpha0, k, 0, 1), eta_weight, acg)
    if mode == "fidelity":
        return x0
    start = max(1, int(round(float(strength) * t_last)))
    if noise is None:
        noise = torch.randn(shape, generator=generator, device="cpu")
    noise = noise.to(cond.device)
    x0_fidelity = x0
    x = schedule.q_sample(x0, start, noise)
    for t, s in timesteps(start, steps):
        x0_hat = predict_x0(net, torch.cat([x, cond], 1), t, class_label(direction, False), window)
        x0_hat = _guided(x0_hat, ref, acg_alpha(alpha0, k, t, start), eta_weight, acg)
        eps = schedule.eps_from_x0(x, x0_hat, t)
        x = schedule.ddim_step(x0_hat, eps, t, s)
        x0 = x0_hat
    if level_weight is not None:
        x0 = anchor_level(x0, x0_fidelity, level_weight.to(x0.device))
    return x0


def anchor_level(sample: torch.Tensor, estimate: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sample`` [B, 1, I, J, K] shifted by m ``weight`` per item, m = sum w (``estimate`` - ``sample``) / sum
    w^2, so that the ``weight``-weighted mean of the result equals the estimate's; voxels of weight 0 keep the
    sample's values. ``weight`` [1 or B, 1, I, J, K] in [0, 1]; an all-zero weight leaves the sample unchanged."""
    w = weight.expand_as(sample)
    total = (w * w).sum(dim=(1, 2, 3, 4), keepdim=True)
    m = (w * (estimate - sample)).sum(dim=(1, 2, 3, 4), keepdim=True) / total.clamp_min(1e-6)
    return sample + m * w
