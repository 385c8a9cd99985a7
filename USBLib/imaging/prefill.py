"""Smooth pre-fill of a lesion before healing: harmonic (Laplace) or biharmonic interpolation from its surroundings.

Healing starts the diffusion from the scan with its lesion already replaced by a smooth fill, so the network
only has to add the anatomy and texture a smooth fill lacks (PathoSyn's view of pathology as an additive
deviation, removed before the generative model works). The fill touches only mask voxels.

Both fills solve a sparse linear system per connected lesion on its bounding box plus a margin:
harmonic: discrete Laplacian = 0 inside the mask; biharmonic: minimum of the squared discrete Laplacian
(the normal equations give Laplacian^2 = 0 inside), which reproduces linear and quadratic intensity trends.
Both systems are symmetric positive definite: small ones are solved directly, larger ones by conjugate gradients
(``_solve``; a direct LU of a large infarct's fill took 17 s of a 58 s heal, CG under a second).
Where a lesion reaches the volume's outer face the Laplacian there mirrors the face (zero normal derivative,
Neumann), so face voxels are filled like the rest instead of keeping their lesion values as a boundary.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.linalg import cg, spsolve

from USBLib.settings import PREFILLS  # noqa: F401  (defined once, with every other setting)

_OFFSETS = [(a, s) for a in range(3) for s in (-1, 1)]
DIRECT_LIMIT = 2_000   # unknowns up to which a direct sparse solve is used; conjugate gradients above
CG_RTOL = 1e-10        # residual relative to the right-hand side: the fill within about 1e-8 of the exact solution
CG_MAXITER = 20_000    # iterations before falling back to the direct solve (a 38 000-unknown fill takes about 1 600)
FALLBACK_LIMIT = 60_000  # unknowns up to which an unconverged CG falls back to the direct solve (its LU fills in)


def _laplacian_rows(shape: tuple[int, ...], rows: np.ndarray) -> sparse.csr_matrix:
    """7-point Laplacian rows (flat indices ``rows``) over a box of ``shape``. A neighbour past the box's face is
    the voxel itself (a mirrored face: the diagonal becomes -5, -4, ...); rows on faces shared with other voxels of
    the volume are never asked for (``_interior``)."""
    coords = np.stack(np.unravel_index(rows, shape), axis=1)
    r = [np.arange(len(rows))]
    c = [rows]
    v = [np.full(len(rows), -6.0)]
    for axis, step in _OFFSETS:
        nb = coords.copy()
        nb[:, axis] = np.clip(nb[:, axis] + step, 0, shape[axis] - 1)
        r.append(np.arange(len(rows)))
        c.append(np.ravel_multi_index(tuple(nb.T), shape))
        v.append(np.ones(len(rows)))
    return sparse.csr_matrix((np.concatenate(v), (np.concatenate(r), np.concatenate(c))),
                             shape=(len(rows), int(np.prod(shape))))


def _interior(shape: tuple[int, ...], open_faces: tuple[tuple[bool, bool], ...] = ((False, False),) * 3
              ) -> np.ndarray:
    """Voxels whose Laplacian may be used: all but the box's faces, except faces that are the volume's own outer
    faces (``open_faces[axis] = (low, high)``), where the Laplacian mirrors."""
    inside = np.ones(shape, bool)
    for axis, (low, high) in enumerate(open_faces):
        index = [slice(None)] * 3
        if not low:
            index[axis] = 0
            inside[tuple(index)] = False
        if not high:
            index[axis] = shape[axis] - 1
            inside[tuple(index)] = False
    return inside


def _solve(a: sparse.csr_matrix, b: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """The solution of ``a x = b`` for a symmetric positive definite ``a`` [n, n] (``b``, ``x0`` [n]).

    A direct sparse LU factorisation fills in badly on these 3D systems (a 38 000-unknown biharmonic fill took
    17 s, most of a large heal's time); conjugate gradients from ``x0`` reach the same fill within about 1e-8 in
    under a second. The direct solve is kept for small systems, and as the fallback when CG does not converge on a
    system small enough to factorise (``FALLBACK_LIMIT``; above it the last CG iterate is returned)."""
    if a.shape[0] <= DIRECT_LIMIT:
        return np.asarray(spsolve(a.tocsc(), b))
    x, info = cg(a, b, x0=x0, rtol=CG_RTOL, maxiter=CG_MAXITER)
    if info != 0 and a.shape[0] <= FALLBACK_LIMIT:
        return np.asarray(spsolve(a.tocsc(), b))
    return x


def _fill_box(values: np.ndarray, unknown: np.ndarray, order: int, interior: np.ndarray) -> np.ndarray:
    """Fill ``unknown`` voxels of a box; voxels outside ``interior`` (the box's inner faces) must be known."""
    shape = values.shape
    flat = values.ravel().astype(np.float64)
    unk = np.flatnonzero(unknown)
    known = np.flatnonzero(~unknown)
    start = np.full(len(unk), flat[known].mean() if len(known) else 0.0)
    if order == 1:  # harmonic: the Laplacian rows of the unknowns themselves (negated: positive definite)
        lap = _laplacian_rows(shape, unk)
        a, b = -lap[:, unk], lap[:, known] @ flat[known]
    else:  # biharmonic: every Laplacian row touching an unknown, least squares
        touching = ndimage.binary_dilation(unknown) & interior
        lap = _laplacian_rows(shape, np.flatnonzero(touching))
        lu, lk = lap[:, unk], lap[:, known]
        a, b = (lu.T @ lu).tocsr(), -(lu.T @ (lk @ flat[known]))
    out = flat.copy()
    out[unk] = _solve(a.tocsr(), b, start)
    return out.reshape(shape)


def prefill(image: np.ndarray, mask: np.ndarray, method: str = "biharmonic") -> np.ndarray:
    """``image`` (float32) with the ``mask`` voxels replaced by a smooth fill; ``none`` returns a float copy.

    Returns float32 [I, J, K], equal to ``image`` outside the mask; mask voxels on the volume's outer faces are
    filled too (mirrored boundary). Raises ``ValueError`` for an unknown method.

    Args:
        image: the scan [I, J, K] in its own units, any real dtype (solved in float64).
        mask: lesion mask [I, J, K] (> 0 = voxels to fill).
        method: ``none``, ``harmonic`` (Laplacian = 0 inside) or ``biharmonic`` (Laplacian^2 = 0 inside), see
            ``settings.PREFILLS``.
    """
    if method not in PREFILLS:
        raise ValueError(f"unknown prefill '{method}' (choose from {', '.join(PREFILLS)})")
    out = np.asarray(image, np.float32).copy()
    lesion = np.asarray(mask) > 0
    if method == "none" or not lesion.any():
        return out
    order = 1 if method == "harmonic" else 2
    margin = order + 1
    labels, _ = ndimage.label(ndimage.binary_dilation(lesion, iterations=margin))
    for box in ndimage.find_objects(labels):
        box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, lesion.shape))
        open_faces = tuple((s.start == 0, s.stop == n) for s, n in zip(box, lesion.shape))
        interior = _interior(lesion[box].shape, open_faces)
        unknown = lesion[box] & interior
        if unknown.all():
            continue  # nothing known to fill from (the mask covers the whole volume)
        if unknown.any():
            out[box] = _fill_box(out[box], unknown, order, interior).astype(np.float32)
    return out
