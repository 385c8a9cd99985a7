"""Resume the latent stage from a shipped bundle: its autoencoder and U-Nets written as a run folder's checkpoints.

A training run keeps its checkpoints in a cache outside the repository; when that cache is gone (a fresh machine),
the committed bundle is the last state. ``python -m usb_training.latent.warm_start --bundle USBLib/models/usb-tiny
--work RUN`` writes ``RUN/autoencoder`` (weights, step, latent scale factor: the latents stage then encodes with
the shipped autoencoder) and ``RUN/diffusion`` (both U-Nets, their EMA copies = the shipped EMA weights, the
bundle's step count and hours, no optimizer moments), so that ``train_diffusion --steps N`` continues from the
bundle's step to N as a resumed session does (learning rate re-warmed, then decayed within the budget).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from USBLib.core import bundle as bundle_mod
from USBLib.core.networks import build_autoencoder, build_unet

from ..base.common import cli_main, HISTORY, load_checkpoint, save_checkpoint
from ..base.config import tier

UNETS = ("unet_lesion", "unet_brain")


def _history(folder: Path, hours: float) -> None:
    """A history with no losses that carries the bundle's training time forward."""
    (folder / HISTORY).write_text(json.dumps({"train": [], "val": [], "seconds": 3600.0 * float(hours)}, indent=1))


def warm_start(cfg: dict[str, Any], bundle: str | Path, work: Path) -> dict[str, int]:
    """Write the bundle's networks as the run's checkpoints; returns the steps written per stage.

    Args:
        cfg: the tier's configuration (its networks must be the bundle's).
        bundle: a bundle folder or name (``USBLib.core.bundle.load``).
        work: the run folder; refused where it already has a diffusion checkpoint (that run resumes by itself).
    """
    from torch.optim.swa_utils import AveragedModel

    b = bundle_mod.load(bundle)
    work = Path(work)
    if load_checkpoint(work / "diffusion", {}) is not None:
        raise SystemExit(f"{work / 'diffusion'} already has a checkpoint; it resumes without a warm start")
    facts = b.config.get("training", {})
    ae = build_autoencoder(cfg["networks"]["autoencoder"])
    ae.load_state_dict(b.load_state_dict("autoencoder"), strict=True)
    ae_steps = int(facts.get("autoencoder", {}).get("steps") or 0)
    save_checkpoint(work / "autoencoder", {"autoencoder": ae}, None,
                    {"step": ae_steps, "scale_factor": float(b.config["latent"]["scale_factor"])})
    _history(work / "autoencoder", facts.get("autoencoder", {}).get("hours", 0.0))
    channels = int(cfg["networks"]["autoencoder"]["latent_channels"])
    modules = {}
    for name in UNETS:
        net = build_unet(cfg["networks"][name], channels)
        net.load_state_dict(b.load_state_dict(name), strict=True)
        modules[name] = net
        modules[f"ema_{name}"] = AveragedModel(net)
    steps = int(facts.get("diffusion", {}).get("steps") or 0)
    save_checkpoint(work / "diffusion", modules, None, {"step": steps, "warm_start": str(b.root)})
    _history(work / "diffusion", facts.get("diffusion", {}).get("hours", 0.0))
    return {"autoencoder": ae_steps, "diffusion": steps}


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", default=None, help="bundle folder or name (default: the default model)")
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--work", type=Path, required=True, help="run folder")
    args = parser.parse_args(argv)
    print(json.dumps(warm_start(tier(args.tier), args.bundle, args.work)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
