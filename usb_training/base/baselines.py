"""Classical pathology -> healthy baselines: FSL-style lesion filling, biharmonic inpainting, and the heal
yardstick's classical set (NAWM constant, biharmonic of the mask grown by 0-3 voxels, the local stage's own base,
the atlas fill, the non-local patch fill)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.mask_edges import grown  # noqa: F401  (the mask + N voxels, as the heal's patch blend grows it)
from USBLib.imaging.patch_fill import patch_fill  # noqa: F401  (the non-local patch filler, one of the classical set)


def white_matter(image: np.ndarray, brain: np.ndarray, lesion: np.ndarray) -> np.ndarray:
    """Normal-appearing white matter: brain voxels outside the lesion brighter than the brain's 60th percentile
    (T1: white matter is the brightest tissue)."""
    inside = (brain > 0) & (lesion == 0)
    return inside & (image > np.percentile(image[inside], 60))


def lesion_filling(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray, shell_vox: int = 4,
                   seed: int = 0) -> np.ndarray:
    """Like FSL's ``lesion_filling``: each lesion (connected component) is filled with intensities drawn from
    the distribution (mean, sd) of the normal-appearing white matter around it; falls back to all NAWM."""
    rng = np.random.default_rng(seed)
    out = image.astype(np.float32).copy()
    nawm = white_matter(image, brain, lesion)
    labels, n = ndimage.label(lesion > 0)
    for comp in range(1, n + 1):
        region = labels == comp
        shell = ndimage.binary_dilation(region, iterations=shell_vox) & nawm
        values = image[shell] if shell.sum() >= 10 else image[nawm]
        out[region] = rng.normal(values.mean(), values.std(), int(region.sum()))
    return out


def biharmonic(image: np.ndarray, lesion: np.ndarray, margin: int = 4) -> np.ndarray:
    """Biharmonic inpainting of the lesion (scikit-image), solved on the lesion's bounding box plus a margin."""
    from skimage.restoration import inpaint_biharmonic

    out = image.astype(np.float32).copy()
    labels, n = ndimage.label(ndimage.binary_dilation(lesion > 0, iterations=margin))
    for box in ndimage.find_objects(labels):
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        out[box] = inpaint_biharmonic(image[box].astype(np.float64), lesion[box] > 0).astype(np.float32)
    out[lesion == 0] = image[lesion == 0]
    return out


# ----------------------------------------------------------------------------------------------------------------
# The heal yardstick's classical set (``usb_training.evaluation.native``): every filler a user could run. Each
# returns float32 ``image`` with only its own region rewritten (bit for bit equal elsewhere).
# ----------------------------------------------------------------------------------------------------------------


def nawm_constant(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The lesion filled with one value: the mean of the scan's normal-appearing white matter
    (``white_matter``)."""
    out = np.asarray(image, np.float32).copy()
    region = np.asarray(lesion) > 0
    out[region] = np.float32(image[white_matter(image, brain, lesion)].mean())
    return out


def biharmonic_fill(image: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Biharmonic fill of ``region`` (``USBLib.imaging.prefill``, the engine's solver). That solver keeps region
    voxels on the volume's faces as known boundary values, which drags the fill of a lesion cut by the field of
    view towards the lesion; here such a region is first mirrored across the face (symmetric padding of the image
    and the region, wider than the region's extent), so the fill meets the face with a zero normal derivative."""
    from USBLib.imaging.prefill import prefill

    region = np.asarray(region) > 0
    image = np.asarray(image, np.float32)
    pads = []
    for axis in range(3):
        extent = np.flatnonzero(region.any(axis=tuple(a for a in range(3) if a != axis)))
        width = int(extent[-1] - extent[0] + 3) if extent.size else 0
        pads.append((width if region.take(0, axis).any() else 0, width if region.take(-1, axis).any() else 0))
    if not any(sum(p) for p in pads):
        return prefill(image, region, "biharmonic")
    out = prefill(np.pad(image, pads, mode="symmetric"), np.pad(region, pads, mode="symmetric"), "biharmonic")
    return np.ascontiguousarray(out[tuple(slice(a, a + n) for (a, _), n in zip(pads, image.shape))])


def biharmonic_grown(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray, voxels: int) -> np.ndarray:
    """Biharmonic fill of the lesion grown by ``voxels`` (26-neighbourhood) within the brain."""
    return biharmonic_fill(image, grown(lesion, voxels, brain))


def stage_base(image: np.ndarray, lesion: np.ndarray, dilation: int) -> np.ndarray:
    """The local stage's own base, verbatim: ``classical_fill`` of ``fill_region(mask, HEAL, dilation)`` (the
    mask grown with the 18-neighbourhood, not cut to the brain; ``USBLib.editor.local.conditioning``)."""
    from USBLib.editor.local.conditioning import HEAL, classical_fill, fill_region

    return classical_fill(np.asarray(image, np.float32), fill_region(lesion, HEAL, int(dilation)))


def atlas_fit(image: np.ndarray, priors: np.ndarray, shell: np.ndarray, brain: np.ndarray,
              ridge: float = 0.05) -> np.ndarray:
    """Class means mu_k such that sum_k p_k mu_k fits ``image`` on ``shell`` in least squares, pulled (ridge) towards
    the same fit over the whole brain so that a class absent from the shell keeps a sensible mean. ``priors``:
    [K, I, J, K] tissue probabilities on the scan's grid."""
    brain = np.asarray(brain) > 0
    idx = np.flatnonzero(brain)
    if idx.size > 200_000:
        idx = np.sort(np.random.default_rng(0).choice(idx, 200_000, replace=False))
    p_all = priors.reshape(len(priors), -1)[:, idx].T.astype(np.float64)
    v_all = np.asarray(image, np.float64).ravel()[idx]
    mu0 = np.linalg.lstsq(p_all, v_all, rcond=None)[0]
    from USBLib.editor.local.conditioning import fit_class_means

    s = np.asarray(shell) > 0
    return fit_class_means(priors[:, s].T, np.asarray(image)[s], mu0, ridge)


def atlas_fill(image: np.ndarray, lesion: np.ndarray, brain: np.ndarray, priors: np.ndarray, grow: int = 2,
               shell: tuple[int, int] = (2, 10)) -> np.ndarray:
    """Atlas fill: the lesion grown by ``grow`` voxels (26-neighbourhood, within the brain) filled with
    sum_k p_k mu_k, ``priors`` [K, ...] registered tissue probabilities (e.g. CSF/GM/WM) on the scan's grid and
    mu_k fitted (``atlas_fit``) on the brain voxels ``shell[0]``-``shell[1]`` steps outside the lesion."""
    region = grown(lesion, grow, brain)
    ring = grown(lesion, shell[1], brain) & ~grown(lesion, shell[0])
    mu = atlas_fit(image, priors, ring, brain)
    out = np.asarray(image, np.float32).copy()
    out[region] = (priors[:, region].T.astype(np.float64) @ mu).astype(np.float32)
    return out
