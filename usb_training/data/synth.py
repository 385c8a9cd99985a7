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

from USBLib.imaging.intensity import IntensityMap

from ..base.config import INTENSITY
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


SHARD = 250  # samples per shard: a data set grows shard by shard and a reader sees every finished shard


class ShardedVolumes:
    """Read-only view of the finished shards of one data set as one sequence of volumes [N, I, J, K].

    Indexing with an int returns one volume, with a slice a stacked array; ``shape`` and ``len`` count the
    samples of the shards that were complete when the view was made (``refresh`` picks up new ones)."""

    def __init__(self, folder: Path, name: str):
        self.folder, self.name = Path(folder), name
        self.refresh()

    def refresh(self) -> "ShardedVolumes":
        self.parts = [np.load(shard / f"{self.name}.npy", mmap_mode="r") for shard in finished_shards(self.folder)]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        inner = self.parts[0].shape[1:] if self.parts else ()
        return (int(self.starts[-1]), *inner)

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return np.stack([self[i] for i in range(*index.indices(len(self)))])
        index = int(index) + (len(self) if int(index) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - self.starts[part]]

    def __array__(self, dtype=None, copy=None):
        out = self[0:len(self)]
        return out.astype(dtype) if dtype is not None else out


def finished_shards(folder: Path) -> list[Path]:
    """The shard folders of a data set whose ``complete`` marker exists, in order."""
    return sorted(p.parent for p in Path(folder).glob("shard_*/complete"))


def _write_shard(anatomies: Sequence[Anatomy], k: int, size: int, shard: int, seed: int, healthy_fraction: float,
                 out: Path, bar=None) -> None:
    """Write shard ``k`` (``size`` samples) of a data set; its ``complete`` marker is written last."""
    shape = anatomies[0].image.shape
    folder = out / f"shard_{k:03d}"
    folder.mkdir(exist_ok=True)
    (folder / "complete").unlink(missing_ok=True)
    images = np.lib.format.open_memmap(folder / "images.npy", "w+", np.float16, (size, *shape))
    masks = np.lib.format.open_memmap(folder / "masks.npy", "w+", np.uint8, (size, *shape))
    rng = np.random.default_rng([seed, k])
    for i in range(size):
        sample = make_sample(anatomies[(k * shard + i) % len(anatomies)], int(rng.integers(2**31)),
                             lesion=rng.random() >= healthy_fraction)
        images[i], masks[i] = sample.image.astype(np.float16), sample.mask
        if bar is not None:
            bar.update(1)
    images.flush()
    masks.flush()
    del images, masks
    (folder / "complete").write_text(f"{size} {seed} {healthy_fraction} {k}")


_WORKER_ANATOMIES: Sequence[Anatomy] = ()


def _init_worker(anatomies: Sequence[Anatomy]) -> None:
    """A data-building process: the templates once (inherited, not pickled per job), one thread each."""
    global _WORKER_ANATOMIES
    import torch

    torch.set_num_threads(1)
    _WORKER_ANATOMIES = anatomies


def _write_shard_job(job: tuple) -> int:
    _write_shard(_WORKER_ANATOMIES, *job)
    return job[0]


def build(anatomies: Sequence[Anatomy], count: int, seed: int, healthy_fraction: float, out: Path,
          desc: str = "samples", shard: int = SHARD, workers: int = 1) -> Path:
    """Write ``count`` samples as ``out``/shard_NNN/{images,masks}.npy (float16 / uint8), cycling the sources.

    Shards are deterministic in ``(seed, shard index)`` and each gets a ``complete`` marker when written, so an
    interrupted build resumes at the unfinished shards, a larger ``count`` adds shards to an existing set, and
    trainers can start on the first shards while later ones are being written. ``workers`` > 1 writes shards in
    parallel processes (a GPU machine's many cores)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for k in range(-(-count // shard)):
        size = min(shard, count - k * shard)
        marker = out / f"shard_{k:03d}" / "complete"
        if not (marker.is_file() and marker.read_text().strip() == f"{size} {seed} {healthy_fraction} {k}"):
            todo.append((k, size))
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        jobs = [(k, size, shard, seed, healthy_fraction, out) for k, size in todo]
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs)), _init_worker, (anatomies,)) as pool:
            for _ in tqdm(pool.imap_unordered(_write_shard_job, jobs), total=len(jobs), desc=desc, leave=False):
                pass
        return out
    with tqdm(total=sum(size for _, size in todo), desc=desc, leave=False) as bar:
        for k, size in todo:
            _write_shard(anatomies, k, size, shard, seed, healthy_fraction, out, bar)
    return out


def load(folder: Path) -> tuple[ShardedVolumes, ShardedVolumes]:
    """(images [N, I, J, K] float16, masks [N, I, J, K] uint8) over the finished shards, memory-mapped."""
    images, masks = ShardedVolumes(folder, "images"), ShardedVolumes(folder, "masks")
    if not len(images):
        raise FileNotFoundError(f"{folder} holds no finished data shard; run `python -m usb_training.data generate`")
    return images, masks
