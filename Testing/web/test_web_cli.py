"""``usb web`` from the command line: without the [web] extra, or on a port in use, one line and exit code 2."""
from __future__ import annotations

import socket
import subprocess
import sys

import pytest

NO_WEB_EXTRA = ("import sys; sys.modules['trame'] = None  # as if the [web] extra were not installed\n"
                "from USBLib.apps.cli import main; sys.exit(main(['web', '--port', '0']))")


def test_usb_web_without_the_extra_says_how_to_install_it():
    done = subprocess.run([sys.executable, "-c", NO_WEB_EXTRA], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "usb: error: usb web needs the [web] extra (trame is missing): install with pip install 'usb-slicer[web]'"]


def test_usb_web_options():
    done = subprocess.run([sys.executable, "-m", "USBLib.apps.cli", "web", "--help"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0
    for option in ("--port", "--host", "--model", "--device", "--max-upload-mb"):
        assert option in done.stdout


def test_usb_web_on_a_port_in_use_is_one_line_and_exit_code_2():
    """A port another program listens on: the CLI's input error (it was 'internal error: OSError ... rerun with
    --debug', an option ``usb web`` does not have, and exit code 1), before the page starts."""
    pytest.importorskip("trame_slicer", reason="usb web needs the [web] extra (pip install -e '.[test]')")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "USBLib.apps.cli", "web", "--host", "127.0.0.1", "--port",
                               str(port)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (f"usb: error: port {port} on 127.0.0.1 is in use: choose "
                                                    "another with --port")
    assert "private folder" not in done.stdout


def test_a_port_taken_after_the_check_is_the_same_one_line():
    """The port taken between the check and the server's own bind: the same line and exit code."""
    pytest.importorskip("trame_slicer", reason="usb web needs the [web] extra (pip install -e '.[test]')")
    racing = ("import sys, USBWeb.server as s; s.check_port = lambda host, port: None\n"
              "from USBLib.apps.cli import main; sys.exit(main(['web', '--port', sys.argv[1]]))")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-c", racing, str(port)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (f"usb: error: port {port} on 127.0.0.1 is in use: choose "
                                                    "another with --port")
