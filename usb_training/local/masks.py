"""The masks a user draws and the fill regions the engine makes from them, drawn at random for training.

Drawn masks (``draw_mask``): the lesion's 0.5 iso-surface exactly, a hasty one (eroded by one voxel, every
component kept), a tight one (eroded by two), a generous one (dilated by one or two voxels) or a slightly shifted
one. Fill regions (``draw_region_kind``): as the engine's heal makes them, either the fixed growth of the mask
(``conditioning.fill_region``, 0-3 voxels of 18-neighbourhood dilation) or the growth into the lesion-like rim
(``USBLib.imaging.rim.rim_region``, up to 2 or 3 mm), half each.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.editor.local.conditioning import HEAL, fill_region
from USBLib.imaging.mask_edges import eroded_keeping_components
from USBLib.imaging.rim import rim_region

MASK_KINDS = {"exact": 0.3, "hasty": 0.25, "tight": 0.05, "generous": 0.2, "generous2": 0.1, "shifted": 0.1}
RIM_FRACTION = 0.5                          # share of fill regions grown into the rim (the rest: fixed growth)
FIXED_DILATION_P = {0: 0.1, 1: 0.25, 2: 0.45, 3: 0.2}  # voxels (1 mm), the engine's dilation_mm
RIM_MAX_MM_P = {2.0: 0.7, 3.0: 0.3}


def draw_mask(binary: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """(the mask a user would draw for the lesion ``binary`` [I, J, K] bool, its kind in ``MASK_KINDS``)."""
    kind = str(rng.choice(list(MASK_KINDS), p=list(MASK_KINDS.values())))
    if kind == "hasty":
        out = eroded_keeping_components(binary, 1)
    elif kind == "tight":
        out = eroded_keeping_components(binary, 2)
    elif kind in ("generous", "generous2"):
        out = ndimage.binary_dilation(binary, iterations=1 if kind == "generous" else 2)
    elif kind == "shifted":
        out = np.roll(binary, int(rng.choice([-1, 1])), axis=int(rng.integers(3)))
    else:
        out = binary.copy()
    return (out if out.sum() >= 2 else binary.copy()), kind


def draw_region_kind(rng: np.random.Generator) -> tuple[str, float]:
    """A heal's fill-region kind: ``("rim", max_mm)`` (grown into the lesion-like rim, ``rim_region``) or
    ``("fixed", voxels)`` (the mask dilated, ``conditioning.fill_region``)."""
    if rng.random() < RIM_FRACTION:
        return "rim", float(rng.choice(list(RIM_MAX_MM_P), p=list(RIM_MAX_MM_P.values())))
    return "fixed", float(rng.choice(list(FIXED_DILATION_P), p=list(FIXED_DILATION_P.values())))


def rim_fill_region(lesioned: np.ndarray, drawn: np.ndarray, brain: np.ndarray, max_mm: float) -> np.ndarray:
    """The engine's ``growth`` ``rim`` region of a drawn mask on a 1 mm image (``USBLib.imaging.rim``). bool."""
    return rim_region(lesioned, drawn, brain, (1.0, 1.0, 1.0), max_mm)


def fixed_fill_region(drawn: np.ndarray, voxels: float) -> np.ndarray:
    """The engine's ``growth`` ``fixed`` region: the mask dilated ``voxels`` times (18-neighbourhood). bool."""
    return fill_region(drawn, HEAL, int(voxels))
