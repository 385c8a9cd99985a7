"""Native-space evaluation of heal and embed through the public API (``USBLib.editor.editor.Editor``), on whole
scans of the held-out source with lesions whose darkening reaches past the drawn mask.

Heal, side by side: the input, FSL-style filling, biharmonic inpainting of the mask dilated by 2 voxels, the
latent stage alone, the local stage alone (fidelity and realism), both stages. Embed: the local stage (the
bundle's mode), the latent stage, both. Scores: ``scores.heal_scores`` / ``scores.embed_scores``; a PNG per
task for a person to look at.

    python -m usb_training.evaluation.evaluate --native [--model M] [--per-site 2] [--out DIR]
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from USBLib.editor.editor import Editor
from USBLib.imaging.prefill import prefill

from ..base import baselines
from ..base.scores import STRUCT, embed_scores, gmm_classes, heal_scores
from ..local.cases import NativeCase

EVAL_SEED = 910_000


def heal_methods(editor: Editor, stages: bool = True) -> dict[str, Callable[[NativeCase, int], np.ndarray]]:
    """Every pathology -> healthy method under test, as f(case, seed) -> healed scan."""
    from scipy import ndimage

    def usb(**settings):
        return lambda c, seed: editor.heal(c.lesioned, c.affine, c.mask, seed=seed, **settings).image

    methods: dict[str, Callable[[NativeCase, int], np.ndarray]] = {
        "input (no change)": lambda c, seed: c.lesioned.copy(),
        "FSL-style lesion filling": lambda c, seed: baselines.lesion_filling(c.lesioned, c.mask, c.brain, seed=seed),
        "biharmonic, mask + 2 vox": lambda c, seed: prefill(
            c.lesioned, ndimage.binary_dilation(c.mask > 0, STRUCT, iterations=2) & (c.brain > 0), "biharmonic"),
    }
    if stages:
        methods.update({"USB latent stage": usb(stages="latent"),
                        "USB local, fidelity": usb(stages="local", local_mode="fidelity"),
                        "USB local, realism": usb(stages="local", local_mode="realism"),
                        "USB both, fidelity": usb(stages="both", local_mode="fidelity")})
    else:
        methods["USB defaults"] = usb()
    return methods


def embed_methods(editor: Editor, stages: bool = True) -> dict[str, Callable[[NativeCase, int], np.ndarray]]:
    def usb(**settings):
        return lambda c, seed: editor.embed(c.healthy, c.affine, c.mask, seed=seed, **settings).image

    if not stages:
        return {"USB defaults": usb()}
    return {"USB local, realism": usb(stages="local", local_mode="realism"),
            "USB local, fidelity": usb(stages="local", local_mode="fidelity"),
            "USB latent stage": usb(stages="latent")}


def _mean(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


def evaluate(editor: Editor, cases: list[NativeCase], stages: bool = True,
             figure_cases: int = 3) -> dict[str, Any]:
    """Per-method mean and per-case scores for heal and embed, and the outputs for the figures."""
    heal = heal_methods(editor, stages)
    embed = embed_methods(editor, stages)
    per_case: dict[str, dict[str, list]] = {"heal": {m: [] for m in heal}, "embed": {m: [] for m in embed}}
    shown: list[dict[str, Any]] = []
    for i, case in enumerate(tqdm(cases, desc="cases", leave=False)):
        gmm = gmm_classes(case.healthy[case.brain > 0])
        outs: dict[str, np.ndarray] = {}
        for name, method in heal.items():
            t0 = time.perf_counter()
            out = method(case, i)
            row = heal_scores(out, case.healthy, case.mask, case.brain, gmm)
            row["seconds"] = time.perf_counter() - t0
            per_case["heal"][name].append(dict(row, case=case.name))
            outs["heal/" + name] = out
        for name, method in embed.items():
            t0 = time.perf_counter()
            out = method(case, i)
            row = embed_scores(out, case.healthy, case.mask, case.brain, case.lesioned)
            row["seconds"] = time.perf_counter() - t0
            per_case["embed"][name].append(dict(row, case=case.name))
            outs["embed/" + name] = out
        if i < figure_cases:
            shown.append({"case": case, "outs": outs})
    means = {task: {m: _mean([{k: v for k, v in r.items() if k != "case"} for r in rows])
                    for m, rows in methods.items()} for task, methods in per_case.items()}
    return {"mean": means, "per_case": per_case, "shown": shown}


def best_classical(per_case: dict[str, list[dict]], key: str = "psnr_lesion") -> list[float]:
    """Per case, the best score of the classical fillers (FSL-style, biharmonic)."""
    names = [n for n in per_case if n.startswith(("FSL", "biharmonic"))]
    return [max(per_case[n][i][key] for n in names) for i in range(len(per_case[names[0]]))]


def figures(shown: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    """``heal_native.png`` and ``embed_native.png``: one row per method (input, results, truth, difference),
    one column block per case (axial, coronal, sagittal through the lesion's centre, 56 mm around it)."""
    from USBLib.apps.montage import save_montage

    half = 28

    def crop(vol: np.ndarray, centre: np.ndarray) -> np.ndarray:
        lo = np.clip(centre - half, 0, np.asarray(vol.shape) - 2 * half)
        return vol[tuple(slice(a, a + 2 * half) for a in lo)]

    centres = [np.round(np.argwhere(item["case"].mask > 0).mean(0)).astype(int) for item in shown]
    sites = [item["case"].site for item in shown]
    written = {}
    for task, first, truth in (("heal", "lesioned", "healthy"), ("embed", "healthy", "lesioned")):
        names = [k.split("/", 1)[1] for k in shown[0]["outs"] if k.startswith(task + "/")]
        names = [n for n in names if not n.startswith("input")]
        main = next((n for n in names if n.startswith("USB local")), names[-1])
        rows = [("input", [crop(getattr(it["case"], first), c) for it, c in zip(shown, centres)])]
        rows += [(n, [crop(it["outs"][f"{task}/{n}"], c) for it, c in zip(shown, centres)]) for n in names]
        rows.append(("truth" if task == "heal" else "generator's lesion",
                     [crop(getattr(it["case"], truth), c) for it, c in zip(shown, centres)]))
        rows.append((f"difference: {main} - {'truth' if task == 'heal' else 'input'}",
                     [crop(it["outs"][f"{task}/{main}"] - getattr(it["case"], truth if task == "heal" else first), c)
                      for it, c in zip(shown, centres)]))
        montage_rows = [(title, vols, [("difference " if title.startswith("difference") else "") + s
                                       for s in sites], np.array([half] * 3)) for title, vols in rows]
        written[task] = save_montage(out / f"{task}_native.png", montage_rows, zoom=2)
    return written


def table(result: dict[str, Any], n_cases: int) -> str:
    """Markdown tables of the mean scores."""
    heal_keys = ["psnr_lesion", "psnr_lesion_brats", "ssim_lesion", "psnr_ring", "mean_ratio", "texture_ratio",
                 "texture_ratio_truth", "tissue_agreement", "seconds"]
    lines = [f"Heal, {n_cases} held-out native cases (mean):", "",
             "| method | " + " | ".join(heal_keys) + " |", "|---" * (len(heal_keys) + 1) + "|"]
    for name, row in result["mean"]["heal"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in heal_keys) + " |")
    best = best_classical(result["per_case"]["heal"])
    lines += ["", f"best classical filler per case (psnr_lesion): mean {np.mean(best):.2f} dB", ""]
    for name, rows in result["per_case"]["heal"].items():
        if name.startswith("USB"):
            diff = [r["psnr_lesion"] - b for r, b in zip(rows, best)]
            lines.append(f"- {name}: {np.mean(diff):+.2f} dB vs best classical (worst case {min(diff):+.2f} dB)")
    embed_keys = ["lesion_surround_ratio", "reference_ratio", "dice_change", "cv_lesion", "cv_reference",
                  "mean_abs_change_ring_3_8", "seconds"]
    lines += ["", f"Embed, {n_cases} held-out native cases (mean):", "",
              "| method | " + " | ".join(embed_keys) + " |", "|---" * (len(embed_keys) + 1) + "|"]
    for name, row in result["mean"]["embed"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for k in embed_keys) + " |")
    return "\n".join(lines)


def run(model: Any, cases: list[NativeCase], out: Path, stages: bool = True) -> dict[str, Any]:
    """Evaluate a bundle on ``cases``; writes ``native_metrics.json``, ``native_results.md`` and the PNGs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor(model, device="auto")
    result = evaluate(editor, cases, stages)
    paths = figures(result.pop("shown"), out)
    md = table(result, len(cases))
    result.update({"cases": len(cases), "table_markdown": md, "figures": {k: str(v) for k, v in paths.items()}})
    (out / "native_metrics.json").write_text(json.dumps(result, indent=1))
    (out / "native_results.md").write_text(md + "\n")
    return result
