"""The first picture a user sees, measured: the bundled sample's lesion healed by the shipped model (the demo's
``realism`` and the CLI's ``fidelity``) and by every classical filler of the yardstick, each scored against the
sample's lesion-free truth, which ``data.sample.sample_arrays`` rebuilds with the sample's own recipe and random
draws (the same bias field and noise); and the sample's lesion embedded into that truth, against the painted one.

    python -m usb_training.evaluation.demo_truth [--cache DIR] [--out DIR]

Needs the MNI152 2009a source in the cache (``python -m usb_training.data fetch``; fetched here when missing).
The sample is made from MNI152 2009a, a training source, and its lesion is one synthetic periventricular lesion:
this checks the demo's picture, it is not an evaluation of the model (that is ``evaluate --native``, held out).
Writes ``native_metrics.json``, ``native_results.md`` and ``heal_yardstick.png`` (truth, lesioned, the best
classical filler, USB) into ``--out``, as the yardstick does.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from USBLib.resources import sample_files

from ..base.paths import DEFAULT_CACHE
from ..data.prepare import CSF, GM, WM
from ..data.sample import sample_arrays
from ..data.sources import fetch
from ..local.cases import NativeCase, hasty_mask
from ..base.common import cli_main

DEMO_CONFIGS = {"USB defaults": {}, "USB realism (the demo)": {"local_mode": "realism"}}


def sample_case(cache: Path) -> NativeCase:
    """The bundled sample as a yardstick case: its scan, lesion mask (exact, and hasty: eroded by a voxel), the
    rebuilt truth, a brain mask and tissue labels from the template's maps. Raises ValueError when the rebuilt scan
    is not the bundled one (the sample was made otherwise)."""
    import nibabel as nib

    arrays = sample_arrays(7, fetch(cache, ["mni2009a"])["mni2009a"])
    shipped = np.asarray(nib.load(str(sample_files()["image"])).dataobj)
    if not np.array_equal(arrays["image"], shipped):
        raise ValueError("the rebuilt sample differs from the bundled one: its truth cannot be rebuilt")
    gm, wm = arrays["gm"], arrays["wm"]
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.3, iterations=3))
    labels = np.where(brain, np.select([gm + wm < 0.5, gm > wm], [CSF, GM], WM), 0).astype(np.uint8)
    lesion = arrays["lesion"].astype(np.uint8)
    return NativeCase(name="sample", site="periventricular", healthy=arrays["truth"].astype(np.float32),
                      lesioned=arrays["image"].astype(np.float32), mask=lesion,
                      soft=arrays["soft"].astype(np.float32), brain=brain.astype(np.uint8), labels=labels,
                      affine=arrays["affine"], hasty=hasty_mask(lesion))


@cli_main
def main(argv: list[str] | None = None) -> int:
    from .native import run

    parser = argparse.ArgumentParser(prog="python -m usb_training.evaluation.demo_truth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, default=Path("usb_demo_truth"))
    args = parser.parse_args(argv)
    try:
        case = sample_case(args.cache)
    except (OSError, ValueError) as exc:
        print(f"demo_truth: error: {exc}", file=sys.stderr)
        return 2
    result = run(None, [case], args.out, DEMO_CONFIGS, cache=args.cache, source="the bundled sample (MNI2009a)",
                 held_out=False, embed="realism")
    print(result["table_markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
