"""Shared training plumbing: seeds, threads, checkpoints in safetensors (no pickle), loss history and curves."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

CHECKPOINT = "checkpoint.safetensors"
HISTORY = "history.json"


def build_aside(final: Path, build: Callable[[Path], Any]) -> None:
    """Run ``build(folder)`` on a new temporary sibling folder of ``final`` and, when it returns, put that folder in
    place of ``final`` (replacing what is there); if ``build`` raises, ``final`` stays as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    built = Path(tempfile.mkdtemp(prefix=f".{final.name}.new.", dir=final.parent))
    try:
        build(built)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=final.parent))
            old.rmdir()
            final.rename(old)
            built.rename(final)
            shutil.rmtree(old)
        else:
            built.rename(final)
    finally:
        if built.exists():
            shutil.rmtree(built)


def cli_main(main: Callable[..., int]) -> Callable[..., int]:
    """A training command's ``main`` whose expected failures (bad input or environment: no network for a download,
    a folder that cannot be written, a stage run before the one it needs, a refused resume) end with one line on
    stderr and exit code 2, and Ctrl-C with one line and 130 (the last checkpoint is kept), instead of a traceback.
    ``USB_TRACEBACK=1`` shows the traceback."""
    import functools
    import sys

    from USBLib.errors import USBError

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print(f"{_prog(main)}: interrupted; the last checkpoint is kept and the same command resumes",
                  file=sys.stderr)
            return 130
        except (USBError, OSError, RuntimeError, ValueError) as exc:
            if os.environ.get("USB_TRACEBACK"):
                raise
            message = " ".join(str(exc).split()) or type(exc).__name__
            print(f"{_prog(main)}: error: {message} (USB_TRACEBACK=1 shows where)", file=sys.stderr)
            return 2

    return run


def _prog(main: Callable) -> str:
    """The command's name as ``python -m`` runs it: the module of its ``main``."""
    spec = main.__globals__.get("__spec__")  # (run with -m, the module is called __main__; its spec has the name)
    module = spec.name if spec is not None else main.__module__
    return "python -m " + (module[: -len(".__main__")] if module.endswith(".__main__") else module)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads() -> None:
    """Use every core the process may use (``USB_THREADS`` overrides)."""
    n = int(os.environ.get("USB_THREADS", 0)) or len(os.sched_getaffinity(0))
    torch.set_num_threads(max(1, n))


def save_checkpoint(folder: Path, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer | None,
                    meta: Mapping[str, Any]) -> Path:
    """Weights, optimizer moments and JSON metadata in one safetensors file, written atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{name}/{key}"] = value.detach().cpu().contiguous()
    groups: list[dict[str, Any]] = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, slots in state["state"].items():
            for slot, value in slots.items():
                tensors[f"optimizer/{idx}/{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
        groups = state["param_groups"]
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / CHECKPOINT
    tmp = folder / (CHECKPOINT + ".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(dict(meta)), "param_groups": json.dumps(groups)})
    os.replace(tmp, target)
    return target


def load_checkpoint(folder: Path, modules: Mapping[str, nn.Module],
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any] | None:
    """Restore a checkpoint written by ``save_checkpoint``; returns its metadata, or None when there is none."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as fh:
        header = fh.metadata()
    for name, module in modules.items():
        prefix = f"{name}/"
        module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optimizer/"):
                _, idx, slot = key.split("/", 2)
                state.setdefault(int(idx), {})[slot] = value
        if state:
            optimizer.load_state_dict({"state": state, "param_groups": json.loads(header["param_groups"])})
    return json.loads(header["meta"])


def module_weights(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """State dict of one module stored in a checkpoint (for export)."""
    from safetensors.torch import load_file

    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in load_file(str(Path(folder) / CHECKPOINT)).items() if k.startswith(prefix)}


PLOT_SECONDS = 300.0  # loss.png is redrawn at most this often during a run (a drawing takes 0.3-0.7 s)


class History:
    """Loss history of a stage (``history.json``) and its PNG curves."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / HISTORY
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {
            "train": [], "val": [], "seconds": 0.0}
        self._plotted = time.monotonic()  # a run's first checkpoint draws no curve of its first steps

    def log(self, split: str, step: int, **values: float) -> None:
        self.data[split].append({"step": step, **{k: float(v) for k, v in values.items()}})

    def validated_at(self, step: int) -> bool:
        """Whether the last validation entry is for ``step`` (so a final validation is not repeated)."""
        return bool(self.data["val"]) and self.data["val"][-1]["step"] == step

    def save(self, title: str, final: bool = True) -> None:
        """Write history.json; redraw loss.png at a run's ``final`` save, else at most every ``PLOT_SECONDS``."""
        self.path.write_text(json.dumps(self.data, indent=1))
        if final or time.monotonic() - self._plotted >= PLOT_SECONDS:
            plot_curves(self.data, self.path.with_name("loss.png"), title)
            self._plotted = time.monotonic()


def plot_curves(data: Mapping[str, Any], out: Path, title: str) -> None:
    """Training (smoothed) and validation losses against step, log scale. Skipped where matplotlib is not
    installed (a lent GPU machine): the numbers are in history.json either way."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("val", "o-")):
        rows = data.get(split, [])
        if not rows:
            continue
        steps = np.array([r["step"] for r in rows])
        for key in [k for k in rows[0] if k != "step"]:
            values = np.array([r[key] for r in rows], float)
            if split == "train" and values.size > 20:
                kernel = np.ones(20) / 20
                values = np.convolve(values, kernel, mode="valid")
                steps_k = steps[19:]
            else:
                steps_k = steps
            ax.plot(steps_k, values, style, label=f"{split} {key}", markersize=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:  # (a history carried over by warm_start has no losses yet)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


class Budget:
    """Stops a loop after ``steps`` or ``minutes`` of wall time, whichever comes first."""

    def __init__(self, minutes: float | None, first_step: int = 0):
        self.start = time.monotonic()
        self.limit = None if not minutes else minutes * 60.0
        self.first_step = first_step

    def over(self) -> bool:
        return self.limit is not None and time.monotonic() - self.start > self.limit

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def progress_step(self, step: int, total: int) -> int:
        """The step a schedule should use: ``step``, or under a time budget the share of ``total`` that the
        elapsed share of the budget stands for when that is further (so learning-rate decay and phase changes
        happen within the budget, not only at ``total``)."""
        if self.limit is None:
            return step
        return max(step, min(total - 1, int(total * self.elapsed() / self.limit)))

    def rewarm(self, step: int, warmup: int) -> float:
        """Learning-rate factor in (0, 1]: after a resume (``first_step`` > 0) the rate ramps up again linearly
        over ``warmup`` steps, so a run whose schedule had decayed does not jump back to a large rate at once."""
        if self.first_step <= 0 or warmup <= 0:
            return 1.0
        return min(1.0, (step - self.first_step + 1) / warmup)


def warmup_cosine(step: int, total: int, base_lr: float, warmup: int, floor: float = 0.02) -> float:
    """Learning rate at ``step``: linear warm-up over ``warmup`` steps, then a cosine decay to ``floor * base_lr``
    at ``total``."""
    import math

    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def adamw(params, lr: float) -> torch.optim.Optimizer:
    """AdamW, fused where this torch build supports it (the CPU speed lever for training)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def stage_main(doc: str, train: Callable[..., Path], argv: list[str] | None = None) -> int:
    """Command line of a training stage: ``--tier --work [--minutes] [--steps] [--seed] [--device]``."""
    from .config import tier

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    from usb_training.base.config import TIERS

    parser.add_argument("--tier", choices=list(TIERS), default="tiny")
    parser.add_argument("--work", type=Path, required=True, help="run folder")
    parser.add_argument("--minutes", type=float, default=None, help="wall-time budget of this run")
    parser.add_argument("--steps", type=int, default=None, help="total steps (default: the tier's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = parser.parse_args(argv)
    print(train(tier(args.tier), args.work, args.minutes, args.steps, args.seed, device=args.device))
    return 0
