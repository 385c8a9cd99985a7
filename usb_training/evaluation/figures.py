"""README figure: one embed on the bundled sample across ACG alpha0 and LCG eta, so the sliders' effect on the
local stage can be seen (realism mode, same seed).

    python -m usb_training.evaluation.figures [--model M] [--out Resources/guidance_embed.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from ..base.common import cli_main

ALPHA0 = (0.0, 2.0, 20.0)
ETA = (0.0, 0.5, 1.0)


def guidance_figure(model, out: Path, seed: int = 0) -> Path:
    from USBLib.resources import sample_files
    from USBLib.imaging.io import read_volume
    from USBLib.apps.montage import save_montage
    from USBLib.editor.editor import Editor

    editor = Editor(model, device="auto")
    files = sample_files()
    image, target = read_volume(files["image"], "image"), read_volume(files["embed"], "mask")
    centre = np.round(np.argwhere(target.data > 0).mean(0)).astype(int)
    half = 26
    lo = np.clip(centre - half, 0, np.asarray(image.data.shape) - 2 * half)
    crop = lambda v: np.asarray(v, np.float32)[tuple(slice(a, a + 2 * half) for a in lo)]  # noqa: E731
    rows = [("input (mask outline not drawn)", [crop(image.data)], ["healthy input"], np.array([half] * 3))]
    for alpha0 in ALPHA0:
        vols, labels = [], []
        for eta in ETA:
            res = editor.embed(image.data, image.affine, target.data, alpha0=alpha0, eta=eta, seed=seed,
                               local_mode="realism", acg=alpha0 > 0)
            vols.append(crop(res.image))
            labels.append(f"eta {eta:g}")
        title = "alpha0 0 (ACG off)" if alpha0 == 0 else f"alpha0 {alpha0:g}"
        rows.append((title, vols, labels, np.array([half] * 3)))
    return save_montage(out, rows, zoom=2)


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("Resources/guidance_embed.png"))
    args = parser.parse_args(argv)
    print(guidance_figure(args.model, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
