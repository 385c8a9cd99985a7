"""A deep lesion's fill brought to the tissue prior's level (``USBLib.editor.local.prior_anchor``)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.editor.local.prior_anchor import GATE_MM, anchor_to_prior, lesion_gates
from USBLib.imaging.boxes import Box

SHAPE = (64, 64, 64)
WM, GM, CSF = 1.0, 0.7, 0.2


def _phantom():
    """White matter with a grey-matter slab and a ventricle (CSF slab) along one side; CSF/GM/WM maps that say so."""
    zz, yy, xx = np.indices(SHAPE)
    csf = (xx < 12).astype(np.float32)
    gm = ((xx >= 50) & (xx < 56)).astype(np.float32)
    wm = 1.0 - csf - gm
    healthy = (CSF * csf + GM * gm + WM * wm).astype(np.float32)
    healthy += np.random.default_rng(0).normal(0, 0.01, SHAPE).astype(np.float32)
    return healthy, np.stack([csf, gm, wm]), np.sqrt((zz - 32) ** 2 + (yy - 32) ** 2 + (xx - 28) ** 2)


def _read(classes):
    def read(box: Box) -> np.ndarray:
        return np.stack([box.read(c) for c in classes])
    return read


def _sagging_heal(healthy, region, ventricle_side):
    """A fill that sags towards the ventricle beside it, as a base anchored on a half-CSF edge does: the deviation
    of the healed scan from ``healthy`` [1, ...]: too dark by up to 30 % of white matter deep inside."""
    depth = ndimage.distance_transform_edt(region)
    sag = -0.3 * np.clip(depth / 6.0, 0, 1) * region * ventricle_side
    return (sag[None] + 0 * healthy[None]).astype(np.float32)


def test_a_deep_lesion_fill_that_sags_towards_a_ventricle_is_brought_to_the_level_the_prior_predicts():
    healthy, classes, r = _phantom()
    mask = (r <= 14).astype(np.uint8)                       # 11 ml, 14 mm deep: fully anchored
    region = ndimage.binary_dilation(mask, iterations=2)
    assert lesion_gates(mask, (1.0, 1.0, 1.0))[1] == [1.0]
    image = healthy  # the scan outside the region (the lesion inside it is replaced by the fill)
    deviation = _sagging_heal(healthy, region, np.ones(SHAPE))
    anchored = anchor_to_prior(image, deviation, mask, region, np.ones(SHAPE, bool), (1.0, 1.0, 1.0),
                               _read(classes))
    inner = ndimage.binary_erosion(region, iterations=5)
    before = np.abs(deviation[0][inner]).mean()
    after = np.abs(anchored[0][inner]).mean()              # error against the truth (healthy): the deviation itself
    assert after < 0.25 * before
    assert np.array_equal(anchored[0][~region], deviation[0][~region])    # nothing outside the fill region moves
    edge = region & ~ndimage.binary_erosion(region)          # the edge keeps most of the network's fill
    moved = np.abs(anchored[0] - deviation[0])
    assert moved[edge].mean() < 0.3 * moved[inner].mean()


def test_a_small_lesion_is_left_exactly_as_the_network_healed_it():
    healthy, classes, r = _phantom()
    mask = (r <= GATE_MM[0] - 1).astype(np.uint8)          # its deepest voxel within the gate: no anchor
    region = ndimage.binary_dilation(mask, iterations=2)
    deviation = _sagging_heal(healthy, region, np.ones(SHAPE))
    assert lesion_gates(mask, (1.0, 1.0, 1.0))[1] == [0.0]
    out = anchor_to_prior(healthy, deviation, mask, region, np.ones(SHAPE, bool), (1.0, 1.0, 1.0), _read(classes))
    assert np.array_equal(out, deviation)


def test_the_gate_measures_depth_in_mm_on_anisotropic_voxels():
    _, _, r = _phantom()
    mask = (r <= 10).astype(np.uint8)                     # 10 voxels deep
    assert lesion_gates(mask, (1.0, 1.0, 1.0))[1][0] > 0.3
    assert lesion_gates(mask, (0.5, 0.5, 0.5))[1] == [0.0]   # the same voxels at 0.5 mm: 5 mm deep
