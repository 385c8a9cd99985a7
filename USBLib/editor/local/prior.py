"""The template's tissue prior in a lesion box: template T1 and CSF/GM/WM (and deep grey matter) probabilities,
registered into the scan.

A bundle whose local network reads prior channels (``conditioning.PRIOR_INPUTS``) ships the maps on its model grid:
the template (``model_space.template``, model intensity units, zero outside the brain) and a 4-D NIfTI of tissue
probabilities (``local.prior.tissue``, [I, J, K, C]: CSF, GM, WM and, with C = 4, deep grey matter, in [0, 1]).
The Editor's registration (``SpaceMapping``, template RAS -> scan RAS) carries them into the scan: for each box only
the box's voxels are resampled (trilinear, zero outside the model grid's field of view), as
``SpaceMapping.to_native`` would give them on the whole scan.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from USBLib.imaging.boxes import Box
from USBLib.imaging.spatial import SpaceMapping

TISSUE_CLASSES = ("csf", "gm", "wm", "deep_gm")  # order of the volumes in the bundle's tissue-prior file (3 or 4)


def load_prior_maps(template: np.ndarray, tissue_path: Path) -> np.ndarray:
    """The prior on the model grid: [1 + C, I, J, K] float32 (template T1, CSF, GM, WM[, deep GM]), from the bundle's
    template [I, J, K] (model units) and its tissue-prior file (4-D NIfTI [I, J, K, C] on the same grid, C = 3 or
    4: the first C of ``TISSUE_CLASSES``)."""
    import nibabel as nib

    tissue = np.asarray(nib.load(str(tissue_path)).dataobj, dtype=np.float32)
    if tissue.ndim != 4 or tissue.shape[:3] != np.shape(template) or tissue.shape[3] not in (3, len(TISSUE_CLASSES)):
        raise ValueError(f"{tissue_path}: the tissue prior must be [I, J, K, 3] or [I, J, K, 4] on the model grid "
                         f"{tuple(np.shape(template))}, got {tissue.shape}")
    return np.concatenate([np.asarray(template, np.float32)[None], np.moveaxis(tissue, -1, 0)])


class TissuePrior:
    """The prior maps [1 + C, I, J, K] on the model grid, read box by box on a scan's grid through ``mapping``.

    Args:
        maps: [1 + C, I, J, K] float32 on the model grid (``load_prior_maps``).
        mapping: the scan <-> model mapping of the Editor's registration.
    """

    def __init__(self, maps: np.ndarray, mapping: SpaceMapping):
        self.maps, self.mapping = maps, mapping

    def read(self, box: Box) -> np.ndarray:
        """The prior on the voxels of ``box`` (a box on the scan's grid; it may reach past the scan):
        [1 + C, *box.shape] float32, trilinear, zero outside the model grid."""
        sub = self.mapping.window(tuple(slice(s, s + n) for s, n in zip(box.start, box.shape)))
        return np.stack([sub.to_native(m, order=1) for m in self.maps])
