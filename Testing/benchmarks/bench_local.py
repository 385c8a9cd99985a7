"""Time one lesion healed and embedded end to end with the shipped model on the 1 mm 181 x 217 x 181 sample
scan (registration, local stage, fusion), each run in its own process so that peak RSS is that run's.

    python Testing/benchmarks/bench_local.py [--device cpu|cuda] [--repeats 3] [--out results.json]

Reports min / median / max seconds over the repeats (the first run of each process loads the model and is
counted: it is what a user waits for) and the peak resident memory.
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
t0 = time.perf_counter()
from USBLib.resources import sample_files
from USBLib.imaging.io import read_volume
from USBLib.editor.editor import Editor
task, device, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
files = sample_files()
image = read_volume(files["image"], "image")
mask = read_volume(files["lesion" if task == "heal" else "embed"], "mask")
editor = Editor(None, device=device)
run = editor.heal if task == "heal" else editor.embed
res = run(image.data, image.affine, mask.data, seed=0, **extra)
seconds = time.perf_counter() - t0
print(json.dumps({"seconds": seconds, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "timings": res.provenance["timings_s"], "stages": res.provenance["settings"].get("stages")}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    variants = {"heal (defaults)": ("heal", {}), "heal, realism": ("heal", {"local_mode": "realism"}),
                "heal, drawn mask only": ("heal", {"boundary_average": False}), "embed (defaults)": ("embed", {})}
    results = {}
    for name, (task, extra) in variants.items():
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, task, args.device, json.dumps(extra)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        secs = sorted(r["seconds"] for r in runs)
        results[name] = {"seconds_min": secs[0], "seconds_median": secs[len(secs) // 2], "seconds_max": secs[-1],
                         "peak_rss_gib": max(r["peak_rss_gib"] for r in runs), "timings": runs[0]["timings"]}
        print(f"{name:<22} {secs[0]:6.1f} / {secs[len(secs) // 2]:6.1f} / {secs[-1]:6.1f} s (min/median/max), "
              f"peak RSS {results[name]['peak_rss_gib']:.2f} GiB, stages {runs[0]['timings']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
