"""Stage 2: encode every sample once (posterior mean x scale factor) and cache (lesion, brain) latent pairs.

The lesion latent of a healthy sample is the empty mask through the same encoder, exactly what inference uses
as the healing condition."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from USBLib.networks import build_autoencoder

from .common import load_checkpoint, set_threads
from .data.synth import load


@torch.no_grad()
def encode_all(ae: torch.nn.Module, volumes: np.ndarray, scale: float, batch: int = 4, desc: str = "") -> np.ndarray:
    """Scaled posterior means [N, C, ...] of volumes [N, I, J, K]."""
    out = []
    for i in tqdm(range(0, volumes.shape[0], batch), desc=desc, leave=False):
        x = torch.from_numpy(np.asarray(volumes[i:i + batch], np.float32))[:, None]
        out.append((ae.encode(x)[0] * scale).numpy())
    return np.concatenate(out)


def cache(cfg: dict[str, Any], work: Path) -> Path:
    """Write ``work/latents/{train,val}.npy`` shaped [N, 2, C, ...] (index 0 lesion, 1 brain)."""
    set_threads()
    work = Path(work)
    ae = build_autoencoder(cfg["networks"]["autoencoder"])
    meta = load_checkpoint(work / "autoencoder", {"autoencoder": ae})
    if meta is None or "scale_factor" not in meta:
        raise RuntimeError(f"{work / 'autoencoder'} has no finished autoencoder; run train_autoencoder first")
    ae.eval()
    folder = work / "latents"
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        images, masks = load(work / "data" / split)
        lesion = encode_all(ae, masks, meta["scale_factor"], desc=f"{split} masks")
        brain = encode_all(ae, images, meta["scale_factor"], desc=f"{split} brains")
        np.save(folder / f"{split}.npy", np.stack([lesion, brain], axis=1).astype(np.float32))
    (folder / "scale_factor.txt").write_text(f"{meta['scale_factor']}\n")
    return folder
