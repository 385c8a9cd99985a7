"""Stage 2: encode every sample once (posterior mean x scale factor) and cache (lesion, brain) latent pairs.

The lesion latent of a healthy sample is the empty mask through the same encoder, exactly what inference uses
as the healing condition. The cache follows the data set's shards (``latents/<split>/shard_NNN.npy``), so a data
set that grows gets only its new shards encoded; a cache made with another autoencoder (its step and scale
factor are stamped in ``latents/autoencoder.json``) is discarded, and a shard whose data were rewritten (its
``complete`` marker differs from the one stamped beside the latents) is encoded again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from USBLib.core.networks import build_autoencoder

from ..base.common import cli_main, load_checkpoint, set_threads
from ..data.synth import finished_shards


@torch.no_grad()
def encode_all(ae: torch.nn.Module, volumes, scale: float, batch: int = 4, desc: str = "") -> np.ndarray:
    """Scaled posterior means [N, C, ...] of volumes [N, I, J, K] (on the autoencoder's device); all-zero volumes
    (empty masks) are encoded once and reused."""
    device = next(ae.parameters()).device
    out: list[np.ndarray | None] = [None] * len(volumes)
    empty = None
    todo = []
    for i in range(len(volumes)):
        if not np.any(volumes[i]):
            if empty is None:
                zero = torch.zeros((1, 1, *volumes[i].shape), device=device)
                empty = (ae.encode(zero)[0] * scale)[0].cpu().numpy()
            out[i] = empty
        else:
            todo.append(i)
    for start in tqdm(range(0, len(todo), batch), desc=desc, leave=False):
        idx = todo[start:start + batch]
        x = torch.from_numpy(np.stack([np.asarray(volumes[i], np.float32) for i in idx]))[:, None].to(device)
        for i, z in zip(idx, (ae.encode(x)[0] * scale).cpu().numpy()):
            out[i] = z
    return np.stack(out)


def load_latents(work: Path, split: str) -> np.ndarray:
    """All cached latent pairs of a split, [N, 2, C, ...] float32 (index 0 lesion, 1 brain)."""
    files = sorted((Path(work) / "latents" / split).glob("shard_[0-9][0-9][0-9].npy"))
    if not files:
        raise FileNotFoundError(f"no cached latents in {Path(work) / 'latents' / split}; run the latents stage")
    return np.concatenate([np.load(f) for f in files]).astype(np.float32)


def cache(cfg: dict[str, Any], work: Path, max_shards: int | None = None, device: str = "auto",
          minutes: float | None = None) -> Path:
    """Encode every finished data shard not yet cached (at most ``max_shards`` per split, within ``minutes``)
    into ``work/latents/<split>/shard_NNN.npy`` shaped [n, 2, C, ...], on ``device`` (auto: CUDA if present)."""
    import time

    set_threads()
    work = Path(work)
    start = time.monotonic()
    ae = build_autoencoder(cfg["networks"]["autoencoder"])
    meta = load_checkpoint(work / "autoencoder", {"autoencoder": ae})
    if meta is None or "scale_factor" not in meta:
        raise RuntimeError(f"{work / 'autoencoder'} has no finished autoencoder; run train_autoencoder first")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    ae.eval().to("cuda" if use_cuda else "cpu")
    folder = work / "latents"
    stamp = {"step": int(meta["step"]), "scale_factor": float(meta["scale_factor"])}
    stamp_file = folder / "autoencoder.json"
    if folder.is_dir() and (not stamp_file.is_file() or json.loads(stamp_file.read_text()) != stamp):
        shutil.rmtree(folder)  # made with another autoencoder
    folder.mkdir(parents=True, exist_ok=True)
    stamp_file.write_text(json.dumps(stamp))
    for split in ("val", "train"):
        (folder / split).mkdir(exist_ok=True)
        shards = finished_shards(work / "data" / split)
        for shard in shards[:max_shards]:
            if minutes is not None and time.monotonic() - start > 60 * minutes:
                break
            target = folder / split / f"{shard.name}.npy"
            marker = folder / split / f"{shard.name}.complete"
            data_marker = (shard / "complete").read_text()
            if target.is_file() and marker.is_file() and marker.read_text() == data_marker:
                continue
            images = np.load(shard / "images.npy", mmap_mode="r")
            masks = np.load(shard / "masks.npy", mmap_mode="r")
            lesion = encode_all(ae, masks, stamp["scale_factor"], desc=f"{split}/{shard.name} masks")
            brain = encode_all(ae, images, stamp["scale_factor"], desc=f"{split}/{shard.name} brains")
            tmp = target.with_name(f".{shard.name}.npy.tmp")  # never matches the shard glob
            with open(tmp, "wb") as fh:
                np.save(fh, np.stack([lesion, brain], axis=1).astype(np.float32))
            tmp.replace(target)
            marker.write_text(data_marker)
    (folder / "scale_factor.txt").write_text(f"{stamp['scale_factor']}\n")
    return folder


@cli_main
def main(argv: list[str] | None = None) -> int:
    """``python -m usb_training.latent.latents --tier tiny --work RUN [--max-shards N]``"""
    import argparse

    from ..base.config import tier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--max-shards", type=int, default=None, help="encode at most this many shards per split")
    parser.add_argument("--minutes", type=float, default=None, help="stop starting new shards after this")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    print(cache(tier(args.tier), args.work, args.max_shards, args.device, args.minutes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
