"""Counterfactual progression: a series of healthy -> pathology edits with a lesion that grows frame by frame.

Frame ``f`` of ``n`` embeds the part of the mask whose depth (distance to the mask's border) exceeds
``(n - f) / n`` of the deepest point, so the lesion grows outwards from its core and the last frame uses the
whole mask. Every frame uses the same seed and the same registration, so frames differ only by the lesion.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from USBLib.errors import InputError
from USBLib.editor.editor import EditResult, Editor, Progress

MAX_FRAMES = 32


def growing_masks(mask: np.ndarray, frames: int, spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> list[np.ndarray]:
    """``frames`` nested uint8 masks growing from the core of ``mask`` to the whole of it."""
    from scipy.ndimage import distance_transform_edt

    if int(frames) != frames or not 2 <= int(frames) <= MAX_FRAMES:
        raise InputError(f"a progression series needs 2 to {MAX_FRAMES} frames, got {frames}")
    mask = np.asarray(mask) > 0
    if not mask.any():
        raise InputError("the lesion mask is empty")
    depth = distance_transform_edt(mask, sampling=spacing)
    deepest = float(depth.max())
    n = int(frames)
    return [(depth > deepest * (n - f) / n).astype(np.uint8) for f in range(1, n + 1)]


def progression(editor: Editor, image: np.ndarray, affine: np.ndarray, mask: np.ndarray, frames: int,
                progress: Progress | None = None, **settings: Any) -> list[EditResult]:
    """Embed ``mask`` growing over ``frames`` steps; one ``EditResult`` per frame (the last = the full mask)."""
    spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine, float)[:3, :3], axis=0))
    masks = growing_masks(mask, frames, spacing)
    results = []
    for f, frame_mask in enumerate(masks):
        def frame_progress(step: int, total: int, message: str, f: int = f) -> bool | None:
            if progress is None:
                return None
            return progress(f * total + step, len(masks) * total, f"frame {f + 1}/{len(masks)}: {message}")

        results.append(editor.embed(image, affine, frame_mask, progress=frame_progress, **settings))
    return results
