"""Crop shards on disk: ``<work>/crops/shard_<seed>_<k>.npz`` with float16 images and uint8 masks.

Generation is deterministic in (sources, seed); several generator processes with different seeds can fill one
folder while the trainer reads whatever shards are complete (files appear atomically by rename).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..data.prepare import Anatomy
from .crops import make_crop

FIELDS = ("healthy", "lesioned", "fill", "soft", "mask", "dilation")


def write_shards(anatomies: list[Anatomy], folder: Path, seed: int, count: int, shard_size: int = 32,
                 size: int = 48) -> list[Path]:
    """Write ``count`` crops (rounded up to whole shards) drawn from ``anatomies`` in turn; skips existing shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(-(-count // shard_size)):
        target = folder / f"shard_{seed}_{k:04d}.npz"
        if target.is_file():
            written.append(target)
            continue
        rng = np.random.default_rng([seed, k])
        crops = [make_crop(anatomies[int(rng.integers(len(anatomies)))], rng, size) for _ in range(shard_size)]
        arrays = {f: np.stack([getattr(c, f) for c in crops]) for f in FIELDS}
        for f in ("healthy", "lesioned", "fill", "soft"):
            arrays[f] = arrays[f].astype(np.float16)
        arrays["mask"] = arrays["mask"].astype(np.uint8)
        tmp = folder / f".tmp_{target.name}"
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, target)
        written.append(target)
    return written


def load_shards(folder: Path, known: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """Add every complete shard of ``folder`` not yet in ``known`` (keyed by file name); returns ``known``."""
    for path in sorted(Path(folder).glob("shard_*.npz")):
        if path.name not in known:
            with np.load(path) as z:
                known[path.name] = {f: z[f] for f in FIELDS}
    return known
