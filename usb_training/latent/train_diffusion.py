"""Stage 3: USB_lesion and USB_brain trained jointly on cached latents (paper eq. 10-11).

For a pair (x0 lesion latent, y0 brain latent) one timestep t and two noises give x_t and y_t. USB_lesion
predicts eps_x from [x_t | y_t]; USB_brain predicts eps_y from [y_t | c], where c is USB_lesion's one-step
estimate x0_hat (detached), or with probability ``clean_condition_fraction`` the true x0, because the editing
tasks condition on a clean mask latent. Loss = MSE(eps_x) + MSE(eps_y) (the paper's objective), each sample
weighted by min-SNR-gamma (Hang et al. 2023: the same optimum, faster convergence; ``min_snr_gamma`` 0 turns it
off), truncated below at ``min_snr_floor`` so that the noisiest steps are still learnt (``snr_weight``).

With the schedule's ``prediction_type`` ``v_prediction`` (the tiny tier's) the networks output
v = sqrt(abar) eps - sqrt(1 - abar) x0 instead: the same denoising objective, reparameterised. Measured here: an
eps model after 1 000 steps predicted the noise to MSE 0.02 at t = 900, which the clean estimate divides by
sqrt(abar) ~ 0.006, and sampling diverged to latents 7x larger than the data; v keeps the estimate bounded.

Learning rate: warm-up then cosine. EMA weights, with the decay ramped up as (1 + n) / (10 + n) so that a short
run is not dominated by the initial weights, are what gets exported. The training latents are every cached shard
(``latents.load_latents``).

    python -m usb_training.latent.train_diffusion --tier tiny --work RUN [--minutes M] [--steps N]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from USBLib.core.networks import build_unet
from USBLib.core.schedule import NoiseSchedule

from . import distributed
from ..base.common import (Budget, History, adamw, load_checkpoint, save_checkpoint, seed_everything, set_lr,
                     set_threads, stage_main, warmup_cosine)
from ..base.config import SCHEDULE
from .latents import load_latents
from ..base.common import cli_main


def q_sample(sched: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Batched forward diffusion: sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, one t per sample."""
    abar = sched.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def snr_weight(sched: NoiseSchedule, t: torch.Tensor, gamma: float, floor: float = 0.0) -> torch.Tensor:
    """Per-sample loss weight from SNR_t = abar_t / (1 - abar_t): the weight of the x0 error is
    max(min(SNR_t, gamma), floor), i.e. that over SNR_t on the eps loss and over (SNR_t + 1) on the v loss; ones if
    gamma <= 0.

    ``gamma``: min-SNR-gamma (Hang et al. 2023), which caps the weight of the nearly clean steps. ``floor``: the
    truncated-SNR weighting of Salimans & Ho 2022 (x0 weight at least ``floor``), which keeps the noisiest steps in
    the loss: without it their v-loss weight is ~SNR_t ~ 0 (5e-5 at t = 1000 on the tiny tier's schedule), and
    usb-tiny's clean estimates from near-pure noise are shrunk towards zero on the training latents (the lesion
    model's to 16-44 % of the mean lesion latent at t >= 800: generated lesions come out small). v prediction only
    (on the eps loss a floor would weigh the noisiest steps by 1 / SNR_t)."""
    if gamma <= 0:
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    abar = sched.alphas_cumprod.to(t.device, torch.float32)[t]
    snr = abar / (1 - abar)
    if floor > 0 and sched.prediction_type != "v_prediction":
        raise ValueError("min_snr_floor needs v prediction")
    return torch.clamp(torch.clamp(snr, max=gamma), min=floor) / (
        snr + 1 if sched.prediction_type == "v_prediction" else snr)


def target_and_x0(sched: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, noise: torch.Tensor,
                  output: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(regression target, one-step clean estimate) for a batched network ``output`` at timesteps ``t`` [B]:
    the noise and (x_t - sqrt(1 - abar) eps_hat) / sqrt(abar) for ``epsilon``; v = sqrt(abar) noise -
    sqrt(1 - abar) x0 and sqrt(abar) x_t - sqrt(1 - abar) v_hat for ``v_prediction``."""
    abar = sched.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    if sched.prediction_type == "v_prediction":
        return abar.sqrt() * noise - (1 - abar).sqrt() * x0, abar.sqrt() * x_t - (1 - abar).sqrt() * output
    return noise, (x_t - (1 - abar).sqrt() * output) / abar.sqrt()


def _weighted_mse(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return ((pred - target).pow(2).flatten(1).mean(1) * weight).mean()


def paired_loss(unet_lesion: torch.nn.Module, unet_brain: torch.nn.Module, sched: NoiseSchedule,
                x0: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, noise_x: torch.Tensor, noise_y: torch.Tensor,
                clean: torch.Tensor, gamma: float = 0.0, floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(lesion loss, brain loss) of eq. 10-11 for one batch; ``clean`` [B] bool picks the true x0 as condition;
    ``gamma`` > 0 weights each sample by min-SNR-gamma, with its x0 weight at least ``floor`` (``snr_weight``)."""
    x_t, y_t = q_sample(sched, x0, t, noise_x), q_sample(sched, y0, t, noise_y)
    out_x = unet_lesion(torch.cat([x_t, y_t], 1), t)
    target_x, x0_hat = target_and_x0(sched, x0, x_t, noise_x, out_x, t)
    cond = torch.where(clean.view(-1, 1, 1, 1, 1), x0, x0_hat.detach())
    out_y = unet_brain(torch.cat([y_t, cond], 1), t)
    target_y, _ = target_and_x0(sched, y0, y_t, noise_y, out_y, t)
    w = snr_weight(sched, t, gamma, floor)
    return _weighted_mse(out_x, target_x, w), _weighted_mse(out_y, target_y, w)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net, parameters and buffers."""
    ema_params = [p for p in ema.parameters()]
    torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1.0 - decay)
    for e, b in zip(ema.buffers(), net.buffers()):
        e.copy_(b)


@torch.no_grad()
def validate(nets: dict[str, torch.nn.Module], sched: NoiseSchedule, latents: np.ndarray, seed: int = 1234) -> dict[str, float]:
    """Losses on the validation latents with fixed t and noise (comparable across steps)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(nets["unet_brain"].parameters()).device
    data = torch.from_numpy(latents)
    n = data.shape[0]
    t = torch.randint(0, sched.num_train_timesteps, (n,), generator=gen)
    nx, ny = torch.randn(data[:, 0].shape, generator=gen), torch.randn(data[:, 1].shape, generator=gen)
    lx, ly = paired_loss(nets["unet_lesion"], nets["unet_brain"], sched, data[:, 0].to(device),
                         data[:, 1].to(device), t.to(device), nx.to(device), ny.to(device),
                         torch.zeros(n, dtype=torch.bool, device=device))
    return {"lesion": lx.item(), "brain": ly.item()}


def autoencoder_stamp(work: Path) -> dict[str, Any] | None:
    """The autoencoder the run's latents were encoded with (``latents/autoencoder.json``: its step and scale
    factor), or None where the latents carry no stamp."""
    stamp = Path(work) / "latents" / "autoencoder.json"
    return json.loads(stamp.read_text()) if stamp.is_file() else None


def train(cfg: dict[str, Any], work: Path, minutes: float | None = None, steps: int | None = None,
          seed: int = 0, progress: bool = True, device: str = "auto") -> Path:
    """Train (or resume) both U-Nets; returns the stage folder. Under ``torchrun`` each rank draws its own
    batches (DDP averages the gradients); rank 0 keeps the EMA copies, validates and saves."""
    set_threads()
    ctx = distributed.setup(device)
    seed_everything(seed)
    c = cfg["diffusion"]
    total = int(steps or c["steps"])
    work = Path(work)
    folder = work / "diffusion"
    train_lat = load_latents(work, "train")
    val_lat = load_latents(work, "val")[:32]
    channels = train_lat.shape[2]
    nets = {name: build_unet(cfg["networks"][name], channels).to(ctx.device)  # before the optimizer state
            for name in ("unet_lesion", "unet_brain")}
    emas = {f"ema_{name}": AveragedModel(net) for name, net in nets.items()}
    params = [p for net in nets.values() for p in net.parameters()]
    opt = adamw(params, float(c["lr"]))
    modules = {**nets, **emas}
    meta = load_checkpoint(folder, modules, opt) or {"step": 0}
    encoder = autoencoder_stamp(work)
    if meta.get("autoencoder") is not None and encoder is not None and meta["autoencoder"] != encoder:
        raise RuntimeError(f"{folder} was trained on latents of another autoencoder ({meta['autoencoder']}, now "
                           f"{encoder}); start the diffusion stage in a new run folder")
    for module in modules.values():
        module.to(ctx.device)
    wrapped = {name: distributed.wrap(net, ctx) for name, net in nets.items()}
    sched = NoiseSchedule.from_config(SCHEDULE)
    history = History(folder)
    seconds_before = float(history.data["seconds"])
    step = int(meta["step"])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + ctx.rank)
    budget = Budget(minutes, first_step=step)
    data = torch.from_numpy(train_lat)
    batch = int(c["batch"])
    gamma, floor = float(c.get("min_snr_gamma", 0.0)), float(c.get("min_snr_floor", 0.0))

    def checkpoint(final: bool = False) -> None:
        history.data["seconds"] = seconds_before + budget.elapsed()
        save_checkpoint(folder, modules, opt, {"step": step, "autoencoder": encoder})
        history.save(f"USB_lesion / USB_brain ({sched.prediction_type} MSE)", final)

    bar = tqdm(total=total, initial=step, desc="diffusion", disable=not (progress and ctx.main))
    for net in nets.values():
        net.train()
    while step < total and not distributed.any_rank(ctx, budget.over()):
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        x0, y0 = data[idx, 0], data[idx, 1]
        t = torch.randint(0, sched.num_train_timesteps, (batch,), generator=gen)
        nx, ny = torch.randn(x0.shape, generator=gen), torch.randn(y0.shape, generator=gen)
        clean = torch.rand(batch, generator=gen) < float(c["clean_condition_fraction"])
        x0, y0, t, nx, ny, clean = (v.to(ctx.device) for v in (x0, y0, t, nx, ny, clean))
        lx, ly = paired_loss(wrapped["unet_lesion"], wrapped["unet_brain"], sched, x0, y0, t, nx, ny, clean, gamma,
                             floor)
        warmup = int(c.get("warmup", 100))
        set_lr(opt, warmup_cosine(budget.progress_step(step, total), total, float(c["lr"]), warmup)
               * budget.rewarm(step, warmup))
        opt.zero_grad(set_to_none=True)
        (lx + ly).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(float(c["ema"]), (1 + step) / (10 + step))
        for name, net in nets.items():
            ema_update(emas[f"ema_{name}"].module, net, decay)
        step += 1
        bar.update(1)
        bar.set_postfix(lesion=f"{lx.item():.3f}", brain=f"{ly.item():.3f}")
        if ctx.main:
            history.log("train", step, lesion=lx.item(), brain=ly.item())
            if step % int(c["val_every"]) == 0:
                history.log("val", step, **validate({k: emas[f"ema_{k}"].module for k in nets}, sched, val_lat))
                checkpoint()
    bar.close()
    if ctx.main:
        if not history.validated_at(step):
            history.log("val", step, **validate({k: emas[f"ema_{k}"].module for k in nets}, sched, val_lat))
        checkpoint(final=True)
    distributed.barrier(ctx)
    distributed.teardown(ctx)
    return folder


@cli_main
def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
