"""``usb demo``: heal the lesion of the bundled sample scan and embed another one, with a PNG montage."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "Resources" / "sample"
SAMPLE_IMAGE = "sample_T1w.nii.gz"
SAMPLE_LESION = "sample_lesion_mask.nii.gz"
SAMPLE_EMBED = "sample_embed_mask.nii.gz"


def sample_files(folder: Path = SAMPLE_DIR) -> dict[str, Path]:
    """Paths of the sample scan, its lesion mask and the mask to embed; an ``InputError`` names what is missing."""
    files = {"image": folder / SAMPLE_IMAGE, "lesion": folder / SAMPLE_LESION, "embed": folder / SAMPLE_EMBED}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"sample data missing: {', '.join(missing)}")
    return files


def run_demo(out: Path, model=None, device: str = "auto", seed: int = 0, steps: int | None = None,
             quiet: bool = False) -> dict[str, Path]:
    """Run both edits on the sample, write NIfTI outputs, sidecars and ``montage.png``; print where they are."""
    import sys

    from .cli import _Bar, _write_result
    from .io import read_volume
    from .montage import save_montage
    from .pipeline import Editor

    editor = Editor(model, device=device)  # fails first, and clearly, when no model is installed
    look = {"local_mode": editor.interactive_local_mode()} if editor.bundle.has_local else {}  # a person looks
    files = sample_files()
    image, lesion, target = (read_volume(files[k], k) for k in ("image", "lesion", "embed"))
    out = Path(out)
    written: dict[str, Path] = {}
    bar = _Bar(quiet, "demo: heal")
    try:
        healed = editor.heal(image.data, image.affine, lesion.data, steps=steps, seed=seed, progress=bar, **look)
    finally:
        bar.close()
    bar = _Bar(quiet, "demo: embed")
    try:
        embedded = editor.embed(image.data, image.affine, target.data, steps=steps, seed=seed, progress=bar, **look)
    finally:
        bar.close()
    written["healed"] = out / "sample_healed.nii.gz"
    _write_result(written["healed"], healed.image, image.affine, image.header, healed.provenance,
                  {"image": files["image"], "mask": files["lesion"]})
    written["embedded"] = out / "sample_embedded.nii.gz"
    _write_result(written["embedded"], embedded.image, image.affine, image.header, embedded.provenance,
                  {"image": files["image"], "mask": files["embed"]})
    src = np.asarray(image.data, np.float32)
    rows = []
    for title, res, mask in (("heal", healed, lesion.data), ("embed", embedded, target.data)):
        res_f = np.asarray(res.image, np.float32)
        center = np.round(np.argwhere(np.asarray(mask) > 0).mean(axis=0)).astype(int)
        rows.append((title, [src, res_f, res_f - src], ["input", "output", "difference"], center))
    written["montage"] = save_montage(out / "montage.png", rows)
    for key, path in written.items():
        print(f"{key:>9}: {path}", file=sys.stdout)
    return written
