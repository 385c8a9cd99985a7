"""Synthetic lesions by anomaly randomisation: random shapes, counts and sizes, deformed by a divergence-free
flow, restricted to brain tissue with soft (partial-volume) edges.

Shapes: thresholded smooth noise (irregular blobs), ellipsoid clusters, vascular-territory-like wedges (a cone
from deep in the brain out to the cortex) and periventricular white-matter caps and bands. Sizes run from a few
voxels to a lobe. All sizes are in voxels of the model grid.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.transform import Rotation

from .prepare import CSF, DEEP_GM, GM, WM
from .warp import integrate_velocity, max_norm, sampling_coords, smooth_field, warp

TISSUE = (GM, WM, DEEP_GM)


@dataclass
class LesionSettings:
    max_lesions: int = 6
    min_radius: float = 1.5      # voxels
    max_radius: float = 16.0     # voxels (a lobe at 2 mm)
    flow_max_vox: float = 5.0    # largest displacement of the divergence-free flow
    flow_control_vox: int = 8
    edge_sigma: float = 0.7


def _grid(shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"), -1)


def _unit_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return field / (field.std() + 1e-6)


def noise_blob(grid, center, radius, labels, rng) -> np.ndarray:
    """Irregular blob: normalised distance perturbed by smooth noise, thresholded."""
    dist = np.linalg.norm(grid - center, axis=-1) / radius
    return dist + rng.uniform(0.15, 0.45) * _unit_noise(dist.shape, max(radius / 3, 1.0), rng) < 1.0


def ellipsoid_cluster(grid, center, radius, labels, rng) -> np.ndarray:
    """Several randomly oriented ellipsoids around a centre (confluent or satellite lesions)."""
    out = np.zeros(grid.shape[:3], bool)
    for _ in range(rng.integers(2, 7)):
        axes = radius * rng.uniform(0.25, 0.8, 3)
        rot = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix().astype(np.float32)
        offset = center + rng.normal(0, radius * 0.5, 3)
        local = (grid - offset) @ rot
        out |= ((local / axes) ** 2).sum(-1) <= 1.0
    return out


def wedge(grid, center, radius, labels, rng) -> np.ndarray:
    """Territory-like wedge: a cone from an apex in deep white matter towards the cortex, irregular border."""
    brain = labels > 0
    brain_center = np.array(ndimage.center_of_mass(brain), np.float32)
    direction = center - brain_center
    direction /= np.linalg.norm(direction) + 1e-6
    apex = brain_center + direction * rng.uniform(0.2, 0.5) * np.linalg.norm(center - brain_center)
    rel = grid - apex
    dist = np.linalg.norm(rel, axis=-1) + 1e-6
    cos = (rel @ direction) / dist
    half = np.deg2rad(rng.uniform(8, 25) * (radius / 8.0) ** 0.5)
    jitter = 0.15 * _unit_noise(dist.shape, 3.0, rng)
    return (cos + jitter > np.cos(min(half, np.deg2rad(45)))) & (dist < radius * 3)


def periventricular(grid, center, radius, labels, rng) -> np.ndarray:
    """Periventricular white-matter caps and bands: a band around the ventricles, broken up by noise."""
    shape = labels.shape
    brain_center = np.array(ndimage.center_of_mass(labels > 0))
    near = np.linalg.norm(grid - brain_center, axis=-1) < 0.3 * max(shape)
    ventricles = (labels == CSF) & near
    if not ventricles.any():
        return noise_blob(grid, center, radius, labels, rng)
    dist = ndimage.distance_transform_edt(~ventricles)
    band = (dist > 0) & (dist < rng.uniform(1.5, 1.5 + radius / 2))
    patchy = _unit_noise(shape, rng.uniform(1.5, 4.0), rng) > rng.uniform(-0.5, 0.8)
    local = np.linalg.norm(grid - center, axis=-1) < radius * 2.5
    return band & patchy & (labels == WM) & local


SHAPES: dict[str, Callable] = {"blob": noise_blob, "cluster": ellipsoid_cluster, "wedge": wedge,
                               "periventricular": periventricular}
SHAPE_P = {"blob": 0.4, "cluster": 0.25, "wedge": 0.15, "periventricular": 0.2}


def divergence_free_flow(shape, rng: np.random.Generator, max_vox: float, control: int) -> torch.Tensor:
    """Displacement [1, 3, *shape] of a divergence-free velocity (curl of a smooth vector potential), integrated
    by scaling and squaring and scaled so that its largest displacement is ``max_vox`` voxels."""
    potential = smooth_field(shape, 3, control, rng)[0].numpy()
    grads = [np.gradient(potential[c]) for c in range(3)]  # grads[c][d] = dA_c / dx_d
    curl = np.stack([grads[2][1] - grads[1][2], grads[0][2] - grads[2][0], grads[1][0] - grads[0][1]])
    velocity = torch.from_numpy(curl.astype(np.float32))[None]
    disp = integrate_velocity(velocity / velocity.abs().amax().clamp_min(1e-8))
    return disp / max_norm(disp).clamp_min(1e-8) * max_vox


def _centre(labels: np.ndarray, rng: np.random.Generator, shape_name: str) -> np.ndarray:
    pool = (labels == WM) if shape_name in ("periventricular", "cluster") or rng.random() < 0.6 else np.isin(labels, TISSUE)
    idx = np.flatnonzero(pool if pool.any() else labels > 0)
    return np.array(np.unravel_index(idx[rng.integers(idx.size)], labels.shape), np.float32)


def random_lesions(labels: np.ndarray, rng: np.random.Generator, s: LesionSettings = LesionSettings()
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(soft mask in [0, 1], binary mask) of one to ``max_lesions`` lesions inside brain tissue. Never empty."""
    shape = labels.shape
    grid = _grid(shape)
    tissue = np.isin(labels, TISSUE)
    for _ in range(20):
        raw = np.zeros(shape, bool)
        count = min(int(rng.geometric(0.45)), s.max_lesions)
        for _ in range(count):
            name = rng.choice(list(SHAPE_P), p=list(SHAPE_P.values()))
            radius = float(np.exp(rng.uniform(np.log(s.min_radius), np.log(s.max_radius))))
            raw |= SHAPES[name](grid, _centre(labels, rng, name), radius, labels, rng)
        flow = divergence_free_flow(shape, rng, rng.uniform(0.3, 1.0) * s.flow_max_vox, s.flow_control_vox)
        moved = warp(raw.astype(np.float32), sampling_coords(shape, None, flow))
        soft = np.clip(ndimage.gaussian_filter(moved, s.edge_sigma), 0, 1) * tissue
        binary = soft >= 0.5
        if binary.sum() >= 2:
            return soft.astype(np.float32), binary.astype(np.uint8)
    raise RuntimeError("could not place a lesion in this brain (no tissue labels?)")
