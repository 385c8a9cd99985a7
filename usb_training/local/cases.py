"""Native-space evaluation and validation cases: a whole scan with one lesion, as a user would bring it.

A case is a healthy brain from one source put onto an oblique 1 mm scanner grid (random rotation up to 10 deg
and shift), with one synthetic lesion at a chosen site whose darkening reaches past the drawn mask (soft
partial-volume edge; the drawn mask is the 0.5 iso-surface), the same bias field / gamma / Rician noise on the
healthy and lesioned versions, stored as int16 scanner units like a real scan. The lesion-free scan is the
ground truth for healing; the lesioned one is the generator's reference lesion for embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..data.prepare import CSF, DEEP_GM, GM, WM, Anatomy
from .masks import eroded_keeping_components
from . import slices
from .crops import _NoLesion, _artefacts, paint_lesion

SITES = ("deep_wm", "periventricular", "juxtacortical", "thalamus", "cerebellum", "large")
SHAPE = (176, 208, 176)
UNITS = 1000.0  # model unit -> scanner units


@dataclass
class NativeCase:
    """One scan (int16-valued float32 arrays on ``affine``'s grid) with its truth."""

    name: str
    site: str
    healthy: np.ndarray
    lesioned: np.ndarray
    mask: np.ndarray     # drawn mask, uint8
    soft: np.ndarray     # true lesion extent in [0, 1]
    brain: np.ndarray    # uint8
    labels: np.ndarray   # tissue classes (prepare.CSF/GM/WM/DEEP_GM)
    affine: np.ndarray
    hasty: np.ndarray | None = None  # yardstick: the exact mask eroded by one voxel (``hasty_mask``)
    contrast: str = "template"       # yardstick: "template" (the source's T1) or "labels" (label-driven)


def _site_pool(labels: np.ndarray, brain: np.ndarray, ras: np.ndarray, site: str) -> np.ndarray:
    wm, gm = labels == WM, labels == GM
    depth = ndimage.distance_transform_edt(brain)
    if site == "periventricular":
        ventricles = (labels == CSF) & (depth > 15)
        pool = wm & (ndimage.distance_transform_edt(~ventricles) <= 4) if ventricles.any() else wm & (depth > 20)
    elif site == "juxtacortical":
        pool = wm & ndimage.binary_dilation(gm, iterations=2) & (depth > 6) & (ras[..., 2] > 0)
    elif site == "thalamus":  # deep grey matter next to the third ventricle: central, GM-like, deep
        pool = (gm | (labels == 4)) & (depth > 25) & (np.abs(ras[..., 0]) < 18) & (np.abs(ras[..., 2]) < 15)
    elif site == "cerebellum":
        pool = (gm | wm) & (ras[..., 2] < -25) & (ras[..., 1] < -45) & (depth > 6)
    elif site == "large":
        pool = wm & (depth > 18) & (ras[..., 2] > 5)
    else:
        pool = wm & (depth > 10) & ~(ndimage.binary_dilation(labels == CSF, iterations=4))
    return pool if pool.any() else wm & (depth > 10)


def _scanner_grid(anatomy: Anatomy, anatomy_affine: np.ndarray, shape, rng: np.random.Generator) -> np.ndarray:
    """A 1 mm scanner grid of ``shape`` around the brain: rotated up to 10 deg per axis, centred within 4 mm of the
    brain's centre of mass. Returns its 4x4 voxel-to-RAS affine."""
    rot = Rotation.from_euler("xyz", rng.uniform(-10, 10, 3), degrees=True).as_matrix()
    com = np.array(ndimage.center_of_mass(anatomy.brain > 0))
    centre_ras = (anatomy_affine @ np.append(com, 1.0))[:3] + rng.uniform(-4, 4, 3)
    affine = np.eye(4)
    affine[:3, :3] = rot
    affine[:3, 3] = centre_ras - rot @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def native_case(anatomy: Anatomy, anatomy_affine: np.ndarray, site: str, seed: int, shape=SHAPE) -> NativeCase:
    """A scan of ``anatomy`` with one lesion at ``site`` (see module docstring); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    affine = _scanner_grid(anatomy, anatomy_affine, shape, rng)
    to_anat = np.linalg.inv(anatomy_affine) @ affine
    sample = lambda a, order: ndimage.affine_transform(a.astype(np.float32), to_anat[:3, :3], to_anat[:3, 3],  # noqa: E731
                                                       output_shape=shape, order=order)
    brain = sample(anatomy.brain, 1) > 0.5
    image = np.clip(sample(anatomy.image, 1), 0, None)
    labels = sample(anatomy.labels, 0).astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    ras = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    pool = np.flatnonzero(_site_pool(labels, brain, ras, site))
    size = 80 if site == "large" else 64
    for _ in range(30):
        centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], shape))
        lo = np.clip(centre - size // 2, 0, np.asarray(shape) - size)
        box = tuple(slice(a, a + size) for a in lo)
        try:
            soft_b, _, dev_b = paint_lesion(image[box], labels[box], (centre - lo).astype(np.float32),
                                            "large" if site == "large" else
                                            "periventricular" if site == "periventricular" else "deep_wm",
                                            rng, max_fraction=0.12)
        except _NoLesion:
            continue
        if soft_b[soft_b.shape[0] // 2 - 12:soft_b.shape[0] // 2 + 12].max() > 0 and (soft_b >= 0.5).sum() >= 8:
            break
    else:
        raise RuntimeError(f"no {site} lesion could be placed")
    soft = np.zeros(shape, np.float32)
    deviation = np.zeros(shape, np.float32)
    soft[box], deviation[box] = soft_b, dev_b
    healthy, lesioned = _artefacts([image, np.clip(image + deviation, 0, None)], brain.astype(np.float32), rng)
    healthy, lesioned = (np.clip(np.rint(x * UNITS), 0, 32767).astype(np.float32) for x in (healthy, lesioned))
    mask = (soft >= 0.5).astype(np.uint8)
    return NativeCase(f"{anatomy.name}-{site}-{seed}", site, healthy, lesioned, mask, soft,
                      brain.astype(np.uint8), labels, affine)


def native_cases(anatomy: Anatomy, anatomy_affine: np.ndarray, per_site: int, seed: int,
                 sites=SITES) -> list[NativeCase]:
    """``per_site`` cases at each site, seeds ``seed``, ``seed + 1``, ..."""
    return [native_case(anatomy, anatomy_affine, site, seed + i * len(sites) + j)
            for i in range(per_site) for j, site in enumerate(sites)]


# ----------------------------------------------------------------------------------------------------------------
# The heal yardstick's cases (``usb_training.evaluation.native``)
#
# Unlike ``native_case`` above, a yardstick case
# - gives the anatomy its own smooth non-linear deformation (random anisotropic scale/shear plus an integrated
#   stationary velocity field of up to ~4 mm, composed with the oblique scanner grid so the template is resampled
#   only once), and, for part of the cases, label-driven contrast (``data.anatomy.synthesize_contrast``, random
#   class levels, deep grey matter its own class between GM and WM);
# - draws lesions with a wider partial-volume edge (Gaussian sigma 1.2-1.8 voxels): the darkening reaches 2-3
#   voxels past the drawn 0.5 iso-surface;
# - carries two masks: the exact one (the 0.5 iso-surface) and a hasty one (the exact mask eroded by one voxel,
#   6-neighbourhood; a component that would vanish keeps its deepest voxels);
# - covers the sites of ``YARDSTICK_SITES``. Deep grey matter is located by MNI coordinates: the sources' tissue
#   maps are CSF/GM/WM only (IXI555, MNI2009a/c), so thalamus, putamen and caudate are ellipsoids around their
#   MNI152 centres (``NUCLEI``, both hemispheres), followed through the deformation; on fsaverage, whose aseg has a
#   deep-GM class, the ellipsoids are intersected with that class. The cerebellum is MNI z < -25, y < -45. The
#   sources lie in MNI space (IXI555 and the 2009 templates: MNI152; fsaverage: MNI305, within a few mm).
# ----------------------------------------------------------------------------------------------------------------

YARDSTICK_SITES = ("deep_wm", "periventricular", "juxtacortical", "thalamus", "putamen", "caudate", "cortex",
                   "cerebellum", "large", "multiple", "border")
# Not among the default sites (their cases, seeds and documented numbers stay as they are); ``evaluate --native
# --sites territorial``: a chronic territorial infarct of about 10-55 ml, white matter and cortex brought towards
# the CSF's level, as stroke scans bring to lesion filling before FreeSurfer.
EXTRA_SITES = ("territorial",)
SITE_GROUPS = {"thalamus": "deep_gm", "putamen": "deep_gm", "caudate": "deep_gm"}
# MNI152 centre (right hemisphere; mirrored in x) and semi-axes (mm) of the deep grey nuclei
NUCLEI = {"thalamus": ((11.0, -18.0, 7.0), (6.0, 11.0, 8.0)),
          "putamen": ((25.0, 2.0, 1.0), (4.5, 12.0, 8.0)),
          "caudate": ((13.0, 12.0, 10.0), (3.5, 7.0, 7.0))}
EDGE_SIGMA = (1.2, 1.8)      # voxels: the soft edge of the lesion (darkening reaches 2-3 voxels past the mask)


def site_group(site: str) -> str:
    """The reporting group of a yardstick site (thalamus, putamen and caudate are ``deep_gm``)."""
    return SITE_GROUPS.get(site, site)


def hasty_mask(mask: np.ndarray, spacing=None) -> np.ndarray:
    """The exact mask eroded by one voxel (6-neighbourhood, along the fine axes only when ``spacing`` in mm says some
    are thick, ``mask_edges.neighbourhood``; the image faces do not erode it); a component that would vanish keeps
    its deepest voxels, as a hasty rater still marks every lesion. uint8."""
    from USBLib.imaging.mask_edges import neighbourhood

    return eroded_keeping_components(mask, 1, neighbourhood(spacing)).astype(np.uint8)


GENEROUS_MM = 2.0  # the generous mask: the exact one grown by this (Euclidean, in mm) within the brain
MASKS = ("exact", "hasty", "generous")  # the drawn masks a yardstick case can be healed with (``drawn_mask``)


def generous_mask(mask: np.ndarray, brain: np.ndarray, spacing=None, mm: float = GENEROUS_MM) -> np.ndarray:
    """The exact ``mask`` [I, J, K] grown by ``mm`` (every voxel whose centre lies within ``mm`` of it, voxel
    ``spacing`` in mm, default 1; on thick slices it grows in-plane only when ``mm`` is below the slice spacing),
    kept within ``brain``: a mask drawn around the darkened rim, as a segmentation made on FLAIR or dilated for
    safety before lesion filling is. uint8."""
    m = np.asarray(mask) > 0
    spacing = np.ones(3) if spacing is None else np.abs(np.asarray(spacing, float))
    distance = ndimage.distance_transform_edt(~m, sampling=spacing)
    return ((distance <= mm + 1e-6) & ((np.asarray(brain) > 0) | m)).astype(np.uint8)


def drawn_mask(case: NativeCase, kind: str) -> np.ndarray:
    """The mask a rater drew for ``case``: ``exact`` (the 0.5 iso-surface), ``hasty`` (eroded by one voxel,
    ``hasty_mask``) or ``generous`` (grown by ``GENEROUS_MM``, ``generous_mask``). uint8 [I, J, K]."""
    if kind == "exact":
        return case.mask
    if kind == "hasty":
        return case.hasty if case.hasty is not None else hasty_mask(case.mask, _spacing(case.affine))
    if kind == "generous":
        return generous_mask(case.mask, case.brain, _spacing(case.affine))
    raise ValueError(f"unknown mask kind '{kind}' (known: {', '.join(MASKS)})")


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))


def _nuclei_map(mni: np.ndarray, site: str, shrink: float = 1.0) -> np.ndarray:
    centre, radii = NUCLEI[site]
    out = np.zeros(mni.shape[:-1], bool)
    for sign in (1.0, -1.0):
        c = np.array([sign * centre[0], centre[1], centre[2]], np.float32)
        out |= (((mni - c) / (np.asarray(radii, np.float32) * shrink)) ** 2).sum(-1) <= 1.0
    return out


def _yardstick_pool(labels: np.ndarray, brain: np.ndarray, mni: np.ndarray, site: str,
                    depth: np.ndarray) -> np.ndarray:
    wm, gm = labels == WM, labels == GM
    csf = labels == CSF
    if site in NUCLEI:
        pool = _nuclei_map(mni, site, 0.6) & brain & (depth > 12)
        if (labels == DEEP_GM).any():  # fsaverage's aseg: the nuclei themselves
            pool &= labels == DEEP_GM
    elif site == "periventricular":
        ventricles = csf & (depth > 15)
        pool = wm & (ndimage.distance_transform_edt(~ventricles) <= 4) if ventricles.any() else wm & (depth > 20)
    elif site == "juxtacortical":
        pool = wm & ndimage.binary_dilation(gm, iterations=2) & (depth > 6) & (mni[..., 2] > 0)
    elif site == "cortex":
        pool = gm & (depth > 3) & (depth < 9) & (mni[..., 2] > -10)
    elif site == "cerebellum":
        pool = (gm | wm) & (mni[..., 2] < -25) & (mni[..., 1] < -45) & (np.abs(mni[..., 0]) > 10) & (depth > 5)
    elif site == "large":
        pool = wm & (depth > 18) & (mni[..., 2] > 5)
    elif site == "territorial":  # lateral hemisphere, under the cortex (the middle cerebral artery's territory)
        pool = (wm | gm) & (depth > 10) & (depth < 22) & (np.abs(mni[..., 0]) > 28) & (mni[..., 2] > -5)
    elif site == "border":
        pool = wm & (depth > 8) & (mni[..., 2] > 25)
    else:  # deep_wm, multiple
        pool = wm & (depth > 10) & ~ndimage.binary_dilation(csf, iterations=4)
        if site == "deep_wm":
            pool &= ~_nuclei_map(mni, "thalamus", 1.3) & ~_nuclei_map(mni, "putamen", 1.3)
    for fallback in (wm & (depth > 10), wm, brain):  # small or unusual anatomies (test phantoms)
        if pool.any():
            break
        pool = fallback
    return pool


def _shape_for(kind: str, rng: np.random.Generator) -> tuple[str, float]:
    if kind == "large":
        return str(rng.choice(["wedge", "blob", "cluster"])), float(rng.uniform(7, 13))
    if kind == "territorial":
        name = str(rng.choice(["wedge", "blob"], p=[0.5, 0.5]))
        return name, float(rng.uniform(14, 22) if name == "wedge" else rng.uniform(16, 26))
    if kind == "periventricular":
        name = str(rng.choice(["periventricular", "blob"], p=[0.6, 0.4]))
        return name, float(np.exp(rng.uniform(np.log(2), np.log(9))))
    if kind == "small":
        return "blob", float(rng.uniform(2.0, 4.5))
    if kind == "cortex":
        return "blob", float(np.exp(rng.uniform(np.log(2.0), np.log(6))))
    if kind in NUCLEI:
        return str(rng.choice(["blob", "cluster"], p=[0.7, 0.3])), float(np.exp(rng.uniform(np.log(2.5), np.log(7))))
    return str(rng.choice(["blob", "cluster"], p=[0.7, 0.3])), float(np.exp(rng.uniform(np.log(2.0), np.log(12))))


def paint_wide_lesion(img: np.ndarray, lab: np.ndarray, centre: np.ndarray, kind: str, rng: np.random.Generator,
                      max_fraction: float = 0.12) -> tuple[np.ndarray, np.ndarray]:
    """(soft extent, deviation) of one lesion of ``kind`` at ``centre`` (voxels) in a box of tissue image ``img``
    with classes ``lab``: like ``crops.paint_lesion`` but with a soft edge of sigma ``EDGE_SIGMA`` voxels, so the
    darkening reaches 2-3 voxels past the 0.5 iso-surface (the drawn mask). Raises ``_NoLesion``."""
    from ..data.lesions import SHAPES, divergence_free_flow
    from ..data.pathology import lesion_deviation
    from ..data.warp import sampling_coords, warp
    from .crops import MAX_LEVEL, TISSUE, VISIBLE_P, VISIBLE_RATIO

    shape = img.shape
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), -1)
    tissue = ndimage.gaussian_filter(np.isin(lab, TISSUE).astype(np.float32), 0.7)
    for _ in range(12):
        name, radius = _shape_for(kind, rng)
        raw = SHAPES[name](grid, centre, radius, lab, rng)
        if not raw.any():
            continue
        flow = divergence_free_flow(shape, rng, rng.uniform(0.3, 1.0) * min(4.0, 0.5 * radius + 1), 8)
        moved = warp(raw.astype(np.float32), sampling_coords(shape, None, flow))
        soft = np.clip(ndimage.gaussian_filter(moved, rng.uniform(*EDGE_SIGMA)), 0, 1) * tissue
        binary = soft >= 0.5
        if 6 <= binary.sum() <= max_fraction * binary.size:
            break
    else:
        raise _NoLesion()
    deviation = infarct_deviation(img, soft, lab, rng) if kind == "territorial" else \
        lesion_deviation(img, soft, binary, lab, rng)
    if rng.random() < VISIBLE_P and kind != "territorial":  # an infarct keeps its CSF-like darkness
        ratio = float(np.mean((img + deviation)[binary]) / max(float(np.mean(img[binary])), 1e-6))
        if ratio < 0.97:
            deviation *= float(np.clip((1.0 - rng.uniform(*VISIBLE_RATIO)) / (1.0 - ratio), 0.3, 3.0))
    deviation = np.clip(deviation, -img, MAX_LEVEL - img)
    return soft.astype(np.float32), deviation.astype(np.float32)


def infarct_deviation(healthy: np.ndarray, soft: np.ndarray, labels: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """The deviation d <= 0 of a chronic territorial infarct (``lesioned = healthy + d``): white and grey matter
    alike brought down towards the level of CSF (encephalomalacia), with a gliotic, less dark part where the soft
    extent fades and some heterogeneity. ``healthy`` [box], ``soft`` [box] the lesion's soft extent in [0, 1],
    ``labels`` [box] the tissue classes."""
    csf = healthy[labels == CSF]
    wm = healthy[labels == WM]
    wm_level = float(np.median(wm)) if wm.size else float(np.percentile(healthy[healthy > 0], 90))
    csf_level = float(np.median(csf)) if csf.size else 0.25 * wm_level
    core = csf_level + rng.uniform(0.0, 0.25) * (wm_level - csf_level)
    texture = ndimage.gaussian_filter(rng.standard_normal(healthy.shape).astype(np.float32), rng.uniform(1.5, 3.0))
    texture /= texture.std() + 1e-6
    target = core + rng.uniform(0.03, 0.10) * wm_level * texture
    return (soft * np.minimum(target - healthy, 0.0)).astype(np.float32)


def _deformed_sampling(anatomy: Anatomy, anatomy_affine: np.ndarray, affine: np.ndarray, shape,
                       rng: np.random.Generator) -> np.ndarray:
    """Anatomy voxel coordinates [3, *shape] to sample for every scan voxel: the scan grid, then a random smooth
    deformation of the anatomy (affine scale/shear/rotation plus an integrated stationary velocity field)."""
    from ..data.warp import integrate_velocity, random_affine, sampling_coords, smooth_field

    ashape = anatomy.image.shape
    velocity = smooth_field(ashape, 3, int(rng.integers(9, 14)), rng)
    velocity = velocity / velocity.abs().amax().clamp_min(1e-6) * rng.uniform(2.5, 4.0)
    coords = sampling_coords(ashape, random_affine(rng, 5.0, 0.08, 0.05, 2.0), integrate_velocity(velocity))
    coords = coords[0].numpy()  # [3, *ashape]: deformed anatomy voxel -> template voxel
    to_anat = np.linalg.inv(anatomy_affine) @ affine
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    pos = np.einsum("ij,j...->i...", to_anat[:3, :3].astype(np.float32), ijk) \
        + to_anat[:3, 3].astype(np.float32)[:, None, None, None]
    return np.stack([ndimage.map_coordinates(c, pos, order=1, mode="nearest") for c in coords])


def yardstick_case(anatomy: Anatomy, anatomy_affine: np.ndarray, site: str, seed: int,
                   synth: bool | None = None, shape=SHAPE) -> NativeCase:
    """One yardstick case (see the section comment above); deterministic in ``seed``. ``synth``: label-driven
    contrast (default: every other seed; always for fsaverage, whose own T1 is a blurred average)."""
    from ..data.anatomy import LABELS_ONLY, synthesize_contrast
    from .crops import _artefacts

    rng = np.random.default_rng(seed)
    synth = (seed % 2 == 1) if synth is None else synth
    synth = synth or anatomy.name in LABELS_ONLY
    affine = _scanner_grid(anatomy, anatomy_affine, shape, rng)
    src = _deformed_sampling(anatomy, anatomy_affine, affine, shape, rng)
    sample = lambda a, order: ndimage.map_coordinates(np.asarray(a, np.float32), src, order=order,  # noqa: E731
                                                      mode="constant", cval=0.0)
    brain = sample(anatomy.brain, 1) > 0.5
    labels = sample(anatomy.labels, 0).astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    mni = (np.moveaxis(src, 0, -1) @ anatomy_affine[:3, :3].T.astype(np.float32)
           + anatomy_affine[:3, 3].astype(np.float32))
    own = None if synth else np.clip(sample(anatomy.image, 1), 0, None)
    del src
    if not (labels == DEEP_GM).any():  # deep grey matter as its own class (label-driven contrast, pools)
        nuclei = np.zeros(shape, bool)
        for name in NUCLEI:
            nuclei |= _nuclei_map(mni, name)
        labels[nuclei & np.isin(labels, (GM, WM))] = DEEP_GM
    if synth:
        image = synthesize_contrast(labels, brain, rng)
    else:
        image = own ** float(rng.uniform(0.8, 1.25)) * brain
    depth = ndimage.distance_transform_edt(brain)
    pool_site = "multiple" if site == "multiple" else site
    pool = np.flatnonzero(_yardstick_pool(labels, brain, mni, pool_site, depth))
    kind = {"multiple": "small", "border": "deep_wm", "juxtacortical": "deep_wm"}.get(site, site)
    count = int(rng.integers(3, 7)) if site == "multiple" else 1
    size = min({"large": 80, "territorial": 144}.get(site, 64), *shape)
    soft = np.zeros(shape, np.float32)
    deviation = np.zeros(shape, np.float32)
    centres: list[np.ndarray] = []
    for _ in range(40 * count):
        if len(centres) == count:
            break
        centre = np.array(np.unravel_index(pool[rng.integers(pool.size)], shape))
        if any(np.linalg.norm(centre - c) < 14 for c in centres):
            continue
        lo = np.clip(centre - size // 2, 0, np.asarray(shape) - size)
        box = tuple(slice(a, a + size) for a in lo)
        try:
            soft_b, dev_b = paint_wide_lesion(image[box], labels[box], (centre - lo).astype(np.float32), kind, rng)
        except _NoLesion:
            continue
        soft[box] = np.maximum(soft[box], soft_b)
        deviation[box] += dev_b
        centres.append(centre)
    if not centres:
        raise RuntimeError(f"no {site} lesion could be placed")
    deviation = np.clip(deviation, -image, None)
    healthy, lesioned = _artefacts([image, np.clip(image + deviation, 0, None)], brain.astype(np.float32), rng)
    healthy, lesioned = (np.clip(np.rint(x * UNITS), 0, 32767).astype(np.float32) for x in (healthy, lesioned))
    mask = (soft >= 0.5).astype(np.uint8)
    arrays = [healthy, lesioned, mask, soft, brain.astype(np.uint8), labels]
    if site == "border":  # cut the field of view through the lesion along the scan axis closest to superior
        axis = int(np.argmax(np.abs(affine[2, :3])))
        inds = np.nonzero(mask)[axis]
        if affine[2, axis] > 0:
            cut = int(np.median(inds)) + 1
            arrays = [a.take(np.arange(cut), axis=axis) for a in arrays]
        else:
            cut = int(np.median(inds))
            arrays = [a.take(np.arange(cut, shape[axis]), axis=axis) for a in arrays]
            shift = np.eye(4)
            shift[axis, 3] = cut
            affine = affine @ shift
    healthy, lesioned, mask, soft, brain_u8, labels = arrays
    return NativeCase(f"{anatomy.name}-{site}-{seed}", site, healthy, lesioned, mask, soft, brain_u8, labels,
                      affine, hasty=hasty_mask(mask), contrast="labels" if synth else "template")


def thick_slices(case: NativeCase, factor: int) -> NativeCase:
    """``case`` as a scanner with ``factor`` times thicker slices would have measured it: every ``factor``
    consecutive slices along the grid axis closest to superior averaged into one (partial volume; a remainder at
    the end is dropped), the affine's voxel size along that axis times ``factor`` with each new voxel centred on its
    block. The drawn mask is the averaged soft extent >= 0.5 (the 0.5 iso-surface, as at 1 mm), the hasty mask it
    eroded by one voxel in-plane only (a rater draws slice by slice), the brain the averaged brain >= 0.5 and the
    tissue classes those of each block's middle slice. Name gets ``-slices{factor}``. ``factor`` 1: ``case``."""
    if factor < 1:
        raise ValueError(f"slice factor must be >= 1, got {factor}")
    if factor == 1:
        return case
    axis = int(np.argmax(np.abs(case.affine[2, :3])))
    n = case.healthy.shape[axis] // factor
    block_mean = partial(slices.block_mean, axis=axis, factor=factor)
    affine = case.affine.copy()
    affine[:3, 3] += case.affine[:3, axis] * (factor - 1) / 2.0
    affine[:3, axis] *= factor
    soft = block_mean(case.soft)
    mask = (soft >= 0.5).astype(np.uint8)
    hasty = hasty_mask(mask, _spacing(affine))
    labels = np.take(case.labels, np.arange(n) * factor + factor // 2, axis=axis)
    return NativeCase(f"{case.name}-slices{factor}", case.site, np.rint(block_mean(case.healthy)),
                      np.rint(block_mean(case.lesioned)), mask, soft,
                      (block_mean(case.brain) >= 0.5).astype(np.uint8), labels, affine, hasty=hasty,
                      contrast=case.contrast)


def yardstick_sites(count: int, sites=YARDSTICK_SITES) -> list[str]:
    """The site of each of ``count`` cases: the sites in turn."""
    return [sites[i % len(sites)] for i in range(count)]


def yardstick_cases(anatomy: Anatomy, anatomy_affine: np.ndarray, count: int, seed: int, sites=YARDSTICK_SITES):
    """``count`` yardstick cases, generated one at a time (a generator: each whole scan is ~100 MB): case ``i``
    has site ``sites[i % len(sites)]``, seed ``seed + i``, label-driven contrast when ``seed + i`` is odd."""
    for i, site in enumerate(yardstick_sites(count, sites)):
        yield yardstick_case(anatomy, anatomy_affine, site, seed + i)
