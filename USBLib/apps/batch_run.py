"""``usb batch`` from the command line: pick the scans and the shard, run, report, and choose the exit code."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

from USBLib.apps.batch import (OUTPUT_CAUSE, BatchSettings, batch_key, dataset_links, load_records,
                                prepare_output, run_batch)
from USBLib.apps.batch_inputs import find_subjects, shard
from USBLib.errors import InputError, OutputError, Terminated

EXIT_SOME_FAILED, EXIT_CANCELLED, EXIT_TERMINATED = 3, 130, 143
STOP_AFTER_OUTPUT_FAILURES = 3  # consecutive scans whose output could not be written: the disk is full, stop


def torchrun_shard(device: str) -> tuple[Optional[str], str]:
    """Under torchrun (WORLD_SIZE > 1): this rank's shard and its own GPU (LOCAL_RANK) when GPUs are used."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return None, device
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{local % torch.cuda.device_count()}"
    return f"{rank + 1}/{world}", device


def _gpu_count(device: str, jobs: int) -> int:
    if jobs <= 1 or not (device == "auto" or device == "cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_cli(source: Path, out: Path, settings: BatchSettings, masks: Optional[Path] = None,
            mask_pattern: Optional[str] = None, participants: Sequence[str] = (), jobs: int = 1,
            shard_spec: Optional[str] = None, quiet: bool = False) -> int:
    """Run a batch; returns 0 when no scan failed, 3 when some did (each is in the report and its record), 130/143
    when Ctrl-C/SIGTERM stopped it. Raises ``OutputError`` (exit 2) when outputs cannot be written: before any
    work when the folder is read-only, or after a record could not be saved or ``STOP_AFTER_OUTPUT_FAILURES``
    scans in a row could not write their output (a full disk); the line says how far the batch got."""
    from tqdm import tqdm

    from USBLib.core.bundle import BUNDLE_FILE, load, sha256_of
    from USBLib.editor.input_checks import check_sampling
    from USBLib.imaging.io import check_writable

    if jobs < 1:
        raise InputError("--jobs must be at least 1")
    source, out = Path(source), Path(out)
    if source.exists() and out.resolve() == source.resolve():
        raise InputError("--out must not be the input dataset itself; use e.g. derivatives/usb")
    check_writable(out / "dataset_description.json")
    subjects = find_subjects(source, masks, mask_pattern, participants, exclude=[out])
    env_shard, settings.device = torchrun_shard(settings.device) if shard_spec is None else (None, settings.device)
    if shard_spec or env_shard:
        subjects = shard(subjects, shard_spec or env_shard)
    bundle = load(settings.model)
    check_sampling(bundle, "heal", settings.samples, settings.stages, settings.local_mode)
    from USBLib.core.devices import pick_device

    pick_device(settings.device)  # an absent GPU is a usage error here, not a failure of every scan
    key = batch_key(sha256_of(bundle.root / BUNDLE_FILE), settings)
    links = dataset_links(source, masks)
    links = prepare_output(out, source, links)  # renamed where an earlier source holds the name
    mine: list[str] = []
    interrupted: KeyboardInterrupt | None = None
    stopped: OutputError | None = None
    output_failures = 0
    try:
        with tqdm(total=len(subjects), desc="usb batch", unit="scan", disable=quiet, file=sys.stderr) as bar:
            for record in run_batch(subjects, out, settings, key, jobs=jobs, links=links,
                                    gpu_count=_gpu_count(settings.device, jobs)):
                mine.append(record.status)
                bar.update(1)
                if not quiet:
                    tail = f" ({record.message})" if record.message and record.status != "healed" else ""
                    bar.write(f"{record.key}: {record.status}{tail}")
                output_failures = output_failures + 1 if record.cause == OUTPUT_CAUSE else 0
                if output_failures >= STOP_AFTER_OUTPUT_FAILURES:
                    raise OutputError(f"{record.message}; {output_failures} scans in a row could not be written")
    except KeyboardInterrupt as exc:
        interrupted = exc
    except OutputError as exc:
        stopped = exc
    counts = {s: mine.count(s) for s in dict.fromkeys(mine)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items()) or "nothing to do"
    if stopped is not None:
        raise OutputError(f"{stopped}; stopped after {len(mine)} of {len(subjects)} scans ({summary}); free space "
                          "or choose another --out, then the same command resumes")
    report = _report(out, settings, bundle, key)
    if interrupted is not None:
        print(f"usb batch: cancelled after {len(mine)} of {len(subjects)} scans ({summary}); finished scans are "
              f"kept and the same command resumes; report: {report}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(interrupted, Terminated) else EXIT_CANCELLED
    print(f"usb batch: {len(mine)} scans: {summary}; report: {report}")
    # a mask layout USB does not know, most likely (an empty shard has no scans to warn about)
    if subjects and all(s.mask is None and not s.problem for s in subjects):
        print(f"usb batch: warning: none of the {len(subjects)} scans has a lesion mask, so none was healed; "
              "see --masks and --mask-pattern", file=sys.stderr)
    return EXIT_SOME_FAILED if "failed" in counts else 0


def _report(out: Path, settings: BatchSettings, bundle, key: str) -> Path:
    """Rebuild ``qc/index.html`` from every record of ``out``."""
    from USBLib.apps.qc_report import write_report

    return write_report(out, load_records(out), dict(asdict(settings), model_bundle=str(bundle.root), batch_key=key))
