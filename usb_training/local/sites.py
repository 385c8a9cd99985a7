"""Where lesions go: anatomical sites of the native 1 mm training anatomies, and the lesion sites drawn from them.

The MNI sources' tissue maps are CSF/GM/WM only, so their deep grey nuclei, cerebellum and brainstem come from
FreeSurfer's fsaverage aseg: fsaverage's label image is registered to each MNI source (USBLib's affine
registration on label-valued images, once, cached) and its structures are carried over by nearest neighbour.
fsaverage itself reads them from its own aseg. The nuclei (thalamus, caudate, putamen, pallidum, accumbens) become
the deep grey matter class (``DEEP_GM``) wherever the source's own map says tissue, which fixes the "deep_gm is deep
white matter on the MNI sources" fallback of the first generator.

Site maps are cached as ``<cache>/prepared/native1mm/<source>_sites.npz`` (uint8 ``STRUCTURES`` codes on the
source's native grid, and the registration used).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..data.prepare import CSF, DEEP_GM, GM, WM, Anatomy
from ..data.sources import fetch

NUCLEI, CEREBELLUM, BRAINSTEM = 1, 2, 3  # codes of the site map
STRUCTURES = {NUCLEI: (10, 11, 12, 13, 26, 49, 50, 51, 52, 58),  # thalamus, caudate, putamen, pallidum, accumbens
              CEREBELLUM: (7, 8, 46, 47),                          # cerebellar white matter and cortex
              BRAINSTEM: (16,)}
TISSUE = (GM, WM, DEEP_GM)

# lesion sites in proportion to use (MS-like white-matter lesions first, then grey matter and infratentorial
# lesions, then territorial ones); every site's lesions are painted by ``crops.paint_lesion`` with the shape kind
# of ``PAINT_KIND``
SITES = {"deep_wm": 0.20, "periventricular": 0.18, "juxtacortical": 0.12, "cortical": 0.10, "deep_gm": 0.12,
         "cerebellum": 0.08, "brainstem": 0.04, "any_tissue": 0.06, "large": 0.10}
PAINT_KIND = {"large": "large", "periventricular": "periventricular"}  # others: "deep_wm" (blobs, clusters)


def site_mix(overrides: dict[str, float] | None = None) -> dict[str, float]:
    """The lesion-site probabilities: ``SITES`` with the weights of ``overrides`` for the sites it names (e.g. more
    deep grey matter for a data round aimed at it), renormalised. Raises ValueError for an unknown site, a negative
    weight or all weights zero."""
    weights = {**SITES, **(overrides or {})}
    if set(weights) - set(SITES) or min(weights.values()) < 0 or sum(weights.values()) <= 0:
        raise ValueError(f"site weights must be >= 0 over the sites {', '.join(SITES)}; got {overrides}")
    total = sum(weights.values())
    return {site: w / total for site, w in weights.items()}


def _aseg_codes(aseg: np.ndarray) -> np.ndarray:
    out = np.zeros(aseg.shape, np.uint8)
    for code, values in STRUCTURES.items():
        out[np.isin(aseg, values)] = code
    return out


def _label_image(anatomy: Anatomy) -> np.ndarray:
    """Tissue classes as a T1-like image (CSF dark, WM bright) for mutual-information registration."""
    return np.choose(np.minimum(anatomy.labels, DEEP_GM), [0.0, 0.3, 0.6, 1.0, 0.8]).astype(np.float32)


def site_map(cache: Path, name: str, anatomy: Anatomy, affine: np.ndarray, fsaverage: Anatomy | None = None,
             fs_affine: np.ndarray | None = None) -> np.ndarray:
    """The structure codes (``STRUCTURES``) of one native anatomy [I, J, K] uint8, cached in ``cache``.

    ``affine``: the anatomy's voxel-to-RAS affine; for an MNI source ``fsaverage`` and ``fs_affine`` are the native
    fsaverage anatomy and affine (registered once to the source)."""
    target = Path(cache) / "prepared" / "native1mm" / f"{name}_sites.npz"
    if target.is_file():
        with np.load(target) as z:
            if z["sites"].shape == anatomy.labels.shape:
                return z["sites"]
    aseg_path = fetch(cache, ["fsaverage"])["fsaverage"]["aseg"]
    import nibabel as nib

    img = nib.load(str(aseg_path))
    aseg, aseg_affine = np.asarray(img.dataobj).astype(np.int32), img.affine.astype(np.float64)
    transform = np.eye(4)  # source RAS -> fsaverage RAS
    if name != "fsaverage":
        from USBLib.imaging.spatial import register

        if fsaverage is None or fs_affine is None:
            raise ValueError(f"{name}: mapping the aseg structures needs the native fsaverage anatomy")
        transform = register(_label_image(fsaverage), fs_affine, _label_image(anatomy), affine, anatomy.brain,
                             fsaverage.brain, "affine", 0)
    vox = np.linalg.inv(aseg_affine) @ transform @ affine
    codes = ndimage.affine_transform(_aseg_codes(aseg), vox[:3, :3], vox[:3, 3], output_shape=anatomy.labels.shape,
                                     order=0)
    codes = (codes * (anatomy.brain > 0)).astype(np.uint8)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, sites=codes, transform=transform)
    return codes


def with_deep_grey(anatomy: Anatomy, sites: np.ndarray) -> Anatomy:
    """The anatomy with the aseg nuclei as deep grey matter (``DEEP_GM``) where its own classes say tissue."""
    labels = anatomy.labels.copy()
    labels[(sites == NUCLEI) & np.isin(labels, TISSUE)] = DEEP_GM
    return Anatomy(anatomy.name, anatomy.image, anatomy.brain, labels)


def site_pools(anatomy: Anatomy, sites: np.ndarray) -> dict[str, np.ndarray]:
    """Flat voxel indices of each lesion site's candidate centres (``SITES``) in a native anatomy (1 mm)."""
    labels, brain = anatomy.labels, anatomy.brain > 0
    wm, gm, csf = labels == WM, labels == GM, labels == CSF
    tissue = np.isin(labels, TISSUE)
    depth = ndimage.distance_transform_edt(brain)
    supratentorial = sites == 0
    ventricles = csf & (depth > 12)
    near_ventricles = ndimage.distance_transform_edt(~ventricles) <= 5 if ventricles.any() else np.zeros_like(wm)
    near_csf = ndimage.binary_dilation(csf, iterations=4)
    pools = {
        "deep_wm": wm & (depth > 10) & ~near_csf & supratentorial,
        "periventricular": wm & near_ventricles & supratentorial,
        "juxtacortical": wm & ndimage.binary_dilation(gm & supratentorial, iterations=2) & (depth > 4)
        & supratentorial,
        "cortical": gm & (depth > 2) & (depth < 10) & supratentorial,
        "deep_gm": (labels == DEEP_GM) & (depth > 8),
        "cerebellum": (sites == CEREBELLUM) & tissue & (depth > 4),
        "brainstem": (sites == BRAINSTEM) & tissue & (depth > 4),
        "any_tissue": tissue,
        "large": wm & (depth > 18) & supratentorial,
    }
    out = {}
    for site, pool in pools.items():
        for fallback in (wm & (depth > 6), wm, brain):  # small or unusual anatomies (test phantoms)
            if pool.any():
                break
            pool = fallback
        out[site] = np.flatnonzero(pool)
    return out
