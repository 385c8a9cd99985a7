"""Add a trained local stage to a model bundle (bundle schema 2): weights, its config and per-task defaults.

The latent-stage files of the source bundle are copied unchanged; ``bundle.json`` gains the ``local`` section
(network, schedule, deviation scale, input channels, training summary) and the local settings in
``defaults.heal`` / ``defaults.embed``; every file's sha256 is recomputed. A network that reads the template's
tissue prior gets its maps as bundle files: ``local.prior.tissue`` (MNI2009c CSF/GM/WM, and deep grey matter for a
network that reads ``prior_deep_gm``, on the bundle's model grid, ``priors.tissue_file``) with its licence notice;
its T1 channel is the bundle's own template.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from USBLib.core import bundle as bundle_mod
from USBLib.editor.local.conditioning import BASE_INPUTS, DEEP_GREY_INPUT, DEVIATION_SCALE, input_names, needs_prior

from ..base.card import CARD_END, CARD_START
from ..base.common import build_aside, module_weights
from .priors import LICENCE_FILE, TISSUE_FILE, tissue_file

PRIOR_DESCRIPTION = ("ICBM 2009c Nonlinear Asymmetric MNI152 CSF/GM/WM probabilities (niworkflows 0.0.5) on the "
                     "model grid")
DEEP_GREY_DESCRIPTION = ", and deep grey matter (fsaverage aseg nuclei, registered affinely onto MNI2009c)"

LOCAL_DEFAULTS = {  # heal: rim growth at most 3 mm and the average over the mask's edge, chosen on the training
    # source MNI2009c; the patch blend's weight on both training sources, each validating the other's fit; the
    # mirror blend on both, confirmed on fresh cases of both (docs/model.md)
    "heal": {"stages": "local", "local_mode": "fidelity", "local_steps": 4, "local_strength": 0.3,
             "dilation_mm": 3.0, "margin_mm": 3.0, "growth": "rim", "boundary_average": True, "patch_blend": 0.45,
             "prior_anchor": True, "mirror_blend": 0.5, "eta": 1.0},
    # embed: realism (a sample at the fidelity estimate's level) is as dark as fidelity and has the heterogeneity
    # of the reference lesions, on the training source MNI2009c (docs/model.md)
    "embed": {"stages": "local", "local_mode": "realism", "local_steps": 4, "local_strength": 0.3,
              "dilation_mm": 1.0, "margin_mm": 2.0},
}


def card_section(config: Mapping[str, Any], table_md: str | None) -> str:
    """The model card's section on the local stage: data, training, hardware, defaults, measured metrics."""
    local = config["local"]
    t = local.get("training", {})
    heal, embed = config["defaults"]["heal"], config["defaults"]["embed"]
    names = list(input_names(local))
    inputs = ", ".join(["x_t"] + names)
    prior = local.get("prior")
    lines = [CARD_START, "## Local stage (PathoSyn at the scan's own resolution)", "",
             f"- network: MONAI DiffusionModelUNet 3D {local['network']['channels']}, "
             f"{local['network'].get('num_res_blocks', 1)} res block per level, attention only in MONAI's middle "
             "block (over the whole window), 4 class labels (heal/embed x sample/deterministic); input "
             f"[{inputs}]; predicts the deviation from the fill channel, scaled by "
             f"{local.get('deviation_scale', 2.0)}; "
             f"noise schedule {local['schedule']}."
             + (" The heal input shows no lesion intensities (no raw image channel: the image voided inside the "
                "fill region is the fill channel)." if "image" not in names else ""),
             *([f"- tissue prior: {prior.get('description', '')} ({prior['tissue']}, licence in "
                f"{prior.get('licence', '')}) and the bundle's template T1, carried into each lesion box by the "
                "affine registration to the template."] if prior else []),
             f"- data: {t.get('data', 'see usb_training.local')}",
             f"- training: {t.get('steps', '?')} steps, {t.get('hours', '?')} h on {t.get('hardware', 'CPU')}; "
             f"{t.get('note', '')}".rstrip("; "),
             f"- defaults: heal stages {heal.get('stages')}, mode {heal.get('local_mode')}, dilation "
             f"{heal.get('dilation_mm')} mm, feather {heal.get('margin_mm')} mm, alpha0 {heal.get('alpha0')}, "
             f"eta {heal.get('eta')}, growth {heal.get('growth', 'fixed')}, boundary average "
             f"{'on' if heal.get('boundary_average') else 'off'}, patch blend {heal.get('patch_blend', 0.0)}, "
             "prior anchor "
             f"{'on' if heal.get('prior_anchor') else 'off'}, mirror blend {heal.get('mirror_blend', 0.0)}; embed mode {embed.get('local_mode')}, dilation "
             f"{embed.get('dilation_mm')} mm, feather {embed.get('margin_mm')} mm, alpha0 {embed.get('alpha0')}, eta "
             f"{embed.get('eta')}; interactive (Slicer, demo) mode {local.get('interactive_mode')}. Heal growth and "
             "boundary average chosen with the heal yardstick on the training source MNI2009c (`evaluate --native "
             "--source mni2009c`), never on the held-out "
             "source.", ""]
    if table_md:
        lines += ["### Measured (held-out source, native space: `python -m usb_training.evaluation.evaluate --native "
                  "--per-site 2`)", "", table_md, "",
                  "Pictures: `Resources/evaluation_heal_native.png`, `Resources/evaluation_embed_native.png`, "
                  "`Resources/guidance_embed.png`.", ""]
    lines.append(CARD_END)
    return "\n".join(lines) + "\n"


def _with_section(card: str | None, section: str) -> str:
    card = card or ""
    if CARD_START in card and CARD_END in card:
        head, rest = card.split(CARD_START, 1)
        return head + section + rest.split(CARD_END, 1)[1].lstrip("\n")
    marker = "## Limitations"
    if marker in card:
        head, tail = card.split(marker, 1)
        return head + section + "\n" + marker + tail
    return card + "\n" + section


def export_local(source: Path, train_dir: Path, out: Path, defaults: Mapping[str, Mapping[str, Any]] | None = None,
                 training: Mapping[str, Any] | None = None, weights: str = "ema",
                 interactive_mode: str = "realism", metrics: Mapping[str, Any] | None = None,
                 table_md: str | None = None, cache: Path | None = None,
                 prior_files: Mapping[str, Path] | None = None) -> bundle_mod.ModelBundle:
    """Write ``out``: the bundle at ``source`` plus the local network of ``train_dir`` (its EMA weights).

    For a network that reads the tissue prior: ``prior_files`` (``TISSUE_FILE`` and ``LICENCE_FILE`` -> files to
    ship), or else they are made from the training ``cache`` (default ``usb_training.base.paths.DEFAULT_CACHE``)
    by ``priors.tissue_file`` on the bundle's model grid.

    ``out`` is checked by ``check_out`` (``ValueError``); the bundle is built in a temporary sibling folder and put
    in place of ``out`` only when complete, so a failed export leaves a previous bundle there as it was."""
    src = bundle_mod.load(source)
    out = Path(out)
    check_out(out, src.root, Path(train_dir))
    build_aside(out, lambda folder: _write_local(src, Path(train_dir), folder, defaults, training, weights,
                                                 interactive_mode, metrics, table_md, cache, prior_files))
    return bundle_mod.load(out)


def check_out(out: Path, source: Path, train_dir: Path) -> None:
    """Refuse an ``out`` folder whose replacement would lose files that are not a bundle (``ValueError``).

    ``out`` may be new, an empty folder, or a bundle (with ``bundle.json``; ``source`` itself for an in-place
    update), never a folder that holds the run folder ``train_dir`` or the bundle ``source``."""
    out = Path(out).resolve()
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / bundle_mod.BUNDLE_FILE).is_file())):
        raise ValueError(f"--out {out} exists and is neither an empty folder nor a model bundle; not replacing it")
    train_dir, source = Path(train_dir).resolve(), Path(source).resolve()
    if out == train_dir or out in train_dir.parents or out in source.parents:
        raise ValueError(f"--out {out} holds the run folder or the source bundle; refusing to replace it")


def _write_local(src: bundle_mod.ModelBundle, train_dir: Path, out: Path, defaults, training, weights: str,
                 interactive_mode: str, metrics, table_md, cache, prior_files) -> bundle_mod.ModelBundle:
    """``export_local`` into the new folder ``out`` (a temporary sibling of the final one)."""
    shutil.copytree(src.root, out, dirs_exist_ok=True)
    config = json.loads((out / bundle_mod.BUNDLE_FILE).read_text())
    train_cfg = json.loads((Path(train_dir) / "config.json").read_text())
    config["local"] = {"weights": "local.safetensors", "network": train_cfg["network"],
                       "schedule": train_cfg["schedule"], "deviation_scale": DEVIATION_SCALE,
                       "interactive_mode": interactive_mode, "training": dict(training or {})}
    names = input_names(train_cfg)
    if names != BASE_INPUTS:
        config["local"]["inputs"] = list(names)
    base = train_cfg.get("base", "biharmonic")
    if base != "biharmonic":
        config["local"]["base"] = base
    for name in (TISSUE_FILE, LICENCE_FILE):  # a previous local stage's prior files go with it
        config["files"].pop(name, None)
        (out / name).unlink(missing_ok=True)
    new_files: dict[str, Path] = {}
    if needs_prior(names, base):
        import nibabel as nib

        from ..base.paths import DEFAULT_CACHE

        space = config["model_space"]
        deep = DEEP_GREY_INPUT in names
        new_files = dict(prior_files) if prior_files else tissue_file(
            cache or DEFAULT_CACHE, space["shape"], np.asarray(space["affine"], float), out, deep_grey=deep)
        classes = ["csf", "gm", "wm"] + (["deep_gm"] if deep else [])
        volumes = nib.load(str(new_files[TISSUE_FILE])).shape
        if len(volumes) != 4 or volumes[3] != len(classes):
            raise ValueError(f"the tissue prior {new_files[TISSUE_FILE]} has shape {volumes}; this network reads "
                             f"{len(classes)} classes ({', '.join(classes)})")
        config["local"]["prior"] = {"tissue": TISSUE_FILE, "classes": classes, "t1": "template",
                                    "licence": LICENCE_FILE,
                                    "description": PRIOR_DESCRIPTION + (DEEP_GREY_DESCRIPTION if deep else "")}
    for task, values in (defaults or LOCAL_DEFAULTS).items():
        config["defaults"][task].update(values)
    if metrics is not None:
        config.setdefault("metrics", {})["heal_yardstick"] = dict(metrics)
    state: dict[str, Any] = {name: src.root / src.config["networks"][name]["weights"]  # unchanged: same bytes
                             for name in bundle_mod.NETWORK_NAMES}
    state[bundle_mod.LOCAL] = module_weights(Path(train_dir), weights)
    extra = {name: out / name for name in config["files"] if not name.endswith(".safetensors")}
    extra.update(new_files)
    card = (out / bundle_mod.CARD_FILE).read_text() if (out / bundle_mod.CARD_FILE).is_file() else None
    card = _with_section(card, card_section(config, table_md))
    return bundle_mod.write(out, config, state, extra_files=extra, card=card)
