"""The background worker process: its command line, environment, progress protocol and cancellation.

Qt-free on purpose: the widget polls ``WorkerProcess.poll()`` from a QTimer, scripts and tests call
``wait()``. Cancelling kills the worker's whole process group (the PythonSlicer launcher and the Python
it starts), so no orphan keeps the CPU or GPU busy.

The worker is kept warm between runs (``python -m USBLib.apps.worker --serve``, one job folder per line on its
stdin): a second edit skips the 6-7 s of importing torch and MONAI and loading the model. An idle worker is sent
away after ``USB_WORKER_IDLE_S`` seconds (default 600; 0 = after every run), which frees its memory (GPU
included); it also ends when this process does (its stdin closes), after a cancel (killed) and after an
unexpected failure.

The process is started the way ``slicer.util.launchConsoleProcess`` starts one (Slicer's startup environment,
console window hidden on Windows, output merged into one pipe), but with ``subprocess.Popen`` directly, because
``launchConsoleProcess`` cannot start the process in its own session / process group, which Cancel needs, nor
read the pipe as UTF-8 line by line.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

from USBLib.apps.worker import SERVE, UNEXPECTED, Event, parse_line

WORKER_MODULE = "USBLib.apps.worker"
IDLE_SECONDS = 600.0  # an idle warm worker is sent away after this (``USB_WORKER_IDLE_S`` overrides; 0 = at once)
# variables that may differ between two runs on one warm worker: read by this process only, or set per test by pytest
UNUSED_BY_WORKER = frozenset({"USB_WORKER_IDLE_S", "PYTEST_CURRENT_TEST"})


def python_executable() -> str:
    """PythonSlicer inside Slicer (same Python, no GUI), else the current interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def usblib_parent() -> Path:
    """Folder that holds the ``USBLib`` package (found without importing its heavy parts)."""
    spec = importlib.util.find_spec("USBLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the USBLib package is not installed next to the USBEditor module")
    return Path(list(spec.submodule_search_locations)[0]).parent


def worker_command(job_dir: Optional[Path] = None, python: Optional[str] = None) -> list[str]:
    """Command line that runs the job in ``job_dir``; without one, the warm worker's (``--serve``)."""
    return [python or python_executable(), "-u", "-m", WORKER_MODULE, SERVE if job_dir is None else str(job_dir)]


def idle_seconds() -> float:
    """How long a warm worker may wait for the next run: ``USB_WORKER_IDLE_S``, else ``IDLE_SECONDS``."""
    try:
        return max(0.0, float(os.environ.get("USB_WORKER_IDLE_S", IDLE_SECONDS)))
    except ValueError:
        return IDLE_SECONDS


def base_environment() -> dict[str, str]:
    """Inside Slicer, ``slicer.util.startupEnvironment()`` (the environment Slicer was started with, without its
    launcher's settings, which PythonSlicer sets again); elsewhere (tests, scripts) this process's environment."""
    try:
        import slicer

        if getattr(slicer, "app", None) is not None:
            return dict(slicer.util.startupEnvironment())
    except (ImportError, AttributeError):
        pass
    return dict(os.environ)


# Windows constants (subprocess has them only on Windows)
CREATE_NEW_PROCESS_GROUP = 0x00000200
CREATE_NO_WINDOW = 0x08000000
STARTF_USESHOWWINDOW = 0x00000001
SW_HIDE = 0


def popen_options(os_name: str = os.name, startupinfo_factory: Optional[Callable[[], Any]] = None) -> dict[str, Any]:
    """Popen keyword arguments that put the worker in its own process group (so Cancel kills the launcher and
    the Python it starts) and, on Windows, hide its console window like ``launchConsoleProcess`` does."""
    if os_name != "nt":
        return {"start_new_session": True}
    info = (startupinfo_factory or subprocess.STARTUPINFO)()
    info.dwFlags |= STARTF_USESHOWWINDOW
    info.wShowWindow = SW_HIDE
    return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW, "startupinfo": info}


def worker_environment(device: str = "auto", threads: Optional[int] = None,
                       base: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Environment of the worker: Slicer's startup environment (``base_environment``), USBLib importable,
    UTF-8 output; ``cpu`` hides GPUs so nothing touches them."""
    env = dict(base_environment() if base is None else base)
    parent = str(usblib_parent())
    env["PYTHONPATH"] = os.pathsep.join([parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"  # messages may hold non-ASCII (e.g. mm³, ×) whatever the console code page
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if threads:
        env["USB_THREADS"] = str(int(threads))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Kill ``proc`` and every process it started (its process group / job tree)."""
    if proc.poll() is None:
        try:
            if os.name == "nt":
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(proc.pid)], capture_output=True)
            else:
                os.killpg(proc.pid, signal.SIGKILL)
        except OSError:  # gone already (ProcessLookupError), not ours, or no taskkill: nothing left to do
            pass


class _WarmWorker:
    """One ``--serve`` worker process: runs one job at a time, handing each job's events to that job's queue.

    Events end with ``Event("done", code)``: the worker's ``USB-DONE`` line, or, when the process ends during a
    job, its exit code. The first job is given to the constructor: it is attached before any output is read, so the
    message of a worker that cannot start (a USB-ERROR line, then its exit) reaches it."""

    def __init__(self, command: list[str], env: dict[str, str], job_dir: Path, job: "queue.Queue[Event]"):
        self.command, self.env = command, env
        self._lock = threading.Lock()
        self._job: Optional["queue.Queue[Event]"] = job  # the running job's events; None while idle
        self._closed = False
        self._leaving = False  # sent away: ends at its run's end instead of waiting for the next
        self._timer: Optional[threading.Timer] = None
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                     bufsize=1, env=env, **popen_options())
        if not self._write(job_dir):  # ended already: its output and exit code still reach the job
            self._closed = True
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            event = parse_line(line)
            with self._lock:
                job = self._job
                if event.kind == "done":
                    self._job = None
                    # after an unexpected failure the worker ends (``serve``): a next job written to it was lost
                    if self._leaving or event.done == UNEXPECTED:
                        self._close()
                    else:
                        self._idle_timer()
            if job is not None:
                job.put(event)
        self.proc.stdout.close()
        code = self.proc.wait()
        with self._lock:
            job, self._job, self._closed = self._job, None, True
        if job is not None:
            job.put(Event("done", code if code != 0 else 1))  # ended during the run (killed, crashed)

    def _idle_timer(self) -> None:  # with the lock held
        seconds = idle_seconds()
        if seconds <= 0:
            self._close()
            return
        self._timer = threading.Timer(seconds, self._close_if_idle)
        self._timer.daemon = True
        self._timer.start()

    def _close_if_idle(self) -> None:
        with self._lock:
            if self._job is None:
                self._close()

    def leave(self) -> None:
        """End now if idle, else at the end of the run in progress."""
        with self._lock:
            self._leaving = True
            if self._job is None:
                self._close()

    def _close(self) -> None:  # with the lock held: end of input, so the worker exits
        self._closed = True
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        except OSError:
            pass

    def submit(self, job_dir: Path, job: "queue.Queue[Event]") -> bool:
        """Start ``job_dir`` on this worker if it is idle and alive; False otherwise."""
        with self._lock:
            if self._job is not None or self._closed or self.proc.poll() is not None:
                return False
            if self._timer is not None:
                self._timer.cancel()
            if not self._write(job_dir):
                self._closed = True
                return False
            self._job = job
            return True

    def _write(self, job_dir: Path) -> bool:
        """Send ``job_dir`` to the worker; False when it can no longer read (ended)."""
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(f"{job_dir}\n")
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    @property
    def usable(self) -> bool:
        with self._lock:
            return not self._closed and self.proc.poll() is None

    def kill(self, timeout: float = 10.0) -> None:
        with self._lock:
            self._closed = True
        _kill_group(self.proc)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # killed but not yet reaped (a process in uninterruptible I/O): the
            logging.warning("USBEditor: a worker (pid %d) did not end within %.0f s of being killed", self.proc.pid,
                            timeout)  # cancel and scene close go on; the OS reaps it


_WARM: list[_WarmWorker] = []
_WARM_LOCK = threading.Lock()


def _start_on_warm_worker(job_dir: Path, command: list[str], env: dict[str, str],
                          job: "queue.Queue[Event]") -> _WarmWorker:
    """Start the job on an idle warm worker started with the same command and environment (but for
    ``UNUSED_BY_WORKER``), or on a new one."""
    def same(a: dict[str, str], b: dict[str, str]) -> bool:
        return {k: v for k, v in a.items() if k not in UNUSED_BY_WORKER} == \
            {k: v for k, v in b.items() if k not in UNUSED_BY_WORKER}

    with _WARM_LOCK:
        _WARM[:] = [w for w in _WARM if w.usable]
        for worker in _WARM:
            if worker.command == command and same(worker.env, env) and worker.submit(job_dir, job):
                return worker
        worker = _WarmWorker(command, env, job_dir, job)
        _WARM.append(worker)
    return worker


def close_warm_workers() -> None:
    """Send every warm worker away (the module's cleanup: Slicer closing, the module reloading); one in the middle
    of a run finishes it first."""
    with _WARM_LOCK:
        for worker in _WARM:
            worker.leave()
        _WARM.clear()


class WorkerProcess:
    """One run on a (warm) worker. ``poll()`` returns the events seen since the last call, without blocking."""

    def __init__(self, job_dir: Path, device: str = "auto", python: Optional[str] = None,
                 threads: Optional[int] = None):
        self.job_dir = Path(job_dir)
        self.command = worker_command(None, python)
        self.log: list[str] = []
        self.error: Optional[str] = None
        self.result: Optional[Path] = None
        self.cancelled = False
        self._code: Optional[int] = None
        self._events: "queue.Queue[Event]" = queue.Queue()
        self._pending: list[Event] = []  # received, not yet returned by ``poll``
        self._worker = _start_on_warm_worker(self.job_dir, self.command, worker_environment(device, threads),
                                             self._events)

    @property
    def pid(self) -> int:
        """The process id of the worker running this run (the same for runs on one warm worker)."""
        return self._worker.proc.pid

    def _receive(self) -> None:
        """Move the worker's events into ``_pending``; its end (``done``) sets the exit code."""
        while self._code is None:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event.kind == "done":
                self._code = event.done
            else:
                self._pending.append(event)

    @property
    def running(self) -> bool:
        self._receive()
        return self._code is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.running else self._code

    def poll(self) -> list[Event]:
        """Events received so far (progress, log, result, error); also records the log, result and error."""
        self._receive()
        events, self._pending = self._pending, []
        for event in events:
            if event.kind == "log":
                self.log.append(event.text)
            elif event.kind == "result":
                self.result = Path(event.text)
            elif event.kind == "error":
                self.error = event.text
        return events

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop the run and every process its worker started; returns when they are gone."""
        self.cancelled = True
        if self.running:
            self._worker.kill(timeout)
            self._code = self._worker.proc.returncode

    def wait(self, on_event: Optional[Callable[[Event], Optional[bool]]] = None, interval: float = 0.05) -> int:
        """Block until the run ends; ``on_event`` returning False cancels it. Returns the exit code."""
        while True:
            for event in self.poll():  # every event up to the end, when it has come
                if on_event is not None and on_event(event) is False:
                    self.cancel()
                    return self._code
            if self._code is not None:
                return self._code
            time.sleep(interval)
