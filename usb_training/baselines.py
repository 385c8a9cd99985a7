"""Classical pathology -> healthy baselines: FSL-style lesion filling and biharmonic inpainting."""
from __future__ import annotations

import numpy as np
from scipy import ndimage


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
