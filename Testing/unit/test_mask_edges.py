"""The masks a heal averages over (``USBLib.imaging.mask_edges``): the drawn mask, a voxel smaller with every lesion
kept, a voxel larger; on thick slices the edge moves in-plane only."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.imaging.mask_edges import boundary_masks, eroded_keeping_components, neighbourhood


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape)
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def test_the_three_masks_are_nested_one_voxel_apart_and_keep_every_lesion():
    mask = _ball((24, 24, 24), (8, 12, 12), 4.0)
    mask[18, 12, 12] = True  # a one-voxel lesion an erosion would lose
    drawn, eroded, grown = boundary_masks(mask.astype(np.uint8))
    assert np.array_equal(drawn, mask)
    assert (eroded <= drawn).all() and (drawn <= grown).all()
    assert ndimage.label(eroded)[1] == ndimage.label(drawn)[1] == 2  # the single voxel stays a lesion
    assert eroded[18, 12, 12] and eroded.sum() < drawn.sum() < grown.sum()
    # one voxel along the 6-neighbourhood: the grown mask's new voxels all touch the drawn mask face to face
    assert np.array_equal(grown, ndimage.binary_dilation(drawn, ndimage.generate_binary_structure(3, 1)))
    to_drawn = ndimage.distance_transform_edt(~drawn)
    assert to_drawn[grown].max() == 1.0
    assert ndimage.distance_transform_edt(drawn)[drawn & ~eroded].max() <= 1.0


def test_on_thick_slices_the_edge_moves_in_plane_only():
    mask = np.zeros((20, 20, 9), bool)
    mask[6:14, 6:14, 3:6] = True
    drawn, eroded, grown = boundary_masks(mask, spacing=(1.0, 1.0, 5.0))
    assert not grown[:, :, 2].any() and not grown[:, :, 6].any()  # no 5 mm growth through the slices
    assert grown[5, 8, 4] and not eroded[6, 8, 4] and eroded[7, 8, 3]  # in-plane it moves, every slice kept
    assert neighbourhood((1.0, 1.0, 1.0)).sum() == 7 and neighbourhood((0.9, 1.2, 3.0)).sum() == 5
    assert np.array_equal(neighbourhood(None), ndimage.generate_binary_structure(3, 1))


def test_erosion_keeps_a_vanishing_lesion_at_its_deepest_voxels():
    mask = np.zeros((10, 10, 10), bool)
    mask[2:4, 2:4, 2:4] = True  # 2x2x2: erosion removes it entirely
    out = eroded_keeping_components(mask, 1)
    assert out.any() and (out <= mask).all()
    assert not ndimage.binary_erosion(mask).any()
