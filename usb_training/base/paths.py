"""Where a training run keeps its files: one work folder per tier, a shared cache of fetched sources."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path(os.environ.get("USB_TRAINING_CACHE", Path.home() / ".cache" / "usb_training"))


@dataclass(frozen=True)
class RunPaths:
    """Folders of one run: ``work/{data,autoencoder,latents,diffusion,export,evaluation}``."""

    work: Path
    cache: Path = DEFAULT_CACHE

    def __post_init__(self) -> None:
        object.__setattr__(self, "work", Path(self.work))
        object.__setattr__(self, "cache", Path(self.cache))

    def sub(self, name: str) -> Path:
        path = self.work / name
        path.mkdir(parents=True, exist_ok=True)
        return path
