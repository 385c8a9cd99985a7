"""Train a tier in one time-boxed command on a lent accelerator (the `device` tool: one GPU, ~10 min a command).

Everything the machine needs travels with the repository: the prepared template sources of the tier's grid
(``--cache``; made here first with ``python -m usb_training.data prepare --tier base``), and wheels for MONAI,
nibabel and einops (``../shared/tools/device_wheels.sh monai nibabel einops``). The run builds the data set with
every CPU core, trains the autoencoder and the paired U-Nets within fractions of ``--minutes``, caches latents,
and exports a bundle (keeping the local stage of ``--keep-local-from``) to ``--out`` (under ``$OUT`` so it comes
back). ``timings.json`` beside the bundle says where the time went. Resumable like every stage: a second command
with the same ``--work`` continues.

    python -m usb_training.latent.device --tier base --cache .device_cache --work /tmp/run --out $OUT/usb-base \\
        --minutes 9 [--keep-local-from USBLib/models/usb-tiny] [--overrides '{"data": {"train": 2000}}']

``.ci/device_train_base.sh`` is the whole device command line.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ..base.config import tier
from ..base.common import cli_main


def run(cfg: dict[str, Any], cache: Path, work: Path, out: Path, minutes: float, workers: int,
        keep_local_from: Path | None = None, device: str = "auto") -> dict[str, Any]:
    """Data -> autoencoder -> latents -> U-Nets -> bundle within ``minutes`` of wall time (data and export
    included); returns the timings."""
    from . import export, latents, train_autoencoder, train_diffusion
    from ..data.dataset import build_datasets

    t0 = time.monotonic()
    timings: dict[str, Any] = {"budget_minutes": minutes}

    def left() -> float:
        return minutes - (time.monotonic() - t0) / 60.0

    build_datasets(cfg, cache, work / "data", workers=workers)
    timings["data_s"] = round(time.monotonic() - t0, 1)
    reserve = 0.12 * minutes  # latents + export
    t = time.monotonic()
    train_autoencoder.train(cfg, work, max(0.1, 0.45 * (left() - reserve)), progress=False, device=device)
    timings["autoencoder_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    latents.cache(cfg, work, device=device, minutes=max(0.1, 0.08 * minutes))
    timings["latents_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    train_diffusion.train(cfg, work, max(0.1, left() - 0.04 * minutes), progress=False, device=device)
    timings["diffusion_s"] = round(time.monotonic() - t, 1)
    t = time.monotonic()
    export.export(cfg, work, out, out.name, keep_local_from=keep_local_from)
    timings["export_s"] = round(time.monotonic() - t, 1)
    timings["total_s"] = round(time.monotonic() - t0, 1)
    for stage in ("autoencoder", "diffusion"):
        history = json.loads((work / stage / "history.json").read_text())
        timings[f"{stage}_steps"] = history["train"][-1]["step"] if history["train"] else 0
        timings[f"{stage}_val"] = history["val"][-1] if history["val"] else {}
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return timings


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="base")
    parser.add_argument("--cache", type=Path, required=True, help="holds prepared/<grid>/ (carried to the device)")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write (under $OUT)")
    parser.add_argument("--minutes", type=float, default=9.0, help="wall-time budget of the whole run")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="processes that build the data set")
    parser.add_argument("--train-samples", type=int, default=400,
                        help="cap of the training set (the base tier's 1 mm samples are 15 MB each on disk)")
    parser.add_argument("--keep-local-from", type=Path, default=None)
    parser.add_argument("--overrides", default="{}", help="JSON merged into the tier's settings")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    cfg = tier(args.tier, json.loads(args.overrides))
    cfg["data"]["train"] = min(int(cfg["data"]["train"]), args.train_samples)
    cfg["data"]["val"] = min(int(cfg["data"]["val"]), max(2, args.train_samples // 25))
    cfg["cache"] = str(args.cache)
    timings = run(cfg, args.cache, args.work, args.out, args.minutes, args.workers, args.keep_local_from,
                  args.device)
    print(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
