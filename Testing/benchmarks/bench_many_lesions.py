"""Time the heal of many small lesions in one 1 mm scan (a scan of multiple sclerosis) with the shipped model: the
bundled sample with N white-matter balls (radius 1.5-3.5 voxels, at least 12 voxels apart, darkened by up to 45 %
with a soft edge) painted in, healed end to end in a fresh process (registration included, no disk cache).

    python Testing/benchmarks/bench_many_lesions.py [--lesions 5 30] [--device cpu|cuda] [--out results.json]

Reports seconds, peak resident memory and the provenance's per-stage timings for each N.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("USB_CACHE_DIR", "")  # each run registers its scan afresh, as a first run does (no disk cache)

CHILD = r"""
import json, resource, sys, time
import numpy as np
from scipy import ndimage
t0 = time.perf_counter()
from USBLib.resources import sample_files
from USBLib.imaging.io import read_volume
from USBLib.editor.editor import Editor
count, device = int(sys.argv[1]), sys.argv[2]
files = sample_files()
image = read_volume(files["image"], "image")
data = np.asarray(image.data)
own = np.asarray(read_volume(files["lesion"], "mask").data) > 0
p99 = np.percentile(data[data > 0], 99)
white = ndimage.binary_erosion(data > 0.8 * p99, iterations=3) & ~ndimage.binary_dilation(own, iterations=10)
rng = np.random.default_rng(0)
points, centres, mask = np.argwhere(white), [], np.zeros(data.shape, bool)
while len(centres) < count:
    c = points[rng.integers(len(points))]
    if all(np.abs(c - d).max() > 12 for d in centres):
        centres.append(c)
offsets = np.indices((9, 9, 9)) - 4
for c in centres:
    radius = rng.uniform(1.5, 3.5)
    mask[tuple(slice(v - 4, v + 5) for v in c)] |= (offsets ** 2).sum(0) <= radius * radius
soft = np.clip(1.5 * ndimage.gaussian_filter(mask.astype(np.float32), 1.0), 0, 1)
lesioned = (data * (1 - 0.45 * soft)).astype(data.dtype)
res = Editor(None, device=device).heal(lesioned, image.affine, mask.astype(np.uint8), seed=0)
print(json.dumps({"lesions": count, "voxels": int(mask.sum()), "seconds": time.perf_counter() - t0,
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "timings": res.provenance["timings_s"]}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, nargs="+", default=[5, 30])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for count in args.lesions:
        done = subprocess.run([sys.executable, "-c", CHILD, str(count), args.device], capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
