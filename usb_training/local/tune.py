"""Defaults of the local stage by measurement, on native validation cases from the training sources only.

Heal (fidelity mode): the mask dilation, the LCG/ACG setting (eta, alpha0) and the feather width, chosen by the
PSNR over the lesion and the ring 1-3 voxels around it (the rim a real mask misses must end up healthy too).
Embed (realism mode): eta and alpha0, chosen by how close the lesion/surround ratio comes to the generator's
reference lesion and by the Dice of the thresholded change against the mask.

    python -m usb_training.local.tune --model BUNDLE [--per-site 2] [--out DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from USBLib.imaging.fusion import edit_weight, fuse
from USBLib.imaging.intensity import IntensityMap
from USBLib.editor.local.conditioning import fusion_core
from USBLib.editor.local.stage import LocalSettings
from USBLib.editor.editor import Editor

from .cases import NativeCase
from ..base.scores import embed_scores, gmm_classes, heal_scores
from ..base.common import cli_main

VALIDATION_SEED = 500_000
HEAL_GRID = {"dilation_mm": [0.0, 1.0, 2.0, 3.0], "guidance": [(1.0, 20.0), (1.0, 0.0), (0.0, 20.0)],
             "margin_mm": [1.0, 2.0, 3.0]}
EMBED_GRID = {"guidance": [(1.0, 20.0), (1.0, 0.0), (0.5, 20.0)]}


def _prepared(editor: Editor, image: np.ndarray, case: NativeCase):
    mapping = editor._map(image, case.affine, None, 0)
    brain = editor._native_brain(mapping, None)
    imap = IntensityMap.fit(image, brain, editor.bundle.config["intensity"])
    return brain, imap


def _local(editor: Editor, image: np.ndarray, case: NativeCase, task: str, imap: IntensityMap,
           settings: LocalSettings, seed: int) -> np.ndarray:
    spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
    prior = editor._local_prior(editor._map(image, case.affine, None, 0)) if editor.local.needs_prior else None
    d = editor.local.deviation((np.asarray(image, np.float32) - imap.low) / imap.units_per_model_unit, case.mask,
                               spacing, task, settings, torch.Generator().manual_seed(seed), clip=imap.clip,
                               prior=prior)
    return imap.delta_to_native(d[0])


def tune_heal(editor: Editor, cases: list[NativeCase]) -> list[dict[str, Any]]:
    """One row per (dilation, eta, alpha0, margin): mean scores over the cases."""
    rows: dict[tuple, list[dict[str, float]]] = {}
    for i, case in enumerate(cases):
        brain, imap = _prepared(editor, case.lesioned, case)
        spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
        gmm = gmm_classes(case.healthy[case.brain > 0])
        for dilation, (eta, alpha0) in itertools.product(HEAL_GRID["dilation_mm"], HEAL_GRID["guidance"]):
            settings = LocalSettings(mode="fidelity", dilation_mm=dilation, eta=eta, alpha0=alpha0, k=2.0,
                                     acg=alpha0 > 0)
            dev = _local(editor, case.lesioned, case, "heal", imap, settings, i)
            for margin in HEAL_GRID["margin_mm"]:
                core = fusion_core(case.mask, spacing, dilation)
                out = fuse(case.lesioned, dev, edit_weight(case.mask, brain, spacing, dilation, margin, core))
                rows.setdefault((dilation, eta, alpha0, margin), []).append(
                    heal_scores(out, case.healthy, case.mask, case.brain, gmm))
    return [{"dilation_mm": d, "eta": e, "alpha0": a, "margin_mm": m,
             **{k: float(np.mean([r[k] for r in rs])) for k in rs[0]}} for (d, e, a, m), rs in rows.items()]


def tune_embed(editor: Editor, cases: list[NativeCase], dilation_mm: float, margin_mm: float) -> list[dict[str, Any]]:
    """One row per (eta, alpha0) of the realism mode: mean embed scores."""
    rows: dict[tuple, list[dict[str, float]]] = {}
    for i, case in enumerate(cases):
        brain, imap = _prepared(editor, case.healthy, case)
        spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
        for eta, alpha0 in EMBED_GRID["guidance"]:
            settings = LocalSettings(mode="realism", dilation_mm=dilation_mm, eta=eta, alpha0=alpha0, k=2.0,
                                     acg=alpha0 > 0)
            dev = _local(editor, case.healthy, case, "embed", imap, settings, i)
            out = fuse(case.healthy, dev, edit_weight(case.mask, brain, spacing, dilation_mm, margin_mm))
            row = embed_scores(out, case.healthy, case.mask, case.brain, case.lesioned)
            row["ratio_error"] = abs(row["lesion_surround_ratio"] - row["reference_ratio"])
            rows.setdefault((eta, alpha0), []).append(row)
    return [{"eta": e, "alpha0": a, **{k: float(np.mean([r[k] for r in rs])) for k in rs[0]}}
            for (e, a), rs in rows.items()]


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ..base.paths import DEFAULT_CACHE
    from .anatomies import native_affine, native_anatomies
    from .cases import native_cases

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--per-site", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("usb_local_tuning"))
    args = parser.parse_args(argv)
    editor = Editor(args.model, device="auto")
    cases = []
    for j, name in enumerate(("mni2009c", "mni2009a")):  # training sources only
        anatomy = native_anatomies(args.cache, [name])[name]
        cases += native_cases(anatomy, native_affine(args.cache, name), args.per_site, VALIDATION_SEED + 1000 * j)
    heal = sorted(tune_heal(editor, cases), key=lambda r: -r["psnr_lesion_ring"])
    best = heal[0]
    embed = sorted(tune_embed(editor, cases, 1.0, best["margin_mm"]),
                   key=lambda r: r["ratio_error"] + (1 - r["dice_change"]))
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"cases": len(cases), "heal": heal, "embed": embed, "best_heal": best, "best_embed": embed[0]}
    (args.out / "tuning.json").write_text(json.dumps(result, indent=1))
    for row in heal[:8]:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    print("embed:")
    for row in embed:
        print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
