"""Time each USB task end to end on a 1 mm 181 x 217 x 181 scan (the bundled sample), with peak memory.

Two configurations run side by side with random weights (speed does not depend on the weights):
- ``tiny``: the default tier's shape (2 mm 80x96x80 grid, AE (32,64,64), U-Nets (32,64,64)) at default settings;
- ``upstream``: the authors' configuration (1 mm 160x192x160 grid, AE (64,128,128,128) x2 res blocks,
  U-Nets (128,256,256), 300 steps for heal, 500 for embed, 342 for generation).
Each (configuration, task) runs in its own process; peak RSS is that process's. ``--max-steps N`` caps the
network steps of a run and scales the denoising time up to the configured count (marked "extrapolated").

    python Testing/benchmarks/bench_tasks.py [--device cpu|cuda] [--max-steps N] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("USB_CACHE_DIR", "")  # each run registers its scan afresh, as a first run does (no disk cache)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

CONFIGS = {
    "tiny": {
        "shape": (80, 96, 80), "spacing": 2.0,
        "networks": {
            "autoencoder": {"channels": [32, 64, 64], "num_res_blocks": 1, "latent_channels": 3, "norm_num_groups": 32,
                            "attention_levels": [False, False, False], "with_encoder_nonlocal_attn": False,
                            "with_decoder_nonlocal_attn": False},
            "unet_lesion": {"channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": [False, False, True],
                            "norm_num_groups": 32, "num_head_channels": [0, 0, 64]},
            "unet_brain": {"channels": [32, 64, 64], "num_res_blocks": 1, "attention_levels": [False, False, True],
                           "norm_num_groups": 32, "num_head_channels": [0, 0, 64]}},
        "defaults": {"heal": {"steps": 50, "strength": 0.3, "alpha0": 20.0, "k": 0.5, "eta": 1.0, "margin_mm": 4.0},
                     "embed": {"steps": 50, "strength": 0.5, "alpha0": 20.0, "k": 0.5, "eta": 1.0, "margin_mm": 4.0},
                     "generate": {"steps": 50}, "generate_from_mask": {"steps": 50}}},
    "upstream": {
        "shape": (160, 192, 160), "spacing": 1.0,
        "networks": {
            "autoencoder": {"channels": [64, 128, 128, 128], "num_res_blocks": 2, "latent_channels": 3,
                            "norm_num_groups": 32, "attention_levels": [False] * 4,
                            "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False},
            "unet_lesion": {"channels": [128, 256, 256], "num_res_blocks": 1, "attention_levels": [False, False, True],
                            "norm_num_groups": 32, "num_head_channels": [0, 0, 256]},
            "unet_brain": {"channels": [128, 256, 256], "num_res_blocks": 1, "attention_levels": [False, False, True],
                           "norm_num_groups": 32, "num_head_channels": [0, 0, 256]}},
        "defaults": {"heal": {"steps": 300, "strength": 300 / 1023, "alpha0": 20.0, "k": 0.5, "eta": 0.0,
                              "margin_mm": 4.0},
                     "embed": {"steps": 500, "strength": 500 / 1023, "alpha0": 20.0, "k": 0.5, "eta": 1.0,
                               "margin_mm": 4.0},
                     "generate": {"steps": 342}, "generate_from_mask": {"steps": 342}}},
}
TASKS = ("heal", "embed", "generate", "generate_from_mask")


def _child(config: str, task: str, device: str, max_steps: int | None, bundle_root: str) -> dict:
    import numpy as np

    from USBLib import Editor
    from USBLib.core import bundle
    from USBLib.resources import sample_files
    from USBLib.imaging.io import read_volume

    editor = Editor(bundle.load(bundle_root), device=device)
    files = sample_files()
    image, lesion, target = (read_volume(files[k]) for k in ("image", "lesion", "embed"))
    steps_cfg = editor.bundle.defaults(task)["steps"]
    steps = min(steps_cfg, max_steps) if max_steps else steps_cfg
    t0 = time.perf_counter()
    if task == "heal":
        res = editor.heal(image.data, image.affine, lesion.data, steps=steps)
    elif task == "embed":
        res = editor.embed(image.data, image.affine, target.data, steps=steps)
    elif task == "generate":
        res = editor.generate(1, steps=steps)[0]
    else:
        res = editor.generate_from_mask(target.data, image.affine, image.data, image.affine, steps=steps)
    total = time.perf_counter() - t0
    timings = res.provenance["timings_s"]
    denoise = timings.get("denoising", 0.0)
    scale = steps_cfg / steps
    if device.startswith("cuda"):
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak_gpu = None
    return {"config": config, "task": task, "device": str(editor.device), "steps_configured": steps_cfg,
            "steps_run": steps, "extrapolated": scale != 1, "total_s": round(total + denoise * (scale - 1), 2),
            "denoise_s": round(denoise * scale, 2), "per_step_s": round(denoise / max(steps, 1), 4),
            "timings_s": timings, "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "peak_gpu_gib": None if peak_gpu is None else round(peak_gpu, 2), "shape": list(np.shape(image.data))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--configs", default="tiny,upstream")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=4, metavar=("CONFIG", "TASK", "MAXSTEPS", "BUNDLE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        config, task, max_steps, root = args.child
        print(json.dumps(_child(config, task, args.device, int(max_steps) or None, root)))
        return
    import phantoms

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs.split(","):
            cfg = CONFIGS[config]
            root = Path(tmp) / config
            phantoms.make_bundle(root, shape=cfg["shape"], spacing=cfg["spacing"], networks=cfg["networks"],
                                 defaults=cfg["defaults"], name=f"bench-{config}", tier=config)
            for task in args.tasks.split(","):
                proc = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", config, task,
                                       str(args.max_steps or 0), str(root)], capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{config}/{task} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(f"{config:>8} {task:<19} {row['total_s']:>8.1f} s  ({row['steps_configured']} steps, "
                      f"{row['per_step_s']:.3f} s/step{', extrapolated' if row['extrapolated'] else ''})  "
                      f"peak RSS {row['peak_rss_gib']:.2f} GiB", flush=True)
    print("\n| config | task | device | steps | total s | s/step | register s | encode s | decode s | peak RSS GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["timings_s"]
        print(f"| {r['config']} | {r['task']} | {r['device']} | {r['steps_configured']}"
              f"{'*' if r['extrapolated'] else ''} | {r['total_s']} | {r['per_step_s']} | "
              f"{t.get('registering to the model template', 0)} | {t.get('encoding', 0)} | {t.get('decoding', 0)} | "
              f"{r['peak_rss_gib']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
