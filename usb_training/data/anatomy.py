"""Healthy anatomy generator: random affine + smooth diffeomorphic deformation of a template, left-right flips,
and either the template's own T1 contrast (with gamma) or label-driven contrast synthesis (SynthSeg-style,
T1-like tissue ordering). Scanner artefacts (bias field, gamma, resolution loss, noise) are applied by
``artefacts`` so that a lesion can be painted into the clean tissue image first."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .prepare import CSF, DEEP_GM, GM, WM, Anatomy
from .warp import integrate_velocity, random_affine, sampling_coords, smooth_field, warp

LABELS_ONLY = ("fsaverage",)  # sources whose own T1 is too blurred to use: contrast from labels only


@dataclass
class Healthy:
    """A deformed healthy brain before scanner artefacts: tissue image (0 outside), brain mask, classes."""

    image: np.ndarray
    brain: np.ndarray
    labels: np.ndarray


@dataclass
class SpatialSettings:
    rotation_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.04
    translation_vox: float = 3.0
    svf_control_vox: int = 10
    svf_max_vox: float = 3.0
    flip: float = 0.5


def random_deformation(shape, rng: np.random.Generator, s: SpatialSettings = SpatialSettings()):
    """A random deformation of a grid of ``shape`` (voxels): ``(matrix, displacement)``, the 4x4 voxel affine about
    the grid's centre and the integrated stationary velocity field's displacement [1, 3, *shape] (torch, voxels),
    such that ``sampling_coords(shape, matrix, displacement)`` gives, for every deformed voxel, the template voxel
    it shows."""
    velocity = smooth_field(shape, 3, s.svf_control_vox, rng)
    velocity = velocity / velocity.abs().amax().clamp_min(1e-6) * rng.uniform(0.0, s.svf_max_vox)
    matrix = random_affine(rng, s.rotation_deg, s.scale, s.shear, s.translation_vox)
    return matrix, integrate_velocity(velocity)


def deform(anatomy: Anatomy, rng: np.random.Generator, s: SpatialSettings = SpatialSettings()) -> Healthy:
    """Randomly deformed copy of a template: affine then an integrated stationary velocity field."""
    shape = anatomy.image.shape
    coords = sampling_coords(shape, *random_deformation(shape, rng, s))
    brain = warp(anatomy.brain.astype(np.float32), coords) > 0.5
    image = warp(anatomy.image, coords) * brain
    labels = warp(anatomy.labels.astype(np.float32), coords, order=0).astype(np.uint8) * brain
    labels[brain & (labels == 0)] = CSF
    if rng.random() < s.flip:
        image, brain, labels = image[::-1].copy(), brain[::-1].copy(), labels[::-1].copy()
    return Healthy(image.astype(np.float32), brain, labels.astype(np.uint8))


def synthesize_contrast(labels: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label-driven T1-like image: a random mean per class with CSF < GM < deep GM < WM, class-wise texture,
    partial-volume blur."""
    csf = rng.uniform(0.05, 0.35)
    gm = rng.uniform(0.45, 0.72)
    wm = rng.uniform(max(gm + 0.12, 0.8), 1.0)
    means = np.array([0.0, csf, gm, wm, rng.uniform(gm, wm)], np.float32)
    image = means[labels]
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), rng.uniform(0.5, 2.0))
    texture /= texture.std() + 1e-6
    image = image + rng.uniform(0.0, 0.04) * texture * (labels > 0)
    image = ndimage.gaussian_filter(image, rng.uniform(0.4, 1.0))
    return np.clip(image, 0, None) * brain


def healthy(anatomy: Anatomy, rng: np.random.Generator, synth_fraction: float = 0.5) -> Healthy:
    """A new healthy brain from a template: deformation, then real or label-driven contrast."""
    h = deform(anatomy, rng)
    if anatomy.name in LABELS_ONLY or rng.random() < synth_fraction:
        h.image = synthesize_contrast(h.labels, h.brain, rng)
    else:
        h.image = (np.clip(h.image, 0, None) ** rng.uniform(0.8, 1.25)) * h.brain
    return h


def artefacts(images: list[np.ndarray], brain: np.ndarray, seed: int) -> list[np.ndarray]:
    """The same scanner artefacts on every image of a list (healthy and lesioned versions of one brain):
    multiplicative bias field, gamma, resolution loss (anisotropic blur) and Rician noise (MONAI transforms)."""
    from monai.transforms import Compose, RandAdjustContrast, RandBiasField, RandGaussianSmooth, RandRicianNoise

    chain = Compose([
        RandBiasField(degree=3, coeff_range=(0.0, 0.3), prob=0.8),
        RandAdjustContrast(gamma=(0.75, 1.35), prob=0.7),
        RandGaussianSmooth(sigma_x=(0.0, 1.0), sigma_y=(0.0, 1.0), sigma_z=(0.0, 1.0), prob=0.5),
        RandRicianNoise(std=0.04, prob=0.7, relative=False, sample_std=True),
    ])
    out = []
    for img in images:
        chain.set_random_state(seed=seed % (2**32))
        res = chain(img[None].astype(np.float32))
        out.append(np.asarray(res[0], dtype=np.float32) * brain)
    return out


__all__ = ["Healthy", "SpatialSettings", "random_deformation", "deform", "synthesize_contrast", "healthy", "artefacts",
           "CSF", "GM", "WM", "DEEP_GM"]
