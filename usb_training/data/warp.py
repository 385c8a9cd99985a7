"""Dense spatial transforms on the model grid: random affine + integrated stationary velocity fields, applied
with one trilinear (or nearest) resampling. Arrays are [I, J, K] numpy; resampling runs in torch."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation


def smooth_field(shape, channels: int, control_spacing: int, rng: np.random.Generator) -> torch.Tensor:
    """Smooth random field [1, C, *shape] with unit std: Gaussian control points upsampled (cubic-like)."""
    coarse = [max(2, int(np.ceil(s / control_spacing)) + 1) for s in shape]
    field = torch.from_numpy(rng.standard_normal((1, channels, *coarse)).astype(np.float32))
    return F.interpolate(field, size=tuple(shape), mode="trilinear", align_corners=True)


def integrate_velocity(velocity: torch.Tensor, steps: int = 7, downsample: int = 2) -> torch.Tensor:
    """Displacement of the flow of a stationary velocity field (voxels), by scaling and squaring (MONAI DVF2DDF).

    Smooth fields are integrated on a grid ``downsample`` times coarser (8x cheaper in 3D) and upsampled."""
    import warnings

    from monai.networks.blocks import DVF2DDF

    shape = velocity.shape[2:]
    coarse = [max(2, s // downsample) for s in shape]
    v = F.interpolate(velocity, size=coarse, mode="trilinear", align_corners=True)
    v = v * torch.tensor([(c - 1) / (s - 1) for c, s in zip(coarse, shape)]).view(1, 3, 1, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI notes that it uses torch's grid_sample
        disp = DVF2DDF(num_steps=steps, mode="bilinear", padding_mode="border")(v)
    disp = disp / torch.tensor([(c - 1) / (s - 1) for c, s in zip(coarse, shape)]).view(1, 3, 1, 1, 1)
    return F.interpolate(disp, size=tuple(shape), mode="trilinear", align_corners=True)


def max_norm(field: torch.Tensor) -> torch.Tensor:
    """Largest vector length of a [1, 3, ...] field."""
    return (field ** 2).sum(1).amax().sqrt()


def random_affine(rng: np.random.Generator, rotation_deg: float, scale: float, shear: float,
                  translation_vox: float) -> np.ndarray:
    """4x4 voxel-space matrix about the origin (the caller centres it): rotation, anisotropic scale, shear, shift."""
    rot = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True).as_matrix()
    scl = np.diag(rng.uniform(1 - scale, 1 + scale, 3))
    sh = np.eye(3)
    sh[np.triu_indices(3, 1)] = rng.uniform(-shear, shear, 3)
    out = np.eye(4)
    out[:3, :3] = rot @ scl @ sh
    out[:3, 3] = rng.uniform(-translation_vox, translation_vox, 3)
    return out


def sampling_coords(shape, matrix: np.ndarray | None = None, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Input voxel coordinates [1, 3, *shape] for every output voxel: c + M (x - c) + u(x)."""
    grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij"))[None]
    coords = grid
    if matrix is not None:
        center = torch.tensor([(s - 1) / 2.0 for s in shape]).view(1, 3, 1, 1, 1)
        m = torch.from_numpy(matrix.astype(np.float32))
        coords = torch.einsum("ij,bj...->bi...", m[:3, :3], grid - center) + center + m[:3, 3].view(1, 3, 1, 1, 1)
    if displacement is not None:
        coords = coords + displacement
    return coords


def warp(volume: np.ndarray, coords: torch.Tensor, order: int = 1) -> np.ndarray:
    """Resample ``volume`` at voxel coordinates ``coords`` (zeros outside)."""
    shape = volume.shape
    norm = torch.stack([2 * coords[:, i] / (shape[i] - 1) - 1 for i in (2, 1, 0)], dim=-1)
    vol = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
    out = F.grid_sample(vol, norm, mode="bilinear" if order else "nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0].numpy()
