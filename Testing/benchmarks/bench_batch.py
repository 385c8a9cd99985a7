"""Scans per hour of ``usb batch`` with the shipped default model on this machine.

Builds a BIDS dataset of N distinct 1 mm scans from the bundled sample (each moved by a different rigid
shift and intensity scale, so no registration is shared between scans), each with its lesion mask in
``derivatives/lesions``, and times ``usb batch`` with 1 worker and with ``--jobs J``.

    python Testing/benchmarks/bench_batch.py [--n 6] [--jobs 2] [--device cpu] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from USBLib.resources import sample_files

os.environ.setdefault("USB_CACHE_DIR", "")  # each run registers its scan afresh, as a first run does (no disk cache)


def make_dataset(root: Path, n: int) -> Path:
    files = sample_files()
    image, mask = nib.load(str(files["image"])), nib.load(str(files["lesion"]))
    data = np.asarray(image.dataobj)
    rng = np.random.default_rng(0)
    (root / "dataset_description.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "usb batch benchmark", "BIDSVersion": "1.9.0"}))
    for i in range(1, n + 1):
        affine = image.affine.copy()
        affine[:3, 3] += rng.uniform(-6, 6, 3)
        scaled = np.clip(np.rint(data * rng.uniform(0.8, 1.2)), np.iinfo(data.dtype).min, np.iinfo(data.dtype).max)
        sub = f"sub-{i:02d}"
        for path, img in ((root / sub / "anat" / f"{sub}_T1w.nii.gz", nib.Nifti1Image(scaled.astype(data.dtype), affine)),
                          (root / "derivatives" / "lesions" / sub / "anat" / f"{sub}_label-lesion_mask.nii.gz",
                           nib.Nifti1Image(np.asarray(mask.dataobj).astype(np.uint8), affine))):
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(path))
    return root


def time_batch(root: Path, out: Path, jobs: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "USBLib.apps.cli", "batch", str(root), "--out", str(out), "--jobs", str(jobs),
           "--device", device, "--quiet"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in (out / "qc" / "records").glob("*.json")]
    healed = [r for r in records if r["status"] == "healed"]
    return {"jobs": jobs, "exit_code": done.returncode, "scans": len(healed), "wall_s": round(seconds, 1),
            "scans_per_hour": round(3600 * len(healed) / seconds, 1),
            "mean_scan_s": round(float(np.mean([r["seconds"] for r in healed])), 1) if healed else None,
            "summary": done.stdout.strip()[-200:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_dataset(Path(tmp) / "bids", args.n)
        results = {"cpu_count": os.cpu_count(), "n": args.n, "device": args.device,
                   "runs": [time_batch(root, Path(tmp) / f"out{j}", j, args.device) for j in sorted({1, args.jobs})]}
        rerun = time_batch(root, Path(tmp) / "out1", 1, args.device)  # everything up to date
        results["rerun_all_up_to_date_s"] = rerun["wall_s"]
    print(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
