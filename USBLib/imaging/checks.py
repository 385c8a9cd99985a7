"""Input checks shared by every entry point (Python API, CLI, batch, Slicer worker): one message per problem.

Every check raises ``InputError`` with a one-line message naming ``what`` was wrong, or returns the array in
the form the engine works on (3D; masks as uint8 {0, 1} on the image's grid).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from USBLib.errors import InputError
from USBLib.imaging.spatial import reoriented_to, resample_mask_to, same_grid


def squeeze_3d(array: np.ndarray, what: str) -> np.ndarray:
    """Drop trailing singleton axes ([I, J, K, 1] -> [I, J, K]); refuse anything that is not 3D."""
    array = np.asarray(array)
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or min(array.shape) < 2:
        raise InputError(f"{what} has shape {array.shape}; a 3D volume is needed")
    return array


def check_image(image: np.ndarray, affine: np.ndarray | None = None, what: str = "image",
                missing_ok: bool = False) -> np.ndarray:
    """A scan [I, J, K]: 3D, an invertible 4x4 voxel-to-RAS ``affine`` (when given), finite, not constant. With
    ``missing_ok``, voxels without a value (NaN or Inf, as SPM writes outside a normalised scan's bounding box) are
    allowed as long as some voxels have one (``fill_missing`` deals with them); constant means among the others."""
    image = squeeze_3d(image, what)
    if affine is not None and (np.asarray(affine).shape != (4, 4)
                               or abs(np.linalg.det(np.asarray(affine)[:3, :3])) < 1e-9):
        raise InputError(f"{what} affine must be an invertible 4x4 voxel-to-RAS matrix")
    values = image
    if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
        if not missing_ok:
            raise InputError(f"{what} contains NaN or Inf voxels")
        values = image[np.isfinite(image)]
        if values.size == 0:
            raise InputError(f"{what} has no voxel with a value (all NaN or Inf)")
    if values.min() == values.max():
        raise InputError(f"{what} is constant ({values.flat[0]}); nothing to edit")
    return image


class SetAside(NamedTuple):
    """Voxels an edit reads as ordinary values and writes back as they were (``fill_missing``)."""

    where: np.ndarray       # [I, J, K] bool
    values: np.ndarray      # their values, in the scan's dtype
    far_out: int = 0        # how many of them have a value far outside the scan's range (the rest: NaN or Inf)


FAR_OUT_PERCENTILES = (0.1, 99.9)  # the scan's range, over its voxels above its minimum (a background or fill)
FAR_OUT_SAMPLE = 2_000_000          # voxels the percentiles are read from at most (every k-th voxel)


def far_out_voxels(image: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray | None:
    """Voxels whose value lies far outside the scan's range: below zero and below its 0.1th percentile by more than
    the range (0.1th to 99.9th percentile, over the voxels above the scan's minimum), or above its 99.9th by as much.
    A fill value outside the field of view (-32768, -10000) or a few corrupt voxels (a zero background is never
    one, however far below a low-contrast brain it lies): read as they are, one such voxel
    becomes the scan's zero point and compressed its tissue contrast (a heal 3-8 % too bright, the registration
    stretched by up to 48 %). bool [I, J, K], or None when there are none.

    Args:
        image: the scan [I, J, K] in its own units.
        valid: bool [I, J, K], the voxels with a value (None: all).
    """
    values = np.asarray(image)
    flat = values[valid] if valid is not None else values.ravel()
    sample = flat[:: max(1, flat.size // FAR_OUT_SAMPLE)].astype(np.float64)
    above = sample[sample > sample.min()]
    if above.size < 100:
        return None
    low, high = np.percentile(above, FAR_OUT_PERCENTILES)
    span = high - low
    if span <= 0:
        return None
    far = ((values < low - span) & (values < 0)) | (values > high + span)
    if valid is not None:
        far &= valid
    return far if far.any() else None


def fill_missing(image: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, SetAside | None]:
    """A scan with voxels without a value (NaN or Inf) or with values far outside its range (``far_out_voxels``: a
    fill value, corrupt voxels) made editable: those voxels read as the nearest ordinary value (the darkest kept
    value, or the range's top); returns (the filled scan, the voxels to write back after the edit with their values
    (``SetAside``), or None when there are none). Refuses a lesion ``mask`` that covers voxels without a value
    (nothing to heal there); far-out voxels in the mask are clipped and healed like the rest of it.

    Args:
        image: the scan [I, J, K] (``check_image`` with ``missing_ok``).
        mask: the lesion mask [I, J, K] (> 0 = lesion), or None.
    """
    floating = np.issubdtype(image.dtype, np.floating)
    missing = ~np.isfinite(image) if floating else np.zeros(image.shape, bool)
    lesion = np.asarray(mask) > 0 if mask is not None else np.zeros(image.shape, bool)
    if missing.any() and (covered := int((missing & lesion).sum())):
        raise InputError(f"the lesion mask covers {covered} voxel{'s' if covered > 1 else ''} without a value (NaN or "
                         "Inf) in the image")
    far = far_out_voxels(image, ~missing if missing.any() else None)
    if not missing.any() and far is None:
        return image, None
    bad = missing | far if far is not None else missing
    kept = image[~bad]
    filled = np.where(missing, kept.min(), image)
    if far is not None:
        filled = np.clip(filled, kept.min(), kept.max())
    filled = filled.astype(image.dtype, copy=False)
    back = bad & ~(lesion & ~missing)  # a far-out voxel in the lesion is healed, not written back
    return filled, SetAside(back, image[back], int((far & back).sum()) if far is not None else 0)


def threshold_mask(mask: np.ndarray, threshold: float | None) -> np.ndarray:
    """A soft (probabilistic) mask made binary: 1 where ``mask >= threshold``; with ``threshold`` None, ``mask``
    as it is (``check_mask`` then decides whether it is binary).

    Args:
        mask: mask values of any shape (a lesion probability map, a 0/255 label, ...).
        threshold: the value from which a voxel counts as lesion (e.g. 0.5 for a probability map), or None.
    """
    if threshold is None:
        return mask
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise InputError("lesion mask contains NaN or Inf voxels")
    return (mask >= float(threshold)).astype(np.uint8)


def check_binary(mask: np.ndarray, what: str = "lesion mask", subject: str | None = None) -> None:
    """Refuse (``InputError``, one line) a mask with NaN/Inf voxels or with several non-zero values (a probability
    map, several labels): every non-zero voxel must have one and the same value. ``subject`` starts the message
    (default ``what``); the hint names ``--mask-threshold`` for a lesion mask."""
    subject = subject or what
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise InputError(f"{subject} contains NaN or Inf voxels")
    values = np.unique(mask)
    nonzero = values[values != 0]
    if len(nonzero) > 1:
        shown = ", ".join(f"{v:g}" for v in values[:5])
        hint = ("give a mask whose lesion voxels share one value, or binarise it with --mask-threshold T"
                if what == "lesion mask" else "give a mask with 0 outside and one value inside")
        raise InputError(f"{subject} is not binary (values {shown}{', ...' if len(values) > 5 else ''}); {hint}")


def check_mask(mask: np.ndarray, shape, mask_affine, affine, resample_mask: bool,
               what: str = "lesion mask") -> np.ndarray:
    """A binary mask on the image's grid (``shape``, ``affine``), as uint8 {0, 1}. A mask on the image's grid in
    another axis order or direction (the same voxel centres; ``spatial.reoriented_to``) is moved onto it exactly; a
    mask on any other grid is resampled (nearest neighbour) only when ``resample_mask``; ``mask_affine`` None means
    the image's grid.

    Binary means: every non-zero voxel has one and the same value (0/1, 0/255, a label map of one label, as
    Slicer's labelmaps); a mask with several non-zero values (a probability map, several labels) is refused with a
    pointer to ``--mask-threshold`` (``threshold_mask``).
    """
    mask = squeeze_3d(mask, what)
    check_binary(mask, what)
    if mask_affine is None:
        mask_affine = affine
    if not same_grid(mask.shape, mask_affine, shape, affine):
        exact = reoriented_to(mask, mask_affine, shape, affine)
        if exact is not None:  # the image's own voxels in another axis order or direction: moved, not resampled
            mask = exact
        elif not resample_mask:
            how = "the same shape, another position or voxel size" if tuple(mask.shape) == tuple(shape) else \
                f"shape {tuple(mask.shape)} vs {tuple(shape)}"
            hint = "pass --resample-mask to resample it" if what == "lesion mask" else "it must be on the image's grid"
            raise InputError(f"{what} is on a different grid than the image ({how}); {hint}")
        else:
            mask = resample_mask_to((mask != 0).astype(np.uint8), mask_affine, shape, affine)
    return (mask != 0).astype(np.uint8)
