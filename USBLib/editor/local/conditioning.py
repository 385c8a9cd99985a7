"""Inputs of the local deviation network, built the same way in training and at inference.

Everything here works on one box in model intensity units (the scan's 99th brain percentile = 1) on an
(about) 1 mm grid. The network predicts a deviation ``d`` from the **base** image, the classical-fill channel:
``result = base + d`` (PathoSyn's pathology as an additive deviation on a stable anatomical estimate):

- heal (direction 0): ``image`` is the lesioned scan. The fill region is the drawn mask dilated by ``dilation``
  voxels (real masks miss the partial-volume rim); the base is the scan with that region filled biharmonically
  (FSL/biharmonic-style classical filling), so the network learns the correction of the classical fill (and the
  rim outside the region) rather than the whole fill: ``d`` = healthy - base.
- embed (direction 1): ``image`` is the healthy scan and the base; ``d`` = lesioned - healthy.

Channels, shape [4, I, J, K] float32: image, drawn mask, fill region, classical fill.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

HEAL, EMBED = 0, 1
DIRECTIONS = {"heal": HEAL, "embed": EMBED}
N_CHANNELS = 4
DEVIATION_SCALE = 2.0  # the diffusion runs on d * scale (deviations are mostly within +-0.6 model units)


def fill_region(mask: np.ndarray, direction: int, dilation: int) -> np.ndarray:
    """Voxels the edit is meant to rewrite: heal, the mask dilated ``dilation`` times with the 18-neighbourhood
    (reach ``dilation`` voxels along the axes, up to ``dilation`` x sqrt 2 along face diagonals); embed, the mask
    itself. bool, same shape as ``mask``. Training and inference use this same definition."""
    mask = np.asarray(mask) > 0
    if direction == HEAL and dilation > 0:
        return ndimage.binary_dilation(mask, ndimage.generate_binary_structure(3, 2), iterations=int(dilation))
    return mask


def classical_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Biharmonic fill of ``region`` from its surroundings (see ``USBLib.imaging.prefill``); float32 like ``image``."""
    from USBLib.imaging.prefill import prefill

    return prefill(image, region, "biharmonic")


def condition(image: np.ndarray, mask: np.ndarray, direction: int, dilation: int,
              fill: np.ndarray | None = None, region: np.ndarray | None = None) -> np.ndarray:
    """Network condition channels [4, I, J, K] (image, mask, fill region, classical fill).

    ``fill`` may be passed when already computed (training caches it); for embed the fill is the image.
    ``region``: a heal's fill region when it is not ``fill_region(mask, direction, dilation)`` (e.g. grown into
    the lesion's rim only, ``USBLib.imaging.rim``).
    """
    image = np.asarray(image, np.float32)
    region = fill_region(mask, direction, dilation) if region is None or direction == EMBED else np.asarray(region) > 0
    if direction == EMBED:
        fill = image
    elif fill is None:
        fill = classical_fill(image, region)
    return np.stack([image, (np.asarray(mask) > 0).astype(np.float32), region.astype(np.float32),
                     np.asarray(fill, np.float32)])


def fusion_core(mask: np.ndarray, spacing, dilation_mm: float) -> np.ndarray:
    """The region a heal rewrites fully on the scan's grid: on a ~1 mm scan the local stage's own fill region
    (``dilation_mm`` 18-neighbourhood steps: up to sqrt 2 x the dilation along face diagonals), else the mask
    grown by ``dilation_mm`` (Euclidean)."""
    from USBLib.imaging.fusion import dilate_mm
    from USBLib.imaging.boxes import needs_resampling

    spacing = np.asarray(spacing, float)
    if dilation_mm <= 0:
        return np.asarray(mask) > 0
    if not needs_resampling(spacing):
        return fill_region(mask, HEAL, int(round(dilation_mm / float(np.mean(spacing)))))
    return dilate_mm(mask, spacing, dilation_mm)


def lesion_prior(region: np.ndarray, sigma_vox: float = 1.0) -> np.ndarray:
    """LCG's lesion prior x_lesion at native resolution (the paper's smoothed mask, eq. 14): 1 on every voxel of
    the fill region, falling off smoothly over about ``sigma_vox`` voxels outside it. float32 in [0, 1]."""
    region = np.asarray(region) > 0
    soft = ndimage.gaussian_filter(region.astype(np.float32), sigma_vox) if sigma_vox > 0 else region.astype(np.float32)
    return np.clip(np.maximum(soft * 2.0, region), 0.0, 1.0).astype(np.float32)
