"""The package a user installs (a wheel, not the checkout): in a clean virtual environment the sample scan and the
default model that ``usb demo`` uses are found inside the installed package, verified and loaded."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_carries_the_sample_and_the_default_model_into_a_clean_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("usb_slicer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"USBLib/resources/sample/sample_T1w.nii.gz", "USBLib/models/DEFAULT",
            "USBLib/models/usb-tiny/bundle.json"} <= set(names)
    assert [n for n in names if n.startswith("USBLib/resources/registrations/") and n.endswith(".json")]
    assert not [n for n in names if n.startswith(("Testing/", "USBEditor/"))]

    venv = tmp_path / "venv"
    # without pip of its own (ensurepip takes seconds): this environment's pip installs into it (``--python``)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the heavy dependencies come from this environment's site-packages through a .pth file; that directory is
    # not a site dir of the new venv, so the checkout's editable install (its own .pth) is not picked up
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import USBLib; print(USBLib.__file__)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(venv) in where and str(ROOT) not in where

    # what `usb demo` needs from the installed package, without running the edits (those run in test_cli with a
    # small bundle and in test_shipped_model with this one): the sample, the default model with every file it
    # lists present and unchanged (``bundle.load`` verifies their hashes), and its networks built from them
    check = ("from USBLib.resources import sample_files; from USBLib.core import bundle; from USBLib import Editor\n"
             "files = sample_files(); b = bundle.load(None); e = Editor(b, device='cpu')\n"
             "import nibabel; assert nibabel.load(files['image']).shape == (181, 217, 181)\n"
             "print(b.root, files['image'], e.bundle.has_local)")
    done = subprocess.run([str(python), "-c", check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    root, image, has_local = done.stdout.split()
    assert root.startswith(str(venv)) and image.startswith(str(venv)) and has_local == "True"
    info = subprocess.run([str(venv / "bin" / "usb"), "info"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0 and "usb-tiny" in info.stdout, info.stderr[-2000:]
