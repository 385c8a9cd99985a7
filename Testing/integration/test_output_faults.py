"""Outputs users can rely on: readable file modes, one clear line on a full disk or a read-only folder, SIGTERM
handled as Ctrl-C, and no uncertainty map that is zero by construction (issue #26)."""
from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_scan
from USBLib.apps.cli import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


@contextmanager
def tmpfs(path: Path, size: str = "64k", read_only: bool = False):
    """A small tmpfs at ``path`` (a full disk or a read-only folder); skips where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def hidden_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name != ".bidsignore"]


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def heal_args(tiny_bundle, scan_files, out):
    return ["heal", scan_files["image"], "--mask", scan_files["mask"], "-o", out, "--model", tiny_bundle.root,
            "--device", "cpu", "--steps", "2", "--quiet"]


@pytest.mark.parametrize("mask_value", [0o022, 0o027])
def test_outputs_get_the_mode_of_a_plain_write(mask_value, tiny_bundle, scan_files, tmp_path, capsys):
    out = tmp_path / "out" / "healed.nii.gz"
    with umask(mask_value):
        code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, out))
    assert code == 0, err
    expected = 0o666 & ~mask_value
    for path in (out, out.with_name("healed.json")):
        assert stat.S_IMODE(path.stat().st_mode) == expected, f"{path.name}: {oct(path.stat().st_mode)}"


def test_batch_outputs_report_and_records_are_readable_by_others(tiny_bundle, tmp_path, capsys):
    img, mask, aff = make_scan()
    anat = tmp_path / "bids" / "sub-01" / "anat"
    anat.mkdir(parents=True)
    nib.save(nib.Nifti1Image(img, aff), str(anat / "sub-01_T1w.nii.gz"))
    nib.save(nib.Nifti1Image(mask, aff), str(anat / "sub-01_label-lesion_mask.nii.gz"))
    out = tmp_path / "derivatives"
    with umask(0o022):
        code, _, err = run(capsys, "batch", tmp_path / "bids", "--out", out, "--model", tiny_bundle.root,
                           "--device", "cpu", "--steps", "2", "--quiet")
    assert code == 0, err
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"dataset_description.json", "index.html", "sub-01.json", "sub-01.png",
            "sub-01_desc-healed_T1w.nii.gz", "sub-01_desc-healed_T1w.json"} <= names, names
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, f"{path}: {oct(path.stat().st_mode)}"


def test_a_failed_write_names_the_output_exits_2_and_leaves_nothing(tiny_bundle, scan_files, tmp_path, capsys,
                                                                     monkeypatch):
    """Everywhere (no root needed): the disk fills up while the image is written."""
    import nibabel

    def full_disk(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"\0" * 100)  # a partial temporary file, as a real full disk leaves
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(nibabel, "save", full_disk)
    out = tmp_path / "out" / "healed.nii.gz"
    code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, out))
    assert code == 2
    line = one_line(err)
    assert line == f"usb: error: cannot write {out}: No space left on device"
    assert not (tmp_path / "out").exists()  # the folder the write made goes with the file


def test_full_disk_heal_is_one_line_exit_2_and_no_temporary_file(tiny_bundle, scan_files, tmp_path, capsys):
    with tmpfs(tmp_path / "small") as disk:
        filler = disk / "filler"
        with open(filler, "wb", buffering=0) as fh:  # leave no free block at all
            try:
                while True:
                    fh.write(b"\0" * 4096)
            except OSError:
                pass
        out = disk / "healed.nii.gz"
        code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, out))
        assert code == 2, err
        assert one_line(err).startswith(f"usb: error: cannot write {out}: No space left on device")
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]


def test_full_disk_batch_records_failed_scans_and_stops_with_exit_2(tiny_bundle, tmp_path, capsys):
    img, mask, aff = make_scan(dtype=np.float32)
    for i in range(1, 5):
        anat = tmp_path / "bids" / f"sub-{i:02d}" / "anat"
        anat.mkdir(parents=True)
        noisy = img + np.random.default_rng(i).normal(0, 5, img.shape).astype(np.float32)  # does not compress away
        nib.save(nib.Nifti1Image(noisy, aff), str(anat / f"sub-{i:02d}_T1w.nii.gz"))
        nib.save(nib.Nifti1Image(mask, aff), str(anat / f"sub-{i:02d}_label-lesion_mask.nii.gz"))
    with tmpfs(tmp_path / "small", size="96k") as disk:  # room for the description and records, not for a scan
        out = disk / "derivatives"
        code, _, err = run(capsys, "batch", tmp_path / "bids", "--out", out, "--model", tiny_bundle.root,
                           "--device", "cpu", "--steps", "2", "--quiet", "--no-qc")
        assert code == 2, err
        line = one_line(err)
        assert "No space left on device" in line and "stopped after 3 of 4 scans (3 failed)" in line, line
        records = {p.stem: json.loads(p.read_text()) for p in (out / "qc" / "records").glob("*.json")}
        assert sorted(records) == ["sub-01", "sub-02", "sub-03"]
        assert all(r["status"] == "failed" and r["cause"] == "output" for r in records.values())
        assert not list(out.rglob("*_T1w.nii.gz")) and not hidden_files(out)


def test_read_only_output_folder_is_refused_before_the_work(tiny_bundle, scan_files, tmp_path, capsys, monkeypatch):
    from USBLib.editor.editor import Editor

    def no_work(*args, **kwargs):
        raise AssertionError("the heal ran although its output cannot be written")

    monkeypatch.setattr(Editor, "heal", no_work)
    if os.geteuid() == 0:
        context = tmpfs(tmp_path / "ro", read_only=True)
    else:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        context = _nullcontext(folder)
    with context as folder:
        out = folder / "sub" / "healed.nii.gz"
        code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, out))
        assert code == 2, err
        line = one_line(err)
        assert line.startswith(f"usb: error: cannot write {out}: ") and ("Read-only" in line or "Permission" in line)
        assert ".healed." not in line  # the user's path, never the hidden temporary file


@contextmanager
def _nullcontext(value):
    yield value


def test_sigterm_is_handled_as_ctrl_c(tiny_bundle, scan_files, tmp_path, capsys, monkeypatch):
    """The signal arrives from inside the run (the first progress report), so the test does not race the heal."""
    import USBLib.apps.cli as cli

    class TerminatedAtFirstStep(cli.ProgressBar):
        def __call__(self, step, total, message):
            os.kill(os.getpid(), signal.SIGTERM)
            return True

    monkeypatch.setattr(cli, "ProgressBar", TerminatedAtFirstStep)
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out" / "healed.nii.gz"
    code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, out))
    assert code == 143
    assert one_line(err) == "usb: cancelled; no output was written"
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI puts the previous handler back


@pytest.mark.parametrize("when", ["interrupt", "input gone"])
def test_a_command_stopped_while_it_writes_the_sidecar_leaves_no_output(tiny_bundle, scan_files, tmp_path, capsys,
                                                                        monkeypatch, when):
    """Between the image and its sidecar: a Ctrl-C (or SIGTERM) left the image without a sidecar although the CLI
    said "no output was written"; an input deleted during the run (its sha256 goes into the sidecar) was an
    internal error and left the image too. Both leave nothing now, the second as a one-line input error."""
    import USBLib.hashing
    import USBLib.imaging.io as io

    write_json, sha256_of = io.write_json, USBLib.hashing.sha256_of
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(Path(scan_files["image"]).read_bytes())

    def interrupted(path, data):
        os.kill(os.getpid(), signal.SIGINT)
        return write_json(path, data)

    def after_the_input_went(path):
        scan.unlink(missing_ok=True)
        return sha256_of(path)

    if when == "interrupt":
        monkeypatch.setattr(io, "write_json", interrupted)
    else:
        monkeypatch.setattr(USBLib.hashing, "sha256_of", after_the_input_went)
    out = tmp_path / "out" / "healed.nii.gz"
    code, _, err = run(capsys, *heal_args(tiny_bundle, {"image": scan, "mask": scan_files["mask"]}, out))
    if when == "interrupt":
        assert (code, one_line(err)) == (130, "usb: cancelled; no output was written")
    else:
        assert code == 2 and "the input was moved or deleted while the command ran" in one_line(err), err
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


def test_uncertainty_needs_samples_that_can_differ(tiny_bundle, scan_files, tmp_path, capsys):
    code, _, err = run(capsys, *heal_args(tiny_bundle, scan_files, tmp_path / "h.nii.gz"), "--uncertainty",
                       tmp_path / "u.nii.gz")
    assert code == 2 and "needs --samples 2 or more" in one_line(err)
    assert not (tmp_path / "h.nii.gz").exists() and not (tmp_path / "u.nii.gz").exists()


def test_deterministic_local_stage_refuses_several_samples_and_the_latent_stage_gives_a_map(tmp_path):
    """The local stage's heal is one deterministic reconstruction (realism only adds synthesized noise): several
    samples are refused, in either mode, with the stages that give a map (not with 'realism', which is refused too);
    an embed in fidelity mode is pointed to realism; with the latent stage the samples differ."""
    import phantoms
    from USBLib import Editor
    from USBLib.errors import InputError

    bundle = phantoms.make_bundle(tmp_path / "local", local=True, name="tiny-local")
    editor = Editor(bundle, device="cpu")
    img, mask, aff = make_scan(dtype=np.float32)
    with pytest.raises(InputError, match="synthesized noise.*'both'") as err:
        editor.heal(img, aff, mask, stages="local", local_mode="fidelity", samples=3)
    assert "realism" not in str(err.value)
    with pytest.raises(InputError, match="identical.*realism"):
        editor.embed(img, aff, mask, stages="local", local_mode="fidelity", samples=3)
    with pytest.raises(InputError, match="synthesized noise.*'both'"):
        editor.heal(img, aff, mask, stages="local", local_mode="realism", samples=2)
    res = editor.heal(img, aff, mask, stages="both", steps=2, samples=2, seed=1)
    assert res.uncertainty is not None and res.uncertainty.max() > 0
    embedded = editor.embed(img, aff, mask, stages="local", local_mode="realism", samples=2, seed=1)
    assert embedded.uncertainty is not None and embedded.uncertainty.max() > 0
