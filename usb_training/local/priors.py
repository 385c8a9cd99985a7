"""The tissue prior as the engine sees it: template T1 and CSF/GM/WM (and deep grey matter) probabilities on a
bundle's model grid.

``prior_maps`` gives one prior source's maps on a model grid ([5, I, J, K] float32: T1 in model units, zero
outside the brain, as ``data.prepare.model_space`` makes the bundle template; CSF, GM, WM probabilities in [0, 1];
the share of each model voxel inside FreeSurfer's deep grey nuclei).
Training reads the MNI2009a and MNI2009c maps on the ``tiny`` tier's 2 mm grid through a simulated registration
(``scenes.Scene.prior``); ``tissue_file`` writes the MNI2009c probabilities on a bundle's grid as the bundle's
``local.prior.tissue`` file (4-D NIfTI [I, J, K, 3], or 4 with deep grey matter; uint8 scaled by 1/255) with its
licence notice next to it.

MNI2009a ships GM and WM maps only (0-255): its CSF is what the brain mask leaves, 1 - GM - WM inside the brain.

Neither MNI source has a class for deep grey matter: their GM map mixes the nuclei (thalamus, caudate, putamen,
pallidum, accumbens; a level of their own on T1, between cortex and white matter) with the cortex. The fifth map
is those nuclei from fsaverage's aseg, carried onto each source by ``sites.site_map`` (the registration the training
windows' sites use) and averaged onto the model grid: a network that reads it can tell a nucleus from the cortex.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from USBLib.imaging.spatial import SpaceMapping

from ..base.config import TIERS, grid_affine
from ..data.prepare import _native, _read, _to_model
from ..data.sources import SOURCES, fetch

PRIOR_SOURCES = ("mni2009a", "mni2009c")
BUNDLE_PRIOR_SOURCE = "mni2009c"
TISSUE_FILE = "tissue_prior.nii.gz"
LICENCE_FILE = "tissue_prior_LICENSE.txt"
MNI_NOTICE = """\
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill
University. Permission to use, copy, modify, and distribute this software and its documentation for any purpose
and without fee is hereby granted, provided that the above copyright notice appear in all copies. The authors and
McGill University make no representations about the suitability of this software for any purpose. It is
provided "as is" without express or implied warranty. The authors are not responsible for any data loss,
equipment damage, property loss, or injury to subjects or patients resulting from the use or misuse of this
software package.
"""


def tiny_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the ``tiny`` tier's model grid (the shipped bundles' 2 mm MNI grid)."""
    grid = TIERS["tiny"]["grid"]
    shape = tuple(int(s) for s in grid["shape"])
    return shape, np.asarray(grid_affine(shape, grid["spacing"]))  # type: ignore[return-value]


def _tissue(name: str, paths: dict[str, Path], shape, affine: np.ndarray) -> np.ndarray:
    """CSF, GM, WM probabilities of a source on the grid [3, *shape] (anti-aliased trilinear)."""
    def on_grid(volume: np.ndarray, vol_affine: np.ndarray) -> np.ndarray:
        mapping = SpaceMapping(volume.shape, vol_affine, tuple(shape), affine, np.eye(4))
        return np.clip(mapping.to_model(volume, order=1, antialias=True), 0.0, 1.0)

    if name == "mni2009c":
        return np.stack([on_grid(*_read(paths[k])) for k in ("csf", "gm", "wm")])
    if name == "mni2009a":
        gm, aff = _read(paths["gm"])
        wm = _read(paths["wm"])[0]
        brain = _native(name, paths)["brain"][0].astype(np.float32)
        csf = np.clip(brain - gm / 255.0 - wm / 255.0, 0.0, 1.0)
        return np.stack([on_grid(csf, aff), on_grid(gm / 255.0, aff), on_grid(wm / 255.0, aff)])
    raise KeyError(f"no tissue prior for source '{name}' (have {', '.join(PRIOR_SOURCES)})")


def _deep_grey(cache: Path, name: str, shape, affine: np.ndarray) -> np.ndarray:
    """The share of each model voxel [*shape] inside the source's deep grey nuclei (``sites.NUCLEI`` of its site
    map, within its tissue), in [0, 1]."""
    from .anatomies import native_affine, native_anatomies
    from .sites import NUCLEI, TISSUE, site_map

    anatomies = native_anatomies(cache, sorted({name, "fsaverage"}))
    own_affine = native_affine(cache, name)
    codes = site_map(cache, name, anatomies[name], own_affine, anatomies["fsaverage"],
                     native_affine(cache, "fsaverage"))
    nuclei = ((codes == NUCLEI) & np.isin(anatomies[name].labels, TISSUE)).astype(np.float32)
    mapping = SpaceMapping(nuclei.shape, own_affine, tuple(shape), affine, np.eye(4))
    return np.clip(mapping.to_model(nuclei, order=1, antialias=True), 0.0, 1.0)


def prior_maps(cache: Path, name: str, shape=None, affine: np.ndarray | None = None,
               deep_grey: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(maps [5, *shape] float32: T1, CSF, GM, WM, deep grey matter, or [4, ...] without ``deep_grey``; the grid
    affine) of one prior source on a model grid (default: the tiny grid), cached as
    ``<cache>/prepared/prior/<source>_<shape>.npz`` (a cache file with the first four maps gains the fifth when it
    is asked for; the fifth needs the fsaverage anatomy and its site maps, ``sites.site_map``)."""
    if shape is None or affine is None:
        shape, affine = tiny_grid()
    tag = "x".join(str(int(s)) for s in shape) + f"_{float(np.linalg.norm(affine[:3, 0])):g}mm"
    target = Path(cache) / "prepared" / "prior" / f"{name}_{tag}.npz"
    maps = None
    if target.is_file():
        with np.load(target) as z:
            if np.allclose(z["affine"], affine) and len(z["maps"]) in (4, 5):
                if len(z["maps"]) == 5 or not deep_grey:
                    return z["maps"][:5 if deep_grey else 4], z["affine"]
                maps = z["maps"]
    if maps is None:
        paths = fetch(cache, [name])[name]
        t1 = _to_model(_native(name, paths), np.eye(4), tuple(shape), np.asarray(affine), name).image
        maps = np.concatenate([t1[None], _tissue(name, paths, shape, np.asarray(affine))]).astype(np.float32)
    if deep_grey:
        maps = np.concatenate([maps, _deep_grey(cache, name, shape, np.asarray(affine))[None]]).astype(np.float32)
    target.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(target, maps=maps, affine=np.asarray(affine, np.float64))
    return maps, np.asarray(affine, np.float64)


def tissue_file(cache: Path, shape, affine: np.ndarray, folder: Path, deep_grey: bool = False) -> dict[str, Path]:
    """Write a bundle's tissue prior (``TISSUE_FILE``: MNI2009c CSF/GM/WM and, with ``deep_grey``, the deep grey
    nuclei on the bundle grid, [I, J, K, 4] (or 3) probabilities stored as uint8 with slope 1/255) and its licence
    notice (``LICENCE_FILE``) into ``folder``; returns bundle file name -> path."""
    import nibabel as nib

    maps, affine = prior_maps(cache, BUNDLE_PRIOR_SOURCE, shape, affine, deep_grey)
    maps = maps[1:]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tissue = nib.Nifti1Image(np.round(np.clip(np.moveaxis(maps, 0, -1), 0, 1) * 255).astype(np.uint8), affine)
    tissue.header.set_slope_inter(1.0 / 255.0, 0.0)  # probabilities in steps of 1/255 (read back as floats)
    nib.save(tissue, str(folder / TISSUE_FILE))
    packaging = Path(fetch(cache, [BUNDLE_PRIOR_SOURCE])[BUNDLE_PRIOR_SOURCE]["licence0"]).read_text()
    text = (f"{TISSUE_FILE}: the ICBM 2009c Nonlinear Asymmetric MNI152 CSF/GM/WM probability maps "
            f"({SOURCES[BUNDLE_PRIOR_SOURCE].description}), resampled onto this bundle's model grid by "
            "usb_training.local.priors. Their licence:\n\n" + MNI_NOTICE +
            "\nThe maps were taken from the niworkflows 0.0.5 source distribution, whose own licence is:\n\n"
            + packaging)
    if deep_grey:
        freesurfer = Path(fetch(cache, ["fsaverage"])["fsaverage"]["licence0"]).read_text()
        text += ("\n\nIts fourth volume, deep grey matter: the thalamus, caudate, putamen, pallidum and accumbens "
                 f"labels of FreeSurfer's fsaverage aseg ({SOURCES['fsaverage'].description}), registered affinely "
                 "onto the MNI2009c template and averaged onto this bundle's model grid. FreeSurfer's licence:\n\n"
                 + freesurfer)
    (folder / LICENCE_FILE).write_text(text)
    return {TISSUE_FILE: folder / TISSUE_FILE, LICENCE_FILE: folder / LICENCE_FILE}
