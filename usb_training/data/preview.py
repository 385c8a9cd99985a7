"""PNG montage of generated samples (lesioned, healthy, mask, deviation) for a person to look at."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from USBLib.apps.montage import save_montage

from .dataset import TRAIN_SOURCES, prepared_sources
from .prepare import Anatomy
from .synth import make_sample


def preview(cfg: dict[str, Any], cache: Path, out: Path, count: int = 8, seed: int = 0) -> Path:
    """One row per sample, cycling the training sources, centred on the largest lesion."""
    prepared = prepared_sources(cfg, cache)
    anatomies = [Anatomy.load(prepared[name]) for name in TRAIN_SOURCES]
    rows = []
    for i in range(count):
        anatomy = anatomies[i % len(anatomies)]
        s = make_sample(anatomy, seed * 1000 + i)
        center = np.argwhere(s.mask).mean(0).astype(int) if s.mask.any() else np.array(s.mask.shape) // 2
        rows.append((f"{anatomy.name} seed {seed * 1000 + i} ({int(s.mask.sum())} lesion voxels)",
                     [s.image, s.healthy, s.mask.astype(np.float32) * 1.2, s.image - s.healthy],
                     ["lesioned", "healthy", "mask", "difference"], center))
    return save_montage(out, rows)
