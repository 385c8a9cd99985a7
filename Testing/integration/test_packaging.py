"""The package a user installs (a wheel, not the checkout): ``usb demo`` runs from it in a clean virtual
environment, with the sample scan and the default model found inside the installed package."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_usb_demo_runs_from_a_wheel_in_a_clean_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("usb_slicer-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {"USBLib/resources/sample/sample_T1w.nii.gz", "USBLib/models/DEFAULT",
            "USBLib/models/usb-tiny/bundle.json"} <= set(names)
    assert not [n for n in names if n.startswith(("Testing/", "USBEditor/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    # the heavy dependencies come from this environment's site-packages through a .pth file; that directory is
    # not a site dir of the new venv, so the checkout's editable install (its own .pth) is not picked up
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(python), "-c", "import USBLib; print(USBLib.__file__)"], cwd=tmp_path, env=env,
                           check=True, capture_output=True, text=True).stdout
    assert str(venv) in where and str(ROOT) not in where

    out = tmp_path / "demo"
    done = subprocess.run([str(venv / "bin" / "usb"), "demo", "--out", str(out), "--quiet"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "montage.png").is_file() and len(list(out.glob("*.nii.gz"))) >= 2
