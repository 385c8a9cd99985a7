"""Robust intensity normalisation into the model's range, and the way back to the scan's own units."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class IntensityMap:
    """Linear map ``model = (native - low) / (high - low) * target``, clipped to ``clip`` in model units."""

    low: float
    high: float
    target: float = 1.0
    clip: tuple[float, float] = (0.0, 1.5)

    @classmethod
    def fit(cls, data: np.ndarray, brain: np.ndarray | None, cfg: Mapping[str, Any]) -> "IntensityMap":
        """Landmarks from the scan: 0 (or the minimum, if negative) and a high percentile inside the brain."""
        values = np.asarray(data, dtype=np.float64)
        inside = values[brain > 0] if brain is not None and np.any(brain) else values[values > values.min()]
        if inside.size == 0:
            inside = values.ravel()
        low = min(0.0, float(values.min()))
        high = float(np.percentile(inside, float(cfg.get("percentile", 99.0))))
        if high <= low:
            high = float(inside.max()) if inside.max() > low else low + 1.0
        clip = tuple(float(c) for c in cfg.get("clip", (0.0, 1.5)))
        return cls(low=low, high=high, target=float(cfg.get("target", 1.0)), clip=clip)  # type: ignore[arg-type]

    @property
    def units_per_model_unit(self) -> float:
        return (self.high - self.low) / self.target

    def to_model(self, data: np.ndarray) -> np.ndarray:
        out = (np.asarray(data, dtype=np.float32) - self.low) / self.units_per_model_unit
        return np.clip(out, *self.clip).astype(np.float32)

    def to_native(self, data: np.ndarray) -> np.ndarray:
        return (np.asarray(data, dtype=np.float32) * self.units_per_model_unit + self.low).astype(np.float32)

    def delta_to_native(self, delta: np.ndarray) -> np.ndarray:
        """A difference in model units expressed in the scan's units (no offset)."""
        return (np.asarray(delta, dtype=np.float32) * self.units_per_model_unit).astype(np.float32)
