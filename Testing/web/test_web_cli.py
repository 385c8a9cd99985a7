"""``usb web`` from the command line without the [web] extra: one line naming the extra, exit code 2."""
from __future__ import annotations

import subprocess
import sys

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
