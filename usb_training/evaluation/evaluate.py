"""Evaluation of a bundle on the held-out template source (never seen in training).

- Pathology -> healthy: synthetic lesions in held-out healthy brains, the lesion-free brain is ground truth.
  L1, PSNR, SSIM over the brain, inside the lesion and outside the edit region, for USB (ACG on, ACG off) and the
  baselines: untouched input, FSL-style lesion filling, biharmonic inpainting.
- Healthy -> pathology: lesion contrast (lesion / surrounding tissue), location fidelity (Dice of the
  thresholded difference against the mask) and the largest change outside the edit region.
- Generation (``--generate``, 16 pairs by default): NCC of each generated brain with held-out brains after affine
  alignment against the model template's NCC, tissue fractions, lesion-mask statistics against the lesion
  generator's (``usb_training.evaluation.generation``, which also measures the autoencoder and generation from a
  mask), and KID / Gaussian MMD on features of the trained encoder.
All computed on the model grid in model intensity units (99th brain percentile = 1, so PSNR uses range 1).

    python -m usb_training.evaluation.evaluate --model USBLib/models/usb-tiny [--cases 8] [--out DIR]

``--native`` evaluates instead what a user gets from heal and embed: whole scans of the held-out source on an
oblique 1 mm scanner grid, through the public API: the heal yardstick (exact and hasty masks, scored over every
voxel the lesion changed, against every classical filler with paired bootstrap intervals; USB configurations from
the command line) and the native embed evaluation (``usb_training.evaluation.native``):

    python -m usb_training.evaluation.evaluate --native [--cases 24] [--usb "d1=dilation_mm:1"] [--segment]
        [--source ixi555] [--embed stages|defaults|none] [--masks exact,hasty,generous] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from USBLib.core import bundle as bundle_mod
from USBLib.imaging.fusion import dilate_mm
from USBLib.apps.montage import save_montage
from USBLib.editor.editor import Editor

from ..base import baselines, metrics
from ..data.dataset import prepared_sources
from ..data.prepare import Anatomy
from ..data.sources import HELD_OUT, SOURCES
from ..data.synth import Sample, make_sample
from .generation import Reference, generator_masks, population_lines, unconditional
from ..base.common import cli_main

EVAL_SEED = 900_000  # far from every training seed


def held_out_cases(cfg: dict[str, Any], cache: Path, count: int, source: str = HELD_OUT) -> list[Sample]:
    """Lesioned/healthy pairs from the held-out source (deterministic)."""
    anatomy = Anatomy.load(prepared_sources(cfg, cache)[source])
    return [make_sample(anatomy, EVAL_SEED + i) for i in range(count)]


def _regions(case: Sample, spacing: float, margin_mm: float) -> dict[str, np.ndarray]:
    edit = dilate_mm(case.mask > 0, (spacing,) * 3, 2 * margin_mm)
    return {"brain": case.brain > 0, "lesion": case.mask > 0, "outside": (case.brain > 0) & ~edit}


def _scores(out: np.ndarray, case: Sample, regions: dict[str, np.ndarray]) -> dict[str, float]:
    scores = {}
    smap = metrics.ssim_map(out, case.healthy)
    for name, region in regions.items():
        scores[f"{name}_l1"] = metrics.l1(out, case.healthy, region)
        scores[f"{name}_psnr"] = metrics.psnr(out, case.healthy, region)
        scores[f"{name}_ssim"] = float(smap[region].mean())
    scores["outside_max_change"] = float(np.abs(out - case.image)[regions["outside"]].max())
    return scores


def heal_methods(editor: Editor) -> dict[str, Callable[[Sample, int], np.ndarray]]:
    """Every pathology -> healthy method under test, as f(case, seed) -> healed image."""
    affine = editor.bundle.grid_affine

    def usb(**settings):
        return lambda c, seed: editor.heal(c.image, affine, c.mask, c.brain, seed=seed, **settings).image

    return {
        "input (no change)": lambda c, seed: c.image.copy(),
        "lesion filling (FSL-style)": lambda c, seed: baselines.lesion_filling(c.image, c.mask, c.brain, seed=seed),
        "biharmonic inpainting": lambda c, seed: baselines.biharmonic(c.image, c.mask),
        "USB (bundle defaults)": usb(),
        "USB latent stage": usb(stages="latent"),
        "USB latent without pre-fill": usb(stages="latent", prefill="none"),
        "USB latent without ACG": usb(stages="latent", acg=False),
        "USB latent without LCG (eta 0)": usb(stages="latent", eta=0.0),
    }


def evaluate_heal(editor: Editor, cases: list[Sample]) -> tuple[dict[str, dict[str, float]], dict[str, list]]:
    """Mean scores per method, and the outputs of the first case for the figure."""
    spacing = float(editor.bundle.spacing[0])
    margin = float(editor.bundle.defaults("heal")["margin_mm"])
    methods = heal_methods(editor)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in methods}
    figure: dict[str, list] = {}
    for i, case in enumerate(tqdm(cases, desc="heal", leave=False)):
        regions = _regions(case, spacing, margin)
        for name, method in methods.items():
            t0 = time.perf_counter()
            out = method(case, i)
            seconds = time.perf_counter() - t0
            scores = _scores(out, case, regions)
            scores["seconds"] = seconds
            rows[name].append(scores)
            if i == 0:
                figure[name] = out
    return {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in rows.items()}, figure


def evaluate_embed(editor: Editor, cases: list[Sample], **settings: Any) -> dict[str, float]:
    """Healthy -> pathology on the held-out healthy brains with the cases' masks (``settings``: embed keywords
    on top of the bundle's defaults, e.g. ``stages="latent"``)."""
    spacing = float(editor.bundle.spacing[0])
    margin = float(editor.bundle.defaults("embed")["margin_mm"])
    contrast_in, contrast_out, dices, outside = [], [], [], []
    for i, case in enumerate(tqdm(cases, desc="embed", leave=False)):
        res = editor.embed(case.healthy, editor.bundle.grid_affine, case.mask, case.brain, seed=i, **settings)
        lesion = case.mask > 0
        ring = ndimage.binary_dilation(lesion, iterations=3) & ~lesion & (case.brain > 0)
        contrast_out.append(float(res.image[lesion].mean() / max(res.image[ring].mean(), 1e-6)))
        contrast_in.append(float(case.image[lesion].mean() / max(case.image[ring].mean(), 1e-6)))
        change = np.abs(res.image - case.healthy)
        dices.append(metrics.dice(change > 0.5 * np.percentile(change[lesion], 90), lesion))
        outside.append(float(change[_regions(case, spacing, margin)["outside"]].max()))
    return {"lesion_contrast_usb": float(np.mean(contrast_out)),
            "lesion_contrast_reference": float(np.mean(contrast_in)),
            "location_dice": float(np.mean(dices)), "outside_max_change": float(np.max(outside))}


def _features(editor: Editor, volumes: np.ndarray) -> np.ndarray:
    """Encoder features: per-channel mean and sd of the latent, plus the latent average-pooled to 2x2x2 cells."""
    import torch

    lat = editor.encode(volumes)
    pooled = torch.nn.functional.adaptive_avg_pool3d(lat, 2).flatten(1)
    return torch.cat([lat.mean((2, 3, 4)), lat.std((2, 3, 4)), pooled], 1).cpu().numpy()


def _mask_stats(masks: list[np.ndarray], spacing: float) -> dict[str, float]:
    vols, counts, cents = [], [], []
    for m in masks:
        m = m > 0
        _, n = ndimage.label(m)
        vols.append(float(m.sum()) * spacing ** 3 / 1000.0)
        counts.append(n)
        if m.any():
            cents.append(np.argwhere(m).mean(0) * spacing)
    cents_arr = np.array(cents) if cents else np.zeros((1, 3))
    return {"volume_ml_mean": float(np.mean(vols)), "volume_ml_sd": float(np.std(vols)),
            "count_mean": float(np.mean(counts)), "empty_fraction": float(np.mean([c == 0 for c in counts])),
            "centroid_mm_mean": [round(float(v), 1) for v in cents_arr.mean(0)]}


def evaluate_generation(editor: Editor, cases: list[Sample], generator_masks: list[np.ndarray], n: int,
                        reference=None) -> dict[str, Any]:
    """Generated pairs against held-out brains: KID / MMD on encoder features and generated lesion-mask statistics;
    with ``reference`` (a ``generation.Reference``) also the NCC with held-out brains after affine alignment, the
    tissue fractions and the lesion statistics against the generator's (``generation.unconditional``)."""
    if reference is not None:
        population, results = unconditional(editor, reference, n)
    else:
        population, results = None, editor.generate(n, seed=0)
    brains = np.stack([r.image for r in results]).astype(np.float32)
    masks = [r.mask for r in results]
    real = np.stack([c.healthy for c in cases]).astype(np.float32)
    f_gen, f_real = _features(editor, brains), _features(editor, real)
    spacing = float(editor.bundle.spacing[0])
    return {"kid": metrics.polynomial_mmd2(f_gen, f_real), "mmd_gaussian": metrics.gaussian_mmd2(f_gen, f_real),
            "generated_masks": _mask_stats(masks, spacing), "generator_masks": _mask_stats(generator_masks, spacing),
            "samples": n, **({"population": population} if population is not None else {})}


HEAL_COLUMNS = [("lesion_psnr", "PSNR lesion"), ("lesion_ssim", "SSIM lesion"), ("lesion_l1", "L1 lesion"),
                ("brain_psnr", "PSNR brain"), ("brain_ssim", "SSIM brain"), ("seconds", "s / case")]


def table(heal: dict[str, dict[str, float]], embed: dict[str, dict[str, float]], gen: dict[str, Any] | None,
          cases: int) -> str:
    """Markdown tables of the results."""
    lines = [f"Pathology -> healthy, held-out source `{HELD_OUT}`, {cases} cases (model grid, model units; "
             "higher PSNR/SSIM and lower L1 are better):", "",
             "| method | " + " | ".join(c for _, c in HEAL_COLUMNS) + " |",
             "|---|" + "---|" * len(HEAL_COLUMNS)]
    for name, scores in heal.items():
        lines.append(f"| {name} | " + " | ".join(f"{scores[k]:.4g}" for k, _ in HEAL_COLUMNS) + " |")
    lines += ["", "Healthy -> pathology (same masks embedded into the lesion-free brains; lesion/surround intensity "
              "ratio: 1 = invisible, lower = darker lesion):", "",
              "| method | lesion/surround | synthetic reference lesions | location Dice | largest change outside |",
              "|---|---|---|---|---|"]
    for name, e in embed.items():
        lines.append(f"| {name} | {e['lesion_contrast_usb']:.3f} | {e['lesion_contrast_reference']:.3f} | "
                     f"{e['location_dice']:.3f} | {e['outside_max_change']:.3g} |")
    if gen:
        g, r = gen["generated_masks"], gen["generator_masks"]
        lines += ["", f"Generation ({gen['samples']} pairs): KID {gen['kid']:.4g}, Gaussian MMD² {gen['mmd_gaussian']:.4g} "
                  "(encoder features, against held-out brains).",
                  f"- lesion volume ml: generated {g['volume_ml_mean']:.2f} ± {g['volume_ml_sd']:.2f}, "
                  f"generator {r['volume_ml_mean']:.2f} ± {r['volume_ml_sd']:.2f}",
                  f"- lesion count: generated {g['count_mean']:.2f} (empty {g['empty_fraction']:.0%}), "
                  f"generator {r['count_mean']:.2f} (empty {r['empty_fraction']:.0%})",
                  f"- centroid mm: generated {g['centroid_mm_mean']}, generator {r['centroid_mm_mean']}"]
        if "population" in gen:
            lines += population_lines(gen["population"])
    return "\n".join(lines)


def run(model: Path | str, samples: list[Sample], reference_masks: list[np.ndarray], out: Path,
        generate: int = 16, reference=None) -> dict[str, Any]:
    """Evaluate a bundle on ``samples``; writes ``metrics.json``, ``results.md`` and ``heal_examples.png``.
    ``generate``: generated pairs (0 = none); ``reference``: a ``generation.Reference`` for the population
    measures of those pairs (NCC, tissue fractions, lesion statistics), or None for KID/MMD only."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor(bundle_mod.load(model), device="auto", registration="none")
    heal, figure = evaluate_heal(editor, samples)
    embed = {"USB (bundle defaults)": evaluate_embed(editor, samples),
             "USB latent stage": evaluate_embed(editor, samples, stages="latent")}
    gen = evaluate_generation(editor, samples, reference_masks, generate, reference) if generate else None
    md = table(heal, embed, gen, len(samples))
    first = samples[0]
    center = np.argwhere(first.mask).mean(0).astype(int)
    save_montage(out / "heal_examples.png",
                 [("truth", [first.image, first.healthy, first.image - first.healthy],
                   ["input", "healthy", "difference"], center)]
                 + [(name, [img, img - first.healthy], ["output", "difference to truth"], center)
                    for name, img in figure.items()])
    result = {"heal": heal, "embed": embed, "generation": gen, "cases": len(samples), "held_out_source": HELD_OUT,
              "table_markdown": md}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(md + "\n")
    return result


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ..base.config import tier
    from ..base.paths import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder or name (default: the default model)")
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default=None,
                        help="tier of the data grid (default: the bundle's)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("usb_evaluation"))
    parser.add_argument("--cases", type=int, default=None, help="cases (default 8; --native: 24)")
    parser.add_argument("--generate", type=int, default=16,
                        help="generated pairs for NCC, tissue fractions, lesion statistics, KID/MMD (0 = skip)")
    parser.add_argument("--native", action="store_true", help="native-space heal/embed evaluation (see above)")
    parser.add_argument("--per-site", type=int, default=None,
                        help="--native: cases per lesion site (11 sites; instead of --cases)")
    parser.add_argument("--usb", action="append", default=[], metavar="NAME=key:value,...",
                        help="--native: a USB heal configuration besides the bundle defaults, as Editor.heal "
                             "keywords (repeatable), e.g. --usb 'd1=dilation_mm:1' --usb 'realism=local_mode:realism'")
    parser.add_argument("--source", default=HELD_OUT, choices=sorted(SOURCES),
                        help=f"--native: anatomy of the cases (default the held-out {HELD_OUT}; a training source "
                             "gives in-distribution numbers, for tuning)")
    parser.add_argument("--segment", action="store_true",
                        help="--native: downstream segmentation check (Atropos with the 'evaluation' extra)")
    parser.add_argument("--embed", default="stages", choices=["stages", "defaults", "realism", "level", "none"],
                        help="--native: embed methods (local realism/fidelity and latent; the bundle's; the "
                             "bundle's and the other local mode; the bundle's and the same at each reference "
                             "lesion's own level, lesion_level; none)")
    parser.add_argument("--seed", type=int, default=None, help="--native: first case seed (default 910000)")
    parser.add_argument("--slice-factor", type=int, default=1, metavar="N",
                        help="--native: every case with N slices averaged into one along its most superior axis "
                             "(1 x 1 x N mm: a thick-slice scan; default 1)")
    parser.add_argument("--sites", default=None, metavar="SITE,...",
                        help="--native: the lesion sites, in turn (default the yardstick's 11; also 'territorial': a "
                             "chronic territorial infarct of about 10-55 ml in white matter and cortex)")
    parser.add_argument("--classical-brighten-only", action="store_true",
                        help="--native: give every classical filler USB's rule that a heal never darkens a voxel "
                             "(max(fill, lesioned scan))")
    parser.add_argument("--masks", default="exact,hasty", metavar="MASK,...",
                        help="--native: the drawn masks each case is healed with: exact (the 0.5 iso-surface), hasty "
                             "(eroded by a voxel), generous (grown by 2 mm within the brain); default exact,hasty")
    args = parser.parse_args(argv)
    b = bundle_mod.load(args.model)
    if args.native:
        return _native_main(b, args)
    cfg = tier(args.tier or b.tier)
    samples = held_out_cases(cfg, args.cache, args.cases or 8)
    reference = None
    if args.generate:
        reference = Reference(cfg, args.cache)
    result = run(b.root, samples, generator_masks(cfg, args.cache), args.out, args.generate, reference)
    print(result["table_markdown"])
    print(f"written: {args.out / 'metrics.json'}, {args.out / 'results.md'}, {args.out / 'heal_examples.png'}")
    return 0


def _native_main(b: bundle_mod.ModelBundle, args: argparse.Namespace) -> int:
    from ..local.anatomies import native_affine, native_anatomies
    from ..local.cases import EXTRA_SITES, MASKS, YARDSTICK_SITES, thick_slices, yardstick_cases
    from .native import EVAL_SEED as NATIVE_SEED
    from .native import run as run_native
    from .native import usb_configs

    configs = usb_configs(args.usb)
    sites = YARDSTICK_SITES if args.sites is None else tuple(s.strip() for s in args.sites.split(",") if s.strip())
    unknown = sorted(set(sites) - set(YARDSTICK_SITES) - set(EXTRA_SITES))
    if not sites or unknown:
        print(f"evaluate: error: --sites: unknown site(s) {unknown or '(none given)'}; known: "
              f"{', '.join(YARDSTICK_SITES + EXTRA_SITES)}", file=sys.stderr)
        return 2
    masks = tuple(m.strip() for m in args.masks.split(",") if m.strip())
    if not masks or set(masks) - set(MASKS) or len(set(masks)) < len(masks):
        print(f"evaluate: error: --masks: give some of {', '.join(MASKS)}, each once; got '{args.masks}'",
              file=sys.stderr)
        return 2
    count = args.per_site * len(sites) if args.per_site else (args.cases or 24)
    held_out = args.source == HELD_OUT
    if not held_out:
        print(f"WARNING: --source {args.source} is a training source: these numbers are in-distribution "
              f"(for tuning only; the yardstick is the held-out {HELD_OUT})")
    anatomy = native_anatomies(args.cache, [args.source])[args.source]
    seed = NATIVE_SEED if args.seed is None else args.seed
    if args.slice_factor < 1:
        print(f"evaluate: error: --slice-factor must be at least 1, got {args.slice_factor}", file=sys.stderr)
        return 2
    cases = (thick_slices(case, args.slice_factor)
             for case in yardstick_cases(anatomy, native_affine(args.cache, args.source), count, seed, sites))
    source = args.source if args.slice_factor == 1 else f"{args.source} with {args.slice_factor}x thicker slices"
    result = run_native(b, cases, args.out, configs, cache=args.cache, source=source, held_out=held_out,
                        embed=args.embed, segment=args.segment, brighten_only=args.classical_brighten_only,
                        masks=masks)
    print(result["table_markdown"])
    if not held_out:
        print(f"WARNING: in-distribution numbers (training source {args.source})")
    print(f"{result['cases']} cases in {result['seconds'] / 60:.1f} min; written: {args.out / 'native_metrics.json'}, "
          f"{args.out / 'native_results.md'}, figures {result['figures']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
