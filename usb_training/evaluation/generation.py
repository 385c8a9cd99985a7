"""Generation measured like generation: the latent model's autoencoder, unconditional pairs and brains for a mask.

All on the model grid in model units (99th brain percentile = 1), against the held-out source (never trained on):

- ``reconstruction``: autoencoder round trip per source (the template itself and synthetic samples of it): PSNR
  and SSIM inside the brain (range 1) and the mean |value| of the background (0 = black).
- ``unconditional``: generated brains against held-out real-population brains (the held-out template and
  deformed samples of it) after affine alignment (normalised cross-correlation inside the reference brain),
  with the model template's NCC as the yardstick; tissue-class fractions of a 3-class Gaussian mixture in the
  brain against the held-out brains; lesion-mask statistics (26-connected components, total volume, fraction in
  white matter and in brain tissue, centroid) against the lesion generator's.
- ``from_mask``: brains generated for held-out lesion masks (the bundle's settings, and the paper's eq. 9 without
  lesion fusion for comparison). The same noise with the empty-mask condition gives the brain without the
  lesion, so the change the mask causes is measured directly: Dice of the thresholded change against the mask,
  lesion/surround intensity ratio, and NCC of the brain as above.

    python -m usb_training.evaluation.generation --model USBLib/models/usb-tiny [--pairs 16] [--out DIR]
    python -m usb_training.evaluation.generation --autoencoder RUN --tier tiny   # the round trip only, from a run
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from USBLib.core import bundle as bundle_mod
from USBLib.editor.editor import Editor
from USBLib.imaging.spatial import SpaceMapping, register
from USBLib.settings import SAMPLERS, value_of

from ..base import metrics
from ..data.dataset import TRAIN_SOURCES, prepared_sources
from ..data.prepare import CSF, WM, Anatomy
from ..data.sources import HELD_OUT
from ..data.synth import Sample, make_sample
from ..base.scores import gmm_classes
from ..base.common import cli_main

EVAL_SEED = 910_000  # far from every training seed
CONNECTIVITY = np.ones((3, 3, 3), bool)


def ncc(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Normalised cross-correlation of two images inside ``region`` (1 = identical up to gain and offset)."""
    x, y = np.asarray(a, np.float64)[region], np.asarray(b, np.float64)[region]
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / max(np.sqrt((x * x).sum() * (y * y).sum()), 1e-12))


def aligned_ncc(moving: np.ndarray, reference: np.ndarray, reference_brain: np.ndarray, affine: np.ndarray,
                seed: int = 0) -> float:
    """NCC inside the reference brain after an affine registration of ``moving`` onto ``reference``
    (both on the grid ``affine``; ``moving`` is 0 outside its brain)."""
    moving_brain = (moving > 0).astype(np.uint8)
    if not moving_brain.any():
        return 0.0
    transform = register(reference, affine, moving, affine, moving_brain, reference_brain.astype(np.uint8),
                         "affine", seed)
    mapping = SpaceMapping(reference.shape, affine, moving.shape, affine, transform)
    return ncc(mapping.to_native(moving.astype(np.float32)), reference, reference_brain > 0)


def tissue_fractions(image: np.ndarray, brain: np.ndarray) -> list[float]:
    """Weights of a 3-class Gaussian mixture of the brain's intensities, CSF < GM < WM."""
    return [float(w) for w in gmm_classes(image[brain > 0])[2]]


def mask_stats(mask: np.ndarray, spacing: float, wm: np.ndarray, tissue: np.ndarray) -> dict[str, Any]:
    """Lesion-mask statistics: components, volume (ml), fraction in white matter / in brain tissue, centroid."""
    m = mask > 0
    _, count = ndimage.label(m, CONNECTIVITY)
    volume = float(m.sum()) * spacing ** 3 / 1000.0
    inside = lambda region: float((m & region).sum() / m.sum()) if m.any() else float("nan")  # noqa: E731
    centroid = (np.argwhere(m).mean(0) * spacing).round(1).tolist() if m.any() else None
    return {"components": int(count), "volume_ml": volume, "in_wm": inside(wm), "in_tissue": inside(tissue),
            "centroid_mm": centroid}


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    def col(key):
        return np.array([r[key] for r in rows if r[key] is not None and np.isfinite(r[key])], float)

    vol = col("volume_ml")
    total = sum(r["volume_ml"] for r in rows)
    return {"components_median": float(np.median(col("components"))), "volume_ml_median": float(np.median(vol)),
            "volume_ml_p5_p95": [float(np.percentile(vol, 5)), float(np.percentile(vol, 95))],
            "in_wm": float(sum(r["volume_ml"] * r["in_wm"] for r in rows if r["volume_ml"]) / max(total, 1e-9)),
            "in_tissue": float(sum(r["volume_ml"] * r["in_tissue"] for r in rows if r["volume_ml"]) / max(total, 1e-9)),
            "empty_fraction": float(np.mean([r["volume_ml"] == 0 for r in rows]))}


def generator_masks(cfg: dict[str, Any], cache: Path, count: int = 16) -> list[np.ndarray]:
    """Lesion masks straight from the data generator (training sources), the reference for generated masks."""
    anatomies = [Anatomy.load(p) for k, p in prepared_sources(cfg, cache).items()
                 if k not in (HELD_OUT, "template", "brain_mask")]
    return [make_sample(anatomies[i % len(anatomies)], 700_000 + i).mask for i in range(count)]


class Reference:
    """The held-out population (the held-out template and deformed samples of it) and the model template's
    tissue maps, on the model grid."""

    def __init__(self, cfg: dict[str, Any], cache: Path, count: int = 4, generator_count: int = 16):
        """``count``: held-out brains (the template and ``count`` - 1 deformed samples of it); ``generator_count``:
        the least number of generator masks generated lesions are compared with."""
        prepared = prepared_sources(cfg, cache)
        self.held = held = Anatomy.load(prepared[HELD_OUT])
        self.template = Anatomy.load(prepared["mni2009a"])
        self.samples: list[Sample] = [make_sample(held, EVAL_SEED + i, lesion=False) for i in range(count - 1)]
        self.brains = [(held.image, held.brain)] + [(s.healthy, s.brain) for s in self.samples]
        self.wm = self.template.labels == WM
        self.tissue = (self.template.labels > 0) & (self.template.labels != CSF)
        self.cfg, self.cache, self.generator_count = cfg, cache, int(generator_count)

    def mean_ncc(self, image: np.ndarray, affine: np.ndarray) -> float:
        return float(np.mean([aligned_ncc(image, ref, brain, affine, seed=i)
                              for i, (ref, brain) in enumerate(self.brains)]))

    def fractions(self) -> list[float]:
        return np.mean([tissue_fractions(img, brain) for img, brain in self.brains], 0).round(4).tolist()

    def generator_masks(self, count: int) -> list[np.ndarray]:
        """Lesion masks straight from the data generator (the same ones ``evaluate`` compares against)."""
        return generator_masks(self.cfg, self.cache, count)


def _round_trip(round_trip, image: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    recon = round_trip(image.astype(np.float32))
    region = brain > 0
    return {"psnr": metrics.psnr(recon, image, region), "ssim": metrics.ssim(recon, image, region),
            "background": float(np.abs(recon[~region]).mean())}


def editor_round_trip(editor: Editor):
    """decode(encode(volume)) of a bundle's autoencoder, for model-grid volumes [I, J, K]."""
    return lambda volume: editor.decode(editor.encode(volume[None]))[0]


def checkpoint_round_trip(cfg: dict[str, Any], work: Path):
    """decode(encode(volume)) of the autoencoder in a training run folder (before any bundle exists)."""
    from USBLib.core.networks import build_autoencoder

    from ..base.common import load_checkpoint
    from ..latent.train_autoencoder import reconstruct

    ae = build_autoencoder(cfg["networks"]["autoencoder"])
    if load_checkpoint(Path(work) / "autoencoder", {"autoencoder": ae}) is None:
        raise FileNotFoundError(f"no autoencoder checkpoint in {work}")
    ae.eval()
    return lambda volume: reconstruct(ae, volume)


def reconstruction_by_source(round_trip, cfg: dict[str, Any], cache: Path, per_source: int = 3) -> dict[str, Any]:
    """Autoencoder round trip (``editor_round_trip`` or ``checkpoint_round_trip``) per source: the template itself
    and ``per_source`` synthetic samples of it (deformation, contrast, artefacts; lesion-free). PSNR/SSIM inside
    the brain (range 1) and the background's mean |value|."""
    prepared = prepared_sources(cfg, cache)
    out: dict[str, Any] = {}
    for name in (HELD_OUT, *TRAIN_SOURCES):
        anatomy = Anatomy.load(prepared[name])
        template = _round_trip(round_trip, anatomy.image, anatomy.brain)
        rows = [_round_trip(round_trip, s.healthy, s.brain)
                for s in (make_sample(anatomy, EVAL_SEED + 100 + i, lesion=False) for i in range(per_source))]
        out[name] = {"template": template,
                     "samples": {k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
                     "held_out": name == HELD_OUT}
    return out


def reconstruction_figure(round_trip, cfg: dict[str, Any], cache: Path, out: Path, title: str) -> Path:
    """Orthogonal slices of the held-out template, its round trip and the difference (x 1, same grey scale as
    the image), so that blur and a grey background show to the eye."""
    from USBLib.apps.montage import save_montage

    image = Anatomy.load(prepared_sources(cfg, cache)[HELD_OUT]).image.astype(np.float32)
    recon = round_trip(image)
    center = [int(c) for c in np.argwhere(image > 0).mean(0)]
    return save_montage(out, [(f"{title}, held-out {HELD_OUT}", [image, recon, recon - image],
                               ["original", "round trip", "difference"], center)], zoom=2)


def unconditional(editor: Editor, ref: Reference, pairs: int, seed: int = 0, steps: int | None = None,
                  sampler: str | None = None) -> tuple[dict[str, Any], list]:
    """Generated pairs measured against the held-out population and the lesion generator (``steps`` and
    ``sampler``: None = the bundle's)."""
    affine = editor.bundle.grid_affine
    spacing = float(editor.bundle.spacing[0])
    t0 = time.perf_counter()
    results = editor.generate(pairs, seed=seed, steps=steps, sampler=sampler)
    seconds = (time.perf_counter() - t0) / pairs
    brain = editor.space["brain"] > 0
    nccs = [ref.mean_ncc(r.image, affine) for r in results]
    template_ncc = ref.mean_ncc(ref.template.image, affine)
    fractions = np.mean([tissue_fractions(r.image, brain) for r in results], 0).round(4).tolist()
    generated = [mask_stats(r.mask, spacing, ref.wm, ref.tissue) for r in results]
    generator = [mask_stats(m, spacing, ref.wm, ref.tissue)
                 for m in ref.generator_masks(max(pairs, ref.generator_count))]
    return {"pairs": pairs, "seconds_per_pair": seconds, "ncc_mean": float(np.mean(nccs)),
            "ncc_template": template_ncc, "ncc_ratio": float(np.mean(nccs) / max(template_ncc, 1e-9)),
            "tissue_fractions": fractions, "tissue_fractions_held_out": ref.fractions(),
            "lesions": _summary(generated), "generator_lesions": _summary(generator)}, results


def from_mask(editor: Editor, ref: Reference, cases: int, seed: int = 0, steps: int | None = None,
              sampler: str | None = None, lesion_guidance: float | None = None, lesion_fusion: bool | None = None,
              with_ncc: bool = True, healthy_cache: dict[int, np.ndarray] | None = None) -> tuple[dict[str, Any], list]:
    """Brains for held-out lesion masks (``Editor.generate_from_mask``, the product's path), each against the
    brain the same noise gives with the empty condition (eq. 9 without a lesion). ``lesion_guidance`` /
    ``lesion_fusion``: None = the bundle's; ``with_ncc`` False skips the (slow) affine NCC; ``healthy_cache``
    (noise seed -> healthy brain) lets a second call with the same seeds and steps reuse those brains."""
    import torch

    from USBLib.core import tasks

    affine = editor.bundle.grid_affine
    settings = editor._settings("generate_from_mask", steps=steps, sampler=sampler, lesion_guidance=lesion_guidance,
                                lesion_fusion=lesion_fusion)
    brain = editor.space["brain"]
    rows, figures = [], []
    for i in range(cases):
        mask = make_sample(ref.held, EVAL_SEED + 500 + i).mask
        if not mask.any():
            continue
        noise_seed = seed + i
        with_lesion = editor.generate_from_mask(mask, affine, steps=settings["steps"], seed=noise_seed,
                                                sampler=settings["sampler"],
                                                lesion_guidance=value_of(settings, "lesion_guidance"),
                                                lesion_fusion=value_of(settings, "lesion_fusion")).image
        without = None if healthy_cache is None else healthy_cache.get(noise_seed)
        if without is None:
            healthy = tasks.generate_from_mask(editor._denoisers(), editor.empty_condition(), settings["steps"],
                                               torch.Generator().manual_seed(noise_seed), sampler=settings["sampler"])
            without = np.clip(editor.decode(healthy)[0], 0, None) * brain
            if healthy_cache is not None:
                healthy_cache[noise_seed] = without
        lesion = mask > 0
        change = without - with_lesion
        ring = ndimage.binary_dilation(lesion, iterations=3) & ~lesion & (brain > 0)
        threshold = 0.5 * np.percentile(np.abs(change[lesion]), 90)
        changed = (np.abs(change) > threshold) if threshold > 0 else np.zeros_like(lesion)
        rows.append({"dice": metrics.dice(changed, lesion) if threshold > 0 else 0.0,
                     "recall": float(changed[lesion].mean()),
                     "ratio": float(with_lesion[lesion].mean() / max(with_lesion[ring].mean(), 1e-6)),
                     **({"ncc": ref.mean_ncc(with_lesion, affine)} if with_ncc else {})})
        figures.append((with_lesion, without, mask))
    if not rows:
        raise ValueError("every held-out case had an empty lesion mask")
    return ({k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
            | {"cases": len(rows), "lesion_guidance": float(value_of(settings, "lesion_guidance")),
               "lesion_fusion": bool(value_of(settings, "lesion_fusion"))}), figures


def montage(pairs: list, out: Path, title: str) -> Path:
    """8 generated pairs: an axial slice through each lesion (or the middle) with the mask outlined in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pairs)
    fig, axes = plt.subplots(2, (n + 1) // 2, figsize=(2.4 * ((n + 1) // 2), 5.6))
    for ax, (image, mask) in zip(np.ravel(axes), pairs):
        z = int(np.argwhere(mask).mean(0)[2]) if mask.any() else image.shape[2] // 2 + 5
        ax.imshow(np.rot90(image[:, :, z]), cmap="gray", vmin=0, vmax=1.2)
        if mask[:, :, z].any():
            ax.contour(np.rot90(mask[:, :, z]), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_axis_off()
    for ax in np.ravel(axes)[n:]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(model: Path | str, cfg: dict[str, Any], cache: Path, out: Path, pairs: int = 16, mask_cases: int = 8,
        seed: int = 0, steps: int | None = None, sampler: str | None = None,
        reference: Reference | None = None, per_source: int = 3) -> dict[str, Any]:
    """Every generation measurement of a bundle; writes ``generation.json``, ``generation.md`` and montages.
    ``reference``: the held-out population (default ``Reference(cfg, cache)``); ``per_source``: synthetic samples
    per source in the autoencoder round trip (``reconstruction_by_source``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    editor = Editor(bundle_mod.load(model), device="auto", registration="none")
    ref = Reference(cfg, cache) if reference is None else reference
    result: dict[str, Any] = {"held_out_source": HELD_OUT,
                              "reconstruction": reconstruction_by_source(editor_round_trip(editor), cfg, cache,
                                                                         per_source)}
    reconstruction_figure(editor_round_trip(editor), cfg, cache, out / "reconstruction.png",
                          f"{editor.bundle.name} autoencoder")
    result["unconditional"], generated = unconditional(editor, ref, pairs, seed, steps, sampler)
    healthy: dict[int, np.ndarray] = {}
    result["from_mask"], conditioned = from_mask(editor, ref, mask_cases, seed, steps, sampler,
                                                 healthy_cache=healthy)
    if result["from_mask"]["lesion_fusion"]:  # the paper's eq. 9 alone, for comparison (no NCC: same brains)
        result["from_mask_eq9"], _ = from_mask(editor, ref, mask_cases, seed, steps, sampler, lesion_fusion=False,
                                               with_ncc=False, healthy_cache=healthy)
    result["sampling"] = {k: v for k, v in editor._settings("generate", steps=steps, sampler=sampler).items()
                          if k in ("steps", "sampler")}
    montage([(r.image, r.mask) for r in generated[:8]], out / "generated_pairs.png",
            f"{editor.bundle.name}: generated pairs (red: generated lesion mask)")
    montage([(img, mask) for img, _, mask in conditioned[:4]] + [(without, mask) for _, without, mask in conditioned[:4]],
            out / "generated_from_mask.png",
            "brains for held-out masks (top) and the same noise without the lesion (bottom)")
    result["table_markdown"] = table(result)
    (out / "generation.json").write_text(json.dumps(result, indent=1))
    (out / "generation.md").write_text(result["table_markdown"] + "\n")
    return result


def reconstruction_table(reconstruction: dict[str, Any]) -> list[str]:
    """Markdown rows of ``reconstruction_by_source``."""
    lines = [f"Autoencoder round trip (model grid, brain voxels, range 1; held-out source `{HELD_OUT}`):", "",
             "| source | template PSNR dB | template SSIM | samples PSNR dB | samples SSIM | background |",
             "|---|---|---|---|---|---|"]
    for name, r in reconstruction.items():
        t, s = r["template"], r["samples"]
        lines.append(f"| {name}{' (held out)' if r['held_out'] else ''} | {t['psnr']:.2f} | {t['ssim']:.3f} | "
                     f"{s['psnr']:.2f} | {s['ssim']:.3f} | {s['background']:.4f} |")
    return lines


def population_lines(u: dict[str, Any]) -> list[str]:
    """Markdown bullet lines of ``unconditional``'s measures: NCC against the template's, tissue fractions, lesion
    statistics against the generator's."""
    g, r = u["lesions"], u["generator_lesions"]
    return [f"- NCC with held-out brains after affine alignment: {u['ncc_mean']:.3f} (model template "
            f"{u['ncc_template']:.3f}; ratio {u['ncc_ratio']:.2f}, target >= 0.75)",
            f"- tissue fractions CSF/GM/WM (3-class GMM): generated {u['tissue_fractions']}, held-out "
            f"{u['tissue_fractions_held_out']}",
            f"- lesion components (median): generated {g['components_median']:.0f}, generator "
            f"{r['components_median']:.0f}",
            f"- lesion volume ml (median): generated {g['volume_ml_median']:.1f}, generator "
            f"{r['volume_ml_median']:.1f} (5-95 %: {r['volume_ml_p5_p95'][0]:.1f}-{r['volume_ml_p5_p95'][1]:.1f})",
            f"- lesion volume in white matter: generated {g['in_wm']:.0%}, generator {r['in_wm']:.0%}; in brain "
            f"tissue: generated {g['in_tissue']:.0%}, generator {r['in_tissue']:.0%}"]


def table(result: dict[str, Any]) -> str:
    """Markdown summary of ``run``'s result."""
    lines = reconstruction_table(result["reconstruction"])
    u = result["unconditional"]
    sampling = result.get("sampling", {})
    lines += ["", f"Unconditional generation, {u['pairs']} pairs, {u['seconds_per_pair']:.1f} s per pair "
              f"({sampling.get('sampler', '?')}, {sampling.get('steps', '?')} steps):", "",
              *population_lines(u)]
    m = result["from_mask"]
    fused = " fused into a healthy twin" if m.get("lesion_fusion") else " (eq. 9, whole brain conditioned)"
    lines += ["", f"Generation from a mask ({m['cases']} held-out masks, lesion guidance "
              f"{m.get('lesion_guidance', 0.0):g}, lesion{fused}): Dice of the thresholded change "
              f"{m['dice']:.3f} (target >= 0.7; {m.get('recall', float('nan')):.0%} of the mask changed), "
              f"lesion/surround ratio {m['ratio']:.3f} (1 = invisible), brain NCC {m['ncc']:.3f}"]
    if m.get("lesion_fusion"):
        lines.append("- with lesion fusion nothing changes beyond the mask grown by dilation + margin (by "
                     "construction), so Dice here says how fully the lesion fills the mask and how little it "
                     "spills into that rim")
    if "from_mask_eq9" in result:
        e = result["from_mask_eq9"]
        lines.append(f"- the paper's eq. 9 (no lesion fusion), same masks and noise: Dice {e['dice']:.3f} "
                     f"({e['recall']:.0%} of the mask changed), lesion/surround ratio {e['ratio']:.3f}")
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ..base.config import tier
    from ..base.paths import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder or name (default: the default model)")
    parser.add_argument("--autoencoder", type=Path, default=None,
                        help="only the autoencoder round trip, from this training run folder (with --tier)")
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("usb_evaluation"))
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--mask-cases", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the bundle's)")
    parser.add_argument("--sampler", choices=SAMPLERS, default=None, help="default: the bundle's")
    args = parser.parse_args(argv)
    if args.autoencoder is not None:
        cfg = tier(args.tier)
        round_trip = checkpoint_round_trip(cfg, args.autoencoder)
        rec = reconstruction_by_source(round_trip, cfg, args.cache)
        args.out.mkdir(parents=True, exist_ok=True)
        reconstruction_figure(round_trip, cfg, args.cache, args.out / "reconstruction.png", "autoencoder")
        (args.out / "reconstruction.json").write_text(json.dumps(rec, indent=1))
        print("\n".join(reconstruction_table(rec)))
        return 0
    b = bundle_mod.load(args.model)
    result = run(b.root, tier(b.tier), args.cache, args.out, args.pairs, args.mask_cases, steps=args.steps,
                 sampler=args.sampler)
    print(result["table_markdown"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
