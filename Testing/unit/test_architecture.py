"""The engine's layering (``.importlinter``): apps > editor > (imaging | core), imaging without torch, leaves
that import no layer, the engine never importing the training package. Checked with import-linter."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='.importlinter'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "7 kept, 0 broken" in done.stdout


def test_no_module_left_in_the_old_flat_layout():
    flat = sorted(p.name for p in (ROOT / "USBLib").glob("*.py"))
    assert flat == ["__init__.py", "errors.py", "hashing.py", "settings.py"], flat
