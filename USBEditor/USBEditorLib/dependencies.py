"""Python packages the USB worker needs inside Slicer, and how they get installed (with the user's consent).

torch comes only through the PyTorch extension's installer (it picks the CUDA/CPU build matching the
machine); the rest with pip. Slicer's own packages (SimpleITK, numpy, vtk, ...) are never replaced:
packages that would pull them in are installed with ``--no-deps``, and those installed with their dependencies
(nibabel, scipy) under a pip constraints file that pins the installed versions of ``PROTECTED`` packages (without
it pip could upgrade Slicer's numpy to satisfy them). Checking is pure metadata, so it is fast and imports nothing.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Callable, Iterator, Optional, Sequence

from packaging.requirements import Requirement

TORCH_REQUIREMENT = "torch>=2.8"  # the minimums match pyproject.toml (a test checks)
# name -> (requirement, install without dependencies: they are Slicer's or torch)
PIP_REQUIREMENTS: dict[str, tuple[str, bool]] = {
    "monai": ("monai>=1.5", True),
    "nibabel": ("nibabel>=5.0", False),
    "safetensors": ("safetensors>=0.4", True),
    "einops": ("einops>=0.8", True),
    "scipy": ("scipy>=1.10", False),
    "tqdm": ("tqdm>=4.60", True),
}
PROTECTED = ("SimpleITK", "numpy", "vtk", "torch", "requests")


class DependencyError(RuntimeError):
    """A dependency cannot be installed here; the message says what the user should do."""

    def __init__(self, message: str, restart_required: bool = False):
        super().__init__(message)
        self.restart_required = restart_required


def _satisfied(requirement: str) -> bool:
    req = Requirement(requirement)
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(installed, prereleases=True)


@dataclass
class InstallPlan:
    """What is missing: torch (via the PyTorch extension) and pip packages."""

    torch: bool = False
    pip: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.torch and not self.pip

    def describe(self) -> str:
        """Text for the one confirmation dialog."""
        lines = []
        if self.torch:
            lines.append(f"- {TORCH_REQUIREMENT} (through the PyTorch extension; several GB with CUDA)")
        lines += [f"- {PIP_REQUIREMENTS[name][0]}" for name in self.pip]
        return ("USB needs these Python packages, which are not installed yet:\n" + "\n".join(lines) +
                "\n\nThey are downloaded from the internet (PyPI / pytorch.org) and may take several minutes. "
                f"Slicer's own packages ({', '.join(PROTECTED[:3])}) are left as they are. Install now?")


def install_plan(packages: Optional[Sequence[str]] = None) -> InstallPlan:
    """Which of torch and ``packages`` (default: all of USB's) are missing or too old."""
    names = list(PIP_REQUIREMENTS) if packages is None else list(packages)
    return InstallPlan(torch=not _satisfied(TORCH_REQUIREMENT),
                       pip=[n for n in names if not _satisfied(PIP_REQUIREMENTS[n][0])])


def protected_pins() -> list[str]:
    """``name==version`` of each installed ``PROTECTED`` package (read now: torch may have just been installed)."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:  # e.g. Slicer's vtk, which is no pip package
            pass
    return pins


@contextmanager
def _constraints_file() -> Iterator[str]:
    """A pip constraints file of ``protected_pins``, removed afterwards."""
    folder = tempfile.mkdtemp(prefix="usb-pip-")
    try:
        path = os.path.join(folder, "constraints.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write("".join(f"{pin}\n" for pin in protected_pins()))
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pytorch_installer() -> Callable[[str], None]:
    """``installTorch`` of the PyTorch extension (PyTorchUtils), or a DependencyError telling how to get it."""
    try:
        import PyTorchUtils  # provided by the PyTorch extension (EXTENSION_DEPENDS)
    except ImportError:
        raise DependencyError("USB needs the 'PyTorch' extension to install torch: install it from the "
                              "Extensions Manager, restart Slicer and press Apply again.") from None

    def install(requirement: str) -> None:
        logic = PyTorchUtils.PyTorchUtilsLogic()
        spec = requirement[len("torch"):]
        if logic.installTorch(askConfirmation=False, torchVersionRequirement=spec) is None:
            raise DependencyError("PyTorch could not be installed; see the Python console for pip's message.")

    return install


def install(plan: InstallPlan, pip_install: Optional[Callable[[list[str]], None]] = None,
            torch_installer: Optional[Callable[[str], None]] = None,
            log: Callable[[str], None] = print) -> None:
    """Carry out ``plan``. ``pip_install`` defaults to ``slicer.util.pip_install`` (given a list of pip arguments).
    A package installed with its dependencies gets ``-c CONSTRAINTS``: Slicer's own packages stay at their versions
    (pip fails, with a message, where that cannot be)."""
    if pip_install is None:
        import slicer.util

        pip_install = slicer.util.pip_install
    if plan.torch:
        log(f"Installing {TORCH_REQUIREMENT} with the PyTorch extension...")
        (torch_installer or _pytorch_installer())(TORCH_REQUIREMENT)
    for name in plan.pip:
        requirement, no_deps = PIP_REQUIREMENTS[name]
        log(f"Installing {requirement}...")
        try:
            if no_deps:
                pip_install(["--no-deps", requirement])
            else:
                with _constraints_file() as constraints:
                    pip_install([requirement, "-c", constraints])
        except Exception as exc:  # pip's CalledProcessError: say which package, keep Slicer usable
            raise DependencyError(f"Installing {requirement} failed ({exc}); check the network connection "
                                  "and disk space, then press Apply again.") from None
    still = install_plan(plan.pip)
    if still.pip:
        raise DependencyError(f"{', '.join(still.pip)} still missing after installation; "
                              "restart Slicer and try again.", restart_required=True)
