"""Native scan space <-> model space: affine registration to the bundle's template and resampling both ways.

Registration (SimpleITK, Mattes mutual information, similarity then affine, three resolutions) finds the map
``T`` from template RAS mm to scan RAS mm. Resampling then needs only voxel-to-voxel matrices, which scipy's
``affine_transform`` applies in one pass, so the input's own affine is never approximated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from USBLib.errors import InputError

REGISTRATION_MODES = ("affine", "rigid", "none")
SHRINK_LEVELS = (4, 2, 1)  # the registration's pyramid: template grid shrink factors, coarse to fine
SAMPLING = 0.25           # share of the template's brain voxels the metric samples at the shrunk levels
FINEST_SAMPLING = 0.10    # ... and at full resolution, where nearly all the time goes
_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS


@dataclass
class SpaceMapping:
    """Geometry linking a native grid and the model grid through a physical transform (model RAS -> native RAS).

    Args:
        native_shape: shape (I, J, K) of the scan's own grid, in voxels.
        native_affine: 4x4 voxel-to-RAS affine (mm) of the scan.
        model_shape: shape of the model grid (the bundle's ``grid_shape``), in voxels.
        model_affine: 4x4 voxel-to-RAS affine (mm) of the model grid (the bundle's ``grid_affine``, template space).
        model_to_native: 4x4 map from model (template) RAS mm to scan RAS mm, as returned by ``register``.
        derived: arrays computed from this mapping alone, kept with it for the next edit of the same scan (the
            Editor's model brain mask on the native grid); a window's mapping starts empty.
    """

    native_shape: tuple[int, int, int]
    native_affine: np.ndarray
    model_shape: tuple[int, int, int]
    model_affine: np.ndarray
    model_to_native: np.ndarray  # 4x4, RAS mm -> RAS mm
    derived: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    def window(self, window: tuple[slice, ...]) -> "SpaceMapping":
        """The same mapping for a window of the native grid (``window``: 3 slices of it, step 1): its shape, and
        its affine with the window's first voxel as the origin."""
        return SpaceMapping(tuple(s.stop - s.start for s in window), window_affine(self.native_affine, window),
                            self.model_shape, self.model_affine, self.model_to_native)

    def model_vox_to_native_vox(self) -> np.ndarray:
        """4x4 voxel-to-voxel map, model IJK -> native IJK: ``inv(native_affine) @ model_to_native @ model_affine``."""
        return np.linalg.inv(self.native_affine) @ self.model_to_native @ self.model_affine

    def to_model(self, data: np.ndarray, order: int = 1, antialias: bool = True) -> np.ndarray:
        """Resample a native-grid array onto the model grid (zeros outside the scan); returns float32 [model_shape].

        Args:
            data: values [I, J, K] on the native grid (``native_shape``), any real dtype (computed in float32).
            order: interpolation order, 0 nearest neighbour or 1 trilinear.
            antialias: when ``order > 0``, first smooth ``data`` with a Gaussian of sigma
                ``sqrt(r^2 - 1) / 2`` native voxels per axis, r from ``voxel_size_ratio`` (only where a model voxel
                spans more than one native voxel; skipped when every sigma is <= 0.1).
        """
        data = np.asarray(data, dtype=np.float32)
        if antialias and order > 0:
            ratio = voxel_size_ratio(self.model_affine, self.model_to_native, self.native_affine)
            sigma = np.sqrt(np.clip(ratio ** 2 - 1.0, 0.0, None)) / 2.0
            if np.any(sigma > 0.1):
                data = ndimage.gaussian_filter(data, sigma)
        return resample(data, self.model_vox_to_native_vox(), self.model_shape, order)

    def to_native(self, data: np.ndarray, order: int = 1) -> np.ndarray:
        """Resample a model-grid array onto the native grid (zeros outside the model field of view).

        Returns float32 [native_shape]; no anti-aliasing filter is applied.

        Args:
            data: values on the model grid [model_shape], any real dtype (computed in float32).
            order: interpolation order, 0 nearest neighbour or 1 trilinear.
        """
        return resample(np.asarray(data, dtype=np.float32), np.linalg.inv(self.model_vox_to_native_vox()),
                        self.native_shape, order)


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm per axis [3] of a 4x4 voxel-to-RAS ``affine`` (the norms of its first three columns)."""
    return np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)


def window_affine(affine: np.ndarray, window: tuple[slice, ...]) -> np.ndarray:
    """The voxel-to-RAS affine (4x4, mm) of ``window`` (3 slices, step 1) of a grid with ``affine``: the window's
    first voxel is its origin."""
    shift = np.eye(4)
    shift[:3, 3] = [s.start for s in window]
    return np.asarray(affine, np.float64) @ shift


def voxel_size_ratio(model_affine: np.ndarray, model_to_native: np.ndarray, native_affine: np.ndarray) -> np.ndarray:
    """How many native voxels one model voxel spans along each native axis (for anti-aliasing).

    Returns [3], per native axis the largest absolute entry of that row of the model-to-native voxel map.

    Args:
        model_affine: 4x4 voxel-to-RAS affine (mm) of the model grid.
        model_to_native: 4x4 map from model RAS mm to native RAS mm.
        native_affine: 4x4 voxel-to-RAS affine (mm) of the native grid.
    """
    vox_map = np.linalg.inv(native_affine) @ model_to_native @ model_affine
    return np.abs(vox_map[:3, :3]).max(axis=1)


def resample(data: np.ndarray, out_to_in_vox: np.ndarray, out_shape, order: int = 1) -> np.ndarray:
    """``out[v] = data[M v]`` with ``M = out_to_in_vox`` (4x4 voxel map), linear or nearest interpolation.

    Returns float32 [out_shape]; points that fall outside ``data`` get 0.

    Args:
        data: input values [I, J, K].
        out_to_in_vox: 4x4 map from output voxel indices to input voxel indices.
        out_shape: shape of the output grid, 3 ints.
        order: 0 nearest neighbour or 1 linear (no spline pre-filter is applied, so higher orders are not exact
            spline interpolation).
    """
    return ndimage.affine_transform(data, out_to_in_vox[:3, :3], offset=out_to_in_vox[:3, 3],
                                    output_shape=tuple(int(s) for s in out_shape), order=order, mode="constant",
                                    cval=0.0, prefilter=False).astype(np.float32)


def same_grid(shape_a, affine_a: np.ndarray, shape_b, affine_b: np.ndarray, tol: float = 1e-3) -> bool:
    """Whether two volumes share shape and voxel-to-world affine (within ``tol`` mm).

    Args:
        shape_a, shape_b: the two grid shapes, 3 ints each.
        affine_a, affine_b: their 4x4 voxel-to-RAS affines (mm).
        tol: absolute tolerance per affine entry (``np.allclose`` ``atol``).
    """
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=tol)


def reoriented_to(values: np.ndarray, affine_from: np.ndarray, shape, affine_to: np.ndarray,
                  tol: float = 1e-3) -> np.ndarray | None:
    """``values`` on the grid (``shape``, ``affine_to``) when their own grid is that grid in another axis order or
    direction (the same voxel centres: a mask saved in LPS for an RAS scan, or with its axes permuted), moved there
    exactly by transposes and flips; None when the grids differ otherwise (then only resampling can help).

    Args:
        values: voxel values [I', J', K'] on the grid ``affine_from``.
        affine_from: their 4x4 voxel-to-RAS affine (mm).
        shape: the target grid's shape, 3 ints.
        affine_to: the target grid's 4x4 voxel-to-RAS affine (mm).
        tol: how far (in voxels) any voxel of the grid, its corners included, may map from a voxel of ``values``'
            grid under a signed permutation of whole voxels (a slightly oblique mask is not taken for a reoriented
            one).
    """
    affine_from = np.asarray(affine_from, float)
    if affine_from.shape != (4, 4) or abs(np.linalg.det(affine_from[:3, :3])) < 1e-9:
        return None
    mapping = np.linalg.inv(affine_from) @ np.asarray(affine_to, float)  # target voxel index -> own voxel index
    turn, shift = np.rint(mapping[:3, :3]), np.rint(mapping[:3, 3])
    if not (np.array_equal(np.abs(turn).sum(0), np.ones(3)) and np.array_equal(np.abs(turn).sum(1), np.ones(3))):
        return None
    corners = np.array(np.meshgrid(*[[0, n - 1] for n in shape], indexing="ij")).reshape(3, -1)
    drift = (mapping[:3, :3] - turn) @ corners + (mapping[:3, 3] - shift)[:, None]
    if np.abs(drift).max() > tol:
        return None
    axes = [int(np.argmax(np.abs(turn[:, b]))) for b in range(3)]  # target axis b reads own axis axes[b]
    if tuple(np.asarray(values).shape[a] for a in axes) != tuple(shape):
        return None
    out = np.transpose(np.asarray(values), axes)
    for b, a in enumerate(axes):
        if shift[a] != (0 if turn[a, b] > 0 else shape[b] - 1):
            return None
        if turn[a, b] < 0:
            out = np.flip(out, b)
    return np.ascontiguousarray(out)


def resample_mask_to(mask: np.ndarray, mask_affine: np.ndarray, shape, affine: np.ndarray) -> np.ndarray:
    """Nearest-neighbour resampling of a mask onto another grid; the physical extents must overlap.

    Returns a uint8 {0, 1} mask [shape]. Raises ``InputError`` when a non-empty mask lands entirely outside the grid.

    Args:
        mask: mask values [I', J', K'] on its own grid; voxels > 0.5 count as inside.
        mask_affine: 4x4 voxel-to-RAS affine (mm) of ``mask``.
        shape: shape (I, J, K) of the target grid.
        affine: 4x4 voxel-to-RAS affine (mm) of the target grid.
    """
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

    Returns the float64 4x4 ``model_to_native`` of a ``SpaceMapping`` (identity for ``none``). Raises ``InputError``
    for an unknown mode or a failed registration.

    Args:
        scan: the scan [I, J, K] on its native grid, in its own units (computed in float32).
        scan_affine: 4x4 voxel-to-RAS affine (mm) of ``scan``.
        template: the bundle's template image on the model grid.
        template_affine: 4x4 voxel-to-RAS affine (mm) of the template (the bundle's ``grid_affine``).
        template_mask: brain mask on the template grid (> 0 = brain).
        scan_brain_mask: brain mask [I, J, K] of the scan (> 0 = brain), or None for an unstripped scan.
        mode: ``affine``, ``rigid`` or ``none`` (``REGISTRATION_MODES``).
        seed: seed of the metric's random sampling; registration runs single-threaded, so a seed gives bitwise
            reproducible results.
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
    # the similarity only starts the affine stage: the shrunk levels suffice (in ``rigid`` mode it is the result)
    transform = _run_registration(fixed, fixed_mask, moving, similarity, seed, finest=mode == "rigid")
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


def _run_registration(fixed, fixed_mask, moving, transform, seed: int, finest: bool = True):
    """One multi-resolution Mattes MI stage over ``SHRINK_LEVELS`` (without full resolution when ``finest`` is
    False and two shrunk levels fit): ``SAMPLING`` of the masked template's voxels sampled at the shrunk levels,
    ``FINEST_SAMPLING`` at full resolution. Against 25 % everywhere and a similarity stage at full resolution too,
    this registers a 1 mm scan in about half the time (7.0 -> 3.8 s on one core) and moves the result by at most
    0.12 mm inside the template's brain (mean 0.04 mm; eight deformed tuning-source scans, 2026-12-06)."""
    import SimpleITK as sitk

    levels = [f for f in SHRINK_LEVELS if min(fixed.GetSize()) / f >= 16] or [1]
    if not finest and len(levels) > 2:  # two shrunk levels at least: one alone misleads a small template
        levels = [f for f in levels if f > 1]
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentagePerLevel([FINEST_SAMPLING if f == 1 else SAMPLING for f in levels],
                                            seed % 2**31 + 1)  # ITK reads seed 0 as "use the wall clock"
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=150,
                                                 relaxationFactor=0.6, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
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
