"""The heal yardstick's worst-case targets (issues #21 and #25), counted from ``evaluate --native``'s rows: heals
more than 1 dB below the best classical filler of their case (the per-case oracle), and cases whose complete (exact)
mask heals worse than the same mask eroded by a voxel (hasty). Used by ``evaluation.compare`` and by the bundle's
record of the yardstick (``local.export.heal_yardstick_metrics``)."""
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
