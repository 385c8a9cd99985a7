"""The heal yardstick summed up from ``evaluate --native``'s ``native_metrics.json``: its worst-case targets
(issues #21 and #25: heals more than 1 dB below the best classical filler of their case, the per-case oracle; cases
whose complete (exact) mask heals worse than the same mask eroded by a voxel, hasty), used by
``evaluation.compare``, and the bundle's record of the yardstick (``heal_yardstick_metrics``: ``bundle.json``'s
``metrics.heal_yardstick``, written by ``local export --metrics`` and ``evaluation.record``, printed by ``usb
info``)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

BELOW_DB = 1.0  # a heal more than this many dB below the per-case oracle is a miss (issue #21's target: none)


def per_case_oracle(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], float]:
    """{(case, mask): the best classical filler's PSNR} over the rows of kind ``classical`` (dB)."""
    oracle: dict[tuple[str, str], float] = {}
    for r in rows:
        if r.get("kind") == "classical":
            pair = (r["case"], r["mask"])
            oracle[pair] = max(oracle.get(pair, -np.inf), float(r["psnr"]))
    return oracle


def worst_cases(rows: Mapping[tuple[str, str], Mapping[str, Any]], oracle: Mapping[tuple[str, str], float],
                pairs: Iterable[tuple[str, str]], below_db: float = BELOW_DB) -> dict[str, Any]:
    """The worst-case targets of a method's heals ``rows`` ({(case, mask): row}) over the (case, mask) ``pairs``:
    ``below``, how many are more than ``below_db`` dB under ``oracle`` (the best classical filler of the same case and
    mask; pairs without one are left out, ``n`` counts the rest) and ``worst``, the lowest USB - oracle (dB; None
    without an oracle); ``exact_worse``, of the ``cases`` with both masks, how many heal worse with the exact mask
    than with the hasty one, and ``exact_worse_db``, by more than ``below_db``."""
    pairs = list(pairs)
    gaps = [rows[p]["psnr"] - oracle[p] for p in pairs if p in oracle]
    cases = sorted({c for c, _ in pairs if (c, "exact") in rows and (c, "hasty") in rows})
    diffs = [rows[(c, "exact")]["psnr"] - rows[(c, "hasty")]["psnr"] for c in cases]
    return {"n": len(gaps), "below": sum(g < -below_db for g in gaps), "worst": min(gaps) if gaps else None,
            "cases": len(cases), "exact_worse": sum(d < 0 for d in diffs),
            "exact_worse_db": sum(d < -below_db for d in diffs)}


def heal_yardstick_metrics(native: Mapping[str, Any]) -> dict:
    """The bundle's record of the heal yardstick (``evaluate --native``'s ``native_metrics.json``): per USB
    configuration, its PSNR over the changed voxels (both masks), the paired differences to the best classical
    filler of each case and to the filler chosen in advance with their 95 % intervals, the worst case, and the
    worst-case targets (``worst_cases``: heals more than 1 dB below the best classical filler of their case,
    cases whose exact mask heals worse than the hasty one); with the run's source, size, classical set and commit.
    """
    all_rows = native.get("rows") or []
    oracle = per_case_oracle(all_rows)
    configs = {}
    for name, per in native["summary"]["configs"].items():
        both = per["both"]
        mine = {(r["case"], r["mask"]): r for r in all_rows if r["method"] == name}
        worst = worst_cases(mine, oracle, mine)
        configs[name] = {"psnr_db": round(both["usb"], 2), "vs_best_classical_db": round(both["vs_best"], 2),
                         "vs_best_classical_ci": [round(x, 2) for x in both["vs_best_ci"]],
                         "worst_vs_best_classical_db": round(both["worst"], 2),
                         "vs_chosen_filler_db": round(both["vs_preset"], 2),
                         "vs_chosen_filler_ci": [round(x, 2) for x in both["vs_preset_ci"]]}
        if worst["n"]:  # (a file without per-heal rows has no worst-case counts)
            configs[name].update(heals=worst["n"], heals_below_best_classical=worst["below"],
                                 exact_worse_than_hasty=worst["exact_worse"], cases_with_both_masks=worst["cases"])
    engine = native.get("engine") or {}
    record = {"source": native["source"], "cases": native["cases"],
              "masks": list(native.get("masks", ["exact", "hasty"])), "chosen_filler": native.get("preset")}
    if native.get("classical"):
        record["classical_fillers"] = len(native["classical"])
    if engine.get("commit"):
        record["commit"] = engine["commit"]
    return record | {"configs": configs}
