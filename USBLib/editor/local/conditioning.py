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

A bundle's ``local.base`` says how the heal's base is made (``BASES``): ``biharmonic`` (the default, above) or
``prior`` (``prior_fill``: the template's tissue classes with means fitted around the region, plus the biharmonic
fill of what they leave unexplained; it needs the tissue prior).

A bundle's ``local.inputs`` names the channels its network reads, in order (``network_input``): without the key,
the four above (``BASE_INPUTS``, the shipped ``usb-tiny``). Bundles may add the template's tissue prior
(``PRIOR_INPUTS``: template T1 in model units, CSF/GM/WM probabilities and, where the bundle's prior has it, deep
grey matter, registered into the box, see ``USBLib.editor.local.prior``) and leave out the raw ``image``: for heal
the image with its lesion voided (set to the base inside the fill region) is the classical-fill channel itself (the
base equals the image outside the region), and for embed the image is the base too, so a network without ``image``
sees no lesion intensities.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

HEAL, EMBED = 0, 1
DIRECTIONS = {"heal": HEAL, "embed": EMBED}
N_CHANNELS = 4
BASE_INPUTS = ("image", "mask", "region", "fill")  # the channels of ``condition``, in its order
DEEP_GREY_INPUT = "prior_deep_gm"  # the prior's fifth map (deep grey nuclei), in bundles whose prior has it
PRIOR_INPUTS = ("prior_t1", "prior_csf", "prior_gm", "prior_wm", DEEP_GREY_INPUT)  # ``TissuePrior.read``'s order
KNOWN_INPUTS = BASE_INPUTS + PRIOR_INPUTS
DEVIATION_SCALE = 2.0  # the diffusion runs on d * scale (deviations are mostly within +-0.6 model units)
BASES = ("biharmonic", "prior")  # how a heal's base is made (``classical_fill``, ``prior_fill``)
PRIOR_SHELL_VOX = (1.0, 8.0)  # prior_fill: the class means are fitted on tissue this many voxels outside the region
PRIOR_MIN_SHELL = 30          # fewer tissue voxels there: the biharmonic fill alone
PRIOR_RIDGE = 0.05            # pull of the shell's class means towards the whole box's


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


def fit_class_means(probabilities: np.ndarray, values: np.ndarray, anchor: np.ndarray, ridge: float) -> np.ndarray:
    """Class means mu [K] such that probabilities @ mu fits ``values`` in least squares, pulled towards ``anchor``
    [K] by a ridge of ``ridge`` x the mean diagonal of the Gram matrix (a class absent from the voxels keeps the
    anchor's mean).

    Args:
        probabilities: [N, K] class probabilities of N voxels.
        values: [N] their intensities.
        anchor: [K] the means to fall back on (e.g. a fit over a larger region).
        ridge: the pull towards ``anchor`` (0: plain least squares).
    """
    a, b = np.asarray(probabilities, np.float64), np.asarray(values, np.float64)
    gram = a.T @ a
    lam = ridge * max(float(np.trace(gram)) / len(gram), 1e-9)
    return np.linalg.solve(gram + lam * np.eye(len(gram)), a.T @ b + lam * np.asarray(anchor, np.float64))


def class_level_model(image: np.ndarray, classes: np.ndarray, tissue: np.ndarray, shell: np.ndarray,
                      ridge: float = PRIOR_RIDGE) -> np.ndarray:
    """The intensity the tissue classes predict, sum_k p_k mu_k [I, J, K] float32, with mu_k fitted in least squares
    on ``shell`` and pulled (``fit_class_means``) towards the fit over all of ``tissue``.

    Args:
        image: [I, J, K] intensities (any units; the means are fitted in them).
        classes: [K, I, J, K] class probabilities (e.g. CSF/GM/WM).
        tissue: [I, J, K] bool, the voxels of the fallback fit; shell: [I, J, K] bool, those of the local fit.
        ridge: the pull towards the fallback fit.
    """
    classes = np.asarray(classes, np.float64)
    anchor = np.linalg.lstsq(classes[:, tissue].T, np.asarray(image, np.float64)[tissue], rcond=None)[0]
    means = fit_class_means(classes[:, shell].T, np.asarray(image)[shell], anchor, ridge)
    return np.tensordot(means, classes, axes=1).astype(np.float32)


def prior_fill(image: np.ndarray, region: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Prior-guided fill of ``region``: inside it sum_k p_k mu_k + r, where p_k are the template's CSF/GM/WM
    probabilities registered into the box, mu_k class means fitted in least squares on the tissue 1-8 voxels
    outside the region (pulled towards the fit over the whole box, so that a class absent there keeps a sensible
    mean), and r the biharmonic fill of the residual image - sum_k p_k mu_k from outside the region (so the fill
    meets the scan at the region's edge). Outside the region: ``image`` itself. Falls back to ``classical_fill``
    where the box has too little tissue around the region.

    Args:
        image: the box [I, J, K] (model units).
        region: the fill region [I, J, K] (> 0 = filled).
        prior: the tissue prior [4 or 5, I, J, K] in ``PRIOR_INPUTS`` order (template T1, CSF, GM, WM; a fifth map,
            deep grey matter, is not used here).
    Returns:
        float32 [I, J, K].
    """
    from USBLib.imaging.prefill import prefill

    image = np.asarray(image, np.float32)
    region = np.asarray(region) > 0
    classes = np.asarray(prior, np.float64)[1:4]
    tissue = (classes.sum(0) > 0.5) & ~region
    dist = ndimage.distance_transform_edt(~region)
    shell = tissue & (dist > PRIOR_SHELL_VOX[0]) & (dist <= PRIOR_SHELL_VOX[1])
    if not region.any() or int(shell.sum()) < PRIOR_MIN_SHELL:
        return classical_fill(image, region)
    model = class_level_model(image, classes, tissue, shell)
    residual = prefill(image - model, region, "biharmonic")
    return np.where(region, model + residual, image).astype(np.float32)


def condition(image: np.ndarray, mask: np.ndarray, direction: int, dilation: int,
              fill: np.ndarray | None = None, region: np.ndarray | None = None, base: str = "biharmonic",
              prior: np.ndarray | None = None) -> np.ndarray:
    """Network condition channels [4, I, J, K] (image, mask, fill region, classical fill).

    ``fill`` may be passed when already computed (training caches it); for embed the fill is the image.
    ``region``: a heal's fill region when it is not ``fill_region(mask, direction, dilation)`` (e.g. grown into
    the lesion's rim only, ``USBLib.imaging.rim``). ``base``: how a heal's fill is made (``BASES``); ``prior``
    (the box's tissue prior [4 or 5, I, J, K]) is needed for ``prior``.
    """
    image = np.asarray(image, np.float32)
    region = fill_region(mask, direction, dilation) if region is None or direction == EMBED else np.asarray(region) > 0
    if base not in BASES:
        raise ValueError(f"unknown local base '{base}' (known: {', '.join(BASES)})")
    if direction == EMBED:
        fill = image
    elif fill is None and base == "prior":
        if prior is None:
            raise ValueError("the 'prior' base needs the tissue prior")
        fill = prior_fill(image, region, prior)
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


def needs_prior(names, base: str = "biharmonic") -> bool:
    """Whether any of the input ``names`` is a tissue-prior channel, or the ``base`` is made from the prior."""
    return any(n in PRIOR_INPUTS for n in names) or base == "prior"


def network_input(cond: np.ndarray, names, prior: np.ndarray | None = None) -> np.ndarray:
    """The network's condition channels [len(names), I, J, K] float32 from ``condition``'s four channels ``cond``
    [4, I, J, K] and, when ``names`` asks for them, the tissue prior [C, I, J, K] (the first C of ``PRIOR_INPUTS``:
    4 without deep grey matter, 5 with it).

    For ``BASE_INPUTS`` this is ``cond`` itself (the same array, so bundles without the key are unchanged)."""
    names = tuple(names)
    if names == BASE_INPUTS:
        return cond
    channels = dict(zip(BASE_INPUTS, cond))
    if needs_prior(names):
        if prior is None:
            raise ValueError("this local network reads the tissue prior, and none was given")
        channels.update(zip(PRIOR_INPUTS, np.asarray(prior, np.float32)))
        missing = [n for n in names if n not in channels]
        if missing:
            raise ValueError(f"this local network reads {', '.join(missing)}, which the tissue prior lacks")
    return np.stack([channels[n] for n in names]).astype(np.float32, copy=False)
