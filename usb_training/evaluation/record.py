"""Record a held-out heal yardstick run in a model bundle: ``bundle.json``'s ``metrics.heal_yardstick``, which
``usb info`` prints. For a bundle whose heal defaults changed after its export (no retrain), so that what the
model says about itself is what its shipped defaults measure.

    python -m usb_training.evaluation.evaluate --native --embed none --out RUN
    python -m usb_training.evaluation.record RUN/native_metrics.json --bundle USBLib/models/usb-tiny

Only the yardstick itself is recorded: the held-out source at its own resolution, exact and hasty masks, a
``USB defaults`` row measured with the bundle's defaults, and an engine without uncommitted changes. Anything else
is refused with a one-line error (exit 2) and the bundle is left as it was: a training source, thick slices, other
masks, failed heals, a file without per-heal rows, an engine that was not a committed checkout. The rest of
``bundle.json`` keeps its content (the file is rewritten whole and atomically, as ``bundle.write`` writes it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Mapping

from USBLib.core.bundle import BUNDLE_FILE
from USBLib.errors import OutputError
from USBLib.imaging.io import write_json

from ..base.yardstick_record import heal_yardstick_metrics
from ..data.sources import HELD_OUT
from ..base.common import cli_main

DEFAULTS_ROW = "USB defaults"


def yardstick_problem(native: Mapping[str, Any]) -> str | None:
    """Why ``native`` (a ``native_metrics.json``) is not a record of the held-out heal yardstick, or None."""
    engine = native.get("engine") or {}
    if not native.get("held_out") or native.get("source") != HELD_OUT:
        return f"the run is on '{native.get('source')}', not the held-out source {HELD_OUT} at its own resolution"
    if list(native.get("masks", ["exact", "hasty"])) != ["exact", "hasty"]:
        return f"the run healed masks {native.get('masks')}, not exact and hasty"
    if (native.get("usb_settings") or {}).get(DEFAULTS_ROW, None) != {} \
            or DEFAULTS_ROW not in ((native.get("summary") or {}).get("configs") or {}):
        return f"the run has no '{DEFAULTS_ROW}' row measured with the bundle's own defaults"
    if native.get("classical_brighten_only"):
        return "the run gave the classical fillers USB's brighten-only rule (--classical-brighten-only)"
    if not native.get("rows") or not native.get("classical"):
        return "the run has no per-heal rows or no classical fillers (an older or trimmed native_metrics.json)"
    if any(row.get("failed") for row in native["rows"]):
        return "some heals of the run failed (see its native_results.md)"
    if not re.fullmatch(r"[0-9a-f]{40}", str(engine.get("commit", ""))) or engine.get("uncommitted_diff_sha1") != "":
        return "the run's engine was not a committed checkout (commit unknown, or uncommitted changes under USBLib)"
    return None


def record(bundle_dir: Path, native: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``heal_yardstick_metrics(native)`` into ``bundle_dir``'s bundle.json (atomically, ``io.write_json``:
    2-space JSON, as ``bundle.write`` writes it) and return it; raises ValueError when ``native`` is not the
    held-out yardstick or ``bundle_dir`` is not a bundle."""
    problem = yardstick_problem(native)
    if problem:
        raise ValueError(problem)
    path = Path(bundle_dir) / BUNDLE_FILE
    if not path.is_file():
        raise ValueError(f"{bundle_dir} is not a model bundle (no {BUNDLE_FILE})")
    config = json.loads(path.read_text())
    metrics = heal_yardstick_metrics(native)
    config.setdefault("metrics", {})["heal_yardstick"] = metrics
    write_json(path, config)
    return metrics


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.evaluation.record",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", type=Path, help="native_metrics.json of an `evaluate --native` run")
    parser.add_argument("--bundle", type=Path, required=True, help="the model bundle folder to record it in")
    args = parser.parse_args(argv)
    try:
        native = json.loads(args.metrics.read_text())
        metrics = record(args.bundle, native)
    except (OSError, ValueError, OutputError) as exc:
        print(f"record: error: {exc}", file=sys.stderr)
        return 2
    except (KeyError, TypeError, AttributeError) as exc:  # a native_metrics.json of another shape
        print(f"record: error: {args.metrics} is not an `evaluate --native` result ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    defaults = metrics["configs"][DEFAULTS_ROW]
    print(f"recorded in {args.bundle / BUNDLE_FILE}: {DEFAULTS_ROW} {defaults['psnr_db']:.2f} dB, "
          f"{defaults['vs_best_classical_db']:+.2f} over the best of {metrics['classical_fillers']} classical "
          f"fillers per case, {defaults['heals_below_best_classical']} of {defaults['heals']} heals more than 1 dB "
          f"below it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
