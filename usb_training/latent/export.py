"""Stage 4: write a USBLib model bundle from a run: EMA U-Nets + autoencoder as safetensors, the model template
and brain mask, ``bundle.json`` (hyper-parameters, scale factor, schedule, defaults, training facts, metrics)
and ``MODEL_CARD.md``.

    python -m usb_training.latent.export --tier tiny --work RUN --out USBLib/models/usb-tiny [--name usb-tiny]
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from USBLib.core import bundle as bundle_mod

from ..base.card import CARD_END, CARD_START
from ..base.common import build_aside, cli_main, HISTORY, load_checkpoint, module_weights
from ..base.config import INTENSITY, SCHEDULE
from ..data.dataset import TRAIN_SOURCES
from ..data.sources import HELD_OUT, SOURCES


def _hours(folder: Path) -> float:
    path = folder / HISTORY
    return float(json.loads(path.read_text()).get("seconds", 0.0)) / 3600 if path.is_file() else 0.0


def _final_val(folder: Path) -> dict[str, float]:
    path = folder / HISTORY
    rows = json.loads(path.read_text()).get("val", []) if path.is_file() else []
    return {k: round(v, 5) for k, v in rows[-1].items()} if rows else {}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latent_clip(work: Path, margin: float = 0.25) -> list[float]:
    """The range of the cached training latents (first shard), widened by ``margin`` of the largest magnitude
    on each side: the bundle's ``latent.clip``, which one-step clean estimates are clamped to at sampling time."""
    files = sorted((Path(work) / "latents" / "train").glob("shard_[0-9][0-9][0-9].npy"))
    if not files:
        raise RuntimeError(f"no cached training latents in {work}; run the latents stage")
    values = np.load(files[0], mmap_mode="r")
    low, high = float(values.min()), float(values.max())
    pad = margin * max(abs(low), abs(high))
    return [round(low - pad, 3), round(high + pad, 3)]


def training_facts(cfg: dict[str, Any], work: Path) -> dict[str, Any]:
    """Data, steps, hours and hardware of a run, for bundle.json and the model card."""
    work = Path(work)
    ae_meta = load_checkpoint(work / "autoencoder", {}) or {}
    diff_meta = load_checkpoint(work / "diffusion", {}) or {}
    return {
        "tier": cfg["name"],
        "data": {
            "healthy_sources": {name: SOURCES[name].description for name in TRAIN_SOURCES},
            "held_out_source": f"{HELD_OUT}: {SOURCES[HELD_OUT].description} (evaluation only)",
            "samples": {"train": cfg["data"]["train"], "val": cfg["data"]["val"],
                        "healthy_fraction": cfg["data"]["healthy_fraction"]},
            "lesions": "synthetic (anomaly randomisation: noise blobs, ellipsoid clusters, wedges, periventricular; "
                       "divergence-free deformation; hypointense T1 encoding)",
        },
        "autoencoder": {"steps": ae_meta.get("step"), "hours": round(_hours(work / "autoencoder"), 3),
                        "final_val": _final_val(work / "autoencoder"), "config": cfg["autoencoder"],
                        "network": cfg["networks"]["autoencoder"]},
        "diffusion": {"steps": diff_meta.get("step"), "hours": round(_hours(work / "diffusion"), 3),
                      "final_val": _final_val(work / "diffusion"), "config": cfg["diffusion"]},
        "hardware": f"{_cpu_name()}, {torch.get_num_threads()} threads, "
                    f"{'CUDA ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'CPU only'}",
        "software": {"torch": torch.__version__},
    }


def _autoencoder_words(facts: dict[str, Any]) -> str:
    net = facts["autoencoder"].get("network", {})
    if net.get("kind") == "patch_kl":
        return (f"a patch KL autoencoder ({net['latent_channels']} coefficients per {net['patch']}^3 patch, "
                "started from their PCA, with a convolutional refinement)")
    return "MONAI AutoencoderKL"


def model_card(name: str, facts: dict[str, Any], metrics: dict[str, Any]) -> str:
    """Markdown model card: what the model is, its data, training cost, measured numbers, limitations."""
    data = facts["data"]
    lines = [f"# {name}", "",
             f"USB (unified brain-lesion synthesis and editing) model, tier `{facts['tier']}`. "
             f"Latent diffusion: {_autoencoder_words(facts)} + two MONAI DiffusionModelUNets (USB_lesion, USB_brain).",
             "",
             "## Training data", "",
             *[f"- {k}: {v}" for k, v in data["healthy_sources"].items()],
             f"- held out: {data['held_out_source']}",
             f"- lesions: {data['lesions']}",
             f"- samples: {data['samples']}",
             "- variety: random affine, integrated stationary velocity field, left-right flips, label-driven "
             "contrast synthesis, bias field, gamma, blur, Rician noise.",
             "- no real patient scans were used.", "",
             "## Training", "",
             f"- autoencoder: {facts['autoencoder']['steps']} steps, {facts['autoencoder']['hours']} h, "
             f"final validation {facts['autoencoder']['final_val']}. L1 + KL; no perceptual loss (every perceptual "
             "network needs downloaded weights, which this project does not use); no adversarial loss in this tier.",
             *(["- the reconstruction of the held-out template: `Resources/reconstruction.png`."]
               if facts["autoencoder"].get("network", {}).get("kind") == "patch_kl" else []),
             f"- U-Nets: {facts['diffusion']['steps']} steps (batch {facts['diffusion']['config']['batch']}), "
             f"{facts['diffusion']['hours']} h, final validation {facts['diffusion']['final_val']}.",
             f"- hardware: {facts['hardware']}", "",
             "## Measured", ""]
    if metrics.get("table_markdown"):
        lines += [metrics["table_markdown"], ""]
    else:
        lines += ["Not evaluated yet: run `python -m usb_training.evaluation.evaluate`.", ""]
    if metrics.get("generation", {}) and metrics["generation"].get("table_markdown"):
        lines += ["### Generation (`python -m usb_training.evaluation.generation --pairs 16`)", "",
                  metrics["generation"]["table_markdown"], "",
                  "Pictures: `Resources/generated_pairs.png`, `Resources/generated_from_mask.png`.", ""]
    lines += ["## Limitations", "",
              "- Trained only on population templates with synthetic deformation and contrast; real scans differ.",
              "- Lesions are synthetic hypointense T1 lesions; other contrasts and lesion types are out of scope.",
              "- Model grid is coarse for the tiny tier; edits are fused into the native scan as a smooth deviation.",
              "- Not a medical device. For research use.", ""]
    return "\n".join(lines)


LOCAL_DEFAULT_KEYS = ("stages", "local_mode", "local_steps", "local_strength", "dilation_mm", "margin_mm", "eta",
                      "alpha0", "k", "acg")


def export(cfg: dict[str, Any], work: Path, out: Path, name: str, metrics: dict[str, Any] | None = None,
           description: str = "", keep_local_from: Path | None = None) -> bundle_mod.ModelBundle:
    """Write the bundle of a finished run to ``out``.

    ``keep_local_from``: a schema-2 bundle whose local stage (weights, ``local`` section, the heal/embed settings
    it was tuned with, and the model card's local-stage section) is carried over unchanged, so that retraining the
    latent model does not drop the local stage."""
    work = Path(work)
    ae_meta = load_checkpoint(work / "autoencoder", {}) or {}
    if "scale_factor" not in ae_meta:
        raise RuntimeError("the autoencoder stage has not finished (no scale factor)")
    grid = cfg["grid"]
    tag = f"{'x'.join(str(s) for s in grid['shape'])}_{float(grid['spacing']):g}mm"
    space_dir = Path(cfg.get("cache", "")) / "prepared" / tag
    state = {"autoencoder": module_weights(work / "autoencoder", "autoencoder"),
             "unet_lesion": _ema(work / "diffusion", "unet_lesion"),
             "unet_brain": _ema(work / "diffusion", "unet_brain")}
    facts = training_facts(cfg, work)
    import nibabel as nib

    affine = nib.load(str(space_dir / "template.nii.gz")).affine
    config = {
        "name": name, "tier": cfg["name"],
        "description": description or f"USB {cfg['name']} tier trained on template anatomy + synthetic lesions",
        "model_space": {"shape": list(grid["shape"]), "affine": affine.tolist(), "template": "template.nii.gz",
                        "brain_mask": "brain_mask.nii.gz", "space": "MNI152NLin2009aSym"},
        "intensity": dict(INTENSITY),
        "latent": {"scale_factor": float(ae_meta["scale_factor"]), "clip": latent_clip(work)},
        "schedule": dict(SCHEDULE),
        "networks": {k: dict(v, weights="") for k, v in cfg["networks"].items()},
        "defaults": cfg["defaults"],
        "training": facts,
        "metrics": _without_tables(metrics or {}),
    }
    extra = {"template.nii.gz": space_dir / "template.nii.gz", "brain_mask.nii.gz": space_dir / "brain_mask.nii.gz"}
    card = model_card(name, facts, metrics or {})
    if keep_local_from is not None:
        card = _graft_local(bundle_mod.load(keep_local_from), config, state, extra, card)
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / bundle_mod.BUNDLE_FILE).is_file())):
        raise SystemExit(f"--out {out} exists and is neither an empty folder nor a model bundle; not replacing it")
    build_aside(out, lambda folder: bundle_mod.write(folder, config, state, extra, card=card))  # whole or not at all
    return bundle_mod.load(out)


def _without_tables(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics for bundle.json: the numbers, without the rendered markdown tables (those go to the card)."""
    return {k: _without_tables(v) if isinstance(v, dict) else v for k, v in metrics.items() if k != "table_markdown"}


def _graft_local(source: bundle_mod.ModelBundle, config: dict[str, Any], state: dict[str, Any],
                 extra: dict[str, Path], card: str) -> str:
    """Carry the local stage of ``source`` into a new latent-stage bundle (config, state and extra files changed in
    place): its weights, ``local`` section, tissue-prior files, its settings (``LOCAL_DEFAULT_KEYS``) and every other
    heal/embed setting the new bundle does not set; returns the model card with the source's local-stage section
    appended."""
    if not source.has_local:
        raise RuntimeError(f"{source.root} has no local stage to keep")
    state[bundle_mod.LOCAL] = source.load_state_dict(bundle_mod.LOCAL)
    config[bundle_mod.LOCAL] = {k: v for k, v in source.config[bundle_mod.LOCAL].items() if k != "weights"}
    prior = config[bundle_mod.LOCAL].get("prior", {})
    for name in (prior.get("tissue"), prior.get("licence")):  # the prior's files go with it
        if name:
            extra[name] = source.root / name
    config["defaults"] = json.loads(json.dumps(config["defaults"]))  # (not the tier's own dicts)
    for task in ("heal", "embed"):
        new = config["defaults"].get(task, {})
        kept = {k: v for k, v in source.defaults(task).items() if k in LOCAL_DEFAULT_KEYS or k not in new}
        config["defaults"][task] = {**new, **kept}
    old = (source.root / bundle_mod.CARD_FILE).read_text() if (source.root / bundle_mod.CARD_FILE).is_file() else ""
    if CARD_START in old and CARD_END in old:
        card = card.rstrip() + "\n\n" + old[old.index(CARD_START):old.index(CARD_END) + len(CARD_END)] + "\n"
    return card


def replace_unets(cfg: dict[str, Any], work: Path, source: Path, out: Path) -> bundle_mod.ModelBundle:
    """A copy of the bundle ``source`` with the run's U-Nets (EMA weights) in place of its own: everything else
    (autoencoder, local stage, settings, metrics, model card) byte for byte, the training facts of the U-Nets and
    the card's U-Nets line from the run. For a run that continued the bundle's U-Nets (``warm_start``) with the same
    autoencoder; refused where the run's latent scale factor differs from the bundle's.

    Args:
        cfg: the run's tier configuration.
        work: the run folder (its ``diffusion`` checkpoint).
        source: the bundle the run started from.
        out: the new bundle's folder, not ``source`` (copy it over the shipped one once measured).
    """
    old = bundle_mod.load(source)
    if Path(out).resolve() == old.root.resolve():
        raise SystemExit("--out must be a new folder, not the bundle the run started from")
    ae_meta = load_checkpoint(Path(work) / "autoencoder", {}) or {}
    if float(ae_meta.get("scale_factor", -1)) != float(old.config["latent"]["scale_factor"]):
        raise SystemExit(f"{work} encoded its latents with another autoencoder than {source}'s")
    config = json.loads(json.dumps(old.config))
    diffusion = training_facts(cfg, work)["diffusion"]
    config["training"]["diffusion"] = diffusion
    state: dict[str, Any] = {"autoencoder": old.path("autoencoder")}  # its bytes: the latents' autoencoder
    if old.has_local:
        state["local"] = old.path("local")
    state.update({net: _ema(Path(work) / "diffusion", net) for net in ("unet_lesion", "unet_brain")})
    extra = {name: old.root / name for name in old.config["files"] if not name.endswith(".safetensors")}
    card = (old.root / "MODEL_CARD.md").read_text()
    line = next((ln for ln in card.splitlines() if ln.startswith("- U-Nets: ")), None)
    if line is not None:
        card = card.replace(line, f"- U-Nets: {diffusion['steps']} steps (batch {diffusion['config']['batch']}), "
                                  f"{diffusion['hours']} h, final validation {diffusion['final_val']}.", 1)
    return bundle_mod.write(Path(out), config, state, extra, card=card)


def _ema(folder: Path, net: str) -> dict[str, torch.Tensor]:
    """The EMA copy of a U-Net (AveragedModel keeps it under ``module.``)."""
    raw = module_weights(folder, f"ema_{net}")
    return {k[len("module."):]: v for k, v in raw.items() if k.startswith("module.")}


@cli_main
def main(argv: list[str] | None = None) -> int:
    from ..base.config import tier
    from ..base.paths import DEFAULT_CACHE

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--metrics", type=Path, default=None, help="metrics.json written by evaluate")
    parser.add_argument("--generation", type=Path, default=None, help="generation.json written by generation")
    parser.add_argument("--keep-local-from", type=Path, default=None,
                        help="bundle whose local stage (weights, settings, card section) the new bundle keeps")
    parser.add_argument("--defaults", type=Path, default=None,
                        help="JSON from usb_training.latent.tune: its best heal settings become the bundle's defaults")
    parser.add_argument("--unets-into", type=Path, default=None,
                        help="bundle the run continued (warm_start): --out is a copy of it with the run's U-Nets")
    args = parser.parse_args(argv)
    cfg = tier(args.tier)
    cfg["cache"] = str(args.cache)
    if args.unets_into is not None:
        print(replace_unets(cfg, args.work, args.unets_into, args.out).root)
        return 0
    if args.defaults:
        best = json.loads(args.defaults.read_text())["best"]
        cfg["defaults"]["heal"].update({k: v for k, v in best.items() if k != "lesion_psnr"})
    metrics = json.loads(args.metrics.read_text()) if args.metrics else None
    if args.generation:
        metrics = dict(metrics or {}, generation=json.loads(args.generation.read_text()))
    b = export(cfg, args.work, args.out, args.name or args.out.name, metrics, keep_local_from=args.keep_local_from)
    print(b.root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
