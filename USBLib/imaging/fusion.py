"""Seam-aware fusion: blend an edit into the original scan inside a feathered region, exact elsewhere.

The edit arrives as an additive deviation (PathoSyn's view of pathology: a residual on top of anatomy) on the
scan's own grid. Its weight ramps smoothly from 1 in the core of the edit region to 0 at its border over a
distance in millimetres, so no seam appears; outside the region the output is the input, bit for bit.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.io import cast_like


def dilate_mm(mask: np.ndarray, spacing, radius_mm: float) -> np.ndarray:
    """Binary dilation by a physical radius (Euclidean distance on the voxel grid); returns bool [I, J, K].

    Args:
        mask: mask [I, J, K] (> 0 = inside).
        spacing: voxel size in mm per axis, 3 values.
        radius_mm: dilation radius in mm; <= 0 returns the mask unchanged (as bool).
    """
    mask = np.asarray(mask) > 0
    if radius_mm <= 0 or not mask.any():
        return mask
    return ndimage.distance_transform_edt(~mask, sampling=spacing) <= radius_mm


def feather_weight(region: np.ndarray, spacing, width_mm: float) -> np.ndarray:
    """Weight in [0, 1]: 0 outside ``region``, rising with the distance from its border, 1 beyond ``width_mm``.

    The ramp is a smoothstep of the distance, so the weight and its first derivative are continuous at both ends.

    Returns float32 [I, J, K].

    Args:
        region: mask [I, J, K] (> 0 = inside); the volume's edge counts as its border too.
        spacing: voxel size in mm per axis, 3 values (distances are Euclidean, in mm).
        width_mm: ramp width in mm; <= 0 gives the region itself as a 0/1 weight.
    """
    region = np.asarray(region) > 0
    if not region.any():
        return np.zeros(region.shape, np.float32)
    if width_mm <= 0:
        return region.astype(np.float32)
    padded = np.pad(region, 1)  # the volume's edge counts as border too
    dist = ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]
    r = np.clip(dist / width_mm, 0.0, 1.0)
    return (r * r * (3.0 - 2.0 * r)).astype(np.float32) * region


def smoothstep(r: np.ndarray) -> np.ndarray:
    """0 below 0, 1 above 1, and 3 r^2 - 2 r^3 between: no step in value or slope at either end."""
    r = np.clip(r, 0.0, 1.0)
    return r * r * (3.0 - 2.0 * r)


def _outer_ramp(core: np.ndarray, spacing, width_mm: float, box: tuple[slice, ...]) -> np.ndarray:
    """1 on ``core``, falling smoothly to 0 at ``width_mm`` outside it (computed on ``box`` only)."""
    out = np.zeros(core.shape, np.float32)
    sub = core[box]
    if width_mm <= 0:
        out[box] = sub
        return out
    dist = ndimage.distance_transform_edt(~sub, sampling=spacing)
    out[box] = smoothstep(1.0 - dist / width_mm).astype(np.float32)
    return out


def with_shell(core: np.ndarray, spacing, feather_mm: float, box: tuple[slice, ...]) -> tuple[np.ndarray, float]:
    """``core`` with its one-voxel shell (the 6-neighbourhood; on thick slices the next slice too) where the shell
    lies within ``feather_mm``, and the feather left for the ramp past it: ``feather_mm`` less the finest voxel
    size. A feather shorter than twice the finest voxel adds nothing: ``(core, feather_mm)``. Computed on ``box``.
    Returns (bool [I, J, K], mm)."""
    step = float(np.min(np.asarray(spacing, float)))
    if feather_mm < 2.0 * step:
        return core, feather_mm
    sub = core[box]
    shell = ndimage.binary_dilation(sub) & ~sub
    shell &= ndimage.distance_transform_edt(~sub, sampling=spacing) <= feather_mm + 1e-6
    out = core.copy()
    out[box] |= shell
    return out, feather_mm - step


def edit_weight(mask: np.ndarray | None, brain: np.ndarray, spacing, dilation_mm: float,
                feather_mm: float, core: np.ndarray | None = None, shell: bool = False) -> np.ndarray:
    """Fusion weight in [0, 1] of an edit; the edit region is where it is > 0.

    With a lesion mask: 1 on ``core`` (default: the mask grown by ``dilation_mm``; the region the edit rewrites),
    falling smoothly (smoothstep, continuous value and slope) to 0 at ``feather_mm`` beyond it, and faded out the
    same way over ``feather_mm`` beyond ``brain`` (a lesion at the brain's edge reaches at most one feather into
    the background). So the edit region is the grown mask + feather and nothing else. ``shell`` keeps the
    weight at 1 on the core's one-voxel shell too (``with_shell``), the ramp then falling over the rest of the
    feather: a heal's network estimates the lesion's tail just past its fill region (``Editor._edit_weight``). On
    an isotropic grid the edit region stays the same; on thick slices the next slice takes full weight, and the
    ramp around it can reach a little past the feather diagonally (at most the feather + a slice).
    Without a mask (whole-brain edit): the brain, feathered inwards.

    Returns float32 [I, J, K] on the scan's grid.

    Args:
        mask: lesion mask [I, J, K] (> 0 = lesion), or None / empty for a whole-brain edit.
        brain: brain mask [I, J, K] (> 0 = brain).
        spacing: voxel size in mm per axis, 3 values.
        dilation_mm: growth of the mask, in mm, that forms the default ``core``.
        feather_mm: width in mm of the smoothstep ramps (outside the core, beyond the brain, or inside the brain
            without a mask).
        core: region [I, J, K] of full weight instead of the grown mask (the lesion is always part of it), or None.
        shell: full weight on the core's one-voxel shell as well (``with_shell``).
    """
    brain = np.asarray(brain) > 0
    if mask is None or not np.any(mask):
        return feather_weight(brain, spacing, feather_mm)
    spacing = np.asarray(spacing, float)
    lesion = np.asarray(mask) > 0
    core = dilate_mm(lesion, spacing, dilation_mm) if core is None else (np.asarray(core) > 0) | lesion
    found = ndimage.find_objects(core.astype(np.uint8))[0]
    reach = np.ceil(max(feather_mm, 0.0) / spacing).astype(int) + 2
    box = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, r, n in zip(found, reach, lesion.shape))
    ramp_mm = feather_mm
    if shell:
        core, ramp_mm = with_shell(core, spacing, feather_mm, box)
    weight = _outer_ramp(core, spacing, ramp_mm, box)
    weight[box] *= _outer_ramp(brain[box] | lesion[box], spacing, feather_mm,
                               tuple(slice(0, s.stop - s.start) for s in box))[...]
    return weight.astype(np.float32)


def fuse(original: np.ndarray, deviation: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """``original + weight * deviation`` inside ``weight > 0``, cast to the original dtype; outside, the original
    array's own values (bit for bit).

    The sum is formed in float64 and cast with ``io.cast_like`` (integer types rounded and clipped to their range).

    Args:
        original: the scan [I, J, K] in its own dtype and units.
        deviation: the additive edit [I, J, K] in the scan's units (edited - original before weighting).
        weight: fusion weight [I, J, K] in [0, 1], e.g. from ``edit_weight``.
    """
    out = np.array(original, copy=True)
    inside = weight > 0
    out[inside] = cast_like(np.asarray(original, dtype=np.float64)[inside] + weight[inside] * deviation[inside],
                            out.dtype)
    return out
