"""Background worker: runs ``Editor`` tasks described by job folders and reports progress on stdout.

``python -m USBLib.apps.worker JOB_DIR`` runs one job and exits. The Slicer module and ``usb web`` start
``PythonSlicer -m USBLib.apps.worker --serve`` instead (``USBEditorLib.process``): it reads one job folder per
line on stdin and keeps torch, MONAI and the last model loaded between jobs, so that a second edit does not pay
the 6-7 s of imports and model loading again; it ends when stdin closes (Slicer quits, or the caller closes it
after ``USB_WORKER_IDLE_S`` idle seconds to free the memory, GPU included) or after an unexpected failure. The
diffusion never blocks Slicer's GUI either way. Importing this module is light (numpy only); torch loads when a
job runs.

Job folder: ``job.json`` (``task``, ``model``, ``device``, ``settings``, ``frames``, and the names of the
input array files ``image``/``mask``) plus those files. Arrays travel as ``.npz`` with ``data`` ([I,J,K],
the nibabel order) and ``affine`` (4x4 IJK->RAS), so geometry is exact and no image library is needed on
the Slicer side. Results go to ``JOB_DIR/out/`` (``result.json`` listing the files) and are written only
when the whole task succeeded.

stdout protocol, one line per event:
    USB-PROGRESS <done> <total> <message>
    USB-RESULT <path of result.json>
    USB-ERROR <one-line message>
    USB-DONE <code>          (``--serve`` only: the job's end; then the next job folder is read)
Exit code (a job's code with ``--serve``): 0 on success, 2 for a user/model error (message in USB-ERROR), 1 for
anything unexpected (after which a serving worker ends: ``USB-DONE 1`` is its last job). A worker that cannot
start (a missing Python module, a bad ``USB_THREADS``) says why in a USB-ERROR line too, and exits with 1 or 2.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

JOB_FILE = "job.json"
RESULT_FILE = "result.json"
OUT_DIR = "out"
TASKS = ("heal", "embed", "generate_from_mask", "generate")
PROGRESS, RESULT, ERROR, DONE = "USB-PROGRESS", "USB-RESULT", "USB-ERROR", "USB-DONE"
SERVE = "--serve"
UNEXPECTED = 1  # exit code of an unexpected failure: a serving worker ends after a job that ends with it


# ----------------------------------------------------------------- array files
def save_array(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write ``data`` [I,J,K] and its IJK->RAS ``affine`` to ``path`` (.npz) atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, data=np.asarray(data), affine=np.asarray(affine, dtype=np.float64))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_array(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` from a file written by ``save_array``."""
    with np.load(Path(path), allow_pickle=False) as f:
        return f["data"], f["affine"]


# ----------------------------------------------------------------- protocol
@dataclass
class Event:
    """One parsed stdout line of the worker."""

    kind: str  # "progress", "result", "error", "done" (``done`` holds the job's exit code) or "log"
    done: int = 0
    total: int = 0
    text: str = ""


def progress_line(done: int, total: int, message: str) -> str:
    return f"{PROGRESS} {int(done)} {int(total)} {' '.join(str(message).split())}"


def parse_line(line: str) -> Event:
    """Event for one line of worker output; anything that is not protocol is a log line."""
    line = line.rstrip("\r\n")
    head, _, rest = line.partition(" ")
    if head == PROGRESS:
        parts = rest.split(" ", 2)
        try:
            return Event("progress", int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "")
        except (ValueError, IndexError):
            return Event("log", text=line)
    if head == RESULT:
        return Event("result", text=rest)
    if head == ERROR:
        return Event("error", text=rest)
    if head == DONE and rest.lstrip("-").isdigit():
        return Event("done", int(rest))
    return Event("log", text=line)


def write_job(job_dir: Path, task: str, settings: dict[str, Any], image: Optional[tuple[np.ndarray, np.ndarray]] = None,
              mask: Optional[tuple[np.ndarray, np.ndarray]] = None, model: Optional[str] = None, device: str = "auto",
              frames: int = 0) -> Path:
    """Write a job folder (inputs + ``job.json``) for ``run_job``; returns the job file."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    job: dict[str, Any] = {"task": task, "model": model, "device": device, "settings": dict(settings),
                           "frames": int(frames)}
    for role, value in (("image", image), ("mask", mask)):
        if value is not None:
            job[role] = save_array(job_dir / f"{role}.npz", *value).name
    path = job_dir / JOB_FILE
    path.write_text(json.dumps(job, indent=1))
    return path


# ----------------------------------------------------------------- running
def _model_stamp(model: Optional[str]) -> tuple:
    """What identifies a bundle folder's contents (names, sizes, modification times); () for an installed name."""
    folder = Path(model) if model else None
    if folder is None or not folder.is_dir():
        return ()
    return tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file()))


def _editor(model: Optional[str], device: str, kept: Optional[dict]):
    """The ``Editor`` for a job: from ``kept`` (the one a serving worker holds) when the same model, unchanged on
    disk, on the same device; else a new one, which replaces it there."""
    from USBLib.editor.editor import Editor

    if kept is None:
        return Editor(model, device=device)
    key = (model, device, _model_stamp(model))
    if key not in kept:
        kept.clear()  # one model at a time: the previous one's memory goes
        kept[key] = Editor(model, device=device)
    return kept[key]


def run_job(job_dir: Path, progress=None, editors: Optional[dict] = None) -> Path:
    """Run the job in ``job_dir``; returns ``out/result.json``. Raises ``USBError`` for bad input/model.
    ``editors``: a serving worker's kept ``Editor`` (reused for the same model; see ``_editor``)."""
    from USBLib.errors import InputError

    job_dir = Path(job_dir)
    job = json.loads((job_dir / JOB_FILE).read_text())
    task, settings = job["task"], dict(job.get("settings", {}))
    if task not in TASKS:
        raise InputError(f"unknown task {task!r}")
    image = load_array(job_dir / job["image"]) if job.get("image") else None
    mask = load_array(job_dir / job["mask"]) if job.get("mask") else None
    editor = _editor(job.get("model"), job.get("device") or "auto", editors)
    outputs: list[tuple[str, int, np.ndarray, np.ndarray]] = []  # role, index, data, affine
    provenance: dict[str, Any]
    if task in ("heal", "embed"):
        if image is None:
            raise InputError(f"{task} needs an input volume")
        if task == "embed" and mask is None:
            raise InputError("embedding needs a lesion mask")
        common = dict(settings, progress=progress)
        if mask is not None:
            common["mask_affine"] = mask[1]
        if task == "embed" and int(job.get("frames") or 0) >= 2:
            from USBLib.editor.progression import progression

            common.pop("mask_affine", None)
            frames = progression(editor, image[0], image[1], mask[0], int(job["frames"]), **common)
            outputs += [("frame", i, r.image, r.affine) for i, r in enumerate(frames)]
            result = frames[-1]
        else:
            run = editor.heal if task == "heal" else editor.embed
            result = run(image[0], image[1], None if mask is None else mask[0], **common)
        outputs.append(("image", 0, result.image, result.affine))
        if result.uncertainty is not None:
            outputs.append(("uncertainty", 0, result.uncertainty, result.affine))
        provenance = result.provenance
    elif task == "generate_from_mask":
        if mask is None:
            raise InputError("generating a brain for a mask needs the mask")
        ref = {} if image is None else {"reference": image[0], "reference_affine": image[1]}
        result = editor.generate_from_mask(mask[0], mask[1], **ref, progress=progress, **settings)
        outputs.append(("image", 0, result.image, result.affine))
        if result.uncertainty is not None:
            outputs.append(("uncertainty", 0, result.uncertainty, result.affine))
        provenance = result.provenance
    else:
        pairs = editor.generate(int(settings.pop("samples", 1)), progress=progress, **settings)
        for i, pair in enumerate(pairs):
            outputs += [("image", i, pair.image, pair.affine), ("lesion", i, pair.mask, pair.affine)]
        provenance = pairs[0].provenance
    out = job_dir / OUT_DIR
    out.mkdir(exist_ok=True)
    listing = [{"role": role, "index": i, "file": save_array(out / f"{role}_{i:03d}.npz", data, affine).name}
               for role, i, data, affine in outputs]
    result_path = out / RESULT_FILE
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"task": task, "outputs": listing, "provenance": provenance}, indent=1, default=str))
    os.replace(tmp, result_path)
    return result_path


def _emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report(job_dir: Path, editors: Optional[dict] = None) -> int:
    """Run one job, reporting progress, the result or a one-line error on stdout; returns its exit code."""
    from USBLib.errors import USBError

    try:
        result = run_job(job_dir, progress=lambda d, t, m: _emit(progress_line(d, t, m)), editors=editors)
    except USBError as exc:
        _emit(f"{ERROR} {' '.join(str(exc).split())}")
        return 2
    except Exception as exc:  # reported as one line; the traceback goes to stderr for the log
        import traceback

        traceback.print_exc()
        _emit(f"{ERROR} unexpected failure: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return UNEXPECTED
    _emit(f"{RESULT} {result}")
    return 0


def serve(lines: Optional[Iterable[str]] = None) -> int:
    """Run the job folders read one per line from ``lines`` (stdin), each ended by ``USB-DONE <code>``, keeping
    the last model's ``Editor``; returns at the end of input, or 1 after an unexpected failure (whatever state it
    left, the next job gets a fresh process)."""
    editors: dict = {}
    for line in sys.stdin if lines is None else lines:
        if not line.strip():
            continue
        code = _report(Path(line.strip()), editors)
        _emit(f"{DONE} {code}")
        if code == UNEXPECTED:
            return UNEXPECTED
    return 0


def _start() -> int:
    """Set the worker up (torch, its threads from ``USB_THREADS``): 0, or the exit code after a USB-ERROR line that
    says why it cannot (before, only a traceback in the log said so)."""
    import traceback

    from USBLib.errors import USBError

    try:
        from USBLib.editor.editor import threads_from_env

        threads_from_env()
    except USBError as exc:  # e.g. a bad USB_THREADS
        _emit(f"{ERROR} the worker cannot start: {' '.join(str(exc).split())}")
        return 2
    except ImportError as exc:  # torch, MONAI, ... missing or broken in the worker's Python
        traceback.print_exc()
        what = f"the Python module '{exc.name}' is missing" if exc.name else "a Python module could not be imported"
        _emit(f"{ERROR} the worker cannot start: {what} ({' '.join(str(exc).split())}; Python: {sys.executable})")
        return UNEXPECTED
    except Exception as exc:
        traceback.print_exc()
        _emit(f"{ERROR} the worker cannot start: {type(exc).__name__}: {' '.join(str(exc).split())}")
        return UNEXPECTED
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python -m USBLib.apps.worker JOB_DIR`` (one job) or ``... --serve`` (jobs from stdin)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        _emit(f"{ERROR} usage: python -m USBLib.apps.worker JOB_DIR | {SERVE}")
        return 2
    code = _start()
    if code:
        return code
    if argv[0] == SERVE:
        return serve()
    return _report(Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main())
