"""PNG montages: orthogonal slices of several volumes side by side, for a person to look at."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from USBLib.imaging.io import atomic_path


def _slices(vol: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    i, j, k = (int(c) for c in center)
    # nibabel RAS-ish arrays: show axial (k), coronal (j), sagittal (i), superior/anterior up
    return [np.rot90(vol[:, :, k]), np.rot90(vol[:, j, :]), np.rot90(vol[i, :, :])]


def _to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return (np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def save_montage(path: Path, rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str], Sequence[int]]],
                 zoom: int = 1) -> Path:
    """Write a PNG with one row per (title, volumes, column labels, centre voxel): axial, coronal and sagittal
    slices of each volume through the row's centre, each voxel ``zoom`` x ``zoom`` pixels. Columns labelled
    'difference' are shown with a symmetric grey scale."""
    from PIL import Image, ImageDraw

    tiles_rows = []
    for title, volumes, labels, center in rows:
        tiles = []
        ref = np.asarray(volumes[0], np.float32)
        lo, hi = np.percentile(ref[ref > ref.min()], [0.5, 99.5]) if np.any(ref > ref.min()) else (0.0, 1.0)
        for vol, label in zip(volumes, labels):
            vol = np.asarray(vol, np.float32)
            if label.startswith("difference"):
                span = max(float(np.abs(vol).max()), 1e-6)
                views = [_to_uint8(s, -span, span) for s in _slices(vol, center)]
            else:
                views = [_to_uint8(s, lo, hi) for s in _slices(vol, center)]
            height = max(v.shape[0] for v in views)
            pad = [np.pad(v, ((0, height - v.shape[0]), (0, 2))) for v in views]
            tile = np.concatenate(pad, axis=1)
            if zoom > 1:
                tile = np.kron(tile, np.ones((zoom, zoom), np.uint8))
            tiles.append((f"{title}: {label}", tile))
        tiles_rows.append(tiles)
    width = max(sum(t.shape[1] + 6 for _, t in row) for row in tiles_rows)
    heights = [max(t.shape[0] for _, t in row) + 18 for row in tiles_rows]
    canvas = Image.new("L", (width, sum(heights)), 0)
    draw = ImageDraw.Draw(canvas)
    y = 0
    for row, h in zip(tiles_rows, heights):
        x = 0
        for label, tile in row:
            draw.text((x + 2, y + 2), label, fill=255)
            canvas.paste(Image.fromarray(tile), (x, y + 16))
            x += tile.shape[1] + 6
        y += h
    path = Path(path)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
