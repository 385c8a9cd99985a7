"""Make the bundled sample scan (``USBLib/resources/sample``) from nilearn's MNI152 2009a T1 template.

The sample is a demo input, not evaluation data: the template is resampled through a small rotation onto a
181 x 217 x 181 1 mm grid, given a smooth bias field and noise, and a synthetic hypointense lesion (smooth-noise
shape, heterogeneous core, partial-volume rim) is painted into the right periventricular white matter. A second
mask in the left hemisphere is the demo's lesion to embed. ``sample_arrays`` also gives the lesion-free truth
(the same scan without the lesion: same bias field and noise), which ``usb_training.evaluation.demo_truth`` scores
the demo's heal against.

    python -m usb_training.data.sample [--out USBLib/resources/sample]   (needs: pip install nilearn)
    python -m usb_training.data.sample --registration   (the sample's registration to the default model, shipped
                                                          in USBLib/resources/registrations: rerun after a retrain)
"""
from __future__ import annotations

import argparse
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from ..base.common import cli_main

SHAPE = (181, 217, 181)


def _template(name: str, maps: dict[str, Path] | None = None) -> nib.Nifti1Image:
    """The MNI152 2009a map ``name`` (t1, gm, wm): from ``maps`` (``usb_training.data.sources.fetch``'s
    ``mni2009a`` files) when given, else from the installed nilearn."""
    if maps:
        return nib.load(str(maps[name]))
    path = resources.files("nilearn") / "datasets" / "data" / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    return nib.load(str(path))


def _smooth_noise(shape, sigma: float, rng: np.random.Generator) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (np.abs(field).max() + 1e-8)


def _blob(shape, affine, center_mm, radius_mm: float, rng: np.random.Generator) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    dist = np.linalg.norm(xyz - np.asarray(center_mm), axis=-1) / radius_mm
    return (dist + 0.35 * _smooth_noise(shape, 4.0, rng)) < 1.0


def sample_arrays(seed: int = 7, maps: dict[str, Path] | None = None) -> dict[str, np.ndarray]:
    """The sample's arrays on its 181 x 217 x 181 1 mm grid: ``image`` (the lesioned scan, int16), ``truth`` (the
    same scan without the lesion, int16: the same bias field and noise), ``lesion`` and ``embed`` (bool masks),
    ``soft`` (the lesion's extent in [0, 1], its partial-volume rim included), ``gm`` and ``wm`` (the template's
    tissue probabilities on the grid) and ``affine`` (4 x 4, scanner RAS mm). ``maps``: where the MNI152 2009a maps
    are (see ``_template``)."""
    rng = np.random.default_rng(seed)
    t1, wm = _template("t1", maps), _template("wm", maps)
    angle = np.deg2rad(4.0)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    affine = np.eye(4)
    affine[:3, 3] = [-90.0, -126.0, -72.0]
    # scanner RAS -> template RAS is a small rotation: sample the template there
    vox = np.linalg.inv(t1.affine) @ rot @ affine
    sample = lambda img, order: ndimage.affine_transform(np.asarray(img.dataobj, np.float32), vox[:3, :3],  # noqa: E731
                                                         vox[:3, 3], output_shape=SHAPE, order=order)
    healthy, wm_prob = sample(t1, 3) / 255.0, sample(wm, 1) / 255.0
    healthy = np.clip(healthy, 0, None)
    bias = 1.0 + 0.08 * _smooth_noise(SHAPE, 30.0, rng)
    lesion = _blob(SHAPE, affine, (24.0, -12.0, 22.0), 9.0, rng) & (wm_prob > 0.3)
    soft = np.clip(ndimage.gaussian_filter(lesion.astype(np.float32), 1.0), 0, 1)
    core = 0.35 + 0.12 * _smooth_noise(SHAPE, 2.0, rng)
    image = healthy * (1 - soft) + healthy * core * soft
    embed = _blob(SHAPE, affine, (-27.0, -20.0, 28.0), 8.0, rng) & (wm_prob > 0.3)
    head = image > 0.02
    noise = rng.normal(0, 12.0, SHAPE) * head
    scan = lambda x: np.clip(np.rint(x * bias * 1000.0 + noise), 0, 32767).astype(np.int16)  # noqa: E731
    return {"image": scan(image), "truth": scan(healthy), "lesion": lesion, "embed": embed, "soft": soft,
            "gm": sample(_template("gm", maps), 1) / 255.0, "wm": wm_prob, "affine": affine}


def make_sample(out: Path, seed: int = 7) -> dict[str, Path]:
    """Write the sample scan and its two masks (NIfTI, sform and qform = the scanner affine) into ``out``."""
    arrays = sample_arrays(seed)
    affine = arrays["affine"]
    out.mkdir(parents=True, exist_ok=True)
    paths = {"image": out / "sample_T1w.nii.gz", "lesion": out / "sample_lesion_mask.nii.gz",
             "embed": out / "sample_embed_mask.nii.gz"}
    for key, arr in (("image", arrays["image"]), ("lesion", arrays["lesion"].astype(np.uint8)),
                     ("embed", arrays["embed"].astype(np.uint8))):
        img = nib.Nifti1Image(arr, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, str(paths[key]))
    return paths


def write_registration(model: str | None = None, folder: Path | None = None) -> Path:
    """Register the bundled sample to ``model`` (default: the default model) as every edit of it does by default
    (seed 0, no brain mask, ``affine``) and store the result in ``folder`` (default: the package's
    ``registration_cache.SHIPPED``), so that ``usb demo`` and the sample in Slicer or ``usb web`` need not register
    it. The package holds one entry, the default model's: written there, it replaces the others; into another
    folder it is added. Returns the entry's path (named by its key: the sample's voxels and the model's template)."""
    from USBLib.core import bundle
    from USBLib.editor import registration_cache
    from USBLib.editor.editor import Editor
    from USBLib.imaging.io import read_volume
    from USBLib.resources import sample_files

    folder = Path(folder or registration_cache.SHIPPED)
    package = folder.resolve() == registration_cache.SHIPPED.resolve()
    if package and model is not None:
        raise ValueError("the package's entry is the default model's: give another folder for another model")
    editor = Editor(bundle.load(model), device="cpu")
    image = read_volume(sample_files()["image"], "image")
    key = editor.registration_key(image.data, image.affine)
    registration_cache.save(key, editor.register_scan(image.data, image.affine), folder)
    if package:  # one entry: the sample's to the model shipped now
        for old in folder.glob("*.json"):
            if old.stem != key:
                old.unlink()
    return folder / f"{key}.json"


@cli_main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parents[2] / "USBLib" / "resources" / "sample")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--registration", action="store_true",
                        help="only register the shipped sample to the default model (the package's entry)")
    args = parser.parse_args()
    if args.registration:
        print(f"registration: {write_registration()}")
        return
    for key, path in make_sample(args.out, args.seed).items():
        print(f"{key}: {path}")


if __name__ == "__main__":
    main()
