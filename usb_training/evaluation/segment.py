"""Downstream segmentation check of heal (issue #25 item 4): does a filled scan segment like the lesion-free truth?

Every scan (the truth, the lesioned scan, each classical fill, each USB output) is segmented alike into CSF / GM /
WM inside the scan's brain mask and compared with the truth's segmentation: label agreement in the drawn (exact)
mask and in the ring 1-3 voxels outside it (26-neighbourhood), and the volume error |dGM| + |dWM| in ml within 10 mm
of the mask and over the whole segmented box.

The segmented box is the lesion's bounding box plus ``MARGIN_MM`` (30 mm) on each side, inside the brain: a whole 1 mm
brain takes Atropos ~30 s on one core and a case needs ~20 segmentations. Outside the box every output equals the
input, so the "whole brain" volume error is taken over the box (``seg_dvol_box_ml``); the small global drift of a
whole-brain segmentation's class parameters is not measured.

Segmenter: ANTs Atropos (``antspyx``, the ``evaluation`` extra: ``pip install .[evaluation]``): 3 classes,
k-means initialisation, MRF smoothing 0.1 (1x1x1 neighbourhood), 3 iterations, a constant seed (``-r 0``), one
thread. Without antspyx a deterministic stand-in runs instead (numpy/scipy only, not Atropos: 1D k-means from the
15/50/85th percentiles, then per-voxel Gaussian class likelihoods smoothed with a Gaussian of sigma 1 voxel, no
MRF) and the results say so (``segmenter``). Segmentations are cached on disk by content (sha1 of the image,
brain mask and segmenter), so the truth's and the classical fills' are computed once across runs.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from scipy import ndimage

STRUCT = ndimage.generate_binary_structure(3, 3)
CSF, GM, WM = 1, 2, 3
MARGIN_MM = 30.0


def _one_thread() -> None:
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")  # before ants is first imported


def segmenter() -> str:
    """``atropos`` when antspyx can be imported, else ``kmeans-fallback``."""
    _one_thread()
    try:
        import ants  # noqa: F401
    except Exception:  # noqa: BLE001  (missing or broken binary wheel)
        return "kmeans-fallback"
    return "atropos"


def _atropos(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    _one_thread()
    import ants

    img = ants.from_numpy(np.ascontiguousarray(image, np.float32))
    msk = ants.from_numpy(np.ascontiguousarray(brain, np.float32))
    seg = ants.atropos(a=img, x=msk, i="kmeans[3]", m="[0.1,1x1x1]", c="[3,0]", v=0, r=0)["segmentation"]
    return np.asarray(seg.numpy(), np.uint8)


def _kmeans_fallback(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    v = image[brain].astype(np.float64)
    mu = np.percentile(v, [15, 50, 85])
    for _ in range(30):
        lab = np.argmin(np.abs(v[:, None] - mu), axis=1)
        mu = np.array([v[lab == k].mean() if (lab == k).any() else mu[k] for k in range(3)])
    sd = np.array([max(v[lab == k].std(), 1e-6) if (lab == k).any() else v.std() for k in range(3)])
    x = image.astype(np.float64)
    like = [ndimage.gaussian_filter(np.exp(-0.5 * ((x - m) / s) ** 2) / s * brain, 1.0) for m, s in zip(mu, sd)]
    return ((np.argmax(np.stack(like), axis=0) + 1) * brain).astype(np.uint8)


def _by_intensity(seg: np.ndarray, image: np.ndarray) -> np.ndarray:
    """Relabel so that 1 < 2 < 3 in mean intensity (T1: CSF, GM, WM)."""
    means = [image[seg == k].mean() if (seg == k).any() else np.inf for k in (1, 2, 3)]
    lut = np.zeros(4, np.uint8)
    lut[1 + np.argsort(means)] = (1, 2, 3)
    return lut[seg]


def segment_box(mask: np.ndarray, spacing, margin_mm: float = MARGIN_MM) -> tuple[slice, ...]:
    """The lesion's bounding box plus ``margin_mm`` per side, within the volume."""
    found = ndimage.find_objects((np.asarray(mask) > 0).astype(np.uint8))[0]
    pad = np.ceil(margin_mm / np.asarray(spacing, float)).astype(int)
    return tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(found, pad, mask.shape))


def segment(image: np.ndarray, brain: np.ndarray, cache: Path | None = None) -> np.ndarray:
    """CSF/GM/WM labels (1/2/3, 0 outside ``brain``) of ``image`` (the whole array given: pass a box); cached
    under ``cache``."""
    brain = np.asarray(brain) > 0
    kind = segmenter()
    image = np.asarray(image, np.float32)
    key = hashlib.sha1(image.tobytes() + np.packbits(brain).tobytes() + kind.encode()
                       + str(image.shape).encode()).hexdigest()
    path = Path(cache) / f"{key}.npz" if cache is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return z["seg"]
    box = tuple(slice(max(s.start - 2, 0), s.stop + 2) for s in ndimage.find_objects(brain.astype(np.uint8))[0])
    run = _atropos if kind == "atropos" else _kmeans_fallback
    seg = np.zeros(image.shape, np.uint8)
    seg[box] = _by_intensity(run(image[box], brain[box]) * brain[box], image[box])
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, seg=seg)
    return seg


def seg_scores(seg: np.ndarray, truth_seg: np.ndarray, mask: np.ndarray, spacing) -> dict[str, float]:
    """Agreement of ``seg`` with ``truth_seg`` in the mask and the ring 1-3 voxels outside it, and |dGM| + |dWM|
    (ml) over the whole array (the segmented box) and within 10 mm of the mask."""
    mask = np.asarray(mask) > 0
    spacing = np.asarray(spacing, float)
    ring = ndimage.binary_dilation(mask, STRUCT, iterations=3) & ~mask & (truth_seg > 0)
    near = ndimage.distance_transform_edt(~mask, sampling=spacing) <= 10.0
    ml = float(np.prod(spacing)) / 1000.0

    def dvol(region: np.ndarray | None) -> float:
        a, b = (seg, truth_seg) if region is None else (seg[region], truth_seg[region])
        return float(sum(abs(int((a == k).sum()) - int((b == k).sum())) for k in (GM, WM)) * ml)

    return {"seg_agree_mask": float((seg[mask] == truth_seg[mask]).mean()),
            "seg_agree_ring": float((seg[ring] == truth_seg[ring]).mean()) if ring.any() else float("nan"),
            "seg_dvol_box_ml": dvol(None), "seg_dvol_10mm_ml": dvol(near)}
