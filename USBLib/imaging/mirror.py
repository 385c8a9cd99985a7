"""A heal's fill moved towards the scan's own other hemisphere (inference-time stabilisation).

The fill of a lesion comes from the tissue around it; inside a grey nucleus (thalamus, putamen, caudate) or a
wide white-matter lesion that tissue does not say what the interior holds, and the fill's level errs by 3-8 %
(docs/model.md). The same structure in the other hemisphere of the same scan does say it: the brain is close to
left-right symmetric, with the scan's own contrast, bias and grain. Each connected part of the fill region is
mirrored across the template's mid-sagittal plane (x -> -x in template RAS, carried by the Editor's registration),
the mirror is aligned on the tissue around the part (an integer shift of up to ``SEARCH_VOX`` voxels per axis that
maximises the normalised cross-correlation over a shell ``SHELL_MM`` outside it), its level matched on that shell
(one offset: the bias field differs between the hemispheres), and the fill is moved ``weight`` of the way towards
it, with a weight that rises from the region's edge (smoothstep over ``RAMP_MM``) and with the depth below the
brain's surface (smoothstep over ``DEPTH_MM``): cortical folding is not symmetric in a person, deep anatomy nearly
is. A part whose shell does not match its mirror (NCC below ``MIN_NCC``), whose mirror falls on the drawn lesion
(a lesion on both sides, or across the midline), or whose shell is too small, is left as it was; inside a part,
voxels whose mirror is far darker than the fill (a lesion nobody drew: ``LESION_LIKE``) or lies outside the scan's
field of view (a lesion cut by it has its mirror at the same cut) are not pulled, the trust fading over a voxel
around them. Every sample of a
heal gets the same correction (from the samples' mean fill), so their spread, the edit's uncertainty, is kept.

A population template is more symmetric than any person (MNI 2009a symmetric: shell NCC 0.99): the measured gain
on templates is an upper bound (docs/model.md, "The other hemisphere").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import ndimage

from USBLib.imaging.fusion import smoothstep

SHELL_MM = (2.0, 7.0)    # the mirror is aligned and its level matched on the tissue this far outside the part
SEARCH_VOX = 3           # integer shifts of the mirror tried per axis (voxels): the hemispheres are not exact mirrors
MIN_NCC = 0.5            # shell NCC below this: the part's surroundings do not match their mirror; left as it was
MAX_ON_LESION = 0.05     # share of the mirrored part on the drawn lesion above which the part is left as it was
LESION_LIKE = 0.2        # a mirrored voxel darker than the fill by this x the tissue level around: a lesion
RAMP_MM = 2.0            # the weight rises from 0 at the region's edge to 1 at this depth inside it
DEPTH_MM = (8.0, 16.0)   # depth below the brain's surface: no mirror above the first, full weight from the second
MIN_SHELL = 50           # voxels: fewer and the part is left as it was
SEARCH_POINTS = 4000     # the shift search reads at most about this many shell points (a 10 ml lesion's shell has
#                          30 000: 343 shifts of it cost seconds per mask); the level is matched on the whole shell


@dataclass
class MirrorSource:
    """The whole scan's other hemisphere, for an edit that runs on a window of the scan.

    Args:
        image: the whole (offset-free) scan [I, J, K], in scan units.
        lesion: the whole drawn lesion mask [I, J, K] (1 = lesion; float32 is read without a copy).
        to_mirror: 4x4 map, scan voxel (i, j, k, 1) -> its mirror's voxel coordinates (``mirror_matrix``).
        depth_mm: scan voxel coordinates [N, 3] -> depth below the brain's surface (mm) [N].
        start: the window's first voxel in the whole scan (3 ints); the arrays the edit passes are the window's.
    """

    image: np.ndarray
    lesion: np.ndarray
    to_mirror: np.ndarray
    depth_mm: Callable[[np.ndarray], np.ndarray]
    start: tuple[int, int, int] = (0, 0, 0)


def mirror_matrix(native_affine: np.ndarray, model_to_native: np.ndarray) -> np.ndarray:
    """4x4 scan voxel -> mirrored scan voxel: scan voxel -> scan RAS -> template RAS, x -> -x, and back.

    Args:
        native_affine: the scan's 4x4 voxel-to-RAS affine (mm).
        model_to_native: 4x4 template RAS -> scan RAS (mm), the Editor's registration (``SpaceMapping``); the
            template's mid-sagittal plane is x = 0 (MNI space).
    """
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    native_affine, model_to_native = np.asarray(native_affine, float), np.asarray(model_to_native, float)
    return np.linalg.inv(native_affine) @ model_to_native @ flip @ np.linalg.inv(model_to_native) @ native_affine


def depth_below_surface(brain: np.ndarray, grid_affine: np.ndarray, scan_to_grid: np.ndarray
                        ) -> Callable[[np.ndarray], np.ndarray]:
    """Depth below the brain's surface (mm), as a function of scan voxel coordinates [N, 3] -> [N].

    Args:
        brain: a brain mask [X, Y, Z] on some grid (the model's).
        grid_affine: that grid's 4x4 voxel-to-RAS affine (its voxel size is read from it).
        scan_to_grid: 4x4 map, scan voxel -> grid voxel.
    """
    spacing = np.linalg.norm(np.asarray(grid_affine, float)[:3, :3], axis=0)
    edt = ndimage.distance_transform_edt(np.pad(np.asarray(brain) > 0, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    edt = edt.astype(np.float32)
    to_grid = np.asarray(scan_to_grid, float)

    def depth(voxels: np.ndarray) -> np.ndarray:
        coords = to_grid[:3, :3] @ np.asarray(voxels, float).T + to_grid[:3, 3:]
        return ndimage.map_coordinates(edt, coords, order=1, mode="constant")

    return depth


def _in_view(coords: np.ndarray, shape) -> np.ndarray:
    """Which of the voxel coordinates ``coords`` [3, N] lie in a volume of ``shape`` (within half a voxel of its
    voxels): bool [N]."""
    return np.all((coords >= -0.5) & (coords <= np.asarray(shape, float)[:, None] - 0.5), axis=0)


def _shifts(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1, dtype=float)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def _best_shift(full: np.ndarray, coords: np.ndarray, target: np.ndarray) -> tuple[np.ndarray | None, float]:
    """The integer shift (of ``_shifts(SEARCH_VOX)``) of the mirrored shell ``coords`` [3, N] whose values in
    ``full`` correlate best with ``target`` [N]: (shift [3] or None, its NCC). Every shifted shell is interpolated
    in one call (N is at most about ``SEARCH_POINTS``)."""
    target = (target - target.mean()) / (target.std() + 1e-6)
    shifts = _shifts(SEARCH_VOX)
    points = (coords[None] + shifts[:, :, None]).transpose(1, 0, 2).reshape(3, -1)
    values = ndimage.map_coordinates(full, points, order=1, mode="nearest").astype(np.float64)
    best, best_shift = -2.0, None
    for shift, row in zip(shifts, values.reshape(len(shifts), -1)):
        spread = row.std()
        if spread <= 0:
            continue
        ncc = float(np.mean(target * (row - row.mean()) / spread))
        if ncc > best:
            best, best_shift = ncc, shift
    return best_shift, best


def blend_towards_mirror(source: MirrorSource, image: np.ndarray, deviation: np.ndarray, region: np.ndarray,
                         brain: np.ndarray, spacing, weight: float) -> tuple[np.ndarray, list[dict]]:
    """The heal's ``deviation`` moved towards the mirror of each part of its fill region (module docstring).

    Args:
        source: the whole scan's other hemisphere (``MirrorSource``; its ``start`` places the window).
        image: the window of the (offset-free) scan [I, J, K] the edit runs on.
        deviation: the heal's deviation [samples, I, J, K] in scan units (healed = image + deviation).
        region: the fill region [I, J, K] bool (``USBLib.imaging.rim.rim_region``).
        brain: the window's brain mask [I, J, K] bool.
        spacing: the scan's voxel size in mm (3 values).
        weight: how far the fill moves towards the mirror where the ramps are 1 (0..1).

    Returns:
        (the new deviation, one record per part: ``voxels``, ``ncc`` (None where the part was not searched: too
        near the brain's surface, or too small a shell) and ``used``; where used, ``depth_weight`` (the mean weight
        over the part), ``lesion_like`` (the share of its voxels with a mirror in view whose mirror looked like a
        lesion) and ``in_view`` (the share of its voxels whose mirror lies in the scan's field of view)).
    """
    spacing = np.asarray(spacing, float)
    region = np.asarray(region, bool)
    out = np.array(deviation, np.float32, copy=True)
    records: list[dict] = []
    if weight <= 0 or not region.any():
        return out, records
    parts, _ = ndimage.label(region, ndimage.generate_binary_structure(3, 3))
    pad = np.ceil(SHELL_MM[1] / spacing).astype(int) + 1
    full = np.asarray(source.image, np.float32)
    lesion = np.asarray(source.lesion, np.float32)  # (0/1; nearest-neighbour reads)
    linear, offset = np.asarray(source.to_mirror, float)[:3, :3], np.asarray(source.to_mirror, float)[:3, 3:]
    for part, found in enumerate(ndimage.find_objects(parts), start=1):
        start = np.maximum(np.array([s.start for s in found]) - pad, 0)
        stop = np.minimum(np.array([s.stop for s in found]) + pad, region.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
        inside = parts[box] == part
        record: dict = {"voxels": int(inside.sum()), "ncc": None, "used": False}
        records.append(record)
        origin = np.asarray(source.start, float) + start
        inside_idx = np.argwhere(inside) + origin
        edge = smoothstep(ndimage.distance_transform_edt(inside, sampling=spacing) / RAMP_MM)
        ramp = np.zeros(inside.shape, np.float32)
        deep = smoothstep((source.depth_mm(inside_idx) - DEPTH_MM[0]) / (DEPTH_MM[1] - DEPTH_MM[0]))
        ramp[inside] = edge[inside] * deep
        if not ramp.any():
            continue  # near the brain's surface (or a part too thin to have an inside): nothing to change
        scan = np.asarray(image[box], np.float32)
        outside = ndimage.distance_transform_edt(~inside, sampling=spacing)
        shell = (np.asarray(brain[box]) > 0) & ~inside & (outside > SHELL_MM[0]) & (outside <= SHELL_MM[1])
        if int(shell.sum()) < MIN_SHELL:
            continue
        shell_coords = linear @ (np.argwhere(shell) + origin).T + offset
        inside_coords = linear @ inside_idx.T + offset
        every = max(1, -(-shell_coords.shape[1] // SEARCH_POINTS))  # a large part's shell: every k-th point
        shift, ncc = _best_shift(full, shell_coords[:, ::every], scan[shell][::every].astype(np.float64))
        record["ncc"] = round(ncc, 3)
        if shift is None or ncc < MIN_NCC:
            continue
        moved = inside_coords + shift[:, None]
        # a part whose mirror leaves the field of view (a lesion cut by it has its mirror at the same cut) is pulled
        # where its mirror is in view, its level matched on the shell points whose mirror is in view
        view = _in_view(moved, full.shape)
        shell_moved = shell_coords + shift[:, None]
        shell_view = _in_view(shell_moved, full.shape)
        if not view.any() or int(shell_view.sum()) < MIN_SHELL:
            continue
        if float(ndimage.map_coordinates(lesion, moved[:, view], order=0, mode="constant").mean()) > MAX_ON_LESION:
            continue  # the mirror is the drawn lesion (a lesion on both sides, or across the midline)
        tissue = float(np.mean(scan[shell][shell_view]))
        level = tissue - float(np.mean(ndimage.map_coordinates(full, shell_moved[:, shell_view], order=1,
                                                               mode="nearest")))
        mirrored = np.zeros(inside.shape, np.float32)
        mirrored[inside] = ndimage.map_coordinates(full, moved, order=1, mode="nearest") + level
        fill = scan + np.asarray(out[(slice(None),) + box], np.float32).mean(axis=0)
        # where the mirror is far darker than the fill it is a lesion too (one not drawn: lesions are often on both
        # sides): no pull there, and the trust fades over a voxel or so around it (no seam in the correction)
        in_view = np.zeros(inside.shape, bool)
        in_view[inside] = view
        trusted = in_view & (mirrored >= fill - LESION_LIKE * tissue)
        sigma = 1.0 / spacing
        ramp *= ndimage.gaussian_filter(trusted.astype(np.float32), sigma) / np.maximum(
            ndimage.gaussian_filter(inside.astype(np.float32), sigma), 1e-3) * trusted
        if not ramp.any():
            continue
        record.update(used=True, depth_weight=round(float(ramp[inside].mean()), 3),
                      lesion_like=round(1.0 - float(trusted.sum()) / float(in_view.sum()), 3),
                      in_view=round(float(in_view.sum()) / float(inside.sum()), 3))
        # one correction, from the samples' mean fill, for every sample: their spread (the uncertainty) stays
        out[(slice(None),) + box] += np.float32(weight) * ramp * (mirrored - fill) * inside
    return out, records
