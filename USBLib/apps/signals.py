"""SIGTERM handled as Ctrl-C, for the command line and the batch workers.

A scheduler (SLURM at its time limit) and ``kill`` send SIGTERM; Python's default is to die at once, without the
clean-ups Ctrl-C runs. Here it raises ``Terminated``, a ``KeyboardInterrupt``: temporary files are removed,
nothing half-written is left, a batch records the scan it was working on as not done, and the CLI exits 143.
"""
from __future__ import annotations

import signal
import threading

from USBLib.errors import Terminated


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def terminate_as_interrupt():
    """Install the SIGTERM handler that raises ``Terminated``; returns the previous handler, or None when not in
    the main thread (where Python allows no signal handler)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)
