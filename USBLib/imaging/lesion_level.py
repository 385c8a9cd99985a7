"""How dark an embedded lesion is: its edit deepened or lightened to a lesion/surround ratio a person asks for.

The local network draws a lesion at the level its training lesions had (about 0.8 of the tissue around it on the
yardstick), fainter than a T1 black hole or a chronic infarct. ``level_scales`` gives, per voxel, the factor that
brings each connected lesion of the mask to the asked ``level``: the mean inside the mask over the mean of the
tissue 2-4 voxels around it (chessboard steps; the yardstick's lesion/surround ratio), with the edit's own darkening
of that ring counted. One factor per lesion keeps the network's shape, edge and heterogeneity; the scan's grain is
synthesized afterwards on the scaled edit (``realism``), so the grain is not scaled with it.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.mask_edges import ring

SURROUND_STEPS = (1, 4)  # the tissue a lesion's level is measured against: 2-4 voxels out (chessboard steps)
MAX_SCALE = 20.0  # at most this many times the network's darkening (a lesion it barely drew cannot be forced)
_STRUCT26 = ndimage.generate_binary_structure(3, 3)


def lesion_labels(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The connected lesions of ``mask`` (26-neighbourhood): (labels [I, J, K] int, 1..count; count)."""
    return ndimage.label(np.asarray(mask) > 0, _STRUCT26)


def surround(lesion: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """The tissue ring a lesion's level is measured against: the voxels ``SURROUND_STEPS`` (exclusive, inclusive)
    chessboard steps outside ``lesion`` [I, J, K] bool, inside ``within`` when given. bool [I, J, K]."""
    return ring(lesion, *SURROUND_STEPS, within)


def lesion_surround_ratio(image: np.ndarray, lesion: np.ndarray, within: np.ndarray | None = None) -> float:
    """The mean of ``image`` inside ``lesion`` over its mean on ``surround(lesion, within)`` (NaN without a
    surround)."""
    around = surround(np.asarray(lesion) > 0, within)
    if not around.any():
        return float("nan")
    return float(np.mean(image[np.asarray(lesion) > 0]) / max(float(np.mean(image[around])), 1e-12))


def level_scales(original: np.ndarray, effect: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                 level: float, spacing=(1.0, 1.0, 1.0)) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Per voxel, the factor by which an embed's weighted deviation ``effect`` is multiplied so that every connected
    lesion of ``mask`` (``lesion_labels``) reaches the lesion/surround ratio ``level``; each voxel takes the factor
    of the lesion nearest to it in mm (so an edit's feather follows its own lesion; two lesions within 4 voxels of
    each other share their rings, and each then lands within a few hundredths of ``level``).

    Args:
        original: the scan [I, J, K] in its own units (positive tissue values).
        effect: the weighted deviation [I, J, K] the embed adds (negative where it darkens), in the scan's units.
        mask: the lesion mask [I, J, K] (> 0 = lesion).
        brain: brain mask [I, J, K]; the surround is taken inside it.
        level: the asked ratio, 0 < level < 1.
        spacing: voxel size in mm per axis (which lesion is nearest).

    Returns (scales [I, J, K] float32, one record per lesion: its voxels, the network's ratio, the factor and the
    ratio reached). A lesion without a surround, or whose edit does not darken it, keeps factor 1; a factor is
    capped at ``MAX_SCALE``.
    """
    labels, count = lesion_labels(mask)
    scales = np.ones(labels.shape, np.float32)
    if count == 0:
        return scales, []
    nearest = ndimage.distance_transform_edt(labels == 0, sampling=spacing, return_distances=False,
                                             return_indices=True)
    owner = labels[tuple(nearest)]
    o, e, within = np.asarray(original, np.float64), np.asarray(effect, np.float64), np.asarray(brain) > 0
    records = []
    for index in range(1, count + 1):
        lesion = labels == index
        around = surround(lesion, within) & (labels == 0)
        factor = 1.0
        if around.any():
            a_m, a_s, d_m, d_s = o[lesion].mean(), o[around].mean(), e[lesion].mean(), e[around].mean()
            # (a_m + f d_m) / (a_s + f d_s) = level  <=>  f = (a_m - level a_s) / (level d_s - d_m)
            denominator = level * d_s - d_m
            if denominator > 0 and a_m - level * a_s > 0:
                factor = min((a_m - level * a_s) / denominator, MAX_SCALE)
            before = (a_m + d_m) / (a_s + d_s)
            reached = (a_m + factor * d_m) / (a_s + factor * d_s)
        else:
            before = reached = float("nan")
        scales[owner == index] = np.float32(factor)
        records.append({"voxels": int(lesion.sum()), "ratio_network": round(float(before), 3),
                        "scale": round(float(factor), 3), "ratio": round(float(reached), 3)})
    return scales, records
