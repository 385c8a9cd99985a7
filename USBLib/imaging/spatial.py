"""Native scan space <-> model space: affine registration to the bundle's template and resampling both ways.

Registration (SimpleITK, Mattes mutual information, similarity then affine, three resolutions) finds the map
``T`` from template RAS mm to scan RAS mm. Resampling then needs only voxel-to-voxel matrices, which scipy's
``affine_transform`` applies in one pass, so the input's own affine is never approximated.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from USBLib.errors import InputError

REGISTRATION_MODES = ("affine", "rigid", "none")
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


@dataclass
class SpaceMapping:
    """Geometry linking a native grid and the model grid through a physical transform (model RAS -> native RAS)."""

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_to_native: np.ndarray  # 4x4, RAS mm -> RAS mm

    def model_vox_to_native_vox(self) -> np.ndarray:
        return np.linalg.inv(self.native_affine) @ self.model_to_native @ self.model_affine

    def to_model(self, data: np.ndarray, order: int = 1, antialias: bool = True) -> np.ndarray:
        """Resample a native-grid array onto the model grid (zeros outside the scan)."""
        data = np.asarray(data, dtype=np.float32)
        if antialias and order > 0:
            ratio = voxel_size_ratio(self.model_affine, self.model_to_native, self.native_affine)
            sigma = np.sqrt(np.clip(ratio ** 2 - 1.0, 0.0, None)) / 2.0
            if np.any(sigma > 0.1):
                data = ndimage.gaussian_filter(data, sigma)
        return resample(data, self.model_vox_to_native_vox(), self.model_shape, order)

    def to_native(self, data: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a model-grid array onto the native grid (zeros outside the model field of view)."""
        return resample(np.asarray(data, dtype=np.float32), np.linalg.inv(self.model_vox_to_native_vox()),
                        self.native_shape, order)


def voxel_size_ratio(model_affine: np.ndarray, model_to_native: np.ndarray, native_affine: np.ndarray) -> np.ndarray:
    """How many native voxels one model voxel spans along each native axis (for anti-aliasing)."""
    vox_map = np.linalg.inv(native_affine) @ model_to_native @ model_affine
    return np.abs(vox_map[:3, :3]).max(axis=1)


def resample(data: np.ndarray, out_to_in_vox: np.ndarray, out_shape, order: int = 1) -> np.ndarray:
    """``out[v] = data[M v]`` with ``M = out_to_in_vox`` (4x4 voxel map), linear or nearest interpolation."""
    return ndimage.affine_transform(data, out_to_in_vox[:3, :3], offset=out_to_in_vox[:3, 3],
                                    output_shape=tuple(int(s) for s in out_shape), order=order, mode="constant",
                                    cval=0.0, prefilter=False).astype(np.float32)


def same_grid(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray, tol: float = 1e-3) -> bool:
    """Whether two volumes share shape and voxel-to-world affine (within ``tol`` mm)."""
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=tol)


def resample_mask_to(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a mask onto another grid; the physical extents must overlap."""
    vox_map = np.linalg.inv(mask_affine) @ affine
    out = resample(np.asarray(mask, dtype=np.float32), vox_map, shape, order=0)
    if mask.any() and not out.any():
        raise InputError("the mask does not overlap the image in physical space; cannot resample it")
    return (out > 0.5).astype(np.uint8)


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    """SimpleITK image (LPS physical space) from an array and its RAS affine; shear is dropped (polar part)."""
    import SimpleITK as sitk

    lps = _FLIP @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    u, _, vt = np.linalg.svd(lps[:3, :3] / spacing)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((u @ vt).ravel().tolist())
    img.SetOrigin(lps[:3, 3].tolist())
    return img


def _head_center(data: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, top_mm: float) -> np.ndarray:
    """RAS centre of the upper ``top_mm`` of the foreground (or of ``mask``): a neck-insensitive brain centre."""
    if mask is None:
        positive = data[data > 0]
        if positive.size == 0:
            positive = data.ravel()
        thr = float(np.percentile(positive, 60)) * 0.3
        mask = ndimage.binary_opening(data > thr, iterations=1)
        if not mask.any():
            mask = data > thr
    ijk = np.argwhere(mask)
    if len(ijk) > 200_000:
        ijk = ijk[:: len(ijk) // 200_000 + 1]
    ras = ijk @ affine[:3, :3].T + affine[:3, 3]
    keep = ras[:, 2] >= ras[:, 2].max() - top_mm
    return ras[keep].mean(axis=0)


def register(scan: np.ndarray, scan_affine: np.ndarray, template: np.ndarray, template_affine: np.ndarray,
             template_mask: np.ndarray, scan_brain_mask: np.ndarray | None = None, mode: str = "affine",
             seed: int = 0) -> np.ndarray:
    """4x4 map from template RAS mm to scan RAS mm.

    ``mode``: ``affine`` (similarity, then 12-parameter affine), ``rigid`` (similarity only) or ``none``
    (the scan is already in template space). A brain mask of the scan, when given, restricts the scan to the
    brain; otherwise the metric is evaluated inside the dilated template brain, which keeps skull and neck of
    an unstripped scan from dominating.
    """
    if mode not in REGISTRATION_MODES:
        raise InputError(f"unknown registration mode '{mode}' (choose from {', '.join(REGISTRATION_MODES)})")
    if mode == "none":
        return np.eye(4)
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # bitwise reproducible for a seed (and faster here)
    try:
        return _register(sitk, scan, scan_affine, template, template_affine, template_mask, scan_brain_mask, mode,
                         seed)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register(sitk, scan, scan_affine, template, template_affine, template_mask, scan_brain_mask, mode: str,
              seed: int) -> np.ndarray:
    scan = np.asarray(scan, dtype=np.float32)
    if scan_brain_mask is not None:
        scan = scan * (scan_brain_mask > 0)
    fixed = _to_sitk(template * (template_mask > 0), template_affine)
    fixed_mask = _to_sitk(ndimage.binary_dilation(template_mask > 0, iterations=2).astype(np.float32), template_affine)
    fixed_mask = sitk.Cast(fixed_mask, sitk.sitkUInt8)
    moving = _to_sitk(scan, scan_affine)
    t_spacing = float(np.min(fixed.GetSpacing()))
    factor = [max(1, int(t_spacing // s)) for s in moving.GetSpacing()]
    if max(factor) > 1:  # bring the scan near the template's resolution before sampling it
        moving = sitk.Shrink(sitk.SmoothingRecursiveGaussian(moving, t_spacing / 2.0), factor)

    top = 110.0
    c_fixed = _FLIP[:3, :3] @ _head_center(template, template_affine, template_mask > 0, top)
    c_moving = _FLIP[:3, :3] @ _head_center(scan, scan_affine, None if scan_brain_mask is None else scan_brain_mask > 0,
                                            top if scan_brain_mask is not None else top + 15.0)
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(c_fixed.tolist())
    similarity.SetTranslation((c_moving - c_fixed).tolist())
    transform = _run_registration(fixed, fixed_mask, moving, similarity, seed)
    if mode == "affine":
        affine_tx = sitk.AffineTransform(3)
        affine_tx.SetCenter(transform.GetCenter())
        affine_tx.SetMatrix(transform.GetMatrix())
        affine_tx.SetTranslation(transform.GetTranslation())
        transform = _run_registration(fixed, fixed_mask, moving, affine_tx, seed)
    matrix = np.eye(4)
    a = np.asarray(transform.GetMatrix()).reshape(3, 3)
    c = np.asarray(transform.GetCenter())
    matrix[:3, :3] = a
    matrix[:3, 3] = np.asarray(transform.GetTranslation()) + c - a @ c
    return _FLIP @ matrix @ _FLIP  # the SimpleITK transform maps fixed (template) LPS points to moving (scan) LPS


def _run_registration(fixed, fixed_mask, moving, transform, seed: int):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed % 2**31 + 1)  # ITK reads seed 0 as "use the wall clock"
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    levels = [f for f in (4, 2, 1) if min(fixed.GetSize()) / f >= 16] or [1]
    reg.SetShrinkFactorsPerLevel(levels)
    reg.SetSmoothingSigmasPerLevel([f / 2.0 if f > 1 else 0.0 for f in levels])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        out = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise InputError(f"registration to the model template failed: {str(exc).strip().splitlines()[-1]}") from None
    if isinstance(out, sitk.CompositeTransform):
        out = out.GetNthTransform(0)
    return out.Downcast() if hasattr(out, "Downcast") else out
