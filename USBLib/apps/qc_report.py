"""QC of a batch: a before/after/difference montage around each lesion and one HTML page to scroll through."""
from __future__ import annotations

import html
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

from USBLib.imaging.io import atomic_path
from USBLib.apps.montage import save_montage

CONTEXT_MM = 25.0


def lesion_row(title: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray, affine: np.ndarray,
               labels: Sequence[str] = ("before", "after", "difference (after - before)")):
    """A ``save_montage`` row of before / after / difference, cropped to the lesion + ``CONTEXT_MM`` and centred
    on it (the whole scan through its centre when the mask is empty)."""
    spacing = np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0)
    ijk = np.argwhere(mask > 0)
    if len(ijk) == 0:  # no lesion: the whole scan through its centre
        lo, hi = np.zeros(3, int), np.array(before.shape)
        center = np.array(before.shape) // 2
    else:
        pad = np.ceil(CONTEXT_MM / spacing).astype(int)
        lo = np.maximum(ijk.min(axis=0) - pad, 0)
        hi = np.minimum(ijk.max(axis=0) + pad + 1, before.shape)
        center = np.round(ijk.mean(axis=0)).astype(int) - lo
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    b, a = np.asarray(before, np.float32)[box], np.asarray(after, np.float32)[box]
    return title, [b, a, a - b], list(labels), center


def lesion_montage(path: Path, key: str, before: np.ndarray, after: np.ndarray, mask: np.ndarray,
                   affine: np.ndarray) -> Path:
    """PNG: axial, coronal and sagittal slices through the lesion's centre, cropped to the lesion + 25 mm."""
    return save_montage(path, [lesion_row(key, before, after, mask, affine)], zoom=2)


def write_report(out_root: Path, records: Sequence[dict[str, Any]], settings: dict[str, Any]) -> Path:
    """``qc/index.html``: a summary and one row per subject (status, lesion volume, time, montage)."""
    qc = Path(out_root) / "qc"
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    rows = []
    for rec in sorted(records, key=lambda r: r["key"]):
        png = rec.get("qc")
        url = html.escape(quote(png)) if png else ""  # a URL: 'scan#1.png' is scan%231.png ('#' starts a fragment)
        picture = (f'<a href="{url}"><img loading="lazy" src="{url}" alt="QC montage"></a>'
                   if png and (qc / png).is_file() else "")
        lesion = f'{rec["lesion_ml"]:.2f}' if rec.get("lesion_ml") is not None else ""
        seconds = f'{rec["seconds"]:.1f}' if rec.get("seconds") is not None else ""
        rows.append(f'<tr class="{html.escape(rec["status"])}"><td>{html.escape(rec["key"])}</td>'
                    f'<td>{html.escape(rec["status"])}</td><td>{lesion}</td><td>{seconds}</td>'
                    f'<td>{html.escape(rec.get("message") or "")}</td><td>{picture}</td></tr>')
    summary = ", ".join(f"{n} {html.escape(s)}" for s, n in sorted(counts.items()))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>USB batch QC</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border-bottom: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }}
img {{ max-width: 900px; }}
tr.failed td:nth-child(2) {{ color: #b00; font-weight: bold; }}
tr.no-mask td:nth-child(2) {{ color: #a60; }}
</style></head><body>
<h1>USB batch healing: quality control</h1>
<p>{len(records)} scans: {summary}. Updated {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
<p>Each montage shows the scan before and after healing and their difference, through the lesion's centre
(axial, coronal, sagittal; cropped to the lesion and {CONTEXT_MM:g} mm around it).</p>
<details><summary>Settings</summary><pre>{html.escape(json.dumps(settings, indent=1, default=str))}</pre></details>
<table><thead><tr><th>scan</th><th>status</th><th>lesion (ml)</th><th>time (s)</th><th>message</th>
<th>before / after / difference</th></tr></thead><tbody>
{os.linesep.join(rows)}
</tbody></table></body></html>
"""
    path = qc / "index.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
