"""Qt-free library of the USBEditor Slicer module: logic (MRML <-> USBLib), background worker, dependencies.

In the extension package ``USBLib`` is installed next to this module. When the module is used straight from a
source checkout (Slicer's "Additional module paths" pointing at ``USBEditor/``), the checkout's ``USBLib``
is put on the path instead.
"""
import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("USBLib") is None:
    _checkout = Path(__file__).resolve().parents[2]
    if (_checkout / "USBLib" / "__init__.py").is_file():
        sys.path.append(str(_checkout))
