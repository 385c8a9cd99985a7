"""One edit at a time: ``USBEditorLib``'s ``EditorLogic`` starts the background worker, this watches it from the
server's event loop (progress, Cancel) and imports the result, so the page stays responsive while it runs."""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from USBEditorLib import logic as L
from USBLib.apps.worker import JOB_FILE, load_array

from .document import Result

POLL_S = 0.2
BUSY = "An edit is already running: wait for it to finish or press Cancel."


@dataclass
class Progress:
    """What the progress bar shows."""

    percent: float
    text: str


def _mask_of(run: L.Run) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """The lesion mask the worker was given (on the scan's grid), read back from its job folder."""
    job = json.loads((run.job_dir / JOB_FILE).read_text())
    return load_array(run.job_dir / job["mask"]) if job.get("mask") else None


def progress_of(done: int, total: int, text: str, elapsed: float) -> Progress:
    """Percent and a line like Slicer's progress bar: the stage, and the time left once a step is done."""
    left = f", {elapsed * (total - done) / done:.0f} s left" if done and done < total else ""
    return Progress(100.0 * done / total if total else 0.0, f"{text or 'Running'}{left}")


class EditJobs:
    """Runs edits one at a time on a shared ``EditorLogic``; a second start while one runs is refused."""

    def __init__(self, logic: Optional[L.EditorLogic] = None, model: Optional[str] = None, device: str = "auto"):
        self.logic = logic or L.EditorLogic()
        self.model = model
        self.device = L.Device(device)
        self.run: Optional[L.Run] = None
        self._mask: Optional[tuple[np.ndarray, np.ndarray]] = None

    @property
    def running(self) -> bool:
        return self.run is not None

    def start(self, task: L.Task, volume, segmentation, segment_id: str, settings: L.RunSettings,
              resample_mask: bool = True) -> L.Run:
        """Check the inputs and start the worker (``EditorLogic.start``); ``USBEditorError`` for bad input or
        when an edit is already running."""
        if self.run is not None:
            raise L.USBEditorError(BUSY)
        mask = segmentation if L.TASK_INFO[L.Task(task)]["mask"] != "unused" else None
        run = self.logic.start(task, volume, mask, segment_id or None, settings, self.model, self.device,
                               resample_mask=resample_mask)
        self.run, self._mask = run, _mask_of(run)
        return run

    def cancel(self) -> bool:
        """Stop the running edit (its worker and files); True if one was running."""
        run, self.run = self.run, None
        if run is None:
            return False
        self.logic.cancel(run)
        return True

    async def watch(self, on_progress: Callable[[Progress], None]) -> Optional[Result]:
        """Report progress until the worker ends; the imported ``Result``, or None if it was cancelled.
        Raises ``USBEditorError`` with the worker's one-line message when the run failed."""
        run = self.run
        if run is None:
            return None
        while True:
            for event in run.process.poll():
                if event.kind == "progress" and event.total > 0:
                    on_progress(progress_of(event.done, event.total, event.text, time.perf_counter() - run.started))
            if self.run is not run:  # cancelled meanwhile
                return None
            if not run.process.running:
                break
            await asyncio.sleep(POLL_S)
        self.run = None
        outputs = self.logic.finish(run)
        engine = float(sum(outputs.provenance.get("timings_s", {}).values()))
        return Result(outputs, run.task, self._mask, engine)
