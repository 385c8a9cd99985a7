"""Training and evaluation samples: healthy brain -> (optional) lesions -> scanner artefacts -> normalisation.

Every sample is deterministic in ``(source, seed)``. A sample holds the lesioned image, the same brain without
the lesion (ground truth for healing), the binary lesion mask and the brain mask, all on the model grid in model
intensity units (normalised exactly like inference normalises a scan: fitted on the lesioned image).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from USBLib.intensity import IntensityMap

from ..config import INTENSITY
from .anatomy import artefacts, healthy
from .lesions import random_lesions
from .pathology import lesion_deviation
from .prepare import Anatomy


@dataclass
class Sample:
    image: np.ndarray      # lesioned (or healthy) T1, model units
    healthy: np.ndarray    # the same brain without lesion, same artefacts and normalisation
    mask: np.ndarray       # uint8 {0, 1}, empty for healthy samples
    brain: np.ndarray      # uint8 {0, 1}


def make_sample(anatomy: Anatomy, seed: int, lesion: bool = True) -> Sample:
    """One sample from one template, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    h = healthy(anatomy, rng)
    if lesion:
        soft, binary = random_lesions(h.labels, rng)
        lesioned = np.clip(h.image + lesion_deviation(h.image, soft, binary, h.labels, rng), 0, None)
    else:
        binary = np.zeros(h.image.shape, np.uint8)
        lesioned = h.image
    art_seed = int(rng.integers(2**31))
    lesioned, clean = artefacts([lesioned, h.image], h.brain, art_seed)
    imap = IntensityMap.fit(lesioned, h.brain, INTENSITY)
    brain = h.brain.astype(np.uint8)
    return Sample(imap.to_model(lesioned) * brain, imap.to_model(clean) * brain, binary.astype(np.uint8), brain)


def build(anatomies: Sequence[Anatomy], count: int, seed: int, healthy_fraction: float, out: Path,
          desc: str = "samples") -> Path:
    """Write ``count`` samples as ``out``/{images,masks}.npy (float16 / uint8 memmaps), cycling the sources."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = anatomies[0].image.shape
    done = out / "complete"
    if done.is_file() and done.read_text().strip() == f"{count} {seed} {healthy_fraction}":
        return out
    images = np.lib.format.open_memmap(out / "images.npy", "w+", np.float16, (count, *shape))
    masks = np.lib.format.open_memmap(out / "masks.npy", "w+", np.uint8, (count, *shape))
    rng = np.random.default_rng(seed)
    for i in tqdm(range(count), desc=desc, leave=False):
        s = make_sample(anatomies[i % len(anatomies)], int(rng.integers(2**31)), lesion=rng.random() >= healthy_fraction)
        images[i], masks[i] = s.image.astype(np.float16), s.mask
    images.flush()
    masks.flush()
    del images, masks
    done.write_text(f"{count} {seed} {healthy_fraction}")
    return out


def load(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images [N, I, J, K] float16, masks [N, I, J, K] uint8), memory-mapped."""
    folder = Path(folder)
    return np.load(folder / "images.npy", mmap_mode="r"), np.load(folder / "masks.npy", mmap_mode="r")
