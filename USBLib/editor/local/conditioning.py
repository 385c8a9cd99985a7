"""Inputs of the local deviation network, built the same way in training and at inference.

Everything here works on one box in model intensity units (the scan's 99th brain percentile = 1) on an
(about) 1 mm grid. The network predicts a deviation ``d`` from the **base** image, the classical-fill channel:
``result = base + d`` (PathoSyn's pathology as an additive deviation on a stable anatomical estimate):

- heal (direction 0): ``image`` is the lesioned scan. The fill region is the drawn mask dilated by ``dilation``
  voxels (real masks miss the partial-volume rim); the base is the scan with that region filled biharmonically
  (FSL/biharmonic-style classical filling), so the network learns the correction of the classical fill (and the
  rim outside the region) rather than the whole fill: ``d`` = healthy - base.
- embed (direction 1): ``image`` is the healthy scan and the base; ``d`` = lesioned - healthy.

Channels of ``condition``, shape [4, I, J, K] float32: image, drawn mask, fill region, classical fill.

A bundle's ``local.inputs`` names the channels its network reads, in order (``network_input``): without the key,
the four above (``BASE_INPUTS``, the shipped ``usb-tiny``). Bundles may add the template's tissue prior
(``PRIOR_INPUTS``: template T1 in model units and CSF/GM/WM probabilities, registered into the box, see
``USBLib.editor.local.prior``) and leave out the raw ``image``: for heal the image with its lesion voided (set to
the base inside the fill region) is the classical-fill channel itself (the base equals the image outside the
region), and for embed the image is the base too, so a network without ``image`` sees no lesion intensities.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

HEAL, EMBED = 0, 1
DIRECTIONS = {"heal": HEAL, "embed": EMBED}
N_CHANNELS = 4
BASE_INPUTS = ("image", "mask", "region", "fill")  # the channels of ``condition``, in its order
PRIOR_INPUTS = ("prior_t1", "prior_csf", "prior_gm", "prior_wm")  # ``prior.TissuePrior.read``'s order
KNOWN_INPUTS = BASE_INPUTS + PRIOR_INPUTS
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


def input_names(local_config) -> tuple[str, ...]:
    """The channels a bundle's local network reads, in order: ``local.inputs``, or ``BASE_INPUTS`` without it.
    Raises ``ValueError`` for an unknown or repeated name or a list without the ``fill`` channel (the base)."""
    names = tuple(local_config.get("inputs", BASE_INPUTS))
    unknown = [n for n in names if n not in KNOWN_INPUTS]
    if unknown or len(set(names)) != len(names) or "fill" not in names:
        raise ValueError(f"local inputs {list(names)} must be distinct names from {list(KNOWN_INPUTS)} and "
                         "include 'fill'")
    return names


def needs_prior(names) -> bool:
    """Whether any of the input ``names`` is a tissue-prior channel."""
    return any(n in PRIOR_INPUTS for n in names)


def network_input(cond: np.ndarray, names, prior: np.ndarray | None = None) -> np.ndarray:
    """The network's condition channels [len(names), I, J, K] float32 from ``condition``'s four channels ``cond``
    [4, I, J, K] and, when ``names`` asks for them, the tissue prior [4, I, J, K] (``PRIOR_INPUTS`` order).

    For ``BASE_INPUTS`` this is ``cond`` itself (the same array, so bundles without the key are unchanged)."""
    names = tuple(names)
    if names == BASE_INPUTS:
        return cond
    channels = dict(zip(BASE_INPUTS, cond))
    if needs_prior(names):
        if prior is None:
            raise ValueError("this local network reads the tissue prior, and none was given")
        channels.update(zip(PRIOR_INPUTS, np.asarray(prior, np.float32)))
    return np.stack([channels[n] for n in names]).astype(np.float32, copy=False)
