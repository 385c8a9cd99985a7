"""Choose a bundle's default heal settings by measurement on validation cases from the *training* sources
(never the held-out evaluation source): a grid over strength, fusion mode, lesion pre-fill and LCG eta,
scored by inside-lesion PSNR against the lesion-free truth.

    python -m usb_training.latent.tune --model BUNDLE --tier tiny [--cases 4] --out tuned.json
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from USBLib.core import bundle as bundle_mod
from USBLib.editor.editor import Editor

from ..base import metrics
from ..data.dataset import TRAIN_SOURCES, prepared_sources
from ..data.prepare import Anatomy
from ..data.synth import Sample, make_sample
from ..base.common import cli_main

TUNE_SEED = 800_000
GRID = {"strength": [0.2, 0.3, 0.5], "fusion": ["deviation", "replace"], "prefill": ["none", "harmonic", "biharmonic"],
        "eta": [0.0, 1.0]}


def validation_cases(cfg: dict[str, Any], cache: Path, count: int) -> list[Sample]:
    """Lesioned/healthy pairs from the training sources with seeds no training sample uses."""
    prepared = prepared_sources(cfg, cache)
    anatomies = [Anatomy.load(prepared[name]) for name in TRAIN_SOURCES]
    return [make_sample(anatomies[i % len(anatomies)], TUNE_SEED + i) for i in range(count)]


def tune_heal(editor: Editor, cases: list[Sample], grid: dict[str, list] = GRID) -> list[dict[str, Any]]:
    """Mean inside-lesion PSNR of every grid point, best first."""
    base = editor.bundle.config["defaults"]["heal"]
    rows = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        settings = dict(zip(keys, values))
        editor.bundle.config["defaults"]["heal"] = {**base, **settings}
        scores = [metrics.psnr(editor.heal(c.image, editor.bundle.grid_affine, c.mask, c.brain, seed=i).image,
                               c.healthy, c.mask) for i, c in enumerate(cases)]
        rows.append({**settings, "lesion_psnr": float(np.mean(scores))})
    editor.bundle.config["defaults"]["heal"] = base
    return sorted(rows, key=lambda r: -r["lesion_psnr"])


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ..base.config import tier
    from ..base.paths import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--out", type=Path, required=True, help="JSON with the grid results and the best settings")
    args = parser.parse_args(argv)
    editor = Editor(bundle_mod.load(args.model), device="auto", registration="none")
    rows = tune_heal(editor, validation_cases(tier(args.tier), args.cache, args.cases))
    for row in rows:
        print(row)
    args.out.write_text(json.dumps({"grid": rows, "best": rows[0]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
