"""Training batches of the local deviation network from window shards.

A batch holds windows of one shape (the network's GroupNorm and its attention mid-block see the whole window, as
at inference, so windows are never padded): the first window is drawn uniformly and its shape, after a random axis
permutation, is the batch's; the others come from the windows whose sides are the same up to order, permuted to
it. The batch has ``batch_voxels / volume`` windows (1 to ``batch``), so a step costs about the same whatever the
shape. Every window gets random axis flips and a global intensity scale.

Per window: a direction (heal with probability ``heal_fraction``) and a mode (deterministic with probability
``deterministic[direction]``: x_t = 0 at t = T - 1, the fidelity estimate; otherwise the forward-diffused target at
a uniform t). The condition channels are ``conditioning.network_input`` of the bundle's input names, exactly as
the stage builds them: for heal the fill region's base (the stored biharmonic fill of the clipped lesioned
window, or with the ``prior`` base ``conditioning.prior_fill`` of it); for embed the clipped healthy window. The
target is x0 = s (truth - base) from step 0.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from USBLib.core.schedule import NoiseSchedule
from USBLib.editor.local.conditioning import (BASES, DEEP_GREY_INPUT, DEVIATION_SCALE, EMBED, HEAL, input_names,
                                              network_input, prior_fill)
from USBLib.editor.local.network import class_label

from .crops import MAX_LEVEL
from .shards import ShardView, load_shards

INTENSITY_SCALE = (0.95, 1.05)


@dataclass
class Batch:
    """Network input [B, 1 + C, I, J, K], t [B], class labels [B], target x0 [B, 1, I, J, K], voxel loss weights
    [B, 1, I, J, K], the drawn masks [B, 1, I, J, K] (0/1, for the mean-level term), and per window its direction
    (0 heal, 1 embed) and whether it was deterministic."""

    x: torch.Tensor
    t: torch.Tensor
    classes: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    directions: list[int]
    deterministic: list[bool]

    def to(self, device: torch.device) -> "Batch":
        """This batch with its tensors on ``device``."""
        if device.type == "cpu":
            return self
        move = lambda v: v.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.x), move(self.t), move(self.classes), move(self.target), move(self.weight),
                     move(self.mask), self.directions, self.deterministic)


class WindowPool:
    """Every window of the loaded shards, grouped by its sides up to order. ``base``: how the heal's base (the
    ``fill`` a window gives) is made (``conditioning.BASES``): ``biharmonic`` is stored in the shards; ``prior``
    is made from the window's clipped lesioned scan, region and tissue prior on first use and kept in memory."""

    def __init__(self, shards: dict[str, ShardView], base: str = "biharmonic"):
        if base not in BASES:
            raise ValueError(f"unknown base '{base}' (known: {', '.join(BASES)})")
        self.base = base
        self.items = [(view, i) for view in shards.values() for i in range(len(view))]
        self.buckets: dict[tuple[int, ...], list[int]] = {}
        for n, (view, i) in enumerate(self.items):
            self.buckets.setdefault(tuple(sorted(view.shape(i))), []).append(n)
        self._fills: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.items)

    def window(self, n: int) -> dict[str, np.ndarray]:
        """Window ``n`` (``ShardView.window``) with its ``fill`` made by the pool's base."""
        view, i = self.items[n]
        w = view.window(i)
        if self.base == "prior":
            if n not in self._fills:
                self._fills[n] = prior_fill(np.clip(w["lesioned"], 0.0, MAX_LEVEL), w["region"], w["prior"])
            w["fill"] = self._fills[n]
        return w


def _oriented(window: dict[str, np.ndarray], perm, flips) -> dict[str, np.ndarray]:
    out = {}
    for k, v in window.items():
        lead = 1 if v.ndim == 4 else 0
        v = np.transpose(v, tuple(range(lead)) + tuple(lead + p for p in perm))
        axes = tuple(lead + a for a in range(3) if flips[a])
        out[k] = np.ascontiguousarray(np.flip(v, axes) if axes else v)
    return out


def draw_windows(pool: WindowPool, rng: np.random.Generator, batch: int, batch_voxels: int
                 ) -> list[dict[str, np.ndarray]]:
    """Windows of one shape (see the module docstring), each randomly permuted and flipped."""
    first = int(rng.integers(len(pool)))
    view, i = pool.items[first]
    shape = view.shape(i)
    target = tuple(shape[p] for p in rng.permutation(3))
    n = int(np.clip(round(batch_voxels / float(np.prod(target))), 1, batch))
    others = [m for m in pool.buckets[tuple(sorted(shape))] if m != first]
    chosen = [first] + [int(m) for m in rng.choice(others, size=min(n - 1, len(others)), replace=False)]
    out = []
    for m in chosen:
        view, i = pool.items[m]
        own = view.shape(i)
        perms = [p for p in itertools.permutations(range(3)) if tuple(own[a] for a in p) == target]
        perm = perms[int(rng.integers(len(perms)))]
        out.append(_oriented(pool.window(m), perm, rng.random(3) < 0.5))
    return out


def make_batch(pool: WindowPool, rng: np.random.Generator, cfg: dict, schedule: NoiseSchedule) -> Batch:
    """One training batch (see the module docstring); ``cfg`` is the trainer's config (``train.LOCAL_CONFIG``)."""
    tc = cfg["train"]
    names = cfg["inputs"]
    t_last = schedule.num_train_timesteps - 1
    xs, ts, classes, targets, weights, masks, dirs, dets = [], [], [], [], [], [], [], []
    for w in draw_windows(pool, rng, tc["batch"], tc["batch_voxels"]):
        scale = np.float32(rng.uniform(*INTENSITY_SCALE))
        healthy, lesioned, fill = w["healthy"] * scale, w["lesioned"] * scale, w["fill"] * scale
        mask = w["mask"].astype(np.float32)
        direction = HEAL if rng.random() < tc["heal_fraction"] else EMBED
        if direction == HEAL:
            image, region, base, truth = np.clip(lesioned, 0.0, MAX_LEVEL), w["region"], fill, healthy
        else:
            image = np.clip(healthy, 0.0, MAX_LEVEL)
            region, base, truth = w["mask"], image, lesioned
        cond = np.stack([image, mask, region.astype(np.float32), base]).astype(np.float32)
        x0 = ((truth - base) * DEVIATION_SCALE).astype(np.float32)
        deterministic = rng.random() < tc["deterministic"]["heal" if direction == HEAL else "embed"]
        if deterministic:
            t, x_t = t_last, np.zeros_like(x0)
        else:
            t = int(rng.integers(0, schedule.num_train_timesteps))
            a = schedule.alpha_bar(t)
            x_t = (math.sqrt(a) * x0 + math.sqrt(1 - a) * rng.standard_normal(x0.shape)).astype(np.float32)
        important = ndimage.binary_dilation((w["soft"] > 0.02) | (region > 0), iterations=2)
        xs.append(np.concatenate([x_t[None], network_input(cond, names, w["prior"])]))
        ts.append(t)
        classes.append(class_label(direction, deterministic))
        targets.append(x0[None])
        weights.append((1.0 + 9.0 * important)[None].astype(np.float32))
        masks.append(mask[None])
        dirs.append(direction)
        dets.append(bool(deterministic))
    return Batch(torch.from_numpy(np.stack(xs)), torch.tensor(ts), torch.tensor(classes),
                 torch.from_numpy(np.stack(targets)), torch.from_numpy(np.stack(weights)),
                 torch.from_numpy(np.stack(masks)), dirs, dets)


def loss_terms(pred: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(voxel loss: weighted MSE + 0.5 L1 of x0; mean-level loss: the mean over windows of the squared error of the
    drawn mask's mean, i.e. (mean of the estimate in the mask - mean of the truth there)^2 in x0 units).
    Windows without mask voxels add nothing to the mean-level term."""
    err = pred - batch.target
    voxel = (batch.weight * (err.square() + 0.5 * err.abs())).sum() / batch.weight.sum()
    count = batch.mask.sum(dim=(1, 2, 3, 4))
    mean_err = (err * batch.mask).sum(dim=(1, 2, 3, 4)) / count.clamp_min(1.0)
    has = (count > 0).float()
    level = (mean_err.square() * has).sum() / has.sum().clamp_min(1.0)
    return voxel, level


def refreshed_pool(folder, shards: dict[str, ShardView], pool: WindowPool | None, base: str,
                   inputs=()) -> WindowPool:
    """``pool`` after adding the complete shards of ``folder`` not yet in ``shards`` (a new pool when any came, or
    when there is none yet). Raises ``RuntimeError`` when the folder holds no shard, and ``ValueError`` when the
    network's ``inputs`` ask for the deep grey prior map and a shard was written without it."""
    before = len(shards)
    load_shards(folder, shards)
    if DEEP_GREY_INPUT in inputs:
        old = sorted(name for name, view in shards.items() if DEEP_GREY_INPUT not in view.arrays)
        if old:
            raise ValueError(f"{folder}: {len(old)} shards ({old[0]}, ...) were written before the deep grey prior "
                             "map; a --deep-grey run needs a work folder of windows written since")
    if pool is None or len(shards) != before:
        pool = WindowPool(shards, base)
    if not len(pool):
        raise RuntimeError(f"no window shards in {folder}")
    return pool


class BatchStream(torch.utils.data.IterableDataset):
    """Endless training batches (``make_batch``) made in ``workers`` loader processes, for a trainer whose network
    step is faster than one process makes batches (a GPU). Each worker draws from its own random stream
    (seed, first step, worker) and re-reads ``folder`` every ``reload_every`` batches, so shards that generators
    add while the run goes on are used."""

    def __init__(self, folder, cfg: dict, seed: int, step: int, workers: int, reload_every: int = 50):
        super().__init__()
        self.folder, self.cfg, self.seed, self.step = folder, cfg, seed, step
        self.workers, self.reload_every = int(workers), int(reload_every)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is None and self.workers > 0:  # the trainer's end: the loader processes
            loader = torch.utils.data.DataLoader(self, batch_size=None, num_workers=self.workers, prefetch_factor=4,
                                                 persistent_workers=True, multiprocessing_context="fork")
            yield from loader
            return
        torch.set_num_threads(1)
        rng = np.random.default_rng([self.seed, self.step, info.id if info else 0])
        schedule = NoiseSchedule.from_config(self.cfg["schedule"])
        shards: dict[str, ShardView] = {}
        pool: WindowPool | None = None
        made = 0
        while True:
            if made % self.reload_every == 0:
                pool = refreshed_pool(self.folder, shards, pool, self.cfg.get("base", "biharmonic"),
                                      input_names(self.cfg))
            yield make_batch(pool, rng, self.cfg, schedule)
            made += 1
