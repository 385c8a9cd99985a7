"""A scene: one randomly deformed native anatomy (a new "individual") and its registered template prior.

The anatomy (1 mm, whole head for the MNI sources) is deformed with ``data.anatomy.random_deformation`` (a random
affine about the grid centre, then an integrated stationary velocity field). Windows are sampled from it box by
box (``window``): only the box's voxels are resampled, so a scene costs one velocity integration however many
windows it gives.

The prior (``prior``) is what the Editor would read into that box at inference: a template's maps on a 2 mm model
grid (``priors.prior_maps``), carried through the registration the Editor would find. Affine registration recovers
the deformation's affine part, not its velocity field, so the box's voxels go to the template through the affine
part only, then through a rigid misregistration (3-5 degrees about a random axis, 2-4 mm shift, about the brain's
centre) and a smooth field of up to ``PRIOR_WARP_MM`` (the template is a different anatomy from the deformed
source, as an individual's brain is from the template).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from ..data.anatomy import SpatialSettings, random_deformation
from ..data.prepare import CSF, Anatomy
from ..data.warp import smooth_field

# 1 mm native grids: broader velocity fields than the 2 mm model grid's defaults (mm = voxels here)
NATIVE_DEFORMATION = SpatialSettings(rotation_deg=10.0, scale=0.1, shear=0.04, translation_vox=3.0,
                                     svf_control_vox=16, svf_max_vox=5.0, flip=0.0)
MISREGISTRATION_DEG = (3.0, 5.0)
MISREGISTRATION_MM = (2.0, 4.0)
PRIOR_WARP_MM = 3.0


@dataclass
class Scene:
    """A deformed anatomy: deformed voxel x shows anatomy voxel ``c + M (x - c) + u(x)`` (``source_coords``).

    Args:
        anatomy: the native anatomy (labels with deep grey matter, ``sites.with_deep_grey``).
        sites: its structure codes (``sites.STRUCTURES``) [I, J, K].
        affine: the anatomy's voxel-to-RAS affine (MNI mm).
        matrix: 4x4 voxel affine about the grid centre (deformed -> anatomy).
        displacement: [3, I, J, K] float32, the velocity field's displacement (voxels) on the deformed grid.
        brain_centre_mm: the anatomy's brain centre of mass in RAS mm (the misregistration's pivot).
    """

    anatomy: Anatomy
    sites: np.ndarray
    affine: np.ndarray
    matrix: np.ndarray
    displacement: np.ndarray
    brain_centre_mm: np.ndarray

    @classmethod
    def make(cls, anatomy: Anatomy, sites: np.ndarray, affine: np.ndarray, rng: np.random.Generator,
             settings: SpatialSettings = NATIVE_DEFORMATION) -> "Scene":
        """A new random deformation of ``anatomy``."""
        matrix, displacement = random_deformation(anatomy.image.shape, rng, settings)
        affine = np.asarray(affine, np.float64)
        com = np.array(ndimage.center_of_mass(anatomy.brain > 0))
        return cls(anatomy, sites, affine, matrix, displacement[0].numpy(), (affine @ np.append(com, 1.0))[:3])

    @property
    def centre(self) -> np.ndarray:
        return (np.asarray(self.anatomy.image.shape, np.float64) - 1) / 2.0

    def _affine_part(self, points: np.ndarray) -> np.ndarray:
        """Anatomy voxels of deformed voxels ``points`` [3, ...] through the affine part only."""
        c = self.centre.reshape((3,) + (1,) * (points.ndim - 1))
        return np.einsum("ij,j...->i...", self.matrix[:3, :3], points - c) + c \
            + self.matrix[:3, 3].reshape(c.shape)

    def _u(self, points: np.ndarray) -> np.ndarray:
        return np.stack([ndimage.map_coordinates(d, points, order=1, mode="nearest") for d in self.displacement])

    def source_coords(self, start, shape) -> np.ndarray:
        """Anatomy voxel coordinates [3, *shape] of the deformed box ``start`` .. ``start + shape``."""
        points = _grid(start, shape)
        return self._affine_part(points) + self._u(points)

    def locate(self, point: np.ndarray, iterations: int = 4) -> np.ndarray:
        """The deformed voxel [3] that shows anatomy voxel ``point`` [3] (fixed-point inverse of the deformation)."""
        inv = np.linalg.inv(self.matrix[:3, :3])
        c = self.centre
        x = inv @ (np.asarray(point, np.float64) - c - self.matrix[:3, 3]) + c
        for _ in range(iterations):
            u = self._u(x.reshape(3, 1))[:, 0]
            x = inv @ (np.asarray(point, np.float64) - c - self.matrix[:3, 3] - u) + c
        return x

    def window(self, start, shape) -> dict[str, np.ndarray]:
        """The deformed anatomy in a box: ``image`` (float32, the source's own contrast, 0 outside the head),
        ``brain`` (bool), ``labels`` (uint8, CSF inside the brain where unlabelled), ``sites`` (uint8)."""
        coords = self.source_coords(start, shape)
        a = self.anatomy
        sample = lambda v, order: ndimage.map_coordinates(np.asarray(v, np.float32), coords, order=order,  # noqa: E731
                                                          mode="constant", cval=0.0)
        brain = sample(a.brain, 1) > 0.5
        labels = sample(a.labels, 0).astype(np.uint8) * brain
        labels[brain & (labels == 0)] = CSF
        return {"image": np.clip(sample(a.image, 1), 0, None), "brain": brain, "labels": labels.astype(np.uint8),
                "sites": sample(self.sites, 0).astype(np.uint8)}

    def prior(self, start, shape, maps: np.ndarray, maps_affine: np.ndarray, rng: np.random.Generator
              ) -> np.ndarray:
        """The template prior [C, *shape] (``maps`` [C, ...] on a model grid with ``maps_affine``) in the deformed
        box, through the simulated registration of the module docstring; zero outside the model grid."""
        points = _grid(start, shape)
        world = _to_world(self.affine, self._affine_part(points))
        world = _misregistration(rng, self.brain_centre_mm) @ np.concatenate([world.reshape(3, -1),
                                                                               np.ones((1, world[0].size))])
        world = world[:3].reshape((3, *shape))
        warp = smooth_field(tuple(shape), 3, 12, rng)[0].numpy()
        world = world + warp / max(float(np.abs(warp).max()), 1e-6) * rng.uniform(0.0, PRIOR_WARP_MM)
        vox = _to_world(np.linalg.inv(maps_affine), world)
        return np.stack([ndimage.map_coordinates(m, vox, order=1, mode="constant", cval=0.0) for m in maps])


def _grid(start, shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, s + n, dtype=np.float64) for s, n in zip(start, shape)],
                                indexing="ij"))


def _to_world(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    c = np.asarray(affine, np.float64)
    return np.einsum("ij,j...->i...", c[:3, :3], points) + c[:3, 3].reshape((3,) + (1,) * (points.ndim - 1))


def _misregistration(rng: np.random.Generator, centre_mm: np.ndarray) -> np.ndarray:
    """A 4x4 rigid map in RAS mm: a rotation of 3-5 degrees about a random axis through ``centre_mm`` and a shift
    of 2-4 mm in a random direction."""
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    rot = Rotation.from_rotvec(np.deg2rad(rng.uniform(*MISREGISTRATION_DEG)) * axis).as_matrix()
    direction = rng.standard_normal(3)
    shift = direction / np.linalg.norm(direction) * rng.uniform(*MISREGISTRATION_MM)
    out = np.eye(4)
    out[:3, :3] = rot
    out[:3, 3] = centre_mm - rot @ centre_mm + shift
    return out

