"""``python -m usb_training.local {data,train,export}``: training windows from the training sources; the local
network; a bundle with the local stage added (defaults from a tuning run of ``usb_training.local.tune``)."""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ..base.paths import DEFAULT_CACHE
from ..base.common import cli_main

TRAIN_SOURCES = ["mni2009a", "mni2009c", "fsaverage"]  # ixi555 is held out (usb_training.data.sources.HELD_OUT)


def _site_weights(text: str) -> dict[str, float]:
    """``SITE=W,SITE=W`` -> {site: weight} (argparse type of ``--sites``; checked by ``sites.site_mix``)."""
    from .sites import site_mix

    try:
        weights = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(",") if item.strip())}
        site_mix(weights)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected SITE=WEIGHT,... ({exc})") from None
    return weights


def _fraction(text: str) -> float:
    """A share in 0..1 (argparse type of ``--thick-fraction``)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text!r}")
    return value


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.local", description=__doc__)
    parser.add_argument("command", choices=["data", "train", "export"])
    parser.add_argument("--work", type=Path, required=True, help="run folder (outside the repository)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=4096, help="data: windows to write with this seed")
    parser.add_argument("--workers", type=int, default=1, help="data: shard-writing processes")
    parser.add_argument("--sites", type=_site_weights, default=None, metavar="SITE=W,...",
                        help="data: lesion-site weights overriding the default mix for the sites named "
                             "(e.g. deep_gm=0.35,cortical=0.15)")
    parser.add_argument("--thick-fraction", type=_fraction, default=0.0, metavar="F",
                        help="data: share of windows measured with 2-5 mm slices along a random axis (default 0)")
    parser.add_argument("--minutes", type=float, default=None, help="train: wall-time budget of this run")
    parser.add_argument("--steps", type=int, default=None, help="train: total steps (the LR schedule's length)")
    parser.add_argument("--base", choices=["biharmonic", "prior"], default=None,
                        help="train: the heal's base the network corrects (a new run folder's; default biharmonic)")
    parser.add_argument("--warm-from", default=None, metavar="BUNDLE",
                        help="train: start a new run folder from this bundle's local network (its weights and step "
                             "count; the LR schedule goes on to --steps) instead of step 0")
    parser.add_argument("--device", default="cpu", help="train: cpu or cuda (a new run's device; default cpu)")
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="train: processes making batches (for a GPU; 0: in the training loop)")
    parser.add_argument("--batch", type=int, default=None,
                        help="train: windows per batch (of 32^3 voxels; larger windows fewer), a new run's")
    parser.add_argument("--channels", default=None, metavar="C1,C2,C3",
                        help="train: the network's channels per level, a new run's (default 16,32,64)")
    parser.add_argument("--deep-grey", action="store_true",
                        help="train: the network also reads the prior's deep grey nuclei (needs windows written "
                             "with the five-map prior; give it again to resume such a run)")
    parser.add_argument("--fit-schedule", action="store_true",
                        help="train: end the learning-rate decay with --minutes (a one-off run)")
    parser.add_argument("--source", type=Path, help="export: the bundle to add the local stage to")
    parser.add_argument("--out", type=Path, help="export: bundle folder to write (may be --source)")
    parser.add_argument("--tuning", type=Path, help="export: tuning.json of usb_training.local.tune")
    parser.add_argument("--metrics", type=Path,
                        help="export: native_metrics.json of usb_training.evaluation.evaluate --native")
    args = parser.parse_args(argv)
    if args.command == "export":
        if args.source is None or args.out is None:
            parser.error("export needs --source and --out")
        from .export import check_out

        try:
            check_out(args.out, args.source, args.work / "train")
        except ValueError as exc:
            parser.error(str(exc))
        return _export(args)
    if args.command == "data":
        from USBLib.editor.local.network import size_multiple

        from .priors import PRIOR_SOURCES, prior_maps
        from .shards import write_shards
        from .train import LOCAL_CONFIG
        from .windows import WindowMaker, training_sources

        maker = WindowMaker(training_sources(args.cache, TRAIN_SOURCES),
                            {name: prior_maps(args.cache, name) for name in PRIOR_SOURCES},
                            size_multiple(LOCAL_CONFIG["network"]), args.sites, args.thick_fraction)
        written = write_shards(maker, args.work / "windows", args.seed, args.count, workers=args.workers)
        print(len(written), "shards")
    else:
        from .train import train

        print(train(args.work, args.minutes, args.steps, args.seed, cfg=_train_config(args), base=args.base,
                    warm_from=args.warm_from, device=args.device, loader_workers=args.loader_workers,
                    fit_schedule=args.fit_schedule))
    return 0


def _train_config(args) -> dict:
    """``train.LOCAL_CONFIG`` with the network's channels, inputs and batch size of the command line."""
    import copy

    from .train import LOCAL_CONFIG

    cfg = copy.deepcopy(LOCAL_CONFIG)
    if args.channels:
        channels = [int(c) for c in args.channels.split(",")]
        if len(channels) != len(cfg["network"]["channels"]) or min(channels) < 8 or any(c % 8 for c in channels):
            raise SystemExit(f"--channels: {len(cfg['network']['channels'])} multiples of 8, e.g. 16,32,64")
        cfg["network"]["channels"] = channels
        cfg["network"]["num_head_channels"] = [0] * (len(channels) - 1) + [channels[-1]]  # one head in the middle
    if args.deep_grey:
        from .train import DEEP_GREY_INPUTS

        cfg["inputs"] = list(DEEP_GREY_INPUTS)
    if args.batch:
        cfg["train"]["batch"] = int(args.batch)
        cfg["train"]["batch_voxels"] = int(args.batch) * 32 ** 3
    return cfg


WINDOWS_SUMMARY = "windows.json"  # a run folder's copy of data_summary, for a run whose windows stayed elsewhere


def data_summary(folder: Path) -> dict:
    """Counts of the training windows in ``folder`` by site, source, contrast, mask kind and region kind."""
    from .shards import load_shards

    infos = [info for view in load_shards(folder, {}).values() for info in view.info]
    out: dict = {"windows": len(infos)}
    for key in ("site", "source", "contrast", "mask_kind", "region_kind"):
        out[key] = dict(sorted(Counter(str(i[key]) for i in infos).items()))
    out["slice_mm"] = dict(sorted(Counter(str(i.get("slice_mm", 1)) for i in infos).items()))  # 1: 1 mm windows
    return out


def training_facts(work: Path) -> dict:
    """The ``local.training`` facts of a run: steps (the checkpoint's), hours, shares and the data."""
    from safetensors import safe_open

    from ..base.common import CHECKPOINT

    train_dir = work / "train"
    with safe_open(str(train_dir / CHECKPOINT), framework="pt") as fh:
        steps = int(json.loads(fh.metadata()["meta"])["step"])
    history = json.loads((train_dir / "history.json").read_text())
    cfg = json.loads((train_dir / "config.json").read_text())
    tc = cfg["train"]
    heal_det = [row["heal_det"] for row in history["train"] if "heal_det" in row]
    kept = train_dir / WINDOWS_SUMMARY
    data = json.loads(kept.read_text()) if kept.is_file() else data_summary(work / "windows")
    facts = {"steps": steps, "hours": round(history.get("seconds", 0.0) / 3600, 2),
             "hardware": history.get("hardware", "2-core Intel Xeon CPU, no GPU"), "sources": TRAIN_SOURCES, "held_out": "ixi555",
             "target": cfg.get("target"), "ema": f"{tc['ema']}, from step 0 (no earlier weights)",
             "heal_fidelity_share": round(tc["heal_fraction"] * tc["deterministic"]["heal"], 3),
             "heal_fidelity_share_seen": round(sum(heal_det) / len(heal_det), 3) if heal_det else None,
             "mean_level_weight": tc["mean_weight"], "windows": data,
             "data": f"{data['windows']} windows shaped like inference boxes (lesion group + 10 mm, sides 32-64 "
                     f"voxels) at 1 mm{_thick_share(data)} from deformed mni2009a/mni2009c (whole head) and "
                     "fsaverage anatomies (affine + velocity field), label-driven contrast on "
                     f"{data['contrast'].get('labels', 0)} of them; sites {data['site']}; drawn masks "
                     f"{data['mask_kind']}; fill regions {data['region_kind']}; the template prior from a "
                     "different anatomy with 2-4 mm / 3-5 degree misregistration. ixi555 held out. No real "
                     "individual scans.",
             "note": "clean retrain from step 0 with the final target and a fresh EMA; heal input without lesion "
                     "intensities"}
    warm = history.get("warm_start")
    if warm:  # the weights and EMA came from a bundle's network, trained on other windows
        facts["ema"] = f"{tc['ema']}, carried over from {warm['bundle']} (step {warm['step']})"
        facts["note"] = (f"warm restart of {warm['bundle']}'s local network at step {warm['step']} on these windows "
                         f"(steps {warm['step']}-{steps}; hours: this run only); heal input without lesion intensities")
    note = train_dir / "NOTE.txt"
    if note.is_file():
        facts["note"] += "; " + note.read_text().strip()
    return facts


def _thick_share(data: dict) -> str:
    """The words the training facts add for the thick-slice windows of a data summary (``data_summary``), or ""."""
    thick = sum(n for mm, n in data.get("slice_mm", {}).items() if mm != "1")
    return f", {thick} of them measured with 2-5 mm slices along one axis and resampled to 1 mm" if thick else ""


def _export(args) -> int:
    from ..base.yardstick_record import heal_yardstick_metrics
    from .export import LOCAL_DEFAULTS, export_local

    defaults = json.loads(json.dumps(LOCAL_DEFAULTS))
    if args.tuning:
        tuned = json.loads(args.tuning.read_text())
        best = tuned["best_heal"]
        defaults["heal"].update({"dilation_mm": best["dilation_mm"], "eta": best["eta"], "alpha0": best["alpha0"],
                                 "acg": best["alpha0"] > 0, "margin_mm": best["margin_mm"]})
        emb = tuned["best_embed"]
        defaults["embed"].update({"eta": emb["eta"], "alpha0": emb["alpha0"], "acg": emb["alpha0"] > 0,
                                  "margin_mm": best["margin_mm"]})  # (in the tuning grid, alpha0 0 = ACG off)
    metrics, table = None, None
    if args.metrics:
        native = json.loads(args.metrics.read_text())
        metrics = heal_yardstick_metrics(native)
        table = native.get("table_markdown")
    print(export_local(args.source, args.work / "train", args.out, defaults, training_facts(args.work),
                       metrics=metrics, table_md=table, cache=args.cache).root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
