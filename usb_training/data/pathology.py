"""Pathology encoding: a lesion is an additive deviation from the healthy tissue image (PathoSyn's view).

T1 appearance: a hypointense core whose depth grows away from the border, a partial-volume rim from the soft
mask, and spatially smooth internal heterogeneity (not i.i.d. noise); strength randomised per sample.

The lesion's levels are set against the white matter, so in grey matter (darker than white matter) its border
level can lie above the tissue it replaces. A T1-hypointense lesion never makes tissue brighter (a lesion prolongs
T1 in grey matter as in white), so the deviation is clipped at zero: in grey matter only the part of the lesion
darker than the grey matter shows. (Before 2026-12-04 it was not: 5 of 33 tuning-yardstick lesions got a bright
halo or were brighter than their grey matter, two of them almost wholly, and those were the worst heals.)
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from .prepare import WM


def lesion_deviation(healthy: np.ndarray, soft: np.ndarray, binary: np.ndarray, labels: np.ndarray,
                     rng: np.random.Generator) -> np.ndarray:
    """The deviation d <= 0 with ``lesioned = healthy + d`` (non-zero only where ``soft`` > 0 and the lesion's
    level is below the healthy tissue's)."""
    wm = healthy[labels == WM]
    wm_level = float(np.median(wm)) if wm.size else float(np.percentile(healthy[healthy > 0], 90))
    core = rng.uniform(0.15, 0.7) * wm_level                  # black hole ... mildly hypointense
    rim = rng.uniform(core, 0.9 * wm_level)                   # level at the border
    depth = ndimage.distance_transform_edt(binary)
    depth = np.clip(depth / max(float(depth.max()), 1.0), 0, 1) ** rng.uniform(0.5, 1.5)
    target = rim + (core - rim) * depth
    texture = ndimage.gaussian_filter(rng.standard_normal(healthy.shape).astype(np.float32), rng.uniform(1.0, 2.5))
    texture /= texture.std() + 1e-6
    target = target + rng.uniform(0.0, 0.12) * wm_level * texture
    strength = rng.uniform(0.6, 1.0)
    return (strength * soft * np.minimum(target - healthy, 0.0)).astype(np.float32)
