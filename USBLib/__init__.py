"""USB engine: bidirectional pathology <-> healthy editing and generation of brain MRI (no Slicer needed).

``from USBLib import Editor`` gives the Python API; heavy packages (torch, MONAI) load on first use.
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Editor", "EditResult", "ModelBundle", "load_bundle", "USBError", "InputError", "BundleError",
           "Cancelled", "__version__"]

from USBLib.errors import BundleError, Cancelled, InputError, USBError


def __getattr__(name: str):
    if name in ("Editor", "EditResult"):
        from USBLib.editor import editor

        return getattr(editor, name)
    if name == "ModelBundle":
        from USBLib.core.bundle import ModelBundle

        return ModelBundle
    if name == "load_bundle":
        from USBLib.core.bundle import load

        return load
    raise AttributeError(name)
