"""Analytic head phantoms and tiny random-init bundles for tests and benchmarks.

The phantom is defined in RAS millimetres, so it can be sampled on any grid (oblique, LPS-ordered, anisotropic)
and always describes the same physical head: what registration and geometry tests need.
"""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from USBLib.core import bundle as bundle_mod
from USBLib.core.networks import build_all

BRAIN_RADII = np.array([68.0, 84.0, 62.0])


def grid_affine(shape, spacing: float, center=(0.0, -10.0, 5.0)) -> np.ndarray:
    """Axis-aligned RAS affine whose grid centre lies at ``center`` mm."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = np.asarray(center) - (np.asarray(shape) - 1) / 2.0 * spacing
    return aff


def ras_coords(shape, affine: np.ndarray) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _inside(xyz: np.ndarray, center, radii) -> np.ndarray:
    return ((((xyz - np.asarray(center)) / np.asarray(radii)) ** 2).sum(-1)) <= 1.0


def brain_mask(shape, affine: np.ndarray) -> np.ndarray:
    xyz = ras_coords(shape, affine)
    return (_inside(xyz, (0, -10, 5), BRAIN_RADII) | _inside(xyz, (0, -60, -40), (40, 22, 18))).astype(np.uint8)


def phantom(shape, affine: np.ndarray, skull: bool = True, scale: float = 1000.0,
            lesion_center=None, lesion_radius: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
    """T1-like phantom: WM bright, GM darker, CSF and ventricles dark, an asymmetric cerebellum, optional skull
    and a hypointense spherical lesion. Values in [0, ~scale]."""
    xyz = ras_coords(shape, affine)
    c = np.array([0.0, -10.0, 5.0])
    img = np.zeros(shape, np.float32)
    img[_inside(xyz, c, BRAIN_RADII * 1.04)] = 0.25
    img[_inside(xyz, c, BRAIN_RADII)] = 0.65
    img[_inside(xyz, c, BRAIN_RADII * 0.8)] = 1.0
    img[_inside(xyz, (0, -60, -40), (40, 22, 18))] = 0.75
    img[_inside(xyz, (-9, 0, 12), (5, 20, 9)) | _inside(xyz, (9, 0, 12), (5, 20, 9))] = 0.2
    img[_inside(xyz, (25, 20, 30), (8, 8, 8))] = 0.55  # an off-centre grey nucleus breaks symmetries
    if skull:
        shell = _inside(xyz, c, BRAIN_RADII * 1.16) & ~_inside(xyz, c, BRAIN_RADII * 1.08)
        img[shell] = 0.45
    if lesion_center is not None and lesion_radius > 0:
        img[_inside(xyz, lesion_center, (lesion_radius,) * 3)] = 0.3
    if noise > 0:
        img += np.random.default_rng(seed).normal(0, noise, shape).astype(np.float32) * (img > 0)
    return np.clip(img, 0, None) * scale


def sphere_mask(shape, affine: np.ndarray, center, radius: float) -> np.ndarray:
    return _inside(ras_coords(shape, affine), center, (radius,) * 3).astype(np.uint8)


TINY_NETWORKS = {
    "autoencoder": {"channels": [8, 16, 16], "num_res_blocks": 1, "latent_channels": 3, "norm_num_groups": 8,
                    "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
                    "with_decoder_nonlocal_attn": False},
    "unet_lesion": {"channels": [16, 32], "num_res_blocks": 1, "attention_levels": [False, True],
                    "norm_num_groups": 8, "num_head_channels": [0, 16]},
    "unet_brain": {"channels": [16, 32], "num_res_blocks": 1, "attention_levels": [False, True],
                   "norm_num_groups": 8, "num_head_channels": [0, 16]},
}
TINY_DEFAULTS = {
    "heal": {"steps": 4, "strength": 0.3, "alpha0": 20.0, "k": 0.5, "eta": 1.0, "margin_mm": 8.0},
    "embed": {"steps": 4, "strength": 0.5, "alpha0": 20.0, "k": 0.5, "eta": 1.0, "margin_mm": 8.0},
    "generate": {"steps": 3},
    "generate_from_mask": {"steps": 3},
}


def randomise(nets: dict, seed: int) -> None:
    """Give zero-initialised layers (MONAI zeroes the U-Net output conv) small random weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in nets.values():
            for p in net.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


# three levels like the shipped network: the U-Net middle block attends over every voxel of its level, which at
# half resolution (two levels) made a 1 mm box of a coarse scan cost 10 s of attention
TINY_LOCAL = {"network": {"channels": [8, 8, 16], "num_res_blocks": 1, "attention_levels": [False, False, False],
                          "norm_num_groups": 8},
              "schedule": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                           "beta_end": 0.0195},
              "deviation_scale": 2.0, "interactive_mode": "realism"}
TINY_LOCAL_DEFAULTS = {"stages": "local", "local_mode": "fidelity", "local_steps": 2, "local_strength": 0.3,
                       "dilation_mm": 2.0}


def make_bundle(root: Path, shape=(32, 40, 32), spacing: float = 5.0, networks=None, defaults=None,
                seed: int = 0, name: str = "tiny-test", tier: str = "test", local: bool = False
                ) -> bundle_mod.ModelBundle:
    """Write a random-init bundle with a phantom template on a small model grid; ``local`` adds a random-init
    local stage (bundle schema 2)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    networks = json.loads(json.dumps(networks or TINY_NETWORKS))
    nets = build_all(networks)
    randomise(nets, seed)
    affine = grid_affine(shape, spacing)
    template = phantom(shape, affine, skull=False, scale=1.0) * brain_mask(shape, affine)
    nib.save(nib.Nifti1Image(template.astype(np.float32), affine), str(root / "template.nii.gz"))
    nib.save(nib.Nifti1Image(brain_mask(shape, affine), affine), str(root / "brain_mask.nii.gz"))
    config = {
        "name": name, "tier": tier, "description": "random-init test bundle",
        "model_space": {"shape": list(shape), "affine": affine.tolist(), "template": "template.nii.gz",
                        "brain_mask": "brain_mask.nii.gz", "space": "phantom"},
        "intensity": {"method": "brain_percentile", "percentile": 99.0, "target": 1.0, "clip": [0.0, 1.5]},
        "latent": {"scale_factor": 1.0, "clip": [-6.0, 6.0]},
        "schedule": {"num_train_timesteps": 1024, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02},
        "networks": {k: dict(v, weights="") for k, v in networks.items()},
        "defaults": json.loads(json.dumps(defaults or TINY_DEFAULTS)),
        "training": {"data": "none: random initialisation"}, "metrics": {},
    }
    state = {k: v.state_dict() for k, v in nets.items()}
    if local:
        from USBLib.editor.local.network import build_local_unet

        net = build_local_unet(TINY_LOCAL["network"])
        randomise({"local": net}, seed + 1)
        state["local"] = net.state_dict()
        config["local"] = json.loads(json.dumps(TINY_LOCAL))
        for task in ("heal", "embed"):
            config["defaults"][task].update(TINY_LOCAL_DEFAULTS)
    return bundle_mod.write(root, config, state, {"template.nii.gz": root / "template.nii.gz",
                                                  "brain_mask.nii.gz": root / "brain_mask.nii.gz"},
                            card="# tiny-test\nRandom weights, for tests only.\n")


def phantom_anatomy(shape=(32, 48, 32), spacing: float = 5.0, name: str = "phantom"):
    """The phantom as a training ``Anatomy`` (normalised T1, brain mask, CSF/GM/WM classes) on a model grid."""
    from usb_training.data.prepare import CSF, GM, WM, Anatomy

    affine = grid_affine(shape, spacing)
    image = phantom(shape, affine, skull=False, scale=1.0)
    brain = brain_mask(shape, affine)
    labels = np.zeros(shape, np.uint8)
    labels[brain > 0] = CSF
    labels[(image > 0.6) & (brain > 0)] = GM
    labels[(image > 0.9) & (brain > 0)] = WM
    return Anatomy(name, (image * brain).astype(np.float32), brain, labels), affine
