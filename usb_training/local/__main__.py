"""``python -m usb_training.local {data,train,export}``: crop shards from the training sources; the local
network; a bundle with the local stage added (defaults from a tuning run of ``usb_training.local.tune``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..base.paths import DEFAULT_CACHE

TRAIN_SOURCES = ["mni2009a", "mni2009c", "fsaverage"]  # ixi555 is held out (usb_training.data.sources.HELD_OUT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.local", description=__doc__)
    parser.add_argument("command", choices=["data", "train", "export"])
    parser.add_argument("--work", type=Path, required=True, help="run folder (outside the repository)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=1024, help="data: crops to write with this seed")
    parser.add_argument("--minutes", type=float, default=None, help="train: wall-time budget of this run")
    parser.add_argument("--steps", type=int, default=None, help="train: total steps")
    parser.add_argument("--source", type=Path, help="export: the bundle to add the local stage to")
    parser.add_argument("--out", type=Path, help="export: bundle folder to write (may be --source)")
    parser.add_argument("--tuning", type=Path, help="export: tuning.json of usb_training.local.tune")
    parser.add_argument("--metrics", type=Path,
                        help="export: native_metrics.json of usb_training.evaluation.evaluate --native")
    args = parser.parse_args(argv)
    if args.command == "export":
        return _export(args)
    if args.command == "data":
        from .anatomies import native_anatomies
        from .shards import write_shards

        anatomies = list(native_anatomies(args.cache, TRAIN_SOURCES).values())
        print(len(write_shards(anatomies, args.work / "crops", args.seed, args.count)), "shards")
    else:
        from .train import train

        print(train(args.work, args.minutes, args.steps, args.seed))
    return 0


def _export(args) -> int:
    import json

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
    history = json.loads((args.work / "train" / "history.json").read_text())
    steps = history["train"][-1]["step"] if history["train"] else 0
    training = {"steps": steps, "hours": round(history.get("seconds", 0.0) / 3600, 2),
                "hardware": "2-core Intel Xeon CPU, no GPU", "sources": TRAIN_SOURCES, "held_out": "ixi555"}
    metrics, table = None, None
    if args.metrics:
        native = json.loads(args.metrics.read_text())
        metrics = {"cases": native["cases"], "held_out_source": "ixi555", "mean": native["mean"]}
        table = native.get("table_markdown")
    note = (args.work / "train" / "NOTE.txt")
    if note.is_file():
        training["note"] = note.read_text().strip()
    print(export_local(args.source, args.work / "train", args.out, defaults, training, metrics=metrics,
                       table_md=table).root)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
