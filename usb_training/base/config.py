"""Training tiers: model grid, network hyper-parameters, data volume and optimisation settings.

``tiny`` trains on a 2-core CPU in about two hours and ships as USBLib's default model (2 mm grid, the patch KL
autoencoder with 16 coefficients per 4x4x4 patch, U-Nets [32, 64, 64]); ``base`` is the paper's scale (1 mm grid,
MONAI AutoencoderKL with three downsamplings, U-Nets [128, 256, 256]) for GPUs. USBLib reads only the
exported bundle, so it does not care which tier made it.
"""
from __future__ import annotations

import copy
from typing import Any

MNI_CENTER_MM = (0.0, -18.0, 6.0)  # centre of the model grid in MNI RAS mm (brain incl. cerebellum fits)

SCHEDULE = {"num_train_timesteps": 1024, "schedule": "linear_beta", "beta_start": 1e-4, "beta_end": 0.02,
            "prediction_type": "v_prediction"}
INTENSITY = {"method": "brain_percentile", "percentile": 99.0, "target": 1.0, "clip": [0.0, 1.5]}

TIERS: dict[str, dict[str, Any]] = {
    "tiny": {
        "grid": {"shape": [80, 96, 80], "spacing": 2.0},
        "networks": {
            "autoencoder": {"kind": "patch_kl", "patch": 4, "latent_channels": 16, "refine_channels": 16,
                            "refine_blocks": 2},
            "unet_lesion": {"channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": [False, False, True],
                            "num_head_channels": [0, 0, 64], "norm_num_groups": 32},
            "unet_brain": {"channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": [False, False, True],
                           "num_head_channels": [0, 0, 64], "norm_num_groups": 32},
        },
        "data": {"train": 3000, "val": 32, "healthy_fraction": 0.2, "seed": 0},
        "autoencoder": {"steps": 1500, "batch": 4, "patch": [48, 48, 48], "lr": 3e-4, "kl_weight": 1e-8,
                        "mask_fraction": 0.25, "val_every": 250, "warmup": 50, "grad_clip": 1.0},
        "diffusion": {"steps": 12000, "batch": 4, "lr": 5e-4, "ema": 0.999, "clean_condition_fraction": 0.2,
                      "val_every": 250, "warmup": 200, "min_snr_gamma": 5.0, "min_snr_floor": 1.0},
        "defaults": {
            # latent heal: the settings usb_training.latent.tune chose on validation cases for the previous tiny model
            "heal": {"steps": 50, "strength": 0.3, "alpha0": 20.0, "k": 2.0, "eta": 1.0, "margin_mm": 6.0,
                     "fusion": "deviation", "prefill": "harmonic"},
            "embed": {"steps": 50, "strength": 0.6, "alpha0": 20.0, "k": 2.0, "eta": 1.0, "margin_mm": 6.0},
            # generation: deterministic DDIM, 50 steps (NCC with held-out brains +0.015 over DPM-Solver++(2M) at 25
            # steps on three checkpoints, and over 50 steps on one; 8.7 s per pair on 2 cores)
            "generate": {"steps": 50, "sampler": "ddim"},
            "generate_from_mask": {"steps": 50, "sampler": "ddim", "lesion_guidance": 2.0, "lesion_fusion": True,
                                   "margin_mm": 3.0, "dilation_mm": 1.0},
        },
    },
    "base": {
        "grid": {"shape": [160, 192, 160], "spacing": 1.0},
        "networks": {
            "autoencoder": {"channels": [64, 128, 128, 128], "num_res_blocks": 2, "latent_channels": 3,
                            "norm_num_groups": 32, "attention_levels": [False, False, False, False],
                            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False},
            "unet_lesion": {"channels": [128, 256, 256], "num_res_blocks": 1, "attention_levels": [False, False, True],
                            "num_head_channels": [0, 0, 256], "norm_num_groups": 32},
            "unet_brain": {"channels": [128, 256, 256], "num_res_blocks": 1, "attention_levels": [False, False, True],
                           "num_head_channels": [0, 0, 256], "norm_num_groups": 32},
        },
        "data": {"train": 4000, "val": 64, "healthy_fraction": 0.2, "seed": 0},
        "autoencoder": {"steps": 60000, "batch": 2, "patch": [96, 96, 96], "lr": 1e-4, "kl_weight": 1e-6,
                        "mask_fraction": 0.3, "val_every": 2000, "warmup": 500, "full_volume_steps": 5000},
        "diffusion": {"steps": 150000, "batch": 8, "lr": 1e-4, "ema": 0.9999, "clean_condition_fraction": 0.2,
                      "val_every": 5000, "warmup": 1000, "min_snr_gamma": 5.0},
        "defaults": {
            "heal": {"steps": 100, "strength": 0.3, "alpha0": 20.0, "k": 2.0, "eta": 1.0, "margin_mm": 6.0},
            "embed": {"steps": 100, "strength": 0.5, "alpha0": 20.0, "k": 2.0, "eta": 1.0, "margin_mm": 6.0},
            "generate": {"steps": 100},
            "generate_from_mask": {"steps": 100, "lesion_fusion": True, "margin_mm": 3.0, "dilation_mm": 1.0},
        },
    },
}


def tier(name: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """A deep copy of a tier's settings, with nested ``overrides`` merged in (used by tests for tiny runs)."""
    if name not in TIERS:
        raise KeyError(f"unknown tier '{name}' (known: {', '.join(TIERS)})")
    cfg = copy.deepcopy(TIERS[name])
    cfg["name"] = name

    def merge(base: dict, extra: dict) -> None:
        for key, value in extra.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                merge(base[key], value)
            else:
                base[key] = copy.deepcopy(value)

    merge(cfg, overrides or {})
    return cfg


def grid_affine(shape, spacing: float, center=MNI_CENTER_MM) -> list[list[float]]:
    """RAS affine of the model grid: axis-aligned, ``spacing`` mm, centred on ``center``."""
    aff = [[0.0] * 4 for _ in range(4)]
    for i in range(3):
        aff[i][i] = float(spacing)
        aff[i][3] = float(center[i]) - (int(shape[i]) - 1) / 2.0 * float(spacing)
    aff[3][3] = 1.0
    return aff
