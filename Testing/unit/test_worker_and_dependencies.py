"""The background worker's protocol and files, progression masks, and the Slicer dependency plan."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from USBLib.errors import InputError
from USBLib.editor.progression import growing_masks
from USBLib.apps.worker import load_array, parse_line, progress_line, save_array, write_job

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "USBEditor"))
from USBEditorLib import dependencies  # noqa: E402


def test_progress_lines_round_trip_and_other_lines_are_logs():
    event = parse_line(progress_line(3, 12, "denoising\n step") + "\n")
    assert (event.kind, event.done, event.total, event.text) == ("progress", 3, 12, "denoising step")
    assert parse_line("USB-RESULT /tmp/x/out/result.json").text == "/tmp/x/out/result.json"
    assert parse_line("USB-ERROR the lesion mask is empty").kind == "error"
    assert parse_line("USB-PROGRESS a b c").kind == "log"
    assert parse_line("some warning from torch").kind == "log"


def test_arrays_travel_with_their_affine(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    affine = np.array([[0, -1.5, 0, 10], [2, 0, 0, -3], [0, 0, 0.7, 5], [0, 0, 0, 1]], float)
    back, aff = load_array(save_array(tmp_path / "a.npz", data, affine))
    assert back.dtype == np.int16 and np.array_equal(back, data) and np.array_equal(aff, affine)
    assert [p.name for p in tmp_path.iterdir()] == ["a.npz"]  # no temporary left behind


def test_write_job_refuses_unknown_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        write_job(tmp_path, "paint", {})


def test_worker_reports_bad_jobs_in_one_line(tmp_path):
    write_job(tmp_path, "embed", {"steps": 2}, image=(np.zeros((4, 4, 4), np.float32), np.eye(4)))
    done = subprocess.run([sys.executable, "-m", "USBLib.apps.worker", str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stdout.strip().splitlines()[-1] == "USB-ERROR embedding needs a lesion mask"
    assert not (tmp_path / "out").exists()
    usage = subprocess.run([sys.executable, "-m", "USBLib.apps.worker"], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stdout.startswith("USB-ERROR usage")


def test_a_serving_worker_reports_each_job_to_its_end_and_keeps_serving_after_a_bad_one(tmp_path, capsys):
    from USBLib.apps import worker

    write_job(tmp_path / "a", "embed", {"steps": 2}, image=(np.zeros((4, 4, 4), np.float32), np.eye(4)))
    write_job(tmp_path / "b", "heal", {"steps": 2}, image=(np.zeros((4, 4, 4), np.float32), np.eye(4)),
              model=str(tmp_path / "no-such-model"))
    assert worker.serve([f"{tmp_path / 'a'}\n", "\n", f"{tmp_path / 'b'}\n"]) == 0
    events = [parse_line(line) for line in capsys.readouterr().out.splitlines()]
    assert [(e.kind, e.done) for e in events if e.kind in ("error", "done")] == [("error", 0), ("done", 2),
                                                                               ("error", 0), ("done", 2)]
    assert events[0].text == "embedding needs a lesion mask" and "no-such-model" in events[2].text
    assert parse_line("USB-DONE 0").kind == "done" and parse_line("USB-DONE x").kind == "log"


def test_a_worker_that_cannot_start_says_why_in_one_line(monkeypatch, capsys):
    """torch missing from the worker's Python, or a bad ``USB_THREADS``: a USB-ERROR line that says so (it raised
    a traceback, and the panel said only "The worker stopped with exit code 1")."""
    import USBLib.editor.editor  # noqa: F401  (loaded: only its torch import fails below)
    from USBLib.apps import worker

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "torch", None)  # import torch: ModuleNotFoundError, name 'torch'
        assert worker.main([worker.SERVE]) == 1
    last = capsys.readouterr().out.splitlines()[-1]
    assert last.startswith("USB-ERROR the worker cannot start: the Python module 'torch' is missing")
    monkeypatch.setenv("USB_THREADS", "abc")
    assert worker.main([worker.SERVE]) == 2
    assert capsys.readouterr().out.splitlines() == [
        "USB-ERROR the worker cannot start: USB_THREADS must be a whole number of threads of 1 or more, got 'abc'"]


def test_a_serving_worker_keeps_its_editor_for_the_same_unchanged_model(tiny_bundle, tmp_path):
    import os
    import shutil

    from USBLib.apps.worker import _editor

    model = tmp_path / "model"
    shutil.copytree(tiny_bundle.root, model)
    kept: dict = {}
    first = _editor(str(model), "cpu", kept)
    assert _editor(str(model), "cpu", kept) is first and len(kept) == 1
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # the bundle re-exported
    second = _editor(str(model), "cpu", kept)
    assert second is not first and len(kept) == 1  # one model at a time
    assert _editor(str(model), "cpu", None) is not second  # a one-job worker keeps nothing


def test_growing_masks_grow_from_the_core_to_the_whole_mask():
    mask = np.zeros((30, 30, 30), np.uint8)
    mask[5:25, 8:22, 10:20] = 1
    frames = growing_masks(mask, 4, spacing=(1.0, 1.0, 2.0))
    sizes = [int(f.sum()) for f in frames]
    assert 0 < sizes[0] < sizes[1] < sizes[2] < sizes[3] == int(mask.sum())
    for small, big in zip(frames, frames[1:]):
        assert not (small & ~big.astype(bool)).any(), "frames must be nested"
    assert np.array_equal(frames[-1], mask)
    with pytest.raises(InputError, match="2 to 32 frames"):
        growing_masks(mask, 1)
    with pytest.raises(InputError, match="empty"):
        growing_masks(np.zeros_like(mask), 3)


def test_dependency_plan_lists_what_is_missing(monkeypatch):
    installed = dependencies.install_plan()
    assert installed.empty, f"the test environment has all of USB's packages: {installed}"
    monkeypatch.setitem(dependencies.PIP_REQUIREMENTS, "monai", ("monai>=999", True))
    monkeypatch.setattr(dependencies, "TORCH_REQUIREMENT", "torch>=999")
    plan = dependencies.install_plan()
    assert plan.torch and plan.pip == ["monai"]
    text = plan.describe()
    assert "torch>=999" in text and "monai>=999" in text and "SimpleITK" in text


def test_install_uses_the_pytorch_installer_and_no_deps_pip(monkeypatch):
    calls = []
    monkeypatch.setattr(dependencies, "install_plan", lambda packages=None: dependencies.InstallPlan())
    plan = dependencies.InstallPlan(torch=True, pip=["monai", "nibabel"])
    dependencies.install(plan, pip_install=calls.append, torch_installer=lambda req: calls.append(("torch", req)),
                         log=lambda m: None)
    assert calls[:2] == [("torch", "torch>=2.8"), ["--no-deps", "monai>=1.5"]]
    assert calls[2][:2] == ["nibabel>=5.0", "-c"] and len(calls) == 3


def test_packages_installed_with_their_dependencies_keep_slicer_s_own_versions(monkeypatch):
    """nibabel and scipy are installed with their dependencies: without constraints pip could upgrade Slicer's numpy
    (or SimpleITK, vtk, torch) to satisfy them. A constraints file pins the installed versions."""
    from importlib import metadata

    seen = {}

    def pip(args):
        constraints = args[args.index("-c") + 1]  # read during the call: it is removed afterwards
        seen[args[0]] = (Path(constraints), Path(constraints).read_text().split())

    monkeypatch.setattr(dependencies, "install_plan", lambda packages=None: dependencies.InstallPlan())
    dependencies.install(dependencies.InstallPlan(pip=["nibabel", "scipy"]), pip_install=pip, log=lambda m: None)
    assert sorted(seen) == ["nibabel>=5.0", "scipy>=1.10"]
    for path, pins in seen.values():
        assert f"numpy=={metadata.version('numpy')}" in pins and f"torch=={metadata.version('torch')}" in pins
        assert all(pin.split("==")[0] in dependencies.PROTECTED for pin in pins)
        assert not path.exists()


def test_install_failures_are_one_clear_message(monkeypatch):
    def failing_pip(args):
        raise subprocess.CalledProcessError(1, ["pip", "install", *args])

    with pytest.raises(dependencies.DependencyError, match=r"Installing monai>=1.5 failed .*network"):
        dependencies.install(dependencies.InstallPlan(pip=["monai"]), pip_install=failing_pip, log=lambda m: None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # the PyTorch extension is not installed
    with pytest.raises(dependencies.DependencyError, match="'PyTorch' extension"):
        dependencies.install(dependencies.InstallPlan(torch=True), pip_install=lambda a: None, log=lambda m: None)


def test_worker_process_options_hide_the_console_and_allow_group_kill():
    from types import SimpleNamespace

    from USBEditorLib import process

    posix = process.popen_options("posix")
    assert posix == {"start_new_session": True}
    nt = process.popen_options("nt", startupinfo_factory=lambda: SimpleNamespace(dwFlags=0, wShowWindow=1))
    assert nt["creationflags"] & process.CREATE_NEW_PROCESS_GROUP and nt["creationflags"] & process.CREATE_NO_WINDOW
    assert nt["startupinfo"].dwFlags & process.STARTF_USESHOWWINDOW and nt["startupinfo"].wShowWindow == 0


def test_worker_environment_starts_from_the_given_base_and_adds_only_what_the_worker_needs():
    from USBEditorLib import process

    base = {"PATH": "/usr/bin", "PYTHONPATH": "/elsewhere", "KEEP": "1"}
    env = process.worker_environment("cpu", threads=3, base=base)
    assert env["KEEP"] == "1" and env["PATH"] == "/usr/bin" and base["PYTHONPATH"] == "/elsewhere"
    parts = env["PYTHONPATH"].split(process.os.pathsep)
    assert parts[0] == str(process.usblib_parent()) and parts[1] == "/elsewhere"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["USB_THREADS"] == "3" and env["PYTHONIOENCODING"] == "utf-8"
    assert "CUDA_VISIBLE_DEVICES" not in process.worker_environment("auto", base={})


def test_slicer_installer_minimums_match_the_package_metadata():
    """The versions the Slicer module installs are the ones pyproject.toml requires (one minimum per package)."""
    import re

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    block = text[text.index("dependencies = ["):text.index("]", text.index("dependencies = ["))]
    pyproject = dict(re.findall(r'"([A-Za-z0-9_.-]+)(>=[0-9.]+)"', block))
    installer = {name: req[len(name):] for name, (req, _) in dependencies.PIP_REQUIREMENTS.items()}
    installer["torch"] = dependencies.TORCH_REQUIREMENT[len("torch"):]
    for name, minimum in installer.items():
        assert pyproject.get(name) == minimum, (name, minimum, pyproject.get(name))


def test_cancel_goes_on_when_a_killed_worker_is_slow_to_end_or_cannot_be_killed(monkeypatch, caplog):
    """Cancel and scene close kill the warm worker and wait for it; a worker that has not ended 10 s after the kill
    (uninterruptible I/O), or a Windows without ``taskkill``, raised out of Cancel as a traceback and left the run
    half stopped. Now it is logged and the cancel goes on."""
    import logging
    import threading

    from USBEditorLib import process

    class Stuck:
        pid = 4242424  # never signalled: poll() says it still runs only where the kill is the taskkill call

        def __init__(self, running: bool):
            self.running = running

        def poll(self):
            return None if self.running else -9

        def wait(self, timeout=None):
            raise subprocess.TimeoutExpired("usb worker", timeout)

    worker = process._WarmWorker.__new__(process._WarmWorker)  # no process started
    worker._lock, worker._closed, worker.proc = threading.Lock(), False, Stuck(running=False)
    with caplog.at_level(logging.WARNING):
        worker.kill(0.01)
    assert worker._closed and "did not end within" in caplog.text
    monkeypatch.setattr(process.os, "name", "nt")  # the kill runs taskkill, which this machine does not have
    monkeypatch.setattr(process.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("taskkill")))
    process._kill_group(Stuck(running=True))
