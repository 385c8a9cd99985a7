"""Robust intensity normalisation into the model's range, and the way back to the scan's own units."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np


@dataclass(frozen=True)
class IntensityMap:
    """Linear map ``model = (native - low) / (high - low) * target``, clipped to ``clip`` in model units.

    Model intensity units: with the defaults (``percentile`` 99, ``target`` 1) the 99th brain percentile maps to 1.

    Args:
        low: native intensity (scan units) that maps to 0: 0, or the scan's minimum if that is negative.
        high: native intensity (scan units) that maps to ``target``: a high percentile inside the brain.
        target: model value of ``high``.
        clip: (min, max) range in model units that ``to_model`` clips to (the range seen in training).
    """

    low: float
    high: float
    target: float = 1.0
    clip: tuple[float, float] = (0.0, 1.5)

    @classmethod
    def fit(cls, data: np.ndarray, brain: np.ndarray | None, cfg: Mapping[str, Any]) -> "IntensityMap":
        """Landmarks from the scan: 0 (or the minimum, if negative) and a high percentile inside the brain.

        Args:
            data: the scan [I, J, K] in its own units, any real dtype.
            brain: brain mask [I, J, K] (> 0 = brain), or None (or empty): then every voxel above the scan's
                minimum is used.
            cfg: the bundle's ``intensity`` section: ``percentile`` (default 99), ``target`` (1.0) and ``clip``
                ((0.0, 1.5)). When the percentile is not above ``low``, the maximum (or ``low + 1``) is used.
        """
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
        """Scan units per model unit, ``(high - low) / target``."""
        return (self.high - self.low) / self.target

    def to_model(self, data: np.ndarray) -> np.ndarray:
        """Scan units -> model units, clipped to ``clip``; float32, same shape as ``data`` (any shape)."""
        out = (np.asarray(data, dtype=np.float32) - self.low) / self.units_per_model_unit
        return np.clip(out, *self.clip).astype(np.float32)

    def to_native(self, data: np.ndarray) -> np.ndarray:
        """Model units -> scan units (the inverse of ``to_model`` before its clip); float32, same shape as ``data``."""
        return (np.asarray(data, dtype=np.float32) * self.units_per_model_unit + self.low).astype(np.float32)

    def delta_to_native(self, delta: np.ndarray) -> np.ndarray:
        """A difference in model units expressed in the scan's units (no offset).

        Args:
            delta: a difference of model-unit volumes (e.g. edited - reference), any shape; returned as float32.
        """
        return (np.asarray(delta, dtype=np.float32) * self.units_per_model_unit).astype(np.float32)
