"""The three networks of USB, built from MONAI classes with hyper-parameters from ``bundle.json``.

- ``autoencoder``: image <-> latent (encode with the posterior mean): ``monai.networks.nets.AutoencoderKL``
  (``kind`` ``monai_kl``) or the patch KL autoencoder (``kind`` ``patch_kl``, ``patch_autoencoder.py``).
- ``unet_lesion`` (USB_lesion): eps_x(x_t (+) y_t, t): the lesion model sees the noisy brain latent (paper eq. 8 note).
- ``unet_brain`` (USB_brain): eps_y(y_t (+) c, t) with c the lesion condition latent (one-step x0 estimate,
  a given mask latent, or the empty-mask latent). (+) is channel concatenation.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from USBLib.core.bundle import ModelBundle, autoencoder_factor
from USBLib.errors import BundleError

AE_KEYS = {"channels", "num_res_blocks", "latent_channels", "norm_num_groups", "norm_eps", "attention_levels",
           "with_encoder_nonlocal_attn", "with_decoder_nonlocal_attn", "use_checkpoint", "include_fc"}
PATCH_AE_KEYS = {"patch", "latent_channels", "refine_channels", "refine_blocks"}
UNET_KEYS = {"channels", "num_res_blocks", "attention_levels", "norm_num_groups", "norm_eps", "num_head_channels",
             "resblock_updown", "use_flash_attention", "include_fc"}


def _kwargs(cfg: Mapping[str, Any], allowed: set[str], what: str) -> dict[str, Any]:
    unknown = set(cfg) - allowed - {"weights", "kind"}
    if unknown:
        raise BundleError(f"{what}: unknown hyper-parameters {sorted(unknown)}")
    out = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in allowed}
    return out


def build_autoencoder(cfg: Mapping[str, Any]) -> nn.Module:
    """The KL autoencoder for one-channel 3D images: MONAI AutoencoderKL (``kind`` ``monai_kl``, the default) or
    the patch autoencoder (``kind`` ``patch_kl``, ``USBLib.core.patch_autoencoder``).

    Either maps an image [B, 1, I, J, K] (model intensity units) to a latent [B, latent_channels, I/f, J/f, K/f] and
    back, f = ``downsampling_factor``. Raises ``BundleError`` for an unknown hyper-parameter.

    Args:
        cfg: the ``networks.autoencoder`` section of ``bundle.json`` (keys in ``AE_KEYS`` or ``PATCH_AE_KEYS``;
            ``weights`` is ignored).
    """
    kind = cfg.get("kind", "monai_kl")
    if kind == "patch_kl":
        from USBLib.core.patch_autoencoder import PatchKLAutoencoder

        return PatchKLAutoencoder(**_kwargs(cfg, PATCH_AE_KEYS, "autoencoder"))
    if kind != "monai_kl":
        raise BundleError(f"autoencoder: unknown kind '{kind}' (known: monai_kl, patch_kl)")
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, **_kwargs(cfg, AE_KEYS, "autoencoder"))


def build_unet(cfg: Mapping[str, Any], latent_channels: int) -> nn.Module:
    """MONAI DiffusionModelUNet taking [noisy latent | condition latent] and predicting the noise.

    Input [B, 2C, i, j, k] (x_t or y_t concatenated with its condition on channels) and timesteps [B] (long);
    output eps_hat [B, C, i, j, k]. Raises ``BundleError`` for an unknown hyper-parameter.

    Args:
        cfg: the ``networks.unet_lesion`` or ``networks.unet_brain`` section (keys in ``UNET_KEYS``).
        latent_channels: C, the autoencoder's latent channels.
    """
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(spatial_dims=3, in_channels=2 * latent_channels, out_channels=latent_channels,
                              with_conditioning=False, **_kwargs(cfg, UNET_KEYS, "unet"))


def build_all(networks_cfg: Mapping[str, Mapping[str, Any]]) -> dict[str, nn.Module]:
    """Untrained networks for a bundle's ``networks`` section.

    Returns ``autoencoder``, ``unet_lesion`` (eps_x) and ``unet_brain`` (eps_y) by name.

    Args:
        networks_cfg: the ``networks`` section of ``bundle.json``; the U-Nets' channel count C is the autoencoder's
            ``latent_channels`` (default 3).
    """
    ae_cfg = networks_cfg["autoencoder"]
    latent_channels = int(ae_cfg.get("latent_channels", 3))
    return {"autoencoder": build_autoencoder(ae_cfg),
            "unet_lesion": build_unet(networks_cfg["unet_lesion"], latent_channels),
            "unet_brain": build_unet(networks_cfg["unet_brain"], latent_channels)}


def downsampling_factor(networks_cfg: Mapping[str, Mapping[str, Any]]) -> int:
    """Image-to-latent size ratio f of the autoencoder (``bundle.autoencoder_factor``).

    Args:
        networks_cfg: the ``networks`` section of ``bundle.json``.
    """
    return autoencoder_factor(networks_cfg["autoencoder"])


def load_networks(bundle: ModelBundle, device: torch.device) -> dict[str, nn.Module]:
    """Build the networks of a bundle and load its safetensors weights (strict), in eval mode on ``device``.

    Returns the networks of ``build_all`` with gradients off. Raises ``BundleError`` when weights do not fit.

    Args:
        bundle: a loaded, verified bundle.
        device: where the networks are placed.
    """
    nets = build_all(bundle.config["networks"])
    for name, net in nets.items():
        try:
            net.load_state_dict(bundle.load_state_dict(name), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BundleError(f"{bundle.root}: weights of '{name}' do not fit its hyper-parameters ({first})") from None
        net.eval().requires_grad_(False).to(device)
    return nets
