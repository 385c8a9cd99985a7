"""``usb info``: a model bundle described in tables a person reads (``usb info --json`` gives bundle.json itself)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

# (metric key, column title, format) per task: the rows of the evaluation that matter to a user
HEAL_COLUMNS = (("lesion_psnr", "lesion PSNR dB", "{:.2f}"), ("lesion_ssim", "lesion SSIM", "{:.3f}"),
                ("lesion_l1", "lesion L1", "{:.4f}"), ("brain_psnr", "brain PSNR dB", "{:.2f}"),
                ("outside_max_change", "outside max change", "{:g}"), ("seconds", "seconds", "{:.1f}"))
EMBED_COLUMNS = (("lesion_contrast_usb", "lesion/surround", "{:.3f}"),
                 ("lesion_contrast_reference", "reference lesions", "{:.3f}"),
                 ("location_dice", "location Dice", "{:.3f}"), ("outside_max_change", "outside max change", "{:g}"))
RECONSTRUCTION_COLUMNS = (("template", "template PSNR dB"), ("samples", "samples PSNR dB"))


def table(header: Sequence[str], rows: Iterable[Sequence[str]], indent: str = "  ") -> list[str]:
    """Lines of a plain-text table: the first column left-aligned, the others right-aligned.

    Args:
        header: column titles.
        rows: one sequence of cell strings per row, as long as ``header``.
        indent: prefix of every line.
    """
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        rest = [f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:])]
        return indent + "  ".join([first, *rest]).rstrip()

    return [line(header), indent + "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _cell(values: Mapping[str, Any], key: str, fmt: str) -> str:
    value = values.get(key)
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _method_table(title: str, methods: Mapping[str, Mapping[str, Any]], columns) -> list[str]:
    rows = [[name, *(_cell(values, key, fmt) for key, _, fmt in columns)]
            for name, values in methods.items() if isinstance(values, Mapping)]
    return [title, *table(["method", *(c[1] for c in columns)], rows)] if rows else []


def _generation_lines(gen: Mapping[str, Any]) -> list[str]:
    lines = [f"Generation (held-out source {gen.get('held_out_source', '?')})"]
    unc = gen.get("unconditional") or {}
    if unc:
        lesions = unc.get("lesions") or {}
        lines.append(f"  unconditional pairs: NCC with held-out brains {unc.get('ncc_mean', float('nan')):.3f} "
                     f"(the template itself {unc.get('ncc_template', float('nan')):.3f}, ratio "
                     f"{unc.get('ncc_ratio', float('nan')):.2f}); {unc.get('pairs', '?')} pairs, "
                     f"{unc.get('seconds_per_pair', float('nan')):.1f} s per pair")
        if lesions:
            lines.append(f"  generated lesions: median {lesions.get('components_median', float('nan')):g} components, "
                         f"median {lesions.get('volume_ml_median', float('nan')):.1f} ml, "
                         f"{lesions.get('in_tissue', float('nan')):.0%} in tissue")
    for key, label in (("from_mask", "brain from a mask (lesion fusion)"), ("from_mask_eq9", "brain from a mask (eq. 9)")):
        fm = gen.get(key) or {}
        if fm:
            lines.append(f"  {label}: Dice {fm.get('dice', float('nan')):.3f}, lesion/surround "
                         f"{fm.get('ratio', float('nan')):.3f} ({fm.get('cases', '?')} masks)")
    sampling = gen.get("sampling") or {}
    if sampling:
        lines.append(f"  sampling: {sampling.get('sampler', '?')}, {sampling.get('steps', '?')} steps")
    recon = gen.get("reconstruction") or {}
    rows = [[source + (" (held out)" if values.get("held_out") else ""),
             *(_cell(values.get(part) or {}, "psnr", "{:.2f}") for part, _ in RECONSTRUCTION_COLUMNS)]
            for source, values in recon.items() if isinstance(values, Mapping)]
    if rows:
        lines += ["  autoencoder reconstruction:", *table(["source", *(c[1] for c in RECONSTRUCTION_COLUMNS)], rows,
                                                          indent="    ")]
    return lines


def metric_lines(metrics: Mapping[str, Any]) -> list[str]:
    """The bundle's measured metrics as tables: heal (method x lesion/brain/outside measures), embed (method x
    lesion contrast and location), generation (NCC, lesions, from a mask, reconstruction); other entries as
    ``key: value`` lines."""
    lines: list[str] = []
    shown = set()
    if isinstance(metrics.get("heal"), Mapping):
        lines += _method_table("Heal on the model's grid (held-out cases; PSNR/SSIM/L1 inside the lesion and over the "
                               "brain)", metrics["heal"], HEAL_COLUMNS) + [""]
        shown.add("heal")
    if isinstance(metrics.get("embed"), Mapping):
        lines += _method_table("Embed on the model's grid (lesion/surround intensity ratio: lower is darker)",
                               metrics["embed"], EMBED_COLUMNS) + [""]
        shown.add("embed")
    if isinstance(metrics.get("heal_yardstick"), Mapping):
        lines += _yardstick_lines(metrics["heal_yardstick"]) + [""]
        shown.add("heal_yardstick")
    if isinstance(metrics.get("generation"), Mapping):
        lines += _generation_lines(metrics["generation"]) + [""]
        shown.add("generation")
    rest = {k: v for k, v in metrics.items() if k not in shown}
    if rest:
        lines += ["Evaluation: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in rest.items()), ""]
    return lines


def _yardstick_lines(yardstick: Mapping[str, Any]) -> list[str]:
    """The heal yardstick (native space, exact and hasty masks): USB's PSNR and its paired differences."""
    rows = [[name, f"{v['psnr_db']:.2f}",
             f"{v['vs_best_classical_db']:+.2f} [{v['vs_best_classical_ci'][0]:+.2f}, {v['vs_best_classical_ci'][1]:+.2f}]",
             f"{v['worst_vs_best_classical_db']:+.2f}",
             f"{v['vs_chosen_filler_db']:+.2f} [{v['vs_chosen_filler_ci'][0]:+.2f}, {v['vs_chosen_filler_ci'][1]:+.2f}]"]
            for name, v in yardstick.get("configs", {}).items()]
    fillers = yardstick.get("classical_fillers")
    head = (f"Heal yardstick ({yardstick.get('source')}, {yardstick.get('cases')} cases x exact and hasty masks, at "
            "the scan's resolution; PSNR dB over every voxel the lesion changed; 95 % intervals"
            + (f"; the best of {fillers} classical fillers per case" if fillers else "") + ")")
    lines = [head] + table(["USB", "PSNR", "- best classical per case", "worst", f"- {yardstick.get('chosen_filler')}"],
                           rows)
    for name, v in yardstick.get("configs", {}).items():
        if "heals_below_best_classical" in v:
            lines.append(f"  {name}: {v['heals_below_best_classical']} of {v['heals']} heals more than 1 dB below the "
                         f"best classical filler of their case; the exact mask healed worse than the hasty one on "
                         f"{v['exact_worse_than_hasty']} of {v['cases_with_both_masks']} cases")
    if yardstick.get("commit"):
        lines.append(f"  measured with the engine at commit {str(yardstick['commit'])[:7]}")
    return lines


def defaults_table(defaults: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Default settings: one row per setting, one column per task ('-' where a task has no such setting)."""
    tasks = list(defaults)
    names = list(dict.fromkeys(name for values in defaults.values() for name in values))
    rows = [[name, *(f"{defaults[t][name]:g}" if isinstance(defaults[t].get(name), float)
                     else str(defaults[t].get(name, "-")) for t in tasks)] for name in names]
    return table(["setting", *tasks], rows)


def _training_lines(training: Mapping[str, Any]) -> list[str]:
    lines = ["Training"]
    for part, values in training.items():
        if isinstance(values, Mapping) and isinstance(values.get("healthy_sources"), Mapping):
            lines.append(f"  {part}: " + ", ".join(values["healthy_sources"])
                         + (f"; held out: {values['held_out_source']}" if values.get("held_out_source") else ""))
        elif isinstance(values, Mapping):
            summary = ", ".join(f"{k} {values[k]}" for k in ("steps", "hours") if k in values)
            lines.append(f"  {part}: {summary or ', '.join(values)}")
        else:
            lines.append(f"  {part}: {values}")
    return lines


def _readable(title: str, lines_of, record: Any) -> list[str]:
    """``lines_of(record)``, or one line saying that the bundle records ``title`` in a form this USBLib does not
    read (a field missing, a list where an object belongs): ``usb info`` describes such a bundle all the same."""
    try:
        return lines_of(record)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
        return [f"{title}: recorded in a form this USBLib does not read ({type(exc).__name__}: {exc})", ""]


def describe(bundle) -> str:
    """``usb info``'s text for a loaded ``ModelBundle``: what it is, its default settings per task, its measured
    metrics and its training."""
    from USBLib.core import bundle as bundle_mod

    cfg = bundle.config
    counts = bundle.parameter_counts()
    overview = [("model", f"{bundle.name} (tier {bundle.tier})"), ("folder", str(bundle.root)),
                ("grid", f"{' x '.join(map(str, bundle.grid_shape))} voxels at "
                         f"{' x '.join(f'{s:g}' for s in bundle.spacing)} mm"),
                ("parameters", ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items())),
                ("latent", f"scale factor {cfg['latent']['scale_factor']:.4g}"
                           + (f", clip {cfg['latent']['clip']}" if cfg['latent'].get('clip') else "")),
                ("schedule", f"{cfg['schedule'].get('schedule', 'linear_beta')}, T = "
                             f"{cfg['schedule'].get('num_train_timesteps')}, beta {cfg['schedule'].get('beta_start')}"
                             f"..{cfg['schedule'].get('beta_end')}")]
    if bundle.has_local:
        local = cfg[bundle_mod.LOCAL]
        overview.append(("local stage", f"deviation U-Net {local['network']['channels']} at the scan's own "
                                        f"resolution, {local['schedule'].get('num_train_timesteps')} steps; "
                                        f"interactive mode {local.get('interactive_mode', 'realism')}"))
    else:
        overview.append(("local stage", "none (latent stage only)"))
    overview.append(("stages", ("latent + local" if bundle.has_local else "latent")
                      + f" (bundle schema {cfg['schema_version']})"))
    width = max(len(k) for k, _ in overview)
    lines = [f"{k:<{width}}  {v}" for k, v in overview]
    lines += ["", "Default settings per task", *defaults_table(cfg["defaults"]), ""]
    metrics = cfg.get("metrics") or {}
    lines += _readable("Metrics", metric_lines, metrics) if metrics else ["Metrics: none recorded", ""]
    training = cfg.get("training") or {}
    if training:
        lines += _readable("Training", _training_lines, training)
    lines.append("")
    lines.append("Machine-readable: usb info --json; the model card: " + str(bundle.root / bundle_mod.CARD_FILE))
    return "\n".join(lines).rstrip() + "\n"
