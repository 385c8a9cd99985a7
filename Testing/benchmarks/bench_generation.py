"""Seconds per generated (brain, lesion) pair and per brain-for-a-mask, by sampler and step count.

    python Testing/benchmarks/bench_generation.py [--model USBLib/models/usb-tiny] [--steps 10 20 50] [--repeat 2]

Each configuration runs ``--repeat`` times after one warm-up; min / median / max wall seconds are printed as a
markdown table. Quality of the same settings: ``python -m usb_training.evaluation.generation --steps N --sampler S``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from USBLib.core import bundle as bundle_mod
from USBLib.editor.editor import Editor


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up: network loading, oneDNN kernels
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--samplers", nargs="+", default=["ddim", "dpm++2m"])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    editor = Editor(bundle_mod.load(args.model), device="cpu", registration="none")
    mask = np.zeros(editor.bundle.grid_shape, np.uint8)
    centre = [s // 2 for s in mask.shape]
    mask[centre[0] + 8:centre[0] + 14, centre[1] - 3:centre[1] + 3, centre[2] + 4:centre[2] + 10] = 1
    print(f"model {editor.bundle.name}, CPU threads {__import__('torch').get_num_threads()}")
    print("| task | sampler | steps | min s | median s | max s |\n|---|---|---|---|---|---|")
    for sampler in args.samplers:
        for steps in args.steps:
            runs = {"generate pair": lambda: editor.generate(1, steps=steps, sampler=sampler),
                    "brain for a mask": lambda: editor.generate_from_mask(mask, editor.bundle.grid_affine,
                                                                          steps=steps, sampler=sampler)}
            for task, fn in runs.items():
                t = timed(fn, args.repeat)
                print(f"| {task} | {sampler} | {steps} | {min(t):.1f} | {statistics.median(t):.1f} | {max(t):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
