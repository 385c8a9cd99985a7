"""Trainer of the local deviation network (one network, both directions, deterministic and sampling modes).

Each step draws a batch of crops, a direction per crop (heal or embed) and a 32^3 window around the lesion;
builds the condition channels of ``USBLib.editor.local.conditioning``; the target is the scaled clean deviation from
the base (the classical-fill channel), x0 = s * (truth - base). With probability ``deterministic_fraction`` a crop is trained in deterministic mode (x_t = 0,
t = T - 1, class 2/3): the network then learns E[d | condition], the fidelity estimate. Otherwise x_t is the
forward-diffused x0 at a uniform t (paper eq. 4-5) and the network predicts x0 (class 0/1). Loss: MSE + 0.5 L1
on x0, weighted 10x on the lesion's true extent and the fill region grown by 2 voxels.

Resumable: model, EMA, optimizer moments, step and data position are checkpointed (safetensors) every few
minutes into ``<work>/train``; a run stops at its wall-time budget and the next one continues.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from USBLib.editor.local.conditioning import DEVIATION_SCALE, EMBED, HEAL, condition
from USBLib.editor.local.network import build_local_unet, class_label
from USBLib.core.schedule import NoiseSchedule

from ..base.common import Budget, History, adamw, load_checkpoint, save_checkpoint, set_threads
from .shards import load_shards

LOCAL_CONFIG: dict[str, Any] = {
    "network": {"channels": [16, 32, 64], "num_res_blocks": 1, "attention_levels": [False, False, False],
                "norm_num_groups": 8},
    "schedule": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                 "beta_end": 0.0195},
    "train": {"steps": 20000, "batch": 4, "window": 32, "lr": 1e-3, "warmup": 300, "ema": 0.999,
              "deterministic_fraction": 0.4, "checkpoint_minutes": 4.0},
}


def _window(arrays: dict[str, np.ndarray], i: int, rng: np.random.Generator, window: int) -> dict[str, np.ndarray]:
    size = arrays["healthy"].shape[1]
    soft = arrays["soft"][i].astype(np.float32)
    centre = np.array(ndimage.center_of_mass(soft > 0.5 if (soft > 0.5).any() else soft > 0))
    lo = np.clip(np.round(centre - window / 2 + rng.integers(-6, 7, 3)), 0, size - window).astype(int)
    box = tuple(slice(s, s + window) for s in lo)
    return {f: arrays[f][i][box] for f in ("healthy", "lesioned", "fill", "soft", "mask")}


def make_batch(pool: list[tuple[dict, int]], rng: np.random.Generator, cfg: dict, schedule: NoiseSchedule
               ) -> tuple[torch.Tensor, ...]:
    """(network input [B,5,w,w,w], t [B], class [B], target x0 [B,1,...], loss weight [B,1,...])."""
    tc = cfg["train"]
    inputs, ts, classes, targets, weights = [], [], [], [], []
    t_last = schedule.num_train_timesteps - 1
    for _ in range(tc["batch"]):
        arrays, i = pool[int(rng.integers(len(pool)))]
        c = {k: v.astype(np.float32) for k, v in _window(arrays, i, rng, tc["window"]).items()}
        direction = HEAL if rng.random() < 0.5 else EMBED
        dilation = int(arrays["dilation"][i])
        if direction == HEAL:
            cond = condition(c["lesioned"], c["mask"], HEAL, dilation, fill=c["fill"])
            truth = c["healthy"]
        else:
            cond = condition(c["healthy"], c["mask"], EMBED, 0)
            truth = c["lesioned"]
        x0 = (truth - cond[3]) * DEVIATION_SCALE  # deviation from the base (the classical-fill channel)
        important = ndimage.binary_dilation((c["soft"] > 0.02) | (cond[2] > 0), iterations=2)
        deterministic = rng.random() < tc["deterministic_fraction"]
        if deterministic:
            t, x_t = t_last, np.zeros_like(x0)
        else:
            t = int(rng.integers(0, schedule.num_train_timesteps))
            a = schedule.alpha_bar(t)
            x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * rng.standard_normal(x0.shape).astype(np.float32)
        inputs.append(np.concatenate([x_t[None], cond]))
        ts.append(t)
        classes.append(class_label(direction, deterministic))
        targets.append(x0[None])
        weights.append((1.0 + 9.0 * important)[None].astype(np.float32))
    return (torch.from_numpy(np.stack(inputs)), torch.tensor(ts), torch.tensor(classes),
            torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(weights)))


def usable_crops(shards: dict[str, dict[str, np.ndarray]], max_deviation: float = 1.2) -> list[tuple[dict, int]]:
    """(shard, index) of every crop whose deviation and intensities are in range (|d| <= ``max_deviation`` and
    lesioned <= 1.5 model units); shards written before the generator bounded its lesion rescaling hold a few
    out-of-range crops, which are left out."""
    pool = []
    for arrays in shards.values():
        for i in range(arrays["healthy"].shape[0]):
            d = arrays["lesioned"][i].astype(np.float32) - arrays["healthy"][i].astype(np.float32)
            if np.abs(d).max() <= max_deviation and arrays["lesioned"][i].max() <= 1.6:
                pool.append((arrays, i))
    return pool


def _lr(step: int, tc: dict) -> float:
    if step < tc["warmup"]:
        return tc["lr"] * (step + 1) / tc["warmup"]
    progress = min(1.0, (step - tc["warmup"]) / max(1, tc["steps"] - tc["warmup"]))
    return tc["lr"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(work: Path, minutes: float | None = None, steps: int | None = None, seed: int = 0,
          cfg: dict | None = None, log_every: int = 50) -> Path:
    """Train (or continue training) in ``<work>/train`` on the shards in ``<work>/crops``; returns the folder."""
    import copy

    cfg = copy.deepcopy(cfg or LOCAL_CONFIG)
    if steps is not None:
        cfg["train"]["steps"] = int(steps)
    tc = cfg["train"]
    work = Path(work)
    out = work / "train"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    set_threads()
    torch.manual_seed(seed)
    net = build_local_unet(cfg["network"])
    ema = build_local_unet(cfg["network"])
    ema.load_state_dict(net.state_dict())
    ema.requires_grad_(False)
    opt = adamw(net.parameters(), tc["lr"])
    meta = load_checkpoint(out, {"model": net, "ema": ema}, opt) or {"step": 0}
    step = int(meta["step"])
    schedule = NoiseSchedule.from_config(cfg["schedule"])
    history = History(out)
    budget = Budget(minutes)
    shards: dict[str, dict[str, np.ndarray]] = {}
    rng = np.random.default_rng([seed, step])
    last_ckpt = time.monotonic()
    running: list[float] = []
    pool: list[tuple[dict, int]] = []
    while step < tc["steps"] and not budget.over():
        if step % 200 == 0 or not pool:
            before = len(shards)
            load_shards(work / "crops", shards)
            if len(shards) != before or not pool:
                pool = usable_crops(shards)
            if not pool:
                raise RuntimeError(f"no crop shards in {work / 'crops'}")
        for group in opt.param_groups:
            group["lr"] = _lr(step, tc)
        x, t, cls, target, weight = make_batch(pool, rng, cfg, schedule)
        pred = net(x, t, class_labels=cls)
        err = pred - target
        loss = (weight * (err.square() + 0.5 * err.abs())).sum() / weight.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(tc["ema"], (1 + step) / (10 + step))
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.mul_(decay).add_(p.detach(), alpha=1 - decay)
        step += 1
        running.append(loss.item())
        if step % log_every == 0:
            history.log("train", step, loss=float(np.mean(running)))
            print(f"step {step} loss {np.mean(running):.5f} lr {_lr(step, tc):.2e} crops {len(pool)} "
                  f"{budget.elapsed():.0f}s", flush=True)
            running = []
        if time.monotonic() - last_ckpt > tc["checkpoint_minutes"] * 60:
            history.data["seconds"] = history.data.get("seconds", 0.0) + (time.monotonic() - last_ckpt)
            save_checkpoint(out, {"model": net, "ema": ema}, opt, {"step": step, "crops": len(pool)})
            history.save("local deviation network")
            last_ckpt = time.monotonic()
    history.data["seconds"] = history.data.get("seconds", 0.0) + (time.monotonic() - last_ckpt)
    save_checkpoint(out, {"model": net, "ema": ema}, opt, {"step": step, "crops": len(pool)})
    history.save("local deviation network")
    return out
