"""Paired comparison of two heal results of the native yardstick: is a retrained bundle better than the shipped one?

Two ``native_metrics.json`` files (``evaluate --native --out DIR``) on the same cases (same source, seed and case
count: the rows are matched on case and mask), one method of each (a USB configuration or a classical filler).
Prints, per mask subset (exact, hasty, both; generous when the runs have it), the mean PSNR difference B - A over
every voxel the lesion changed, its bootstrap 95 % interval (cases resampled whole, as in ``native.summarise``), the
worst and best case, how many heals B wins, and the per-site means; also the fill mean / truth mean of each. Then
the worst-case targets of issues #21 and #25 for A and B each: heals more than 1 dB below the best classical filler
of their case (the per-case oracle, from the file's classical rows), the worst of them, and the cases whose
complete (exact) mask heals worse than the same mask eroded by a voxel (hasty).

    python -m usb_training.evaluation.compare OLD/native_metrics.json:"USB rim3" NEW/native_metrics.json:"USB defaults"
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..base.yardstick_record import per_case_oracle, worst_cases
from .native import bootstrap_ci, mask_subsets, site_group
from ..base.common import cli_main


def _rows(spec: str) -> tuple[str, dict[tuple[str, str], dict[str, Any]], dict[tuple[str, str], float]]:
    """``path:method`` -> (label, {(case, mask): row}, {(case, mask): the best classical filler's PSNR}); raises
    ValueError naming what is missing."""
    path, sep, method = spec.partition(":")
    if not sep or not method:
        raise ValueError(f"'{spec}': expected PATH:METHOD, e.g. out/native_metrics.json:'USB defaults'")
    data = json.loads(Path(path).read_text())
    rows = {(r["case"], r["mask"]): r for r in data["rows"] if r["method"] == method}
    if not rows:
        methods = sorted({r["method"] for r in data["rows"]})
        raise ValueError(f"{path} has no method '{method}' (it has: {', '.join(methods)})")
    return f"{method} ({Path(path).parent.name})", rows, per_case_oracle(data["rows"])


def worst_case_table(label_a: str, label_b: str, a: dict[str, Any], b: dict[str, Any]) -> str:
    """Markdown table of ``worst_cases`` for A and B (the targets: none below, no exact mask worse)."""
    def below(r: dict[str, Any]) -> str:
        return f"{r['below']}/{r['n']}" if r["n"] else "n/a (no classical rows)"

    def worst(r: dict[str, Any]) -> str:
        return f"{r['worst']:+.2f}" if r["worst"] is not None else "n/a"

    def exact(r: dict[str, Any]) -> str:
        return f"{r['exact_worse']}/{r['cases']} ({r['exact_worse_db']} by > 1 dB)"

    return "\n".join([f"Worst cases (targets of #21/#25: none below, none worse); A = {label_a}, B = {label_b}", "",
                      "| | A | B |", "|---|---|---|",
                      f"| heals > 1 dB below the best classical filler of their case | {below(a)} | {below(b)} |",
                      f"| worst heal - best classical of its case (dB) | {worst(a)} | {worst(b)} |",
                      f"| exact mask worse than the hasty one | {exact(a)} | {exact(b)} |"])


def compare(a: dict[tuple[str, str], dict[str, Any]], b: dict[tuple[str, str], dict[str, Any]],
            key: str = "psnr", seed: int = 0) -> dict[str, Any]:
    """Paired B - A of ``key`` over the (case, mask) pairs both hold, per mask subset and site.

    Returns {subset: {n, mean, ci, worst, worst_case, best, wins, mean_ratio_a, mean_ratio_b, sites: {site: mean}}};
    raises ValueError when the two share no pair (different sources or seeds)."""
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError("the two results share no case: run both on the same --source, --seed and --cases")
    out: dict[str, Any] = {}
    for subset, keep in mask_subsets({p[1] for p in shared}):
        sel = [p for p in shared if p[1] in keep]
        if not sel:
            continue
        d = np.array([b[p][key] - a[p][key] for p in sel])
        sites: dict[str, list[float]] = {}
        for p, x in zip(sel, d):
            sites.setdefault(site_group(a[p]["site"]), []).append(float(x))
        out[subset] = {"n": len(sel), "mean": float(d.mean()), "ci": bootstrap_ci(d, [p[0] for p in sel], seed),
                       "worst": float(d.min()), "worst_case": f"{sel[int(d.argmin())][0]} ({sel[int(d.argmin())][1]})",
                       "best": float(d.max()), "wins": int((d > 0).sum()),
                       "mean_ratio_a": float(np.mean([a[p]["mean_ratio"] for p in sel])),
                       "mean_ratio_b": float(np.mean([b[p]["mean_ratio"] for p in sel])),
                       "sites": {s: float(np.mean(v)) for s, v in sorted(sites.items())}}
    return out


def table(label_a: str, label_b: str, result: dict[str, Any]) -> str:
    """Markdown table of ``compare``'s result."""
    lines = [f"B - A, PSNR over the changed voxels (dB); A = {label_a}, B = {label_b}", "",
             "| masks | n | B - A | 95 % CI | worst (case) | best | B better | mean/truth A | mean/truth B |",
             "|---|---|---|---|---|---|---|---|---|"]
    for subset, r in result.items():
        lines.append(f"| {subset} | {r['n']} | {r['mean']:+.2f} | [{r['ci'][0]:+.2f}, {r['ci'][1]:+.2f}] | "
                     f"{r['worst']:+.2f} ({r['worst_case']}) | {r['best']:+.2f} | {r['wins']}/{r['n']} | "
                     f"{r['mean_ratio_a']:.3f} | {r['mean_ratio_b']:.3f} |")
    both = result.get("both") or next(iter(result.values()))
    lines += ["", "| site | " + " | ".join(both["sites"]) + " |", "|---|" + "---|" * len(both["sites"]),
              "| B - A (both masks) | " + " | ".join(f"{v:+.2f}" for v in both["sites"].values()) + " |"]
    return "\n".join(lines)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="PATH:METHOD, the reference (e.g. the shipped model's run)")
    parser.add_argument("b", help="PATH:METHOD, the candidate")
    parser.add_argument("--key", default="psnr", help="row measure to compare (default psnr; psnr_mask)")
    args = parser.parse_args(argv)
    try:
        (label_a, a, oracle_a), (label_b, b, oracle_b) = _rows(args.a), _rows(args.b)
        print(table(label_a, label_b, compare(a, b, args.key)))
        shared = sorted(set(a) & set(b))
        print()
        print(worst_case_table(label_a, label_b, worst_cases(a, oracle_a, shared), worst_cases(b, oracle_b, shared)))
    except (OSError, ValueError, KeyError) as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
