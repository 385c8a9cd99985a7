"""The background worker process: its command line, environment, progress protocol and cancellation.

Qt-free on purpose: the widget polls ``WorkerProcess.poll()`` from a QTimer, scripts and tests call
``wait()``. Cancelling kills the worker's whole process group (the PythonSlicer launcher and the Python
it starts), so no orphan keeps the CPU or GPU busy.

The process is started the way ``slicer.util.launchConsoleProcess`` starts one (Slicer's startup environment,
console window hidden on Windows, output merged into one pipe), but with ``subprocess.Popen`` directly, because
``launchConsoleProcess`` cannot start the process in its own session / process group, which Cancel needs, nor
read the pipe as UTF-8 line by line.
"""
from __future__ import annotations

import importlib.util
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Optional

from USBLib.apps.worker import Event, parse_line

WORKER_MODULE = "USBLib.apps.worker"


def python_executable() -> str:
    """PythonSlicer inside Slicer (same Python, no GUI), else the current interpreter."""
    return shutil.which("PythonSlicer") or sys.executable


def usblib_parent() -> Path:
    """Folder that holds the ``USBLib`` package (found without importing its heavy parts)."""
    spec = importlib.util.find_spec("USBLib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the USBLib package is not installed next to the USBEditor module")
    return Path(list(spec.submodule_search_locations)[0]).parent


def worker_command(job_dir: Path, python: Optional[str] = None) -> list[str]:
    """Command line that runs the job in ``job_dir``."""
    return [python or python_executable(), "-u", "-m", WORKER_MODULE, str(job_dir)]


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


class WorkerProcess:
    """One running worker. ``poll()`` returns the events seen since the last call, without blocking."""

    def __init__(self, job_dir: Path, device: str = "auto", python: Optional[str] = None,
                 threads: Optional[int] = None):
        self.job_dir = Path(job_dir)
        self.command = worker_command(self.job_dir, python)
        self.log: list[str] = []
        self.error: Optional[str] = None
        self.result: Optional[Path] = None
        self.cancelled = False
        self._events: "queue.Queue[Event]" = queue.Queue()
        kwargs = popen_options()
        self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, text=True, encoding="utf-8", errors="replace",
                                      bufsize=1,
                                      env=worker_environment(device, threads), **kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._events.put(parse_line(line))
        self._proc.stdout.close()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None or self._reader.is_alive()

    @property
    def returncode(self) -> Optional[int]:
        return None if self.running else self._proc.returncode

    def poll(self) -> list[Event]:
        """Events received so far (progress, log, result, error); also records the log, result and error."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event.kind == "log":
                self.log.append(event.text)
            elif event.kind == "result":
                self.result = Path(event.text)
            elif event.kind == "error":
                self.error = event.text
            events.append(event)
        return events

    def cancel(self, timeout: float = 10.0) -> None:
        """Stop the worker and every process it started; returns when they are gone."""
        self.cancelled = True
        if self._proc.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._proc.pid)], capture_output=True)
                else:
                    os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._proc.wait(timeout)
        self._reader.join(timeout)

    def wait(self, on_event: Optional[Callable[[Event], Optional[bool]]] = None, interval: float = 0.05) -> int:
        """Block until the worker ends; ``on_event`` returning False cancels it. Returns the exit code."""
        while True:
            finished = not self.running
            for event in self.poll():
                if on_event is not None and on_event(event) is False:
                    self.cancel()
                    return self._proc.returncode
            if finished:
                self.poll()
                return self._proc.returncode
            self._reader.join(interval)
