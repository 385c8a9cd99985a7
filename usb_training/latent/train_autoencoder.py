"""Stage 1: the KL autoencoder on random patches of brains and lesion masks.

Two kinds (``networks.autoencoder.kind``):

- ``patch_kl`` (tier ``tiny``, ``USBLib.core.patch_autoencoder``): a linear code of 4x4x4 patches started from
  their PCA (``initialise``), plus a normalisation-free refinement CNN. Crops are aligned to the patch grid. It
  reached 32.5 dB validation PSNR after 500 steps (9 CPU minutes), where the deep MONAI AutoencoderKL below was
  at 20.4 dB after 1 000 steps and collapsed into a blurred mean brain in its whole-volume phase.
- ``monai_kl`` (tier ``base``): MONAI ``AutoencoderKL``. Two phases: ``steps`` on random patches, then
  ``full_volume_steps`` on whole volumes at ``full_volume_lr_scale`` times the rate, so that the GroupNorm
  statistics the decoder sees at inference (whole brain + black background) are the ones it trained on. The
  KL weight multiplies the KL *summed* over latent elements while L1 is a *mean* over voxels, so MONAI's tutorial
  1e-6 weighs the KL ~1e5 times more than Stable Diffusion's; a fresh model starts its log-variance
  ``log_var_init`` lower so that the latent carries the image from the first steps.

Loss: L1 + ``kl_weight`` * KL, plus an optional patch adversarial loss (MONAI ``PatchDiscriminator`` +
``PatchAdversarialLoss``). Learning rate: warm-up then cosine; under a time budget (``--minutes``) the phase change
and the decay follow the elapsed share of it. No perceptual loss: every perceptual network needs weights that must
be downloaded, which this project does not do. After training, the latent scale factor is measured as 1 / std of
the posterior means of the training brains.

    python -m usb_training.latent.train_autoencoder --tier tiny --work RUN [--minutes M] [--steps N]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from USBLib.core.networks import build_autoencoder

from . import distributed
from ..base.common import (Budget, History, adamw, load_checkpoint, save_checkpoint, seed_everything, set_lr,
                     set_threads, stage_main, warmup_cosine)
from ..data.synth import load
from ..base.common import cli_main


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over latent voxels, averaged over the batch."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2) + 1e-8) - 1)
    return kl.flatten(1).sum(1).mean()


def random_patches(images: np.ndarray, masks: np.ndarray, batch: int, patch, mask_fraction: float,
                   rng: np.random.Generator, align: int = 1) -> torch.Tensor:
    """[B, 1, *patch] crops: brains (crop centred inside the brain) or lesion masks (centred on a lesion); crop
    corners on multiples of ``align`` (the patch autoencoder's grid, so training sees its inference blocks)."""
    n, shape = images.shape[0], images.shape[1:]
    out = np.zeros((batch, 1, *patch), np.float32)
    for b in range(batch):
        i = int(rng.integers(n))
        use_mask = rng.random() < mask_fraction and masks[i].any()
        vol = np.asarray(masks[i] if use_mask else images[i], np.float32)
        fg = np.argwhere(vol > 0.5 if use_mask else vol > 0)
        center = fg[rng.integers(len(fg))] if len(fg) else np.array(shape) // 2
        start = [int(np.clip(c - p // 2 + rng.integers(-p // 4, p // 4 + 1), 0, s - p))
                 for c, p, s in zip(center, patch, shape)]
        start = [s0 - s0 % align for s0 in start]
        out[b, 0] = vol[tuple(slice(s0, s0 + p) for s0, p in zip(start, patch))]
    return torch.from_numpy(out)


def _volume(array: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.asarray(array, np.float32))[None, None].to(device)


def whole_volumes(images, masks, batch: int, mask_fraction: float, rng: np.random.Generator) -> torch.Tensor:
    """[B, 1, I, J, K] whole brains or whole lesion masks (the full-volume phase)."""
    out = []
    for _ in range(batch):
        i = int(rng.integers(len(images)))
        use_mask = rng.random() < mask_fraction and masks[i].any()
        out.append(np.asarray(masks[i] if use_mask else images[i], np.float32))
    return torch.from_numpy(np.stack(out))[:, None]


def brain_psnr(recon: np.ndarray, image: np.ndarray) -> float:
    """PSNR in dB inside the brain (image > 0), data range 1 (model units)."""
    brain = image > 0
    mse = float(np.mean((recon[brain] - image[brain]) ** 2))
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


@torch.no_grad()
def reconstruct(ae: torch.nn.Module, volume: np.ndarray) -> np.ndarray:
    """Decode(encode(volume)) with the posterior mean, as inference does."""
    device = next(ae.parameters()).device
    return ae.decode(ae.encode(_volume(volume, device))[0])[0, 0].cpu().numpy()


@torch.no_grad()
def validate(ae: torch.nn.Module, images, masks, count: int = 8) -> dict[str, float]:
    """Whole-volume reconstruction of validation brains and masks: PSNR in the brain (dB, range 1), mean absolute
    value of the background (should be 0: black), L1 of the masks."""
    ae.eval()
    scores: dict[str, list[float]] = {"psnr_brain": [], "background": [], "l1_mask": []}
    for i in range(min(count, images.shape[0])):
        image = np.asarray(images[i], np.float32)
        recon = reconstruct(ae, image)
        scores["psnr_brain"].append(brain_psnr(recon, image))
        scores["background"].append(float(np.abs(recon[image <= 0]).mean()))
        mask = np.asarray(masks[i], np.float32)
        scores["l1_mask"].append(float(np.abs(reconstruct(ae, mask) - mask).mean()))
    ae.train()
    return {k: float(np.mean(v)) for k, v in scores.items()}


@torch.no_grad()
def latent_scale(ae: torch.nn.Module, images: np.ndarray, count: int = 32) -> float:
    """1 / std of posterior means over ``count`` training brains."""
    ae.eval()
    device = next(ae.parameters()).device
    mus = [ae.encode(_volume(images[i], device))[0] for i in range(min(count, images.shape[0]))]
    return float(1.0 / torch.cat(mus).std().item())


def initialise(ae: torch.nn.Module, images, masks, c: dict[str, Any], count: int = 64) -> None:
    """Fresh weights: the patch autoencoder starts from the PCA of the patches of ``count`` training brains and a
    ``mask_fraction`` share of lesion masks; MONAI's AutoencoderKL starts with a small posterior sigma
    (``log_var_init``, see the module docstring)."""
    if hasattr(ae, "initialise_from_patches"):
        n = min(count, images.shape[0])
        n_masks = int(round(n * float(c.get("mask_fraction", 0.0))))
        volumes = [np.asarray(images[i], np.float32) for i in range(n)]
        volumes += [np.asarray(masks[i], np.float32) for i in range(n_masks)]
        ae.initialise_from_patches(np.stack(volumes))
        return
    with torch.no_grad():
        ae.quant_conv_log_sigma.conv.bias += float(c.get("log_var_init", 0.0))


def train(cfg: dict[str, Any], work: Path, minutes: float | None = None, steps: int | None = None,
          seed: int = 0, progress: bool = True, device: str = "auto") -> Path:
    """Train (or resume) the autoencoder; returns the stage folder holding ``checkpoint.safetensors``.
    Under ``torchrun`` every rank trains on its own random patches (DDP); rank 0 validates and saves."""
    set_threads()
    ctx = distributed.setup(device)
    seed_everything(seed)
    c = cfg["autoencoder"]
    full_steps = int(c.get("full_volume_steps", 0))
    total = int(steps or (int(c["steps"]) + full_steps))
    patch_steps = max(0, total - full_steps)
    folder = Path(work) / "autoencoder"
    images, masks = load(Path(work) / "data" / "train")
    val_images, val_masks = load(Path(work) / "data" / "val")
    ae = build_autoencoder(cfg["networks"]["autoencoder"])
    adv_weight = float(c.get("adversarial_weight", 0.0))
    modules: dict[str, torch.nn.Module] = {"autoencoder": ae}
    if adv_weight > 0:
        from monai.losses import PatchAdversarialLoss
        from monai.networks.nets import PatchDiscriminator

        modules["discriminator"] = PatchDiscriminator(spatial_dims=3, channels=32, num_layers_d=3, in_channels=1)
        adv = PatchAdversarialLoss(criterion="least_squares")
    for module in modules.values():  # on the device before the optimizer state is restored onto it
        module.to(ctx.device)
    opt = adamw(ae.parameters(), float(c["lr"]))
    d_opt = adamw(modules["discriminator"].parameters(), float(c["lr"])) if adv_weight > 0 else None
    meta = load_checkpoint(folder, modules, opt)
    if meta is None:  # a fresh start
        meta = {"step": 0}
        initialise(ae, images, masks, c)
    model = distributed.wrap(ae, ctx)
    disc = distributed.wrap(modules["discriminator"], ctx) if adv_weight > 0 else None
    history = History(folder)
    seconds_before = float(history.data["seconds"])
    step = int(meta["step"])
    rng = np.random.default_rng([seed, step, ctx.rank])
    budget = Budget(minutes, first_step=step)

    def checkpoint(extra: dict[str, Any] | None = None, final: bool = False) -> None:
        history.data["seconds"] = seconds_before + budget.elapsed()
        save_checkpoint(folder, modules, opt, {"step": step, **(extra or {})})
        history.save("autoencoder (L1; val: PSNR dB, background, mask L1)", final)

    model.train()
    bar = tqdm(total=total, initial=step, desc="autoencoder", disable=not (progress and ctx.main))
    while step < total and not distributed.any_rank(ctx, budget.over()):
        at = budget.progress_step(step, total)
        warmup = int(c.get("warmup", 0))
        lr = warmup_cosine(at, total, float(c["lr"]), warmup) * budget.rewarm(step, warmup)
        set_lr(opt, lr if at < patch_steps else lr * float(c.get("full_volume_lr_scale", 1.0)))
        if at < patch_steps:
            x = random_patches(images, masks, int(c["batch"]), c["patch"], float(c["mask_fraction"]), rng,
                               align=getattr(ae, "patch", 1))
        else:
            x = whole_volumes(images, masks, 1, float(c["mask_fraction"]), rng)
        x = x.to(ctx.device)
        recon, mu, sigma = model(x)
        l1 = F.l1_loss(recon, x)
        loss = l1 + float(c["kl_weight"]) * kl_loss(mu, sigma)
        adversarial = disc is not None and step >= int(c.get("adversarial_start", 0))
        if adversarial:
            loss = loss + adv_weight * adv(disc(recon)[-1], target_is_real=True, for_discriminator=False)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if float(c.get("grad_clip", 0.0)) > 0:  # batch-1 whole volumes give occasional large gradients
            torch.nn.utils.clip_grad_norm_(ae.parameters(), float(c["grad_clip"]))
        opt.step()
        if adversarial:
            d_loss = 0.5 * (adv(disc(recon.detach())[-1], target_is_real=False, for_discriminator=True)
                            + adv(disc(x)[-1], target_is_real=True, for_discriminator=True))
            d_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            d_opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(l1=f"{l1.item():.4f}")
        if ctx.main:
            history.log("train", step, l1=l1.item())
            if step % int(c["val_every"]) == 0:
                history.log("val", step, **validate(ae, val_images, val_masks))
                checkpoint()
                images.refresh(), masks.refresh()  # shards written since the start
    bar.close()
    if ctx.main:
        if not history.validated_at(step):
            history.log("val", step, **validate(ae, val_images, val_masks))
        scale = latent_scale(ae, images)
        history.data["scale_factor"] = scale
        checkpoint({"scale_factor": scale}, final=True)
    distributed.barrier(ctx)
    distributed.teardown(ctx)
    return folder


@cli_main
def main(argv: list[str] | None = None) -> int:
    return stage_main(__doc__, train, argv)


if __name__ == "__main__":
    raise SystemExit(main())
