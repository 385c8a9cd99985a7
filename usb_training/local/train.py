"""Trainer of the local deviation network (one network, both directions, deterministic and sampling modes).

A clean run from step 0: the target is the scaled clean deviation from the base (the classical-fill channel),
x0 = s (truth - base), from the first step, and the EMA starts from the first step's weights. Batches are windows
shaped like the stage's inference boxes (``batches``); the inputs are the config's ``inputs`` (by default the drawn
mask, the fill region, the classical fill, and the template's T1 and CSF/GM/WM prior: the heal input shows no
lesion intensities). Heal windows in deterministic mode (the shipped fidelity mode) are ``heal_fraction`` x
``deterministic.heal`` of all windows (0.75 x 0.85 = 64 %).

Loss: MSE + 0.5 L1 on x0, weighted 10x on the lesion's true extent and the fill region grown by 2 voxels, plus
``mean_weight`` x the squared error of the drawn mask's mean (``batches.loss_terms``).

Resumable: model, EMA, optimizer moments, step and the data position are checkpointed (safetensors) every few
minutes into ``<work>/train``; a run stops at its wall-time budget and the next one continues. A run refuses to
continue a checkpoint made with another network, inputs or target (start a new work folder instead).

On a GPU (``device="cuda"``) the batches are made by ``loader_workers`` processes (``batches.BatchStream``, each
with its own random stream, re-reading the shard folder as generators fill it) and ``fit_schedule`` ends the cosine
learning-rate decay with the run's wall-time budget (``Budget.progress_step``), for a one-off run whose speed is
not known in advance; ``history.json`` records the device.

Warm restart (``warm_from``): a new run folder can start from a bundle's local network instead of step 0: model and
EMA from its weights, the step count from its ``local.training.steps`` (the LR schedule goes on from there to
``steps``), fresh optimizer moments; ``history.json`` records where it came from (``warm_start``).
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from USBLib.core.devices import use_onednn_convs
from USBLib.core.schedule import NoiseSchedule
from USBLib.editor.local.conditioning import DEEP_GREY_INPUT, input_names
from USBLib.editor.local.network import build_local_unet

from ..base.common import CHECKPOINT, Budget, History, adamw, load_checkpoint, save_checkpoint, set_threads
from .batches import BatchStream, WindowPool, loss_terms, make_batch, refreshed_pool

INPUTS = ["mask", "region", "fill", "prior_t1", "prior_csf", "prior_gm", "prior_wm"]
DEEP_GREY_INPUTS = INPUTS + [DEEP_GREY_INPUT]  # ``train --deep-grey``: the prior's deep grey nuclei as well
TARGET = "healthy (embed: lesioned) - classical base, from step 0"
LOCAL_CONFIG: dict[str, Any] = {
    "inputs": INPUTS,
    "target": TARGET,
    "base": "biharmonic",  # how the heal's base is made (USBLib.editor.local.conditioning.BASES)
    # MONAI's middle block always attends over the whole window (4096 positions at 64^3): one 64-channel head
    # costs a quarter less than the default 8-channel heads there
    "network": {"channels": [16, 32, 64], "num_res_blocks": 1, "attention_levels": [False, False, False],
                "norm_num_groups": 8, "num_head_channels": [0, 0, 64]},
    "schedule": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                 "beta_end": 0.0195},
    "train": {"steps": 10000, "batch": 4, "batch_voxels": 4 * 32 ** 3, "lr": 1e-3, "warmup": 300, "ema": 0.999,
              "heal_fraction": 0.75, "deterministic": {"heal": 0.85, "embed": 0.4}, "mean_weight": 1.0,
              "checkpoint_minutes": 4.0},
}
IDENTITY = ("inputs", "target", "base", "network", "schedule")  # what a checkpoint must share with the config to resume
IDENTITY_DEFAULTS = {"base": "biharmonic"}  # what a run folder written before the key existed was made with


def _lr(step: int, tc: dict) -> float:
    if step < tc["warmup"]:
        return tc["lr"] * (step + 1) / tc["warmup"]
    progress = min(1.0, (step - tc["warmup"]) / max(1, tc["steps"] - tc["warmup"]))
    return tc["lr"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))


def _log(history: History, step: int, running: dict[str, list[float]], tail: str) -> None:
    """Log the means of ``running`` (then emptied) at ``step``: loss terms, heal-fidelity share, s/step."""
    means = {k: float(np.mean(v)) for k, v in running.items()}
    history.log("train", step, **means)
    print(f"step {step} loss {means['loss']:.5f} (level {means['level']:.5f}) heal-fidelity {means['heal_det']:.0%} "
          f"{means['seconds']:.2f} s/step ({means['cpu_seconds']:.2f} CPU s) {tail}", flush=True)
    for values in running.values():
        values.clear()


def _config(out: Path, cfg: dict) -> dict:
    """The run's config: ``cfg``, checked against the one a checkpoint in ``out`` was made with."""
    path = out / "config.json"
    if path.is_file() and (out / "checkpoint.safetensors").is_file():
        before = json.loads(path.read_text())
        changed = [k for k in IDENTITY if before.get(k, IDENTITY_DEFAULTS.get(k)) != json.loads(json.dumps(cfg.get(k)))]
        if changed:
            raise ValueError(f"{out} holds a checkpoint trained with another {', '.join(changed)}; "
                             "train a new network in a new work folder")
    path.write_text(json.dumps(cfg, indent=1))
    return cfg


def _warm_start(net: torch.nn.Module, ema: torch.nn.Module, bundle_ref: Path | str, cfg: dict) -> int:
    """Load a bundle's local network into ``net`` and ``ema``; returns the step it was trained to."""
    from USBLib.core import bundle as bundle_mod

    bundle = bundle_mod.load(bundle_ref)
    local = bundle.config.get(bundle_mod.LOCAL)
    if not local:
        raise ValueError(f"{bundle.root} has no local stage to start from")
    made = {"network": (local["network"], cfg["network"]), "schedule": (local["schedule"], cfg["schedule"]),
            "inputs": (list(input_names(local)), list(input_names(cfg))),
            "base": (local.get("base", IDENTITY_DEFAULTS["base"]), cfg.get("base", IDENTITY_DEFAULTS["base"]))}
    changed = [k for k, (theirs, ours) in made.items() if json.loads(json.dumps(ours)) != theirs]
    if changed:
        raise ValueError(f"{bundle.root}'s local network has another {', '.join(changed)}; it cannot start this run")
    weights = bundle.load_state_dict(bundle_mod.LOCAL)
    net.load_state_dict(weights, strict=True)
    ema.load_state_dict(weights, strict=True)
    return int(local.get("training", {}).get("steps", 0))


def device_name(device: torch.device) -> str:
    """Words for the hardware a run trains on (the model card's)."""
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} GPU"
    return f"{len(os.sched_getaffinity(0))}-core CPU, no GPU"


def train(work: Path, minutes: float | None = None, steps: int | None = None, seed: int = 0,
          cfg: dict | None = None, log_every: int = 50, base: str | None = None,
          warm_from: Path | str | None = None, device: str = "cpu", loader_workers: int = 0,
          fit_schedule: bool = False) -> Path:
    """Train (or continue training) in ``<work>/train`` on the shards in ``<work>/windows``; returns the folder.
    ``base``: the heal's base (``conditioning.BASES``; default the config's), fixed for a run folder.
    ``warm_from``: a bundle (folder or name) whose local network a run folder without a checkpoint starts from
    (its network, inputs, noise schedule and base must be this config's); ignored once the folder has a checkpoint.
    ``device``: where the network trains ("cpu" or "cuda"); ``loader_workers`` > 0 makes the batches in that many
    processes (``batches.BatchStream``) instead of in the training loop. ``fit_schedule``: the learning rate follows
    the share of ``minutes`` spent when that is further along than the step count (the schedule ends with the
    budget); needs ``minutes``."""
    cfg = copy.deepcopy(cfg or LOCAL_CONFIG)
    if steps is not None:
        cfg["train"]["steps"] = int(steps)
    if base is not None:
        cfg["base"] = base
    tc = cfg["train"]
    work = Path(work)
    out = work / "train"
    out.mkdir(parents=True, exist_ok=True)
    cfg = _config(out, cfg)
    if fit_schedule and not minutes:
        raise ValueError("fit_schedule needs a wall-time budget (minutes)")
    set_threads()
    torch.manual_seed(seed)
    dev = torch.device(device)
    net = build_local_unet(cfg["network"], len(input_names(cfg)))
    if dev.type == "cpu":
        net = use_onednn_convs(net)  # batch-1 windows: oneDNN
    ema = build_local_unet(cfg["network"], len(input_names(cfg)))
    ema.load_state_dict(net.state_dict())  # the EMA starts here, at step 0 of this network
    ema.requires_grad_(False)
    meta = load_checkpoint(out, {"model": net, "ema": ema})
    history = History(out)
    if meta is None and warm_from is not None:
        meta = {"step": _warm_start(net, ema, warm_from, cfg)}
        history.data["warm_start"] = {"bundle": str(warm_from), "step": meta["step"]}
    net.to(dev)
    ema.to(dev)
    opt = adamw(net.parameters(), tc["lr"])
    if (out / CHECKPOINT).is_file():
        load_checkpoint(out, {}, opt)  # the optimizer moments, once the parameters are on their device
    history.data.setdefault("hardware", device_name(dev))
    step = int((meta or {"step": 0})["step"])
    schedule = NoiseSchedule.from_config(cfg["schedule"])
    budget = Budget(minutes)
    shards: dict = {}
    pool: WindowPool | None = None
    stream = iter(BatchStream(work / "windows", cfg, seed, step, loader_workers)) if loader_workers > 0 else None
    rng = np.random.default_rng([seed, step])
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    last_ckpt = time.monotonic()
    running: dict[str, list[float]] = {"loss": [], "voxel": [], "level": [], "heal_det": [], "seconds": [],
                                       "cpu_seconds": []}

    def lr_step(s: int) -> int:  # the step the learning-rate schedule reads: warm-up by steps, decay by time share
        return budget.progress_step(s, tc["steps"]) if fit_schedule and s >= tc["warmup"] else s

    while step < tc["steps"] and not budget.over():
        if stream is None and (step % 200 == 0 or pool is None):
            pool = refreshed_pool(work / "windows", shards, pool, cfg.get("base", "biharmonic"), input_names(cfg))
        for group in opt.param_groups:
            group["lr"] = _lr(lr_step(step), tc)
        started, cpu_started = time.perf_counter(), time.process_time()
        batch = (make_batch(pool, rng, cfg, schedule) if stream is None else next(stream)).to(dev)
        pred = net(batch.x, batch.t, class_labels=batch.classes)
        voxel, level = loss_terms(pred, batch)
        loss = voxel + tc["mean_weight"] * level
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(tc["ema"], (1 + step) / (10 + step))
            torch._foreach_mul_(ema_params, decay)
            torch._foreach_add_(ema_params, net_params, alpha=1 - decay)
        step += 1
        running["loss"].append(loss.item())
        running["voxel"].append(voxel.item())
        running["level"].append(level.item())
        running["heal_det"] += [float(d == 0 and k) for d, k in zip(batch.directions, batch.deterministic)]
        running["seconds"].append(time.perf_counter() - started)
        running["cpu_seconds"].append(time.process_time() - cpu_started)
        if step % log_every == 0:
            _log(history, step, running, f"lr {_lr(lr_step(step), tc):.2e} windows "
                 f"{len(pool) if pool else 'in loaders'} {budget.elapsed():.0f}s")
        if time.monotonic() - last_ckpt > tc["checkpoint_minutes"] * 60:
            history.data["seconds"] = history.data.get("seconds", 0.0) + (time.monotonic() - last_ckpt)
            save_checkpoint(out, {"model": net, "ema": ema}, opt, {"step": step, "windows": len(pool) if pool else 0})
            history.save("local deviation network", final=False)
            last_ckpt = time.monotonic()
    if stream is not None:
        stream.close()  # ends the loader processes
    if running["loss"]:
        _log(history, step, running, "(end of this run)")
    history.data["seconds"] = history.data.get("seconds", 0.0) + (time.monotonic() - last_ckpt)
    save_checkpoint(out, {"model": net, "ema": ema}, opt, {"step": step, "windows": len(pool) if pool else 0})
    history.save("local deviation network")
    return out
