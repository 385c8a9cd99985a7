"""Scores of native-space edits, judged as a user would: inside the drawn lesion, in the ring just outside it,
texture, tissue class, and for embedding the lesion's visibility and location.

All intensity scores use the truth's 99th brain percentile as range 1 (so PSNR in dB is comparable with
model-space numbers). Regions: ``lesion`` = the drawn mask; ``ring`` = 1-3 voxels outside it (26-neighbourhood).
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.lesion_level import lesion_surround_ratio
from USBLib.imaging.mask_edges import ring

from . import metrics

COLLATERAL_REACH = 6  # voxels outside the lesion's changes where ``yardstick_scores`` looks for collateral change


def _box(mask: np.ndarray, pad: int = 8) -> tuple[slice, ...]:
    found = ndimage.find_objects((mask > 0).astype(np.uint8))[0]
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(found, mask.shape))


def local_std(x: np.ndarray, sigma: float = 1.5) -> np.ndarray:
    """High-pass local standard deviation: x minus its Gaussian (sigma 1 voxel), then the Gaussian-weighted RMS."""
    x = np.asarray(x, np.float64)
    hp = x - ndimage.gaussian_filter(x, 1.0)
    return np.sqrt(ndimage.gaussian_filter(hp * hp, sigma))


def texture_ratio(x: np.ndarray, lesion: np.ndarray, around: np.ndarray) -> float:
    """Mean high-pass local std inside ``lesion`` over that of ``around`` (1 = same texture; << 1 = a smooth blob).
    Computed on the bounding box of ``lesion | around`` plus 6 voxels."""
    box = _box(lesion | around, pad=6)
    s = local_std(x[box])
    return float(s[lesion[box]].mean() / max(s[around[box]].mean(), 1e-9))


def gmm_classes(values: np.ndarray, k: int = 3, iters: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1D Gaussian mixture (EM) of brain intensities: (means, sds, weights), sorted by mean (CSF < GM < WM)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size > 200_000:  # a fixed subsample: the fit is the same, 10x faster on a whole brain
        v = v[np.random.default_rng(0).choice(v.size, 200_000, replace=False)]
    mu = np.percentile(v, [15, 50, 85])
    sd = np.full(k, v.std() / k)
    w = np.full(k, 1.0 / k)
    for _ in range(iters):
        p = w * np.exp(-0.5 * ((v[:, None] - mu) / sd) ** 2) / sd
        r = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
        n = r.sum(0) + 1e-9
        mu = (r * v[:, None]).sum(0) / n
        sd = np.sqrt((r * (v[:, None] - mu) ** 2).sum(0) / n) + 1e-6
        w = n / n.sum()
    order = np.argsort(mu)
    return mu[order], sd[order], w[order]


def classify(x: np.ndarray, gmm: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """Most probable class of each value under a fitted ``gmm_classes`` mixture."""
    mu, sd, w = gmm
    x = np.asarray(x, np.float64)[..., None]
    return np.argmax(np.log(w) - np.log(sd) - 0.5 * ((x - mu) / sd) ** 2, axis=-1)


def heal_scores(out: np.ndarray, truth: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                gmm=None) -> dict[str, float]:
    """Scores of a healed scan ``out`` against the lesion-free ``truth`` (scan units)."""
    lesion = mask > 0
    rng_ = ring(mask, 0, 3, brain)
    around = ring(mask, 3, 8, brain)
    scale = float(np.percentile(truth[brain > 0], 99))
    o, t = np.asarray(out, np.float64) / scale, np.asarray(truth, np.float64) / scale
    box = _box(mask)
    smap = metrics.ssim_map(o[box], t[box])
    lo, hi = np.percentile(truth[(brain > 0) & ~lesion], [0.5, 99.5])
    ob, tb = (np.clip((np.asarray(a, np.float64) - lo) / (hi - lo), 0, 1) for a in (out, truth))
    gmm = gmm or gmm_classes(truth[brain > 0])
    return {
        "psnr_lesion": metrics.psnr(o, t, lesion),
        "psnr_lesion_brats": metrics.psnr(ob, tb, lesion),
        "ssim_lesion": float(smap[lesion[box]].mean()),
        "psnr_ring": metrics.psnr(o, t, rng_),
        "psnr_lesion_ring": metrics.psnr(o, t, lesion | rng_),
        "mean_ratio": float(o[lesion].mean() / max(t[lesion].mean(), 1e-9)),
        "texture_ratio": texture_ratio(o, lesion, around),
        "texture_ratio_truth": texture_ratio(t, lesion, around),
        "tissue_agreement": float((classify(out[lesion], gmm) == classify(truth[lesion], gmm)).mean()),
    }


def half_depth_dice(change: np.ndarray, mask: np.ndarray) -> float:
    """Dice of a lesion's extent at half its depth with ``mask``: the voxels whose ``change`` [I, J, K] (darkening,
    any units) is at least half the lesion's 90th percentile inside the mask, as a rater draws a lesion's border
    where its partial-volume edge is half way. Unlike a fixed threshold it does not count a dark lesion's
    partial-volume edge (a few % of the range one voxel past its border) as spill."""
    lesion = np.asarray(mask) > 0
    depth = float(np.percentile(change[lesion], 90)) if lesion.any() else 0.0
    return metrics.dice(change >= 0.5 * depth, lesion) if depth > 0 else 0.0


def edge_profile(change: np.ndarray, mask: np.ndarray, brain: np.ndarray) -> list[float]:
    """A lesion's darkening across its border: the mean ``change`` on the mask's outermost voxel layer and on the
    first and second layer outside it (Euclidean distance 1 and 2 voxels, within ``brain``), each divided by the
    mean over the mask's interior (2+ voxels deep; the maximum for a mask without one). 3 floats."""
    lesion = np.asarray(mask) > 0
    signed = ndimage.distance_transform_edt(~lesion) - ndimage.distance_transform_edt(lesion)
    deep = signed <= -2
    core = float(change[deep].mean()) if deep.any() else float(change[lesion].max())
    out = []
    for d in (-1, 1, 2):
        shell = (np.abs(signed - d) < 0.5) & ((np.asarray(brain) > 0) | lesion)
        out.append(float(change[shell].mean() / core) if shell.any() and core > 0 else 0.0)
    return out


def embed_scores(out: np.ndarray, healthy: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                 reference: np.ndarray) -> dict[str, float]:
    """Scores of an embedding ``out`` of ``mask`` into ``healthy``; ``reference`` is the generator's lesioned scan.
    ``dice_change``: the change above 5 % of the range against the mask (a dark lesion's partial-volume edge one
    voxel past the mask counts as outside); ``dice_half_depth``: its extent at half its depth (``half_depth_dice``);
    ``edge_*``: ``edge_profile`` (the darkening on the mask's edge and 1-2 voxels past it, over its core's)."""
    lesion = mask > 0
    far = ring(mask, 3, 8, brain)
    scale = float(np.percentile(healthy[brain > 0], 99))
    o, h = np.asarray(out, np.float64), np.asarray(healthy, np.float64)
    change = (h - o) / scale
    change_reference = (h - np.asarray(reference, np.float64)) / scale
    profile, profile_reference = edge_profile(change, mask, brain), edge_profile(change_reference, mask, brain)
    return {
        "lesion_surround_ratio": lesion_surround_ratio(o, lesion, brain),
        "reference_ratio": lesion_surround_ratio(np.asarray(reference, np.float64), lesion, brain),
        "dice_change": metrics.dice(np.abs(change) > 0.05, lesion),
        # the same Dice for the reference lesion (its darkening reaches past the drawn mask too): the yardstick's
        # own ceiling for dice_change
        "dice_reference": metrics.dice(np.abs(change_reference) > 0.05, lesion),
        "dice_half_depth": half_depth_dice(change, mask),
        "dice_half_depth_reference": half_depth_dice(change_reference, mask),
        "edge_inside": profile[0], "edge_1": profile[1], "edge_2": profile[2],
        "edge_inside_reference": profile_reference[0], "edge_1_reference": profile_reference[1],
        "edge_2_reference": profile_reference[2],
        "cv_lesion": float(o[lesion].std() / max(o[lesion].mean(), 1e-9)),
        "cv_reference": float(reference[lesion].std() / max(reference[lesion].mean(), 1e-9)),
        "mean_abs_change_ring_3_8": float(np.abs(change[far]).mean()),
        "changed_voxels": int((o != h).sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# The heal yardstick (``usb_training.evaluation.native``): scored where the lesion is
# ----------------------------------------------------------------------------------------------------------------

CHANGE_TOL = 0.01  # of the truth's 99th brain percentile: a voxel the lesion changed by less is "unchanged"


def changed_region(lesioned: np.ndarray, truth: np.ndarray, brain: np.ndarray, mask: np.ndarray | None = None,
                   tol: float = CHANGE_TOL) -> np.ndarray:
    """Every brain voxel the lesion changed: |lesioned - truth| > ``tol`` x the truth's 99th brain percentile
    (mask and partial-volume rim), plus the exact ``mask`` when given. bool."""
    brain = np.asarray(brain) > 0
    scale = float(np.percentile(truth[brain], 99))
    out = (np.abs(np.asarray(lesioned, np.float64) - truth) > tol * scale) & brain
    return out | (np.asarray(mask) > 0) if mask is not None else out


def yardstick_scores(out: np.ndarray, truth: np.ndarray, changed: np.ndarray, drawn: np.ndarray,
                     brain: np.ndarray, scale: float | None = None) -> dict[str, float]:
    """Scores of a healed scan ``out`` against the lesion-free ``truth`` where the lesion is.

    - ``psnr``: PSNR over ``changed`` (every voxel the lesion changed, ``changed_region``), range 1 = the truth's
      99th brain percentile; ``psnr_mask``: over the ``drawn`` mask only (the older, secondary score);
    - ``mean_ratio``: the fill's mean / the truth's mean over ``changed``;
    - ``texture``: high-pass local SD inside ``changed`` against the ring 3-8 voxels around it (``texture_ratio``),
      of ``out`` divided by that of the truth (1 = the truth's texture; << 1 a smooth blob); ``texture_truth``:
      the truth's own ratio;
    - ``collateral``: what the heal did to healthy tissue around the lesion, which PSNR over ``changed`` cannot see:
      the mean |out - truth| over the brain voxels 1-``COLLATERAL_REACH`` voxels outside ``changed`` (the lesion left
      them as they were), in % of the range (0 = untouched; a fill painted over a ventricle beside the lesion shows
      here).

    ``scale``: the truth's 99th brain percentile when the arrays are a crop (``scoring_box``) of the scan."""
    changed = np.asarray(changed) > 0
    brain = np.asarray(brain) > 0
    scale = float(np.percentile(truth[brain], 99)) if scale is None else float(scale)
    o, t = np.asarray(out, np.float64) / scale, np.asarray(truth, np.float64) / scale
    around = ring(changed, 3, 8, brain)
    t_truth = texture_ratio(t, changed, around)
    return {"psnr": metrics.psnr(o, t, changed),
            "psnr_mask": metrics.psnr(o, t, np.asarray(drawn) > 0),
            "mean_ratio": float(o[changed].mean() / max(t[changed].mean(), 1e-9)),
            "texture": texture_ratio(o, changed, around) / max(t_truth, 1e-9),
            "texture_truth": t_truth,
            "collateral": float(100 * np.abs(o - t)[ring(changed, 0, COLLATERAL_REACH, brain)].mean())}


def scoring_box(changed: np.ndarray, pad: int = 16) -> tuple[slice, ...]:
    """Bounding box of ``changed`` plus ``pad`` voxels (the ring 3-8 and the texture filter fit inside): the
    yardstick scores of a crop equal those of the whole scan."""
    found = ndimage.find_objects((np.asarray(changed) > 0).astype(np.uint8))[0]
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(found, changed.shape))
