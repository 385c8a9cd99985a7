"""Record a held-out heal yardstick run in a model bundle: ``bundle.json``'s ``metrics.heal_yardstick``, which
``usb info`` prints. For a bundle whose heal defaults changed after its export (no retrain), so that what the
model says about itself is what its shipped defaults measure.

    python -m usb_training.evaluation.evaluate --native --embed none --out RUN
    python -m usb_training.evaluation.record RUN/native_metrics.json --bundle USBLib/models/usb-tiny

Only the yardstick itself is recorded: the held-out source at its own resolution, exact and hasty masks, a
``USB defaults`` row measured with the bundle's defaults, and an engine without uncommitted changes. Anything else
is refused with a one-line error (exit 2) and the bundle is left as it was. The rest of ``bundle.json`` keeps its
bytes' meaning (the file is rewritten as ``bundle.write`` writes it, 2-space JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from USBLib.core import bundle as bundle_mod

from ..data.sources import HELD_OUT
from ..local.export import heal_yardstick_metrics

DEFAULTS_ROW = "USB defaults"


def yardstick_problem(native: Mapping[str, Any]) -> str | None:
    """Why ``native`` (a ``native_metrics.json``) is not a record of the held-out heal yardstick, or None."""
    if not native.get("held_out") or native.get("source") != HELD_OUT:
        return f"the run is on '{native.get('source')}', not the held-out source {HELD_OUT} at its own resolution"
    if list(native.get("masks", ["exact", "hasty"])) != ["exact", "hasty"]:
        return f"the run healed masks {native.get('masks')}, not exact and hasty"
    if (native.get("usb_settings") or {}).get(DEFAULTS_ROW, None) != {}:
        return f"the run has no '{DEFAULTS_ROW}' row measured with the bundle's own defaults"
    if native.get("classical_brighten_only"):
        return "the run gave the classical fillers USB's brighten-only rule (--classical-brighten-only)"
    if (native.get("engine") or {}).get("uncommitted_diff_sha1"):
        return "the run's engine had uncommitted changes"
    return None


def record(bundle_dir: Path, native: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``heal_yardstick_metrics(native)`` into ``bundle_dir``'s bundle.json (atomically: a temporary file
    renamed over it) and return it; raises ValueError when ``native`` is not the held-out yardstick."""
    problem = yardstick_problem(native)
    if problem:
        raise ValueError(problem)
    path = Path(bundle_dir) / bundle_mod.BUNDLE_FILE
    config = json.loads(path.read_text())
    metrics = heal_yardstick_metrics(native)
    config.setdefault("metrics", {})["heal_yardstick"] = metrics
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(part, path)
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.evaluation.record",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="native_metrics.json of an `evaluate --native` run")
    parser.add_argument("--bundle", type=Path, required=True, help="the model bundle folder to record it in")
    args = parser.parse_args(argv)
    try:
        native = json.loads(args.metrics.read_text())
        if not (args.bundle / bundle_mod.BUNDLE_FILE).is_file():
            raise ValueError(f"{args.bundle} is not a model bundle (no {bundle_mod.BUNDLE_FILE})")
        metrics = record(args.bundle, native)
    except (OSError, ValueError, KeyError) as exc:
        print(f"record: error: {exc}", file=sys.stderr)
        return 2
    defaults = metrics["configs"][DEFAULTS_ROW]
    print(f"recorded in {args.bundle / bundle_mod.BUNDLE_FILE}: {DEFAULTS_ROW} {defaults['psnr_db']:.2f} dB, "
          f"{defaults['vs_best_classical_db']:+.2f} over the best of {metrics['classical_fillers']} classical "
          f"fillers per case, {defaults['heals_below_best_classical']} of {defaults['heals']} heals more than 1 dB "
          f"below it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
