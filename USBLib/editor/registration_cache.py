"""Registrations kept on disk between processes, so that a scan edited again is not registered again.

The Slicer module starts a worker process for every run and ``usb heal`` is one process per command, so the Editor's
own memory of a scan's registration (``Editor._map``) is lost between a person's tries of the sliders on one scan;
the registration (about 4 s on one core for a 1 mm scan) was repeated on every try. Each entry here is the 4x4
``model_to_native`` of a ``SpaceMapping`` (a few hundred bytes of JSON), under a key over everything the
registration reads: the scan's voxels and affine, its brain mask, the seed and mode (the Editor's own key), the
bundle's template and brain mask (their sha256) and grid, and ``VERSION`` of the procedure. The registration is
single-threaded and seeded, so an entry holds exactly what registering again would give.

Where: ``USB_CACHE_DIR`` when set (set but empty: no disk cache), else ``$XDG_CACHE_HOME/usb`` or ``~/.cache/usb``
(Windows: ``%LOCALAPPDATA%\\usb``);
entries in its ``registrations`` folder. The cache never fails an edit: an unreadable, damaged or unwritable entry
is skipped (the scan is registered as without it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from USBLib.errors import OutputError
from USBLib.imaging.io import atomic_path

VERSION = 2  # of ``USBLib.imaging.spatial.register``'s result: bump when a change moves it
FOLDER = "registrations"


def cache_root() -> Path | None:
    """The cache folder (``USB_CACHE_DIR``, else ``$XDG_CACHE_HOME/usb``, ``%LOCALAPPDATA%\\usb`` on Windows or
    ``~/.cache/usb``), None when disabled (``USB_CACHE_DIR`` set to the empty string)."""
    given = os.environ.get("USB_CACHE_DIR")
    if given is not None:
        return Path(given) if given.strip() else None
    base = os.environ.get("XDG_CACHE_HOME") or (os.name == "nt" and os.environ.get("LOCALAPPDATA")) \
        or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "usb"


def _entry(key: str) -> Path | None:
    root = cache_root()
    return None if root is None else root / FOLDER / f"{key}.json"


def load(key: str) -> np.ndarray | None:
    """The 4x4 float64 matrix stored under ``key`` (a hex digest), or None (absent, disabled or unreadable)."""
    path = _entry(key)
    if path is None or not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        matrix = np.asarray(entry["model_to_native"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if entry.get("version") != VERSION or matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        return None
    return matrix


def save(key: str, matrix: np.ndarray) -> None:
    """Store the 4x4 ``matrix`` under ``key``, whole or not at all (``io.atomic_path``); does nothing when the cache
    is disabled or cannot be written."""
    path = _entry(key)
    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"version": VERSION, "model_to_native": np.asarray(matrix, np.float64).tolist()}))
    except OutputError:
        pass
