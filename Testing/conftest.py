"""Shared fixtures: a tiny random-init bundle and phantom scans written as real files."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each (also for their subprocesses)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("USB_THREADS", "1")

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import phantoms  # noqa: E402


def pytest_configure(config):
    """The tests' registrations (``USBLib.editor.registration_cache``) go to a folder of this run, shared by its
    workers and their subprocesses (they inherit the variable), never to the user's cache."""
    if "USB_CACHE_DIR" not in os.environ:
        os.environ["USB_CACHE_DIR"] = config._usb_cache_dir = tempfile.mkdtemp(prefix="usb-test-cache-")


def pytest_collection_modifyitems(config, items):
    """The files marked ``slow`` first, each file's tests in their order: pytest-xdist hands out whole files in this
    order (``--dist loadfile --no-loadscope-reorder``), so the long files start early and the short ones fill the
    two workers' ends (by its own order, by number of tests, the 45 s browser file came last)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
    if getattr(config, "_usb_cache_dir", None):
        shutil.rmtree(config._usb_cache_dir, ignore_errors=True)


SCAN_SHAPE = (48, 60, 48)
LESION_CENTER = (28.0, 5.0, 20.0)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    return phantoms.make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-test")


@pytest.fixture(scope="session")
def editor(tiny_bundle):
    from USBLib import Editor

    return Editor(tiny_bundle, device="cpu")


def oblique_affine(spacing=3.5) -> np.ndarray:
    a = np.deg2rad(10.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([spacing, spacing * 1.1, spacing])
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(SCAN_SHAPE) - 1) / 2.0) + np.array([2.0, -8.0, 6.0])
    return aff


def lps_affine(spacing=3.5) -> np.ndarray:
    aff = np.diag([-spacing, -spacing, spacing, 1.0])
    aff[:3, 3] = -aff[:3, :3] @ ((np.array(SCAN_SHAPE) - 1) / 2.0)
    return aff


AFFINES = {"axial": phantoms.grid_affine(SCAN_SHAPE, 3.5, center=(0.0, -5.0, 5.0)), "oblique": oblique_affine(),
           "lps": lps_affine()}


def make_scan(kind: str = "axial", lesion: bool = True, dtype=np.int16):
    aff = AFFINES[kind]
    img = phantoms.phantom(SCAN_SHAPE, aff, lesion_center=LESION_CENTER if lesion else None, lesion_radius=7.0,
                           noise=0.01)
    mask = phantoms.sphere_mask(SCAN_SHAPE, aff, LESION_CENTER, 9.0)
    return img.astype(dtype), mask, aff


@pytest.fixture
def scan_files(tmp_path):
    """A phantom scan with a lesion, its mask, and a mask to embed, as NIfTI files."""
    img, mask, aff = make_scan()
    paths = {"image": tmp_path / "t1.nii.gz", "mask": tmp_path / "lesion.nii.gz", "embed": tmp_path / "embed.nii.gz"}
    nib.save(nib.Nifti1Image(img, aff), str(paths["image"]))
    nib.save(nib.Nifti1Image(mask, aff), str(paths["mask"]))
    embed = phantoms.sphere_mask(SCAN_SHAPE, aff, (-25.0, -10.0, 15.0), 9.0)
    nib.save(nib.Nifti1Image(embed, aff), str(paths["embed"]))
    return paths


# ----------------------------------------------------------------- headless Slicer (Testing/slicer)
@pytest.fixture(scope="session")
def slicer_scene():
    """A real MRML scene with application and module logics from slicer-core (see Testing/slicer/headless.py)."""
    sys.path[:0] = [str(Path(__file__).resolve().parent / "slicer"),
                    str(Path(__file__).resolve().parents[1] / "USBEditor")]  # as Slicer adds a module's folder
    import headless

    return headless.bootstrap()


@pytest.fixture
def scene(slicer_scene):
    yield slicer_scene
    slicer_scene.Clear(0)


@pytest.fixture
def logic(slicer_scene):
    from USBEditorLib.logic import EditorLogic

    return EditorLogic(threads=1)
