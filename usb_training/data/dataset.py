"""The training/validation data set of a tier: prepared template sources -> synthetic samples on disk."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .prepare import Anatomy, prepare
from .sources import HELD_OUT, SOURCES
from .synth import build

TRAIN_SOURCES = tuple(name for name in SOURCES if name != HELD_OUT)


def prepared_sources(cfg: dict[str, Any], cache: Path) -> dict[str, Path]:
    """Fetch and prepare all template sources on the tier's grid (cached)."""
    return prepare(cache, cfg["grid"]["shape"], float(cfg["grid"]["spacing"]), seed=int(cfg["data"]["seed"]))


def build_datasets(cfg: dict[str, Any], cache: Path, out: Path, workers: int = 1) -> dict[str, Path]:
    """Write the train and validation sets (training sources only; ``HELD_OUT`` is kept for evaluation)."""
    prepared = prepared_sources(cfg, cache)
    anatomies = [Anatomy.load(prepared[name]) for name in TRAIN_SOURCES]
    d = cfg["data"]
    seed = int(d["seed"])
    val = build(anatomies, int(d["val"]), seed + 10_000, float(d["healthy_fraction"]), Path(out) / "val", "val set",
                workers=workers)
    train = build(anatomies, int(d["train"]), seed, float(d["healthy_fraction"]), Path(out) / "train", "train set",
                  workers=workers)
    return {"train": train, "val": val}
