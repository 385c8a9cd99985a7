"""Native-space yardstick for heal, and the native embed evaluation, through the public API
(``USBLib.editor.editor.Editor``) on whole scans a user would bring.

Read the numbers with this in mind: every source here is a *population template*, an average of hundreds of brains,
and a population template is smoother than any individual brain (blurred sulci, no individual grain, tissue
interiors flatter than a real scan's). Template- or prior-driven methods look better on it than they will on a real
individual scan, and the held-out IXI555 template is still a template. The yardstick makes the held-out anatomy as
unlike the training templates as it can (its own smooth non-linear deformation, label-driven contrast for every
other case, ``usb_training.local.cases.yardstick_case``); it cannot make it an individual.

Heal (the yardstick, issues #21 and #25):

- cases: ``--cases`` (24) scans of the held-out source over the sites of ``cases.YARDSTICK_SITES`` (deep and
  periventricular WM, juxtacortical, thalamus / putamen / caudate located by MNI coordinates, cortex, cerebellum,
  large territorial, several small lesions, a lesion cut by the field of view), darkening 2-3 voxels past the mask;
- every case is healed twice: with the exact mask (the 0.5 iso-surface) and a hasty one (eroded by one voxel);
  ``--masks`` adds a generous one (grown by 2 mm: drawn around the darkened rim, as a FLAIR segmentation or a mask
  dilated for safety is) or picks any of the three;
- scores where the lesion is (``scores.yardstick_scores``): PSNR over every voxel the lesion changed (mask and rim),
  the fill's mean / the truth's there, the texture relative to the truth's; mask-only PSNR as a secondary column;
- the classical set (``CLASSICAL``): NAWM constant, FSL-style, biharmonic of the mask and of the mask grown by 2 and
  3, the local stage's own base, an atlas fill (MNI2009a tissue maps through the engine's registration), a
  non-local patch fill of the mask and of the mask grown by 2 (NiftySeg's ``seg_FillLesions`` method,
  ``USBLib.imaging.patch_fill``);
- USB configurations: the bundle defaults plus ``--usb NAME=key:value,...`` (``Editor.heal`` keywords);
- statistics: per configuration, the paired difference to the best classical filler of each case and to the filler
  chosen in advance (``PRESET``: biharmonic of the mask grown by 3), seeded bootstrap 95 % intervals (cases
  resampled), the worst case, per-site means, exact / hasty / both;
- optional (``--segment``): the downstream segmentation check of ``usb_training.evaluation.segment``.

Embed (as before): the local stage, the latent stage, both, on the same cases with the exact masks.

    python -m usb_training.evaluation.evaluate --native [--cases 24] [--usb "d1=dilation_mm:1"] [--segment]
        [--source ixi555] [--embed stages|defaults|none] [--out DIR]
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from tqdm import tqdm

from USBLib.editor.editor import Editor

from ..base import baselines
from ..base.scores import changed_region, embed_scores, scoring_box, yardstick_scores
from ..local.cases import MASKS, NativeCase, drawn_mask, site_group

EVAL_SEED = 910_000
PRESET = "biharmonic, mask + 3 vox"   # the single classical filler chosen in advance
PATCH = "patch fill (NiftySeg-style)"  # non-local patch-based filling, as seg_FillLesions does it
BOOTSTRAP = 10_000
ATLAS_SOURCE = "mni2009a"             # the bundle template's own tissue maps (a training source)


# ----------------------------------------------------------------------------------------------------------------
# USB configurations from the command line
# ----------------------------------------------------------------------------------------------------------------

def parse_value(text: str) -> Any:
    """``true``/``false`` -> bool, then int, then float, else the string itself."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            pass
    return text.strip()


def parse_usb(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME=key:value,key:value"`` -> (``"USB NAME"``, {key: value}) for ``Editor.heal``; ``"NAME"`` or
    ``"NAME="`` alone is the bundle defaults under that name. Raises ``ValueError`` on a malformed setting."""
    name, _, body = spec.partition("=")
    name = name.strip()
    if not name:
        raise ValueError(f"--usb {spec!r}: a configuration needs a name (NAME=key:value,...)")
    settings: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, sep, value = item.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"--usb {spec!r}: {item!r} is not key:value")
        settings[key.strip()] = parse_value(value)
    return (name if name.startswith("USB") else f"USB {name}"), settings


def usb_configs(specs: Iterable[str]) -> dict[str, dict[str, Any]]:
    """The bundle defaults (``USB defaults``) plus one configuration per ``--usb`` spec."""
    out: dict[str, dict[str, Any]] = {"USB defaults": {}}
    for spec in specs:
        name, settings = parse_usb(spec)
        out[name] = settings
    return out


def check_usb_settings(editor: Editor, configs: dict[str, dict[str, Any]]) -> None:
    """Fail before any case is built when a configuration names an unknown or invalid heal setting."""
    import inspect

    from USBLib.settings import validate

    known = set(inspect.signature(editor.heal).parameters) - {"image", "affine", "mask", "brain_mask", "seed",
                                                              "progress", "samples", "mask_affine",
                                                              "resample_mask"}
    for name, settings in configs.items():
        unknown = set(settings) - known
        if unknown:
            raise ValueError(f"{name}: unknown heal setting(s) {sorted(unknown)}; known: {sorted(known)}")
        validate(dict(editor.bundle.defaults("heal"), **settings))


# ----------------------------------------------------------------------------------------------------------------
# The classical set
# ----------------------------------------------------------------------------------------------------------------

def atlas_priors(cache: Path, grid_shape, grid_affine: np.ndarray, source: str = ATLAS_SOURCE) -> np.ndarray:
    """[3, *grid_shape] float32 CSF/GM/WM probabilities of a training source (MNI2009a: nilearn's GM/WM maps,
    CSF = 1 - GM - WM) resampled onto the bundle's model grid (trilinear, anti-aliased)."""
    import nibabel as nib

    from USBLib.imaging.spatial import SpaceMapping

    from ..data.sources import fetch

    paths = fetch(cache, [source])[source]
    maps = []
    for key in ("gm", "wm"):
        img = nib.load(str(paths[key]))
        data = np.asarray(img.dataobj, np.float32)
        maps.append(data / 255.0 if data.max() > 1.5 else data)
        affine = img.affine
    mapping = SpaceMapping(tuple(maps[0].shape), np.asarray(affine, float), tuple(grid_shape),
                           np.asarray(grid_affine, float), np.eye(4))
    gm, wm = (np.clip(mapping.to_model(m), 0, 1) for m in maps)
    return np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm]).astype(np.float32)


def _heal_inputs(case: NativeCase) -> np.ndarray:
    """The scan exactly as ``Editor.heal`` registers it (checked, offset-free), so ``Editor._map`` is shared."""
    from USBLib.editor.input_checks import offset_free
    from USBLib.imaging.checks import check_image

    return offset_free(check_image(case.lesioned, case.affine))[0]


def native_priors(editor: Editor, case: NativeCase, model_priors: np.ndarray, seed: int) -> np.ndarray:
    """The model-grid tissue maps mapped into the case's scan through the engine's own registration
    (``Editor._map``, the mapping the heal of this case reuses)."""
    mapping = editor._map(_heal_inputs(case), np.asarray(case.affine, float), None, seed)
    return np.stack([mapping.to_native(p) for p in model_priors])


def classical_fillers(dilation: int, brighten_only: bool = False
                      ) -> dict[str, Callable[[NativeCase, np.ndarray, dict], np.ndarray]]:
    """Every classical filler under test, as f(case, drawn mask, context) -> healed scan; ``context`` holds
    ``seed`` and ``priors`` (the atlas maps on the scan's grid). ``dilation``: the local stage's fill dilation
    (voxels) for its own base. ``brighten_only``: each filler given USB's rule that a heal never darkens a voxel
    (the result is max(fill, lesioned scan); ``USBLib.editor.stage_rules.signed_effect``), the fairer yardstick for that rule."""
    fillers: dict[str, Callable[[NativeCase, np.ndarray, dict], np.ndarray]] = {
        "NAWM constant": lambda c, m, ctx: baselines.nawm_constant(c.lesioned, m, c.brain),
        "FSL-style lesion filling": lambda c, m, ctx: baselines.lesion_filling(c.lesioned, m, c.brain,
                                                                              seed=ctx["seed"]),
        "biharmonic, mask": lambda c, m, ctx: baselines.biharmonic_grown(c.lesioned, m, c.brain, 0),
        "biharmonic, mask + 2 vox": lambda c, m, ctx: baselines.biharmonic_grown(c.lesioned, m, c.brain, 2),
        PRESET: lambda c, m, ctx: baselines.biharmonic_grown(c.lesioned, m, c.brain, 3),
        f"local stage base (d={dilation}, 18-nbh)": lambda c, m, ctx: baselines.stage_base(c.lesioned, m, dilation),
        "atlas fill (MNI2009a, mask + 2)": lambda c, m, ctx: baselines.atlas_fill(c.lesioned, m, c.brain,
                                                                                  ctx["priors"], grow=2),
        PATCH: lambda c, m, ctx: baselines.patch_fill(c.lesioned, np.asarray(m) > 0),
        PATCH + ", mask + 2 vox": lambda c, m, ctx: baselines.patch_fill(c.lesioned, baselines.grown(m, 2, c.brain)),
    }
    if not brighten_only:
        return fillers
    return {name: (lambda c, m, ctx, f=f: np.maximum(np.asarray(f(c, m, ctx), np.float32),
                                                     np.asarray(c.lesioned, np.float32)))
            for name, f in fillers.items()}


# ----------------------------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------------------------

def bootstrap_ci(values, clusters=None, seed: int = 0, n: int = BOOTSTRAP, level: float = 0.95
                 ) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; with ``clusters`` (one id per value) whole
    clusters (cases) are resampled, so that a case's exact and hasty rows stay together. Seeded."""
    v = np.asarray(values, np.float64)
    ids = np.arange(len(v)) if clusters is None else np.unique(np.asarray(clusters), return_inverse=True)[1]
    k = int(ids.max()) + 1
    sums, counts = np.bincount(ids, v, k), np.bincount(ids, minlength=k).astype(np.float64)
    pick = np.random.default_rng(seed).integers(0, k, (n, k))
    means = sums[pick].sum(1) / counts[pick].sum(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def summarise(rows: list[dict[str, Any]], classical: list[str], usb: list[str], key: str = "psnr",
              seed: int = 0) -> dict[str, Any]:
    """Per USB configuration and mask subset (exact, hasty, both): the paired difference to the best classical
    filler of each (case, mask) and to ``PRESET``, with bootstrap intervals, the worst case, per-site means."""
    table: dict[tuple, dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["case"], r["mask"]), {})[r["method"]] = r[key]
    meta = {(r["case"], r["mask"]): r for r in rows}
    pairs = sorted(table)
    best = {p: max(table[p][m] for m in classical) for p in pairs}
    best_name = {p: max(classical, key=lambda m: table[p][m]) for p in pairs}
    out: dict[str, Any] = {"best_classical": {f"{c}/{m}": [best_name[(c, m)], best[(c, m)]] for c, m in pairs},
                           "configs": {}}
    for name in usb:
        per: dict[str, Any] = {}
        for subset, keep in mask_subsets({p[1] for p in pairs}):
            sel = [p for p in pairs if p[1] in keep and name in table[p]]
            if not sel:
                continue
            cases = [p[0] for p in sel]
            d_best = [table[p][name] - best[p] for p in sel]
            d_pre = [table[p][name] - table[p][PRESET] for p in sel]
            worst = int(np.argmin(d_best))
            sites: dict[str, list] = {}
            for p, d, dp in zip(sel, d_best, d_pre):
                sites.setdefault(site_group(meta[p]["site"]), []).append((d, dp, table[p][name], best[p]))
            per[subset] = {
                "n": len(sel), "usb": float(np.mean([table[p][name] for p in sel])),
                "best_classical": float(np.mean([best[p] for p in sel])),
                "preset": float(np.mean([table[p][PRESET] for p in sel])),
                "vs_best": float(np.mean(d_best)), "vs_best_ci": bootstrap_ci(d_best, cases, seed),
                "vs_preset": float(np.mean(d_pre)), "vs_preset_ci": bootstrap_ci(d_pre, cases, seed),
                "worst": float(d_best[worst]), "worst_case": f"{sel[worst][0]} ({sel[worst][1]})",
                "worst_vs_preset": float(min(d_pre)),
                "sites": {s: {"n": len(v), "vs_best": float(np.mean([x[0] for x in v])),
                              "vs_preset": float(np.mean([x[1] for x in v])),
                              "usb": float(np.mean([x[2] for x in v])),
                              "best_classical": float(np.mean([x[3] for x in v]))} for s, v in sites.items()},
            }
        out["configs"][name] = per
    return out


def mask_subsets(present) -> list[tuple[str, tuple[str, ...]]]:
    """The mask subsets a summary reports, of the drawn masks ``present`` (``cases.MASKS``): each mask alone, in
    ``MASKS`` order, then ``both`` (exact and hasty together) when both are there."""
    subsets = [(m, (m,)) for m in MASKS if m in present]
    return subsets + ([("both", ("exact", "hasty"))] if {"exact", "hasty"} <= set(present) else [])


def method_means(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """{method: {mask: {key: mean}}} over the cases."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in rows:
        out.setdefault(r["method"], {}).setdefault(r["mask"], {})
    for method, masks in out.items():
        for mask in masks:
            sel = [r for r in rows if r["method"] == method and r["mask"] == mask]
            masks[mask] = {k: float(np.nanmean([r[k] for r in sel if k in r])) for k in keys
                           if any(k in r for r in sel)}  # (a case without a mask has no tissue scores)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------

def _crop(vol: np.ndarray, centre: np.ndarray, half: int = 28) -> np.ndarray:
    pad = np.pad(np.asarray(vol, np.float32), half)  # a lesion at the field of view's edge still gets a full tile
    c = np.asarray(centre) + half
    return pad[tuple(slice(int(a) - half, int(a) + half) for a in c)].copy()


def embed_methods(editor: Editor, kind: str = "stages") -> dict[str, Callable[[NativeCase, int], np.ndarray]]:
    """The embeds under test, as f(case, seed) -> embedded scan: ``stages`` (local realism, local fidelity, the
    latent stage), ``defaults`` (the bundle's), ``realism`` (the bundle's and the local realism mode, the one a
    person looking at the result gets in the Slicer module and the demo; and local fidelity instead when the
    bundle's embed already is local realism, so that no embed runs twice), ``level`` (the bundle's, and the same
    asked for the reference lesion's own level, ``lesion_level``: its shape and texture at matched darkness)."""
    def usb(**settings):
        return lambda c, seed: editor.embed(c.healthy, c.affine, c.mask, seed=seed, **settings).image

    if kind == "defaults":
        return {"USB defaults": usb()}
    if kind == "level":
        from USBLib.imaging.lesion_level import lesion_surround_ratio

        def at_reference_level(c: NativeCase, seed: int) -> np.ndarray:
            # measured as the engine measures it: on the scan shifted so that its darkest voxel is 0
            level = lesion_surround_ratio(c.lesioned - float(np.min(c.healthy)), c.mask > 0, c.brain > 0)
            level = float(np.clip(level, 0.05, 0.99))
            return editor.embed(c.healthy, c.affine, c.mask, seed=seed, lesion_level=level).image

        return {"USB defaults": usb(), "USB at the reference lesion's level": at_reference_level}
    if kind == "realism":
        default = editor.bundle.defaults("embed")
        other = "fidelity" if (default.get("stages"), default.get("local_mode")) == ("local", "realism") else "realism"
        return {"USB defaults": usb(), f"USB local, {other}": usb(stages="local", local_mode=other)}
    return {"USB local, realism": usb(stages="local", local_mode="realism"),
            "USB local, fidelity": usb(stages="local", local_mode="fidelity"),
            "USB latent stage": usb(stages="latent")}


def evaluate(editor: Editor, cases: Iterable[NativeCase], configs: dict[str, dict[str, Any]],
             model_priors: np.ndarray, embed: str = "stages", segment_cache: Path | None = None,
             figure_cases: int = 4, log: Callable[[str], None] | None = None,
             brighten_only: bool = False, masks: tuple[str, ...] = ("exact", "hasty")) -> dict[str, Any]:
    """Heal every case with every classical filler and USB configuration, with each of the drawn ``masks``
    (``cases.drawn_mask``: exact, hasty, generous; the first is the one the figures and the log show); embed with
    ``embed`` (``stages``: local realism / fidelity / latent, ``defaults``: the bundle's, ``realism``: the bundle's
    and local realism, ``none``). ``brighten_only``: the classical fillers never darken a voxel
    (``classical_fillers``)."""
    dilation = int(round(float(editor.bundle.defaults("heal").get("dilation_mm", 2.0))))
    fillers = classical_fillers(dilation, brighten_only)
    emb = {} if embed == "none" else embed_methods(editor, embed)
    rows: list[dict[str, Any]] = []
    embed_rows: dict[str, list] = {m: [] for m in emb}
    shown: list[dict[str, Any]] = []
    seg_kind = None
    if segment_cache is not None:
        from .segment import seg_scores, segment, segment_box, segmenter

        seg_kind = segmenter()
    for i, case in enumerate(tqdm(cases, desc="cases", leave=False)):
        t_case = time.perf_counter()
        seed = i
        changed = changed_region(case.lesioned, case.healthy, case.brain, case.mask)
        sbox = scoring_box(changed)
        scale = float(np.percentile(case.healthy[case.brain > 0], 99))
        spacing = np.linalg.norm(np.asarray(case.affine)[:3, :3], axis=0)
        t0 = time.perf_counter()
        ctx = {"seed": seed, "priors": native_priors(editor, case, model_priors, seed)}
        register_s = time.perf_counter() - t0
        base = {"case": case.name, "site": case.site, "group": site_group(case.site), "contrast": case.contrast,
                "changed_voxels": int(changed.sum()), "mask_voxels": int(case.mask.sum())}
        truth_seg = None
        if segment_cache is not None and np.any(case.mask > 0):  # (a thick case's mask can vanish: no box)
            box = segment_box(case.mask, spacing)
            seg = lambda x: segment(x[box], case.brain[box], segment_cache)  # noqa: E731
            truth_seg = seg(case.healthy)
            lesioned_seg = seg_scores(seg(case.lesioned), truth_seg, case.mask[box], spacing)
        outs: dict[str, np.ndarray] = {}
        for mask_name in masks:
            drawn = drawn_mask(case, mask_name)
            methods: list[tuple[str, str, Callable[[], np.ndarray]]] = [
                ("classical", n, (lambda f=f: f(case, drawn, ctx))) for n, f in fillers.items()]
            methods += [("usb", n, (lambda s=s: editor.heal(case.lesioned, case.affine, drawn, seed=seed,
                                                            **s).image)) for n, s in configs.items()]
            methods.append(("input", "input (no change)", lambda: case.lesioned.copy()))
            for kind, name, run_method in methods:
                t0 = time.perf_counter()
                failed = None
                try:
                    out = np.asarray(run_method(), np.float32)
                except Exception as exc:  # noqa: BLE001  a crash is a result: scored as the unchanged input
                    failed = f"{type(exc).__name__}: {exc}"
                    out = np.asarray(case.lesioned, np.float32)
                    if log:
                        log(f"FAILED {name} on {case.name} ({mask_name} mask): {failed}")
                seconds = time.perf_counter() - t0
                row = dict(base, mask=mask_name, method=name, kind=kind, seconds=seconds,
                           **yardstick_scores(out[sbox], case.healthy[sbox], changed[sbox], drawn[sbox],
                                              case.brain[sbox], scale))
                if failed:
                    row["failed"] = failed
                if truth_seg is not None:
                    row.update(lesioned_seg if kind == "input" else
                               seg_scores(seg(out), truth_seg, case.mask[box], spacing))
                rows.append(row)
                if i < figure_cases and kind != "input" and mask_name == masks[0]:
                    outs[f"{mask_name}/{name}"] = out
        for name, method in emb.items():
            t0 = time.perf_counter()
            try:
                out = method(case, seed)
            except Exception as exc:  # noqa: BLE001  one refused or crashed embed must not lose the run: logged
                if log:
                    log(f"FAILED embed {name} on {case.name}: {type(exc).__name__}: {exc}")
                continue
            row = embed_scores(out, case.healthy, case.mask, case.brain, case.lesioned)
            row["seconds"] = time.perf_counter() - t0
            embed_rows[name].append(dict(row, case=case.name))
            if i < figure_cases:
                outs[f"embed/{name}"] = out
        if i < figure_cases and np.any(case.mask > 0):  # (a thick case's mask can vanish: nothing to show)
            centre = np.round(np.argwhere(case.mask > 0).mean(0)).astype(int)
            shown_rows = [r for r in rows if r["case"] == case.name and r["mask"] == masks[0]]
            best = max((r for r in shown_rows if r["kind"] == "classical"), key=lambda r: r["psnr"])
            shown.append({"name": case.name, "site": case.site,
                          "truth": _crop(case.healthy, centre), "lesioned": _crop(case.lesioned, centre),
                          "best": (best["method"], _crop(outs[f"{masks[0]}/{best['method']}"], centre)),
                          "usb": {n: _crop(outs[f"{masks[0]}/{n}"], centre) for n in configs},
                          "embed": {n: _crop(outs["embed/" + n], centre) for n in emb if "embed/" + n in outs}})
        if log:
            first = {r["method"]: r["psnr"] for r in rows if r["case"] == case.name and r["mask"] == masks[0]}
            best_c = max(first[n] for n in fillers)
            log(f"case {i} {case.name} ({case.contrast}{'' if masks[0] == 'exact' else ', ' + masks[0] + ' mask'}): "
                f"best classical {best_c:.2f} dB, " + ", ".join(f"{n} {first[n]:.2f}" for n in configs)
                + f" (registration {register_s:.1f} s, case {time.perf_counter() - t_case:.0f} s)")
    return {"rows": rows, "embed_rows": embed_rows, "shown": shown, "classical": list(fillers),
            "usb": list(configs), "segmenter": seg_kind}


def figure(shown: list[dict[str, Any]], out: Path) -> Path:
    """``heal_yardstick.png``: one column block per case (axial, coronal, sagittal, 56 mm around the lesion),
    rows truth / lesioned / best classical / each USB configuration (the first mask healed, exact by default) /
    USB - truth."""
    from USBLib.apps.montage import save_montage

    centre = np.array([28] * 3)
    labels = [f"{s['site']}" for s in shown]
    rows = [("truth", [s["truth"] for s in shown], labels, centre),
            ("lesioned", [s["lesioned"] for s in shown], labels, centre),
            ("best classical", [s["best"][1] for s in shown], [f"{s['best'][0]}" for s in shown], centre)]
    names = list(shown[0]["usb"])
    for n in names:
        rows.append((n, [s["usb"][n] for s in shown], labels, centre))
    rows.append((f"{names[0]} - truth", [s["usb"][names[0]] - s["truth"] for s in shown],
                 ["difference " + lab for lab in labels], centre))
    return save_montage(out / "heal_yardstick.png", rows, zoom=2)


def embed_figure(shown: list[dict[str, Any]], out: Path) -> Path | None:
    from USBLib.apps.montage import save_montage

    if not shown or not shown[0]["embed"]:
        return None
    centre = np.array([28] * 3)
    labels = [s["site"] for s in shown]
    rows = [("healthy input", [s["truth"] for s in shown], labels, centre)]
    rows += [(n, [s["embed"][n] for s in shown], labels, centre) for n in shown[0]["embed"]]
    rows.append(("generator's lesion", [s["lesioned"] for s in shown], labels, centre))
    return save_montage(out / "embed_native.png", rows, zoom=2)


def _ci(v: tuple[float, float]) -> str:
    return f"[{v[0]:+.2f}, {v[1]:+.2f}]"


def table(result: dict[str, Any]) -> str:
    """The text tables of a yardstick run."""
    s = result["summary"]
    means = result["means"]
    masks = [m for m in MASKS if m in result.get("masks", ("exact", "hasty"))]
    lines = [f"Heal yardstick: {result['cases']} cases of {result['source']}"
             f"{' (held out)' if result['held_out'] else ' (TRAINING SOURCE: in-distribution)'}, "
             f"{', '.join(masks)} masks. PSNR (dB) over every voxel the lesion changed (mask and rim); "
             "mask-only PSNR secondary; mean = fill mean / truth mean there; texture = high-pass SD inside vs "
             "the ring around, relative to the truth's (1 = right); collateral = mean |change| of the healthy tissue "
             "1-6 voxels around the lesion's changes, % of the range (0 = untouched).", "",
             "| method | " + " | ".join(f"PSNR {m}" for m in masks) + " | "
             + " | ".join(f"mask-only PSNR {m}" for m in masks) + " | " + " | ".join(f"mean {m}" for m in masks)
             + f" | texture {masks[0]} | collateral {' / '.join(masks)} | s / heal |",
             "|---|" + "---|" * (3 * len(masks) + 3)]
    for name, per_mask in means.items():
        v = [per_mask.get(m, {}) for m in masks]
        lines.append(f"| {name} | " + " | ".join(f"{e.get('psnr', np.nan):.2f}" for e in v) + " | "
                     + " | ".join(f"{e.get('psnr_mask', np.nan):.2f}" for e in v) + " | "
                     + " | ".join(f"{e.get('mean_ratio', np.nan):.3f}" for e in v) + " | "
                     f"{v[0].get('texture', np.nan):.2f} | "
                     + " / ".join(f"{e.get('collateral', np.nan):.2f}" for e in v)
                     + f" | {v[0].get('seconds', np.nan):.1f} |")
    first = next(iter(s["configs"].values()))
    lines += ["", f"best classical per case (max over {len(result['classical'])} fillers"
              f"{', each brightening only' if result.get('classical_brighten_only') else ''}): "
              + ", ".join(f"{m} {first[m]['best_classical']:.2f} dB" for m in masks)
              + f"; '{PRESET}' (chosen in advance): " + ", ".join(f"{m} {first[m]['preset']:.2f}" for m in masks), "",
              "Paired differences, PSNR over the changed voxels (dB; bootstrap 95 % interval over cases, "
              f"{BOOTSTRAP} resamples, seeded):", "",
              "| USB configuration | masks | n | USB | USB - best classical | 95 % CI | worst (case) "
              f"| USB - {PRESET} | 95 % CI | worst |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, per in s["configs"].items():
        for subset, v in per.items():
            lines.append(f"| {name} | {subset} | {v['n']} | {v['usb']:.2f} | {v['vs_best']:+.2f} | "
                         f"{_ci(v['vs_best_ci'])} | {v['worst']:+.2f} ({v['worst_case']}) | {v['vs_preset']:+.2f} | "
                         f"{_ci(v['vs_preset_ci'])} | {v['worst_vs_preset']:+.2f} |")
    groups = list(first[mask_subsets(masks)[-1][0]]["sites"])
    lines += ["", f"Per site (mean over the site's cases; USB - best classical, dB; {' / '.join(masks)}):", "",
              f"| site | n | best classical {masks[0]} | "
              + " | ".join(f"{n} {m}" for n in s["configs"] for m in masks) + " |",
              "|---|---|---|" + "---|" * (len(s["configs"]) * len(masks))]
    for g in groups:
        ex = first[masks[0]]["sites"].get(g)
        cells = []
        for per in s["configs"].values():
            cells += [f"{per[m]['sites'][g]['vs_best']:+.2f}" if g in per[m]["sites"] else "" for m in masks]
        lines.append(f"| {g} | {ex['n'] if ex else 0} | {ex['best_classical'] if ex else np.nan:.2f} | "
                     + " | ".join(cells) + " |")
    failures = [r for r in result["rows"] if r.get("failed")]
    if failures:
        lines += ["", f"FAILURES ({len(failures)} runs, scored as the unchanged input):"]
        lines += [f"- {r['method']} on {r['case']} ({r['mask']}): {r['failed']}" for r in failures]
    wins: dict[str, int] = {}
    for name, _ in s["best_classical"].values():
        wins[name] = wins.get(name, 0) + 1
    lines += ["", "best classical filler, how often (case x mask): "
              + ", ".join(f"{k} {v}" for k, v in sorted(wins.items(), key=lambda kv: -kv[1]))]
    if result.get("segmenter"):
        lines += downstream_lines(result, means)
    if result.get("embed"):
        keys = ["lesion_surround_ratio", "reference_ratio", "dice_change", "dice_reference", "dice_half_depth",
                "dice_half_depth_reference", "edge_inside", "edge_1", "edge_2", "edge_1_reference",
                "edge_2_reference", "cv_lesion", "cv_reference", "mean_abs_change_ring_3_8", "seconds"]
        lines += ["", f"Embed, {result['cases']} native cases, exact masks (mean):", "",
                  "| method | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for name, row in result["embed"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" if k in row else "" for k in keys) + " |")
    return "\n".join(lines)


SEG_KEYS = ("seg_agree_mask", "seg_agree_ring", "seg_dvol_box_ml", "seg_dvol_10mm_ml")
SEG_HIGHER_BETTER = {"seg_agree_mask": True, "seg_agree_ring": True, "seg_dvol_box_ml": False,
                     "seg_dvol_10mm_ml": False}


def downstream_lines(result: dict[str, Any], means: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """The downstream segmentation tables, exact and hasty masks apart: every method's means, then each USB
    configuration against the best classical filler of each score (by its mean over the cases), paired over the
    cases with bootstrap 95 % intervals."""
    lines: list[str] = []
    classical = list(result["classical"])
    for mask in MASKS:
        if not any("seg_agree_mask" in masks.get(mask, {}) for masks in means.values()):
            continue
        lines += ["", f"Downstream segmentation ({result['segmenter']}, on the lesion + 30 mm box; agreement with "
                  f"the truth's labels, |dGM|+|dWM| ml), {mask} masks:", "",
                  "| method | agree in mask | agree ring 1-3 | dvol box (~brain) ml | dvol 10 mm ml |",
                  "|---|---|---|---|---|"]
        for name, masks in means.items():
            e = masks.get(mask, {})
            if "seg_agree_mask" in e:
                lines.append(f"| {name} | " + " | ".join(f"{e[k]:.3f}" for k in SEG_KEYS) + " |")
        rows = [r for r in result["rows"] if r["mask"] == mask and "seg_agree_mask" in r]
        per = {(r["case"], r["method"]): r for r in rows}
        cases = sorted({r["case"] for r in rows})
        for name in result["usb"]:
            parts = []
            for key in SEG_KEYS[:2] + SEG_KEYS[3:]:
                pick = max if SEG_HIGHER_BETTER[key] else min
                best = pick((m for m in classical if all((c, m) in per for c in cases)),
                            key=lambda m: np.mean([per[(c, m)][key] for c in cases]), default=None)
                if best is None or not all((c, name) in per for c in cases):
                    continue
                d = [per[(c, name)][key] - per[(c, best)][key] for c in cases]
                lo, hi = bootstrap_ci(d)
                parts.append(f"{key.removeprefix('seg_')} {np.mean(d):+.3f} [{lo:+.3f}, {hi:+.3f}] vs {best}")
            if parts:
                lines += ["", f"{name} - best classical filler ({mask} masks, n = {len(cases)}): " + "; ".join(parts)]
        seg_sites: dict[str, dict[str, list]] = {}
        for r in rows:
            seg_sites.setdefault(r["group"], {}).setdefault(r["method"], []).append(r["seg_dvol_10mm_ml"])
        methods = list(means)
        lines += ["", f"dvol within 10 mm (ml) per site, {mask} masks:", "",
                  "| site | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for g, per_m in seg_sites.items():
            lines.append(f"| {g} | " + " | ".join(f"{np.mean(per_m[m]):.2f}" if m in per_m else "" for m in methods)
                         + " |")
    return lines


def engine_state() -> dict[str, str]:
    """Where the engine ran from: the ``USBLib`` folder imported, its checkout's commit and a digest of uncommitted
    changes under ``USBLib`` (the numbers belong to that engine)."""
    import hashlib
    import subprocess

    import USBLib

    package = Path(USBLib.__file__).resolve().parent
    out = {"usblib": str(package), "commit": "not a git checkout"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            diff = subprocess.run(["git", "diff", "HEAD", "--", "."], cwd=package, capture_output=True,
                                  timeout=30).stdout
            out.update(commit=head.stdout.strip(), uncommitted_diff_sha1=hashlib.sha1(diff).hexdigest() if diff else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def run(model: Any, cases: Iterable[NativeCase], out: Path, configs: dict[str, dict[str, Any]] | None = None,
        cache: Path | None = None, source: str = "ixi555", held_out: bool = True, embed: str = "stages",
        segment: bool = False, model_priors: np.ndarray | None = None, seed: int = 0,
        log: Callable[[str], None] | None = print, brighten_only: bool = False,
        masks: tuple[str, ...] = ("exact", "hasty")) -> dict[str, Any]:
    """Run the yardstick on ``cases``; writes ``native_metrics.json``, ``native_results.md``,
    ``heal_yardstick.png`` (and ``embed_native.png``). ``model_priors``: the atlas maps on the model grid
    (default: MNI2009a's from ``cache``). ``brighten_only``: the classical fillers never darken a voxel.
    ``masks``: the drawn masks each case is healed with (``cases.MASKS``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    editor = model if isinstance(model, Editor) else Editor(model, device="auto")
    configs = configs or {"USB defaults": {}}
    check_usb_settings(editor, configs)
    if model_priors is None:
        from ..base.paths import DEFAULT_CACHE

        model_priors = atlas_priors(cache or DEFAULT_CACHE, editor.bundle.grid_shape, editor.bundle.grid_affine)
    t0 = time.perf_counter()
    res = evaluate(editor, cases, configs, model_priors, embed,
                   (Path(cache or out) / "segmentations") if segment else None, log=log, brighten_only=brighten_only,
                   masks=tuple(masks))
    rows = res["rows"]
    n = len({r["case"] for r in rows})
    keys = ["psnr", "psnr_mask", "mean_ratio", "texture", "texture_truth", "collateral", "seconds", "seg_agree_mask",
            "seg_agree_ring", "seg_dvol_box_ml", "seg_dvol_10mm_ml"]
    result: dict[str, Any] = {
        "source": source, "held_out": held_out, "cases": n, "classical": res["classical"], "usb": res["usb"],
        "usb_settings": configs, "preset": PRESET, "segmenter": res["segmenter"],
        "classical_brighten_only": brighten_only, "masks": list(masks),
        "means": method_means(rows, keys),
        "summary": summarise(rows, res["classical"], res["usb"], seed=seed),
        "embed": {m: {k: float(np.mean([r[k] for r in rs])) for k in rs[0] if k != "case"}
                  for m, rs in res["embed_rows"].items() if rs},
        "rows": rows, "embed_rows": res["embed_rows"], "seconds": time.perf_counter() - t0,
        "engine": engine_state(),
    }
    paths = {"heal": figure(res["shown"], out)} if res["shown"] else {}
    emb = embed_figure(res["shown"], out)
    if emb is not None:
        paths["embed"] = emb
    md = table(result)
    result.update({"table_markdown": md, "figures": {k: str(v) for k, v in paths.items()}})
    (out / "native_metrics.json").write_text(json.dumps(result, indent=1, default=float))
    (out / "native_results.md").write_text(md + "\n")
    return result
