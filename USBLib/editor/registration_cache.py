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

The package ships the bundled sample's registration to the default model (``SHIPPED``, read only, written by
``python -m usb_training.data.sample --registration``; read after the user's cache, and not at all when the cache is
disabled): the first thing a new user runs, ``usb demo`` or the sample in Slicer or ``usb web``, does not wait for
it. Its key holds the model's template, so a retrained model simply registers the sample again until the entry is
rewritten (``Testing/integration/test_shipped_model.py`` fails then). It is the registration SimpleITK gave when it
was written (2.5.7); another SimpleITK version may register the sample a few hundredths of a millimetre apart.
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
SHIPPED = Path(__file__).resolve().parents[1] / "resources" / FOLDER  # the sample's, to the default model


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
    """The 4x4 float64 matrix stored under ``key`` (a hex digest): the user's cache's, else the package's
    (``SHIPPED``); None where neither has it, and always None when the cache is disabled (``USB_CACHE_DIR`` empty:
    every scan is registered, as the benchmarks of a first run need)."""
    path = _entry(key)
    if path is None:
        return None
    found = _read(path)
    return found if found is not None else _read(SHIPPED / f"{key}.json")


def _read(path: Path) -> np.ndarray | None:
    """The entry at ``path``, or None (absent, unreadable, another ``VERSION``, not a finite 4x4)."""
    if not path.is_file():
        return None
    try:
        entry = json.loads(path.read_text())
        matrix = np.asarray(entry["model_to_native"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if entry.get("version") != VERSION or matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        return None
    return matrix


def save(key: str, matrix: np.ndarray, folder: Path | None = None) -> None:
    """Store the 4x4 ``matrix`` under ``key``, whole or not at all (``io.atomic_path``), in the cache (nothing when
    it is disabled or cannot be written) or in ``folder`` (``SHIPPED``: the package's entries)."""
    path = _entry(key) if folder is None else Path(folder) / f"{key}.json"
    if path is None:
        return
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"version": VERSION, "model_to_native": np.asarray(matrix, np.float64).tolist()}))
    except OutputError:
        if folder is not None:  # the package's entries are written on purpose: say why not
            raise
