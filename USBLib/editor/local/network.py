"""The local deviation network: a MONAI ``DiffusionModelUNet`` (3D) predicting the clean deviation x0.

Inputs: [x_t | condition channels] (``conditioning.network_input``: the bundle's ``local.inputs``, four channels by
default) with x_t the noisy scaled deviation; ``class_labels`` carry the direction
and the mode: 0 heal-sample, 1 embed-sample, 2 heal-deterministic, 3 embed-deterministic. In deterministic
mode x_t is zero and t is the last training step: the output is the network's estimate of the conditional mean
E[d | condition] (the anatomical reconstruction that PSNR rewards); in sample mode it is the usual one-step
estimate x0_hat(x_t, t) of the diffusion sampler.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from USBLib.editor.local.conditioning import N_CHANNELS

N_CLASSES = 4
UNET_KEYS = {"channels", "num_res_blocks", "attention_levels", "norm_num_groups", "norm_eps", "num_head_channels",
             "resblock_updown", "include_fc"}


def class_label(direction: int, deterministic: bool) -> int:
    """Class index for a direction (0 heal, 1 embed) and mode."""
    return int(direction) + (2 if deterministic else 0)


def build_local_unet(cfg: Mapping[str, Any], n_inputs: int = N_CHANNELS) -> nn.Module:
    """Untrained local network from a bundle's ``local.network`` section, reading ``n_inputs`` condition channels
    (plus x_t)."""
    from monai.networks.nets import DiffusionModelUNet

    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in UNET_KEYS}
    return DiffusionModelUNet(spatial_dims=3, in_channels=1 + int(n_inputs), out_channels=1, with_conditioning=False,
                              num_class_embeds=N_CLASSES, **kwargs)


def size_multiple(cfg: Mapping[str, Any]) -> int:
    """Box sides must be multiples of this (2 per U-Net level after the first)."""
    return 2 ** (len(cfg["channels"]) - 1)
