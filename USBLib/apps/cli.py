"""``usb``: the command line of the USB engine.

Exit codes: 0 success, 2 bad input, usage or environment (an output that cannot be written: full disk,
read-only folder), 1 internal failure, 130 cancelled (Ctrl-C), 143 terminated (SIGTERM, handled as Ctrl-C).
Errors are one line on stderr; ``--debug`` shows the traceback of an internal failure. Outputs are written only
when a run has finished (temporary file, then rename), each with a JSON provenance sidecar.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Sequence

from USBLib.errors import BundleError, Cancelled, InputError, OutputError, Terminated, USBError
from USBLib.apps.progress_bar import ProgressBar
from USBLib.apps.signals import terminate_as_interrupt
from USBLib.imaging.io import all_or_nothing, float_map_header, write_result
from USBLib.settings import COVERS_RIM_DILATION_MM, SETTINGS, add_cli_options, cli_number

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_CANCELLED, EXIT_TERMINATED = 0, 1, 2, 130, 143
PROG = "usb"


class _Parser(argparse.ArgumentParser):
    """One-line errors (exit 2), and no abbreviated options: `generate --mask M` was read as `--mask-out M` and
    overwrote the mask with a generated one."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # one line, exit 2
        self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def _common(p: argparse.ArgumentParser, samples: bool = True, uncertainty: bool = True) -> None:
    p.add_argument("--model", help="bundle name or folder (default: the installed default model)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N (GPU N) or mps")
    p.add_argument("--seed", type=cli_number("seed"), default=0, help=SETTINGS["seed"].help + " (default 0)")
    add_cli_options(p, ["steps"])
    if samples:
        spec = SETTINGS["samples"]
        p.add_argument("--samples", type=int, default=1,
                       help=f"{spec.help} [{spec.low:g}..{spec.high:g}] (default 1)")
        if uncertainty:
            p.add_argument("--uncertainty", type=Path, help="write the per-voxel std of the samples here "
                                                            "(needs --samples 2 or more)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks of internal failures")


def _edit_options(p: argparse.ArgumentParser, eta: bool) -> None:
    p.add_argument("--brain-mask", type=Path, help="brain mask of the input (also helps registration)")
    _guidance_options(p, eta)


def _threshold(text: str) -> float:
    """``--mask-threshold``: a finite number above 0 (at 0 or below every background voxel would be lesion; NaN
    made every voxel background, "the lesion mask is empty")."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number above 0 (e.g. 0.5 for a probability map), got {text!r}")
    return value


def _mask_threshold_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mask-threshold", type=_threshold, metavar="T",
                   help="binarise a soft (probabilistic) lesion mask: voxels >= T are lesion (default: the mask must "
                        "be binary, i.e. its non-zero voxels share one value, as 0/1 or 0/255)")


def _guidance_options(p: argparse.ArgumentParser, eta: bool) -> None:
    names = ["strength", "acg", "alpha0", "k", "eta", "margin_mm", "dilation_mm", "stages", "local_mode",
             "local_steps", "local_strength"] + (["lesion_level"] if eta else ["growth", "boundary_average",
                                                                                 "patch_blend", "prior_anchor",
                                                                                 "mirror_blend", "prefill"])
    overrides = {} if eta else {"eta": "LCG-style freedom inside the given lesion mask while healing (0 = the "
                                       "paper's plain heal, 1 = fully free)"}
    add_cli_options(p, names, overrides)
    if not eta:
        p.add_argument("--mask-covers-rim", action="store_true",
                       help="the lesion mask already covers the lesion's dark rim (made on FLAIR, or dilated): heal "
                            "it as drawn, without growing it into the rim (= --dilation 0; +1.9 dB on such masks on "
                            "1 mm scans, no gain on thick slices: docs/model.md)")
    p.add_argument("--resample-mask", action="store_true", help="resample a mask on another grid (nearest)")
    p.add_argument("--registration", choices=("affine", "rigid", "none"), default="affine",
                   help="how to align the scan with the model template (none: already in template space)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="USB: remove or embed brain lesions in MRI, or generate brain/lesion "
                                            "pairs, with the Unified Synthetic Brain diffusion model.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("heal", help="pathology -> healthy: remove a lesion")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--mask", type=Path, help="lesion mask (edit stays inside it); without: the whole brain")
    _mask_threshold_option(p)
    _edit_options(p, eta=False)
    _common(p)

    p = sub.add_parser("embed", help="healthy -> pathology: embed a lesion of the mask's shape")
    p.add_argument("input", type=Path)
    p.add_argument("--mask", type=Path, required=True, help="lesion mask to embed")
    p.add_argument("-o", "--output", type=Path, required=True)
    _mask_threshold_option(p)
    _edit_options(p, eta=True)
    _common(p)

    p = sub.add_parser("generate", help="new brain + lesion mask pairs from noise (model space)")
    p.add_argument("-o", "--output", type=Path, required=True, help="image path (numbered when --n > 1)")
    p.add_argument("--mask-out", type=Path, required=True, help="lesion mask path (numbered when --n > 1)")
    p.add_argument("--n", type=int, default=1, help="number of pairs")
    add_cli_options(p, ["sampler"])
    _common(p, samples=False)

    p = sub.add_parser("generate-from-mask", help="a brain showing a given lesion mask")
    p.add_argument("--mask", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--reference", type=Path, help="scan whose space (and units) the output takes; the mask "
                                                  "must be on its grid")
    p.add_argument("--resample-mask", action="store_true", help="resample the mask onto the reference grid")
    _mask_threshold_option(p)
    add_cli_options(p, ["sampler", "lesion_guidance", "lesion_fusion", "margin_mm", "dilation_mm"],
                    {"margin_mm": "Lesion fusion: feather width in mm beyond the (grown) mask; farther away the "
                                  "brain is the healthy twin's.",
                     "dilation_mm": "Lesion fusion: mm the mask is grown by before the lesion is fused."})
    _common(p)

    p = sub.add_parser("batch", help="heal many scans (BIDS dataset, folder or CSV) into a BIDS derivatives folder",
                       description="Heal every T1w scan that has a lesion mask; resumable, parallel, with an HTML "
                                   "QC report (OUT/qc/index.html). Exit code 0: every scan healed or up to date "
                                   "(scans without a mask are reported, not failed); 3: some scans failed; 2: bad "
                                   "input, or outputs cannot be written (full disk, read-only folder: the batch "
                                   "stops); 130/143: cancelled by Ctrl-C/SIGTERM (the same command resumes).")
    p.add_argument("source", type=Path, help="BIDS dataset, folder of scans, or CSV with image,mask[,id] columns")
    p.add_argument("-o", "--out", type=Path, required=True, help="derivatives folder to write (created if needed)")
    p.add_argument("--masks", type=Path, help="where the lesion masks are (a BIDS derivatives dataset or folder; "
                                              "default: the dataset itself and its derivatives/*)")
    p.add_argument("--mask-pattern", help="mask path template relative to the mask folder, with {sub} {ses} "
                                          "{entities} {anat} and * wildcards, e.g. "
                                          "'{anat}/{entities}_space-orig_label-lesion_mask.nii.gz'")
    p.add_argument("--participant-label", nargs="+", default=[], metavar="LABEL", help="only these subjects")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (one GPU each when GPUs are used)")
    p.add_argument("--shard", help="i/n: only every n-th scan starting at the i-th (array jobs on a cluster); "
                                   "under torchrun, RANK/WORLD_SIZE are used when this is not given")
    p.add_argument("--without-mask", choices=("skip", "copy"), default="skip",
                   help="scans without a lesion mask: skip them (default) or copy them unchanged")
    p.add_argument("--no-qc", action="store_true", help="no montages (the HTML report is still written)")
    _mask_threshold_option(p)
    _guidance_options(p, eta=False)
    _common(p, uncertainty=False)

    p = sub.add_parser("info", help="describe a model bundle")
    p.add_argument("--model", help="bundle name or folder (default: the installed default model)")
    p.add_argument("--json", action="store_true", help="print bundle.json as it is (machine-readable)")
    p.add_argument("--debug", action="store_true")

    p = sub.add_parser("demo", help="heal and embed a lesion on the bundled sample scan")
    p.add_argument("-o", "--out", type=Path, default=Path("usb_demo_output"), help="output folder")
    _common(p, samples=False)

    p = sub.add_parser("web", help="serve the USB Editor as a web page (needs the [web] extra; docs/web.md)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="other than 127.0.0.1: anyone on that network can use it")
    p.add_argument("--model", help="bundle name or folder (default: the installed default model)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-upload-mb", type=float, default=512,
                   help="largest file the page accepts (default 512); a scan may unpack to 4 times it")
    return parser


def _version() -> str:
    from USBLib import __version__

    return __version__


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def _foreign_json(path: Path) -> bool:
    """Whether ``path`` is a file that is not a USB sidecar (a scanner's or BIDS sidecar, say), which an output's
    sidecar must not replace."""
    if not path.exists():
        return False
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return True
    return not (isinstance(content, dict) and {"task", "output_sha256"} <= set(content))


def _described_elsewhere(sidecar: Path, out: Path) -> Path | None:
    """The other output file that USB's ``sidecar`` describes when it still exists (``scan.nrrd`` written before
    ``scan.mgz``: one ``scan.json``, which the new output would take from it), else None."""
    try:
        described = json.loads(sidecar.read_text()).get("output") if sidecar.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(described, str):
        return None
    other = sidecar.parent / Path(described).name  # (recorded as typed, relative to the folder it was run from)
    if not other.is_file() or (out.exists() and _same_file(other, out)) or other.name == out.name:
        return None
    return other


def _check_outputs(inputs: Sequence[Path | None], outputs: Sequence[Path | None], model: Any = None) -> None:
    """Refuse, before the work, outputs that would overwrite an input or the model's own files (``model``: the
    ``--model`` given), share a path or a sidecar, or cannot be written."""
    from USBLib.imaging.io import check_writable

    outs = [o for o in outputs if o is not None]
    _check_named(outs)
    try:
        _check_output_paths(inputs, outs, model)
    except OSError as exc:  # a name too long for the file system, say: one line, exit 2
        raise InputError(f"cannot write {exc.filename or outs[0]}: {exc.strerror or exc}") from None
    for out in outs:  # before the work starts, not after it
        check_writable(out)


def _check_named(outputs: Sequence[Path | None]) -> None:
    """Refuse an output path that is a file type without a name (``.nii.gz``)."""
    from USBLib.imaging.io import suffix_of

    for out in outputs:
        if out is not None and len(out.name) == len(suffix_of(out)):
            raise InputError(f"output {out} has a file type but no name (e.g. {out.with_name('healed' + out.name)})")


def _check_output_paths(inputs: Sequence[Path | None], outs: list[Path], model: Any) -> None:
    """``_check_outputs``' checks of the paths themselves (may raise ``OSError`` for a path the system refuses)."""
    from USBLib.core.bundle import resolve
    from USBLib.imaging.io import nrrd_data_files, output_files, sidecar_path

    read = [(inp, file) for inp in inputs if inp is not None for file in (inp, *nrrd_data_files(inp))]
    model_root = resolve(model).resolve()
    for out in outs:
        if model_root in out.resolve().parents:
            raise InputError(f"output {out} is inside the model's folder {model_root}; write it elsewhere")
        for inp in inputs:
            if inp is not None and _same_file(inp, out):
                raise InputError(f"output {out} is the same file as input {inp}; choose another output path")
        for file in output_files(out):  # (a .nhdr output: its data file too)
            if file.is_dir():
                raise InputError(f"output {file} is a folder")
            for inp, data in read:  # an input .nhdr's data file too
                if data != inp and _same_file(data, file):
                    raise InputError(f"output {out} would replace {data}, the data file of input {inp}; choose "
                                     "another output name")
        if _foreign_json(sidecar_path(out)):
            raise InputError(f"the output's sidecar {sidecar_path(out)} would replace a JSON file USB did not write "
                             "(a scanner or BIDS sidecar?); choose another output name")
        other = _described_elsewhere(sidecar_path(out), out)
        if other is not None:
            raise InputError(f"the output's sidecar {sidecar_path(out)} describes {other}, which is still there "
                             "(a name that differs only in the suffix); choose another output name, or remove it")
    if len({str(o.resolve()) for o in outs}) != len(outs):
        raise InputError("two outputs have the same path")
    if len({str(sidecar_path(o).resolve()) for o in outs}) != len(outs):  # e.g. out.nii.gz and out.mgz: out.json
        raise InputError("two outputs would share one sidecar (their names differ only in the suffix); choose "
                         "other names")


def _with_mask_reading(provenance: dict, args) -> dict:
    """The run's provenance with how the mask file was read (``--mask-threshold``, ``--resample-mask``) among its
    settings: two thresholds of one soft mask give two edits, and the sidecar must tell them apart."""
    settings = dict(provenance.get("settings") or {}, mask_threshold=args.mask_threshold,
                    resample_mask=bool(args.resample_mask))
    return dict(provenance, settings=settings)


def _load_image(path: Path, what: str = "input image"):
    from USBLib.imaging.io import check_image_values, read_volume

    vol = read_volume(path, what)
    check_image_values(vol, what)
    return vol


def _read_mask(path: Path, threshold: float | None):
    """The lesion mask file as a ``Volume``, binarised at ``threshold`` when one is given (``--mask-threshold``)."""
    from USBLib.imaging.checks import threshold_mask
    from USBLib.imaging.io import read_volume

    vol = read_volume(path, "lesion mask")
    vol.data = threshold_mask(vol.data, threshold)
    return vol


def _check_uncertainty(args) -> None:
    if args.uncertainty is not None and args.samples < 2:
        raise InputError("--uncertainty needs --samples 2 or more (the spread of one sample is zero)")


def _print_notes(result) -> None:
    for note in result.provenance.get("notes", []):
        print(f"{PROG}: note: {note}", file=sys.stderr)


def _editor(args):
    from USBLib.editor.editor import Editor

    return Editor(args.model, device=args.device, registration=getattr(args, "registration", "affine"))


def _local_options(args) -> dict[str, Any]:
    """The stage/local-stage options of an edit command (None = the bundle's default)."""
    return {"stages": args.stages, "local_mode": args.local_mode, "local_steps": args.local_steps,
            "local_strength": args.local_strength, "dilation_mm": _growth_limit(args), "acg": args.acg}


def _growth_limit(args) -> float | None:
    """``dilation_mm`` of an edit: ``--dilation``, or ``COVERS_RIM_DILATION_MM`` with ``--mask-covers-rim`` (heal,
    batch); None = the bundle's default."""
    if not getattr(args, "mask_covers_rim", False):
        return args.dilation_mm
    if args.dilation_mm not in (None, COVERS_RIM_DILATION_MM):
        raise InputError(f"--mask-covers-rim heals the mask as drawn (--dilation {COVERS_RIM_DILATION_MM:g}); it "
                         f"cannot go with --dilation {args.dilation_mm:g}")
    return COVERS_RIM_DILATION_MM


def cmd_edit(args, task: str) -> int:
    from USBLib.imaging.checks import check_mask
    from USBLib.imaging.io import read_volume

    _check_outputs([args.input, args.mask, args.brain_mask], [args.output, args.uncertainty], args.model)
    _check_uncertainty(args)
    vol = _load_image(args.input)
    mask = _read_mask(args.mask, args.mask_threshold) if args.mask else None
    brain = read_volume(args.brain_mask, "brain mask") if args.brain_mask else None
    if brain is not None:  # on the image's grid, or moved onto it exactly (another axis order); never resampled
        brain.data = check_mask(brain.data, vol.data.shape, brain.affine, vol.affine, False, "brain mask")
    editor = _editor(args)
    bar = ProgressBar(args.quiet, task)
    try:
        run = editor.heal if task == "heal" else editor.embed
        extra = {"prefill": args.prefill, "growth": args.growth,
                 "boundary_average": args.boundary_average, "patch_blend": args.patch_blend,
                 "prior_anchor": args.prior_anchor, "mirror_blend": args.mirror_blend} if task == "heal" \
            else {"lesion_level": args.lesion_level}
        result = run(vol.data, vol.affine, None if mask is None else mask.data,
                     None if brain is None else brain.data, steps=args.steps, strength=args.strength,
                     alpha0=args.alpha0, k=args.k, eta=args.eta, margin_mm=args.margin_mm, samples=args.samples,
                     seed=args.seed, mask_affine=None if mask is None else mask.affine,
                     resample_mask=args.resample_mask, progress=bar, **_local_options(args), **extra)
    finally:
        bar.close()
    _print_notes(result)
    inputs = {"image": args.input, "mask": args.mask, "brain_mask": args.brain_mask}
    result.provenance = _with_mask_reading(result.provenance, args)
    with all_or_nothing() as written:
        write_result(args.output, vol.as_in_file(result.image), vol.affine, vol.header, result.provenance, inputs)
        written.append(args.output)
        if args.uncertainty is not None:
            write_result(args.uncertainty, vol.as_in_file(result.uncertainty.astype("float32")), vol.affine,
                         float_map_header(vol.header),
                         dict(result.provenance, kind="uncertainty (std over samples)"), inputs)
    print(args.output)
    return EXIT_OK


def _numbered(path: Path, i: int, n: int) -> Path:
    if n == 1:
        return path
    from USBLib.imaging.io import suffix_of

    cut = len(path.name) - len(suffix_of(path))  # the suffix as the user typed it (OUT.NII.GZ stays upper case)
    return path.with_name(f"{path.name[:cut]}_{i + 1:03d}{path.name[cut:]}")


def cmd_generate(args) -> int:
    if args.n < 1 or args.n > 64:
        raise InputError(f"--n must be from 1 to 64, got {args.n}")
    _check_named([args.output, args.mask_out])  # before numbering: '.nii.gz' would become '_001.nii.gz'
    outs = [(_numbered(args.output, i, args.n), _numbered(args.mask_out, i, args.n)) for i in range(args.n)]
    _check_outputs([], [p for pair in outs for p in pair], args.model)
    editor = _editor(args)
    bar = ProgressBar(args.quiet, "generate")
    try:
        results = editor.generate(args.n, steps=args.steps, seed=args.seed, sampler=args.sampler, progress=bar)
    finally:
        bar.close()
    with all_or_nothing() as written:
        for (img_path, mask_path), res in zip(outs, results):
            write_result(img_path, res.image, res.affine, None, res.provenance, {})
            written.append(img_path)
            write_result(mask_path, res.mask, res.affine, None, dict(res.provenance, kind="lesion mask"), {})
            written.append(mask_path)
    for img_path, mask_path in outs:
        print(img_path)
        print(mask_path)
    return EXIT_OK


def cmd_generate_from_mask(args) -> int:
    if args.resample_mask and args.reference is None:
        raise InputError("--resample-mask needs --reference (the grid to resample the mask onto); without a "
                         "reference the mask is taken to be in template space as it is")
    _check_outputs([args.mask, args.reference], [args.output, args.uncertainty], args.model)
    _check_uncertainty(args)
    mask = _read_mask(args.mask, args.mask_threshold)
    ref = _load_image(args.reference, "reference image") if args.reference else None
    editor = _editor(args)
    bar = ProgressBar(args.quiet, "generate-from-mask")
    try:
        res = editor.generate_from_mask(mask.data, mask.affine, None if ref is None else ref.data,
                                        None if ref is None else ref.affine, steps=args.steps, seed=args.seed,
                                        samples=args.samples, resample_mask=args.resample_mask,
                                        sampler=args.sampler, lesion_guidance=args.lesion_guidance,
                                        lesion_fusion=args.lesion_fusion, margin_mm=args.margin_mm,
                                        dilation_mm=args.dilation_mm, progress=bar)
    finally:
        bar.close()
    inputs = {"mask": args.mask, "reference": args.reference}
    res.provenance = _with_mask_reading(res.provenance, args)
    header = None if ref is None else ref.header
    data = res.image if ref is None else ref.as_in_file(_like(res.image, ref.data.dtype))
    with all_or_nothing() as written:
        write_result(args.output, data, res.affine, header, res.provenance, inputs)
        written.append(args.output)
        if args.uncertainty is not None:
            unc = res.uncertainty.astype("float32")
            write_result(args.uncertainty, unc if ref is None else ref.as_in_file(unc), res.affine,
                         None if ref is None else float_map_header(ref.header),
                         dict(res.provenance, kind="uncertainty (std over samples)"), inputs)
    print(args.output)
    return EXIT_OK


def _like(values, dtype):
    from USBLib.imaging.io import cast_like

    return cast_like(values, dtype)


def cmd_info(args) -> int:
    import json

    from USBLib.apps.info import describe
    from USBLib.core import bundle as bundle_mod

    b = bundle_mod.load(args.model)
    print(json.dumps(b.config, indent=2) if args.json else describe(b), end="\n" if args.json else "")
    return EXIT_OK


def cmd_demo(args) -> int:
    from USBLib.apps.demo import run_demo

    run_demo(args.out, model=args.model, device=args.device, seed=args.seed, steps=args.steps, quiet=args.quiet)
    return EXIT_OK


def cmd_web(args) -> int:
    import importlib  # loaded by name: the engine does not depend on the web front end

    try:
        serve = importlib.import_module("USBWeb.server").serve
    except ImportError as exc:
        raise InputError(f"usb web needs the [web] extra ({(exc.name or str(exc)).split('.')[0]} is missing): "
                         "install with pip install 'usb-slicer[web]'") from None
    return serve(args.host, args.port, model=args.model, device=args.device, max_upload_mb=args.max_upload_mb)


def cmd_batch(args) -> int:
    from USBLib.apps.batch import BatchSettings
    from USBLib.apps.batch_run import run_cli

    settings = BatchSettings(model=args.model, device=args.device, steps=args.steps, strength=args.strength,
                             mask_threshold=args.mask_threshold, growth=args.growth,
                             boundary_average=args.boundary_average, patch_blend=args.patch_blend,
                             prior_anchor=args.prior_anchor, mirror_blend=args.mirror_blend,
                             alpha0=args.alpha0, k=args.k, eta=args.eta, margin_mm=args.margin_mm, prefill=args.prefill,
                             **_local_options(args), samples=args.samples, seed=args.seed, registration=args.registration,
                             resample_mask=args.resample_mask, without_mask=args.without_mask, qc=not args.no_qc)
    return run_cli(args.source, args.out, settings, masks=args.masks, mask_pattern=args.mask_pattern,
                   participants=args.participant_label, jobs=args.jobs, shard_spec=args.shard, quiet=args.quiet)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``usb`` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # usage errors (2), --help and --version (0)
        return int(exc.code or 0)
    commands = {"heal": lambda a: cmd_edit(a, "heal"), "embed": lambda a: cmd_edit(a, "embed"),
                "generate": cmd_generate, "generate-from-mask": cmd_generate_from_mask, "info": cmd_info,
                "demo": cmd_demo, "batch": cmd_batch, "web": cmd_web}
    previous = terminate_as_interrupt()
    try:  # the engine (torch) is imported by the commands that run it, after their inputs are checked
        return commands[args.command](args)
    except (InputError, BundleError, OutputError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (Cancelled, KeyboardInterrupt) as exc:
        print(f"{PROG}: cancelled; no output was written", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_CANCELLED
    except USBError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_INTERNAL
    except BrokenPipeError:  # the reader of stdout stopped early (``usb info --json | head``): no message, but
        try:  # not a success either (a batch piped into ``head`` stopped part-way); Python's own recipe: stdout to
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # devnull, so its flush at exit is quiet
        except (OSError, ValueError, AttributeError):  # a stdout without a file descriptor
            pass
        return EXIT_INTERNAL
    except Exception as exc:  # noqa: BLE001 - last resort: one line unless --debug
        if getattr(args, "debug", False):
            raise
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc} (rerun with --debug for details)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
