"""``python -m usb_training.data {fetch,prepare,generate,preview}``: template sources, data set, montages."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..base.config import tier
from ..base.paths import DEFAULT_CACHE
from ..base.common import cli_main


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.data", description=__doc__)
    parser.add_argument("command", choices=["fetch", "prepare", "generate", "preview"])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where fetched sources are kept")
    parser.add_argument("--work", type=Path, default=Path("usb_training_runs/tiny"), help="run folder")
    parser.add_argument("--out", type=Path, default=None, help="preview: PNG path")
    parser.add_argument("--count", type=int, default=8, help="preview: samples to show")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = tier(args.tier)
    if args.command == "fetch":
        from .sources import fetch

        for name, files in fetch(args.cache).items():
            print(f"{name}: {files['t1'].parent}")
    elif args.command == "prepare":
        from .dataset import prepared_sources

        for name, path in prepared_sources(cfg, args.cache).items():
            print(f"{name}: {path}")
    elif args.command == "generate":
        from .dataset import build_datasets

        for name, path in build_datasets(cfg, args.cache, args.work / "data").items():
            print(f"{name}: {path}")
    else:
        from .preview import preview

        out = args.out or args.work / "data" / "preview.png"
        print(preview(cfg, args.cache, out, args.count, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
