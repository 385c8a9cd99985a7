"""``usb demo``: heal the lesion of the bundled sample scan and embed another one, with a PNG montage."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from USBLib.resources import sample_files

def run_demo(out: Path, model=None, device: str = "auto", seed: int = 0, steps: int | None = None,
             quiet: bool = False) -> dict[str, Path]:
    """Run both edits on the sample, write NIfTI outputs, sidecars, ``montage.png`` (whole slices) and
    ``closeup.png`` (each lesion and 25 mm around it, twice the size); print where they are."""
    import sys

    from USBLib.apps.progress_bar import ProgressBar
    from USBLib.errors import OutputError
    from USBLib.imaging.io import all_or_nothing, check_writable, read_volume, write_result
    from USBLib.apps.montage import save_montage
    from USBLib.apps.qc_report import lesion_row
    from USBLib.editor.editor import Editor

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write the demo into {out}: it is a file, not a folder")
    names = ("sample_healed.nii.gz", "sample_healed.json", "sample_embedded.nii.gz", "sample_embedded.json",
             "montage.png", "closeup.png")
    for name in names:  # before the work, not after it
        if (out / name).is_dir():
            raise OutputError(f"cannot write the demo's {out / name}: it is a folder")
    check_writable(out / names[0])
    editor = Editor(model, device=device)  # fails first, and clearly, when no model is installed
    look = {"local_mode": editor.interactive_local_mode()} if editor.bundle.has_local else {}  # a person looks
    files = sample_files()
    image, lesion, target = (read_volume(files[k], k) for k in ("image", "lesion", "embed"))
    written: dict[str, Path] = {}
    bar = ProgressBar(quiet, "demo: heal")
    try:
        healed = editor.heal(image.data, image.affine, lesion.data, steps=steps, seed=seed, progress=bar, **look)
    finally:
        bar.close()
    bar = ProgressBar(quiet, "demo: embed")
    try:
        embedded = editor.embed(image.data, image.affine, target.data, steps=steps, seed=seed, progress=bar, **look)
    finally:
        bar.close()
    src = np.asarray(image.data, np.float32)
    rows = []
    for title, res, mask in (("heal", healed, lesion.data), ("embed", embedded, target.data)):
        res_f = np.asarray(res.image, np.float32)
        center = np.round(np.argwhere(np.asarray(mask) > 0).mean(axis=0)).astype(int)
        rows.append((title, [src, res_f, res_f - src], ["input", "output", "difference"], center))
    with all_or_nothing() as done:  # a full disk half way, or Ctrl-C: none of the demo's files stays
        written["healed"] = out / "sample_healed.nii.gz"
        write_result(written["healed"], healed.image, image.affine, image.header, healed.provenance,
                     {"image": files["image"], "mask": files["lesion"]})
        done.append(written["healed"])
        written["embedded"] = out / "sample_embedded.nii.gz"
        write_result(written["embedded"], embedded.image, image.affine, image.header, embedded.provenance,
                     {"image": files["image"], "mask": files["embed"]})
        done.append(written["embedded"])
        written["montage"] = save_montage(out / "montage.png", rows)
        done.append(written["montage"])
        written["closeup"] = save_montage(out / "closeup.png", [
            lesion_row(title, src, np.asarray(res.image, np.float32), np.asarray(mask), image.affine,
                       ["input", "output", "difference"])
            for title, res, mask in (("heal", healed, lesion.data), ("embed", embedded, target.data))], zoom=2)
    for key, path in written.items():
        print(f"{key:>9}: {path}", file=sys.stdout)
    return written
