"""Device choice and the CPU speed lever for small 3D convolutions."""
from __future__ import annotations

import types

import torch
from torch import nn

from USBLib.errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes CUDA, then Apple MPS, then the CPU; an explicit device that is absent is an input error.

    Args:
        name: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps`` (case-insensitive; empty or None means ``auto``).
            Raises ``InputError`` for an unknown or unavailable device.
    """
    name = (name or "auto").lower()
    index = name[len("cuda:"):] if name.startswith("cuda:") else None
    if name not in DEVICE_CHOICES and not (index is not None and index.isascii() and index.isdigit()):
        raise InputError(f"unknown device '{name}' (choose from {', '.join(DEVICE_CHOICES)}, or cuda:N for GPU N)")
    cuda, mps = torch.cuda.is_available(), bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda") and not cuda:
        raise InputError("device 'cuda' was asked for but no CUDA GPU is available")
    if index is not None and int(index) >= torch.cuda.device_count():
        raise InputError(f"device '{name}' was asked for but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                         "numbered from 0")
    if name == "mps" and not mps:
        raise InputError("device 'mps' was asked for but Apple MPS is not available")
    return torch.device(name)


def _onednn_conv_forward(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if (x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)):
        return torch.mkldnn_convolution(x, weight, bias, self.padding, self.stride, self.dilation, self.groups)
    return nn.Conv3d._conv_forward(self, x, weight, bias)


def use_onednn_convs(model: nn.Module) -> nn.Module:
    """Route this model's fp32 CPU Conv3d calls through oneDNN.

    PyTorch sends small batch-1 3D convolutions to ``slow_conv3d``; oneDNN is 2-3x faster for the latent U-Nets
    and numerically the same (rel. L2 ~1e-6). Only this model's conv instances are changed, nothing global.

    Calls that are not fp32 on the CPU with numeric zero padding keep PyTorch's own path; without oneDNN nothing
    is changed. Returns ``model`` itself (modified in place).

    Args:
        model: any module; its ``nn.Conv3d`` instances are patched.
    """
    if torch.backends.mkldnn.is_available():
        for module in model.modules():
            if isinstance(module, nn.Conv3d):
                module._conv_forward = types.MethodType(_onednn_conv_forward, module)
    return model
