"""Window shards on disk: ``<work>/windows/shard_<seed>_<k>/`` holding windows of different shapes, flattened.

A shard folder has one ``.npy`` per field (every window's voxels one after the other): ``healthy``, ``lesioned``,
``fill``, ``prior_t1`` float16; ``soft``, ``prior_csf``, ``prior_gm``, ``prior_wm``, ``prior_deep_gm`` uint8 (x 255;
the last absent from shards written before the deep grey prior); ``bits`` uint8 (1 = drawn mask, 2 = fill region);
``index.npy`` int64 [n, 4] (offset, I, J, K) and ``info.json`` (one ``windows.Window.info`` per window). Reading
memory-maps the files, so a large data set costs page cache, not process memory.

Generation is deterministic in (sources, seed, shard); several generator processes with different seeds (or
``workers``) can fill one folder while the trainer reads whatever shards are complete (folders appear atomically
by rename).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from USBLib.editor.local.conditioning import DEEP_GREY_INPUT, PRIOR_INPUTS

from .windows import Window, WindowMaker

HALF = ("healthy", "lesioned", "fill", "prior_t1")
PRIOR = PRIOR_INPUTS  # ``Window.prior``'s channels, in order
BYTE = ("soft",) + PRIOR[1:]
FIELDS = HALF + BYTE + ("bits",)
OPTIONAL = (DEEP_GREY_INPUT,)  # absent from shards written before the deep grey prior (their prior has 4 channels)
MASK, REGION = 1, 2


def _flat(windows: list[Window]) -> dict[str, np.ndarray]:
    per = {"healthy": [w.healthy for w in windows], "lesioned": [w.lesioned for w in windows],
           "fill": [w.fill for w in windows], "soft": [w.soft for w in windows],
           "bits": [w.mask * MASK + w.region * REGION for w in windows]}
    channels = {len(w.prior) for w in windows}
    if len(channels) != 1 or channels.pop() not in (len(PRIOR) - len(OPTIONAL), len(PRIOR)):
        raise ValueError(f"a shard's windows need priors of {len(PRIOR)} (or {len(PRIOR) - len(OPTIONAL)}) "
                         "channels alike")
    for c, name in enumerate(PRIOR[:len(windows[0].prior)]):
        per[name] = [w.prior[c] for w in windows]
    out = {}
    for name, arrays in per.items():
        flat = np.concatenate([np.ravel(a) for a in arrays])
        if name in HALF:
            out[name] = flat.astype(np.float16)
        elif name == "bits":
            out[name] = flat.astype(np.uint8)
        else:
            out[name] = np.round(np.clip(flat, 0.0, 1.0) * 255).astype(np.uint8)
    return out


def write_shard(windows: list[Window], target: Path) -> Path:
    """Write ``windows`` as the shard folder ``target`` (atomically: a temporary folder renamed)."""
    target = Path(target)
    tmp = target.with_name(f".tmp_{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, flat in _flat(windows).items():
        np.save(tmp / f"{name}.npy", flat)
    sizes = [int(np.prod(w.healthy.shape)) for w in windows]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    np.save(tmp / "index.npy", np.column_stack([offsets, [w.healthy.shape for w in windows]]).astype(np.int64))
    (tmp / "info.json").write_text(json.dumps([w.info for w in windows]))
    os.replace(tmp, target)
    return target


_MAKER: WindowMaker | None = None  # a worker process's window maker (inherited through fork, not pickled)


def _init_worker(maker: WindowMaker) -> None:
    global _MAKER
    import torch

    torch.set_num_threads(1)
    _MAKER = maker


def _shard_job(job: tuple, maker: WindowMaker | None = None) -> Path:
    target, seed, k, size, per_scene = job
    rng = np.random.default_rng([seed, k])
    return write_shard(list((maker or _MAKER).windows(rng, size, per_scene)), target)  # type: ignore[union-attr]


def write_shards(maker: WindowMaker, folder: Path, seed: int, count: int, shard_size: int = 32,
                 per_scene: int = 8, workers: int = 1) -> list[Path]:
    """Write ``count`` windows (rounded up to whole shards) as ``shard_<seed>_<k>``; skips existing shards.
    ``workers`` > 1 writes shards in parallel processes (one thread each)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs, written = [], []
    for k in range(-(-count // shard_size)):
        target = folder / f"shard_{seed}_{k:04d}"
        written.append(target)
        if not (target / "index.npy").is_file():
            jobs.append((target, seed, k, shard_size, per_scene))
    if workers > 1 and len(jobs) > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), _init_worker, (maker,)) as pool:
            for done in pool.imap_unordered(_shard_job, jobs):
                print(done.name, flush=True)
    else:
        for job in jobs:
            print(_shard_job(job, maker).name, flush=True)
    return written


class ShardView:
    """The windows of one shard folder, memory-mapped: ``len``, ``shape(i)``, ``window(i)`` (dict of arrays)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = np.load(self.folder / "index.npy")
        self.info = json.loads((self.folder / "info.json").read_text())
        self.arrays = {name: np.load(self.folder / f"{name}.npy", mmap_mode="r") for name in FIELDS
                       if name not in OPTIONAL or (self.folder / f"{name}.npy").is_file()}

    def __len__(self) -> int:
        return len(self.index)

    def shape(self, i: int) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.index[i, 1:])  # type: ignore[return-value]

    def window(self, i: int) -> dict[str, np.ndarray]:
        """Window ``i``: ``healthy``/``lesioned``/``fill``/``soft`` float32 [I, J, K], ``mask``/``region`` bool,
        ``prior`` float32 [5, I, J, K] (``PRIOR``; [4, ...] from a shard written before the deep grey prior)."""
        shape = self.shape(i)
        start = int(self.index[i, 0])
        stop = start + int(np.prod(shape))
        get = lambda name: np.asarray(self.arrays[name][start:stop]).reshape(shape)  # noqa: E731
        out = {name: get(name).astype(np.float32) for name in ("healthy", "lesioned", "fill")}
        out["soft"] = get("soft").astype(np.float32) / 255.0
        bits = get("bits")
        out["mask"], out["region"] = (bits & MASK) > 0, (bits & REGION) > 0
        out["prior"] = np.stack([get("prior_t1").astype(np.float32)]
                                + [get(n).astype(np.float32) / 255.0 for n in PRIOR[1:] if n in self.arrays])
        return out


def load_shards(folder: Path, known: dict[str, ShardView]) -> dict[str, ShardView]:
    """Add every complete shard of ``folder`` not yet in ``known`` (keyed by folder name); returns ``known``."""
    for path in sorted(Path(folder).glob("shard_*")):
        if path.name not in known and (path / "index.npy").is_file() and (path / "info.json").is_file():
            known[path.name] = ShardView(path)
    return known
