"""``python -m usb_training run``: the whole pipeline (data -> autoencoder -> latents -> U-Nets -> export ->
evaluation), resumable: each stage continues from its checkpoint.

    python -m usb_training run --tier tiny --work RUN --out USBLib/models/usb-tiny \
        [--ae-minutes 25 --diffusion-minutes 45] [--skip-eval]
Stages one by one: ``python -m usb_training.data generate``, ``usb_training.latent.train_autoencoder``,
``usb_training.latent.latents``, ``usb_training.latent.train_diffusion``, ``usb_training.latent.export``,
``usb_training.evaluation.evaluate``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .base.config import tier
from .base.paths import DEFAULT_CACHE
from .base.common import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["run"])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--work", type=Path, required=True, help="run folder (data, checkpoints, curves)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="fetched template sources")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--name", default=None)
    parser.add_argument("--ae-minutes", type=float, default=None)
    parser.add_argument("--diffusion-minutes", type=float, default=None)
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--eval-cases", type=int, default=8)
    args = parser.parse_args(argv)
    cfg = tier(args.tier)
    cfg["cache"] = str(args.cache)
    from .latent import export, latents, train_autoencoder, train_diffusion
    from .data.dataset import build_datasets

    t0 = time.monotonic()
    build_datasets(cfg, args.cache, args.work / "data")
    print(f"[{time.monotonic() - t0:7.0f} s] data ready", flush=True)
    train_autoencoder.train(cfg, args.work, args.ae_minutes)
    print(f"[{time.monotonic() - t0:7.0f} s] autoencoder done", flush=True)
    latents.cache(cfg, args.work)
    print(f"[{time.monotonic() - t0:7.0f} s] latents cached", flush=True)
    train_diffusion.train(cfg, args.work, args.diffusion_minutes)
    print(f"[{time.monotonic() - t0:7.0f} s] U-Nets done", flush=True)
    name = args.name or args.out.name
    export.export(cfg, args.work, args.out, name)
    print(f"[{time.monotonic() - t0:7.0f} s] exported {args.out}", flush=True)
    if not args.skip_eval:
        from .evaluation import evaluate

        samples = evaluate.held_out_cases(cfg, args.cache, args.eval_cases)
        metrics = evaluate.run(args.out, samples, evaluate.generator_masks(cfg, args.cache), args.work / "evaluation")
        export.export(cfg, args.work, args.out, name, metrics)
        print(json.dumps({k: v for k, v in metrics.items() if k != "table_markdown"}, indent=1)[:2000])
        print(f"[{time.monotonic() - t0:7.0f} s] evaluated", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
