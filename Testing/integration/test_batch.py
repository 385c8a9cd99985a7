"""``usb batch`` on a tiny BIDS tree built here: outputs, sidecars, skip on rerun, failures recorded, report."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from conftest import make_scan
from USBLib.apps.batch_inputs import find_subjects, shard
from USBLib.apps.cli import main
from USBLib.errors import InputError

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save(path: Path, data, affine) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture
def bids(tmp_path):
    """sub-01 (lesion mask in derivatives), sub-02 session 1 (no mask), sub-03 (corrupt image file)."""
    root = tmp_path / "bids"
    root.mkdir()
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    img, mask, aff = make_scan("oblique")
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", mask, aff)
    save(root / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz", img, aff)
    broken = root / "sub-03/anat/sub-03_T1w.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(save(tmp_path / "x.nii.gz", img, aff).read_bytes()[:300])  # truncated gzip
    save(root / "derivatives/lesions/sub-03/anat/sub-03_label-lesion_mask.nii.gz", mask, aff)
    return root


def run(bids: Path, out: Path, model, *extra: str) -> int:
    return main(["batch", str(bids), "-o", str(out), "--model", str(model.root), "--steps", "2", "--quiet",
                 "--device", "cpu", *extra])


def records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "qc" / "records").glob("*.json")}


def test_batch_writes_derivatives_records_failures_and_resumes(bids, tmp_path, tiny_bundle):
    out = tmp_path / "derivatives-usb"
    inputs_before = {p: sha(p) for p in bids.rglob("*.nii.gz")}
    assert run(bids, out, tiny_bundle) == 3  # sub-03 failed

    desc = json.loads((out / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "USB"
    healed = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    src = nib.load(str(bids / "sub-01/anat/sub-01_T1w.nii.gz"))
    result = nib.load(str(healed))
    np.testing.assert_allclose(result.affine, src.affine, atol=1e-6)
    assert result.get_data_dtype() == src.get_data_dtype()
    assert int(result.header["sform_code"]) == int(src.header["sform_code"])
    assert not np.array_equal(np.asarray(result.dataobj), np.asarray(src.dataobj))
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-healed_T1w.json").read_text())
    assert sidecar["output_sha256"] == sha(healed)
    assert sidecar["inputs"]["image"]["sha256"] == inputs_before[bids / "sub-01/anat/sub-01_T1w.nii.gz"]
    assert sidecar["Sources"] == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
                                  "bids:raw:derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz"]
    assert desc["DatasetLinks"] == {"raw": bids.as_uri()} and sidecar["lesion_volume_ml"] > 0
    assert sidecar["task"] == "heal" and sidecar["settings"]["steps"] == 2

    recs = records(out)
    assert recs["sub-01"]["status"] == "healed" and recs["sub-01"]["qc"] == "sub-01.png"
    assert recs["sub-02_ses-1"]["status"] == "no-mask"
    assert recs["sub-03"]["status"] == "failed" and "sub-03_T1w.nii.gz" in recs["sub-03"]["message"]
    assert not (out / "sub-02").exists() and not (out / "sub-03").exists()
    assert (out / "qc" / "sub-01.png").stat().st_size > 1000
    report = (out / "qc" / "index.html").read_text()
    for key in ("sub-01", "sub-02_ses-1", "sub-03", "failed", "no-mask", 'src="sub-01.png"'):
        assert key in report
    left = [p for p in out.rglob(".*") if p.name != ".bidsignore"]
    assert not left, f"temporary files left behind: {left}"
    assert {p: sha(p) for p in bids.rglob("*.nii.gz")} == inputs_before, "an input file changed"

    # rerun: sub-01 is up to date (not rewritten), the failure is recorded again
    mtime = healed.stat().st_mtime_ns
    assert run(bids, out, tiny_bundle) == 3
    assert healed.stat().st_mtime_ns == mtime and records(out)["sub-01"]["status"] == "up-to-date"
    assert records(out)["sub-01"]["qc"] == "sub-01.png"

    # a damaged output is redone; other settings redo it too
    healed.write_bytes(healed.read_bytes()[:-10])
    assert run(bids, out, tiny_bundle, "--participant-label", "01") == 0
    assert records(out)["sub-01"]["status"] == "healed" and sha(healed) == json.loads(
        (out / "sub-01/anat/sub-01_desc-healed_T1w.json").read_text())["output_sha256"]
    assert run(bids, out, tiny_bundle, "--participant-label", "sub-01", "--strength", "0.4") == 0
    assert records(out)["sub-01"]["status"] == "healed"
    # an engine that heals the same settings differently (ENGINE_REVISION) redoes it: it is not up to date
    import USBLib.apps.batch as batch_module

    before = batch_module.ENGINE_REVISION
    try:
        batch_module.ENGINE_REVISION = before + 1
        assert run(bids, out, tiny_bundle, "--participant-label", "sub-01", "--strength", "0.4") == 0
        assert records(out)["sub-01"]["status"] == "healed"
    finally:
        batch_module.ENGINE_REVISION = before


def test_the_qc_table_carries_a_heal_s_notes_also_on_a_resumed_run(tmp_path, tiny_bundle):
    """A lesion mask drawn over tissue that looks like its surroundings (here: the phantom's lesion mask moved off
    the lesion): the heal's note is in the scan's QC message and sidecar, and still in the message when a rerun finds
    the output up to date."""
    img, mask, aff = make_scan("oblique")
    root = tmp_path / "bids"
    (root / "sub-01/anat").mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", np.roll(mask, 5, axis=1), aff)
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle) == 0
    notes = json.loads((out / "sub-01/anat/sub-01_desc-healed_T1w.json").read_text())["notes"]
    assert len(notes) == 1 and "looks like the tissue around it" in notes[0]
    assert records(out)["sub-01"]["message"].endswith("; " + notes[0])
    assert notes[0] in (out / "qc" / "index.html").read_text().replace("&#x27;", "'")
    assert run(root, out, tiny_bundle) == 0
    resumed = records(out)["sub-01"]
    assert resumed["status"] == "up-to-date" and resumed["message"].endswith("; " + notes[0])


def test_a_rerun_with_qc_draws_the_montage_a_no_qc_run_left_out(tmp_path, tiny_bundle):
    """``--no-qc`` first (a fast pipeline run), then the same command with QC: the scan is up to date (no new heal)
    and gets its montage from the files, so the report is whole."""
    img, mask, aff = make_scan("oblique")
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", mask, aff)
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle, "--no-qc") == 0
    healed = sha(out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz")
    assert records(out)["sub-01"]["qc"] is None and not (out / "qc" / "sub-01.png").exists()
    assert run(root, out, tiny_bundle) == 0
    again = records(out)["sub-01"]
    assert again["status"] == "up-to-date" and again["qc"] == "sub-01.png"
    assert (out / "qc" / "sub-01.png").stat().st_size > 1000
    assert sha(out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz") == healed  # drawn, not healed again
    assert 'src="sub-01.png"' in (out / "qc" / "index.html").read_text()


def test_an_unreadable_scan_without_mask_is_a_failure_not_a_skip(tmp_path, tiny_bundle):
    root = tmp_path / "bids"
    img, _, aff = make_scan("axial")
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)  # readable, no mask: skipped
    broken = root / "sub-02/anat/sub-02_T1w.nii.gz"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(save(tmp_path / "x.nii.gz", img, aff).read_bytes()[:300])  # truncated, no mask
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle) == 3
    recs = records(out)
    assert recs["sub-01"]["status"] == "no-mask"
    assert recs["sub-02"]["status"] == "failed" and "sub-02_T1w.nii.gz" in recs["sub-02"]["message"]


@pytest.mark.parametrize("singleton_4d", [False, True])
def test_a_scan_whose_lesion_mask_is_empty_is_copied_unchanged(tmp_path, tiny_bundle, singleton_4d):
    """A lesion segmentation that found no lesion (a control): the scan is its own heal, written unchanged (bit for
    bit and of its own shape, with a sidecar that says so) rather than healed without a mask, which would edit the
    whole brain; a rerun finds it up to date. A one-volume 4-D scan's copy is 4-D too (it came back 3-D)."""
    img, mask, aff = make_scan("axial")
    root = tmp_path / "bids"
    scan = save(root / "sub-01/anat/sub-01_T1w.nii.gz", img[..., None] if singleton_4d else img, aff)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", np.zeros_like(mask), aff)
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle) == 0
    written = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    copy, original = np.asarray(nib.load(str(written)).dataobj), np.asarray(nib.load(str(scan)).dataobj)
    assert copy.shape == original.shape and np.array_equal(copy, original)
    sidecar = json.loads((out / "sub-01/anat/sub-01_desc-healed_T1w.json").read_text())
    assert sidecar["task"] == "copy" and "empty" in sidecar["note"] and sidecar["lesion_volume_ml"] == 0
    assert records(out)["sub-01"]["status"] == "copied" and "empty" in records(out)["sub-01"]["message"]
    assert run(root, out, tiny_bundle) == 0 and records(out)["sub-01"]["status"] == "up-to-date"


def test_a_mask_that_is_gone_or_a_redo_that_fails_leaves_no_earlier_heal_behind(tmp_path, tiny_bundle):
    """The derivatives hold heals of the inputs as they are now: a scan healed with a mask that was deleted since is
    not 'up to date' (its output healed a lesion nobody marks any more); the earlier output and sidecar go, and so
    they do when a redo fails (here: the mask replaced by one on another grid)."""
    img, mask, aff = make_scan("axial")
    root = tmp_path / "bids"
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    roi = save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", mask, aff)
    out = tmp_path / "out"
    healed = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    assert run(root, out, tiny_bundle) == 0 and healed.is_file()
    roi.unlink()
    assert run(root, out, tiny_bundle) == 0
    record = records(out)["sub-01"]
    assert record["status"] == "no-mask" and "earlier output" in record["message"]
    assert not healed.exists() and not healed.with_name("sub-01_desc-healed_T1w.json").exists()
    save(roi, mask, aff)
    assert run(root, out, tiny_bundle) == 0 and healed.is_file()
    save(roi, mask[:-1], aff)  # another grid: the redo fails
    assert run(root, out, tiny_bundle) == 3
    record = records(out)["sub-01"]
    assert record["status"] == "failed" and "different grid" in record["message"]
    assert "earlier output" in record["message"]
    assert not healed.exists()


def test_batch_shards_copies_unmasked_and_runs_workers(bids, tmp_path, tiny_bundle):
    out = tmp_path / "usb"
    # shard 2/3 of [sub-01, sub-02_ses-1, sub-03] is sub-02 only; copied unchanged with --without-mask copy
    assert run(bids, out, tiny_bundle, "--shard", "2/3", "--without-mask", "copy") == 0
    copied = out / "sub-02/ses-1/anat/sub-02_ses-1_desc-healed_T1w.nii.gz"
    original = bids / "sub-02/ses-1/anat/sub-02_ses-1_T1w.nii.gz"
    assert np.array_equal(np.asarray(nib.load(str(copied)).dataobj), np.asarray(nib.load(str(original)).dataobj))
    assert set(records(out)) == {"sub-02_ses-1"} and records(out)["sub-02_ses-1"]["status"] == "copied"
    # two worker processes for the rest; the report gathers every shard's records
    assert run(bids, out, tiny_bundle, "--participant-label", "01", "02", "--jobs", "2", "--without-mask", "copy") == 0
    assert records(out)["sub-01"]["status"] == "healed"
    assert records(out)["sub-02_ses-1"]["status"] == "up-to-date"  # the copy from the first shard still holds
    assert (out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz").is_file()


def test_batch_bad_usage_is_one_line(bids, tmp_path, tiny_bundle, capsys):
    assert run(bids, bids, tiny_bundle) == 2
    assert run(tmp_path / "missing", tmp_path / "o", tiny_bundle) == 2
    assert run(bids, tmp_path / "o", tiny_bundle, "--shard", "4/3") == 2
    assert main(["batch", str(bids), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "nomodel"),
                 "--quiet"]) == 2
    assert main(["batch", str(bids), "--out", str(tmp_path / "o"), "--model", str(tiny_bundle.root), "--device", "tpu",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("usb: error:") for line in err)
    assert not (tmp_path / "o").exists()


def test_discovery_of_folders_csv_patterns_and_shards(tmp_path, bids):
    img, mask, aff = make_scan()
    folder = tmp_path / "plain"
    save(folder / "a.nii.gz", img, aff)
    save(folder / "a_mask.nii.gz", mask, aff)
    save(folder / "b.nii.gz", img, aff)
    subjects = find_subjects(folder)
    assert [(s.key, s.mask.name if s.mask else None) for s in subjects] == [("a", "a_mask.nii.gz"), ("b", None)]

    table = tmp_path / "pairs.csv"
    table.write_text("image,mask,id\nplain/a.nii.gz,plain/a_mask.nii.gz,first\nplain/b.nii.gz,,second\n")
    subjects = find_subjects(table)
    assert [s.key for s in subjects] == ["first", "second"] and subjects[0].mask == (folder / "a_mask.nii.gz").resolve()
    (tmp_path / "bad.csv").write_text("path\nx.nii.gz\n")
    with pytest.raises(InputError, match="header row"):
        find_subjects(tmp_path / "bad.csv")

    masks = tmp_path / "lesions"
    save(masks / "sub-02/ses-1/anat/sub-02_ses-1_space-orig_lesion.nii.gz", mask, aff)
    found = {s.key: s.mask for s in find_subjects(bids, masks, "{anat}/{entities}_space-orig_lesion.nii.gz")}
    assert found["sub-02_ses-1"] is not None and found["sub-01"] is None
    keys = [s.key for s in find_subjects(bids)]
    assert keys == ["sub-01", "sub-02_ses-1", "sub-03"]
    assert [s.key for s in shard(find_subjects(bids), "1/2")] == ["sub-01", "sub-03"]
    # two masks for one scan: that scan fails with a clear reason, the others still run
    save(bids / "derivatives/lesions/sub-01/anat/sub-01_desc-lesion_mask.nii.gz", mask, aff)
    problem = {s.key: s.problem for s in find_subjects(bids)}["sub-01"]
    assert "several masks match sub-01_T1w.nii.gz" in problem


def test_torchrun_ranks_pick_their_shard(monkeypatch):
    from USBLib.apps.batch_run import torchrun_shard

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert torchrun_shard("cpu") == (None, "cpu")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert torchrun_shard("cpu") == ("3/4", "cpu")


@pytest.mark.parametrize("signame,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_and_sigterm_leave_only_whole_files_and_the_rerun_resumes(tmp_path, tiny_bundle, signame, code):
    """Ctrl-C, and SIGTERM (a scheduler's time limit, ``kill``) alike: whole files only, the scan being worked on
    recorded as not done, and the same command finishes the batch."""
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "bids"
    img, mask, aff = make_scan()
    for i in range(1, 5):
        save(root / f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz", (img + i).astype(img.dtype), aff)
        save(root / f"sub-{i:02d}/anat/sub-{i:02d}_label-lesion_mask.nii.gz", mask, aff)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "USBLib.apps.cli", "batch", str(root), "--out", str(out), "--model", str(tiny_bundle.root),
           "--steps", "5", "--device", "cpu", "--quiet"]
    # SIGINT back to its default in the child: a suite started in the background (``cmd &``) inherits SIGINT
    # ignored, and Python then never raises KeyboardInterrupt (seen: the batch ran to the end with exit 0)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt right after the first scan is recorded, however slow the machine: no timing race (the
    # generous limit only turns a hung batch into a failure instead of a hung test)
    deadline = time.time() + 900
    # (a record's hidden temporary file, ".KEY.XXXX.json" before its rename, is not a record yet)
    while not [p for p in (out / "qc" / "records").glob("*.json") if not p.name.startswith(".")]:
        assert proc.poll() is None, "the batch ended before any scan was recorded"
        assert time.time() < deadline, "no scan finished within 15 minutes"
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signame))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "finished scans are kept" in err, err
    outputs = sorted(out.rglob("*_desc-healed_T1w.nii.gz"))
    done = [p for p in outputs if p.with_name(p.name.replace(".nii.gz", ".json")).is_file()]
    # (stopped between image and sidecar: redone)
    assert 1 <= len(done) < 4 and len(outputs) - len(done) <= 1, (outputs, err)
    for path in outputs:  # whole files only: each loads, and a sidecar describes exactly its image
        assert np.asarray(nib.load(str(path)).dataobj).shape == img.shape
        if path in done:
            assert json.loads(path.with_name(path.name.replace(".nii.gz", ".json")).read_text())["output_sha256"] == sha(path)
    left = [p for p in out.rglob(".*") if p.name != ".bidsignore"]
    assert not left, f"temporary files left behind: {left}"
    assert (out / "qc" / "index.html").is_file()
    stopped = {k: r["status"] for k, r in records(out).items()}
    assert list(stopped.values()).count("cancelled") <= 1, stopped  # the scan being worked on (if the signal hit one)
    assert all(status in ("healed", "cancelled") for status in stopped.values()), stopped
    assert main(cmd[3:]) == 0  # the same command resumes
    statuses = {k: r["status"] for k, r in records(out).items()}
    assert len(statuses) == 4 and list(statuses.values()).count("up-to-date") == len(done), (statuses, done, stopped)
    assert "cancelled" not in statuses.values(), statuses  # the interrupted scan was healed by the rerun


def test_a_scan_copied_without_mask_is_skipped_and_its_copy_removed_when_the_batch_skips_such_scans(tmp_path,
                                                                                                       tiny_bundle):
    """``--without-mask copy``, then the default ``--without-mask skip``: the scan without a mask is skipped and its
    earlier copy goes (outputs of settings that no longer apply are removed), rather than being 'up to date'; copy
    again writes it again."""
    img, _, aff = make_scan("axial")
    root = tmp_path / "bids"
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    out = tmp_path / "out"
    copied = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    assert run(root, out, tiny_bundle, "--without-mask", "copy") == 0
    assert copied.is_file() and records(out)["sub-01"]["status"] == "copied"
    assert run(root, out, tiny_bundle, "--without-mask", "skip") == 0
    record = records(out)["sub-01"]
    assert record["status"] == "no-mask" and "earlier output" in record["message"]
    assert not copied.exists() and not copied.with_name("sub-01_desc-healed_T1w.json").exists()
    assert run(root, out, tiny_bundle, "--without-mask", "copy") == 0
    assert copied.is_file() and records(out)["sub-01"]["status"] == "copied"


def test_sidecar_sources_name_image_and_mask_by_uris_that_dataset_links_resolve(tmp_path, tiny_bundle):
    """BIDS URIs in ``Sources`` need ``DatasetLinks`` in ``dataset_description.json``: ``raw`` (relative where the
    derivatives lie inside the study), ``masks`` for a ``--masks`` folder outside it; the lesion mask is a source too;
    files of a CSV (no BIDS dataset) are ``file:`` URIs. A description an earlier run wrote gets the links; a second
    study healed into the same folder gets a link of its own (``raw2``), so the first one's URIs still resolve."""
    img, mask, aff = make_scan("axial")
    root = tmp_path / "bids"
    (root / "dataset_description.json").parent.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny", "BIDSVersion": "1.9.0"}))
    scan = save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    empty = np.zeros_like(mask)  # an empty mask: the scan is copied, its mask a source all the same (no heal: fast)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", empty, aff)

    def written(out: Path) -> tuple[dict, list[str]]:
        description = json.loads((out / "dataset_description.json").read_text())
        return description, json.loads((out / "sub-01/anat/sub-01_desc-healed_T1w.json").read_text())["Sources"]

    inside = root / "derivatives/usb"
    assert run(root, inside, tiny_bundle) == 0
    description, sources = written(inside)
    assert description["DatasetLinks"] == {"raw": "../.."}
    assert sources == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
                       "bids:raw:derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz"]

    masks = tmp_path / "lesions"
    outside_mask = save(masks / "sub-01/anat/sub-01_label-lesion_mask.nii.gz", empty, aff)
    out = tmp_path / "usb"
    out.mkdir()
    earlier = {"Name": "USB healed T1w images", "BIDSVersion": "1.9.0", "DatasetType": "derivative",
               "GeneratedBy": [{"Name": "USB", "Version": "0"}], "SourceDatasets": [{"URL": root.as_uri()}]}
    (out / "dataset_description.json").write_text(json.dumps(earlier))  # written before DatasetLinks were
    assert run(root, out, tiny_bundle, "--masks", str(masks)) == 0
    description, sources = written(out)
    assert description == dict(earlier, DatasetLinks={"raw": root.as_uri(), "masks": masks.as_uri()})
    assert sources == ["bids:raw:sub-01/anat/sub-01_T1w.nii.gz",
                       "bids:masks:sub-01/anat/sub-01_label-lesion_mask.nii.gz"]

    other = tmp_path / "bids-site2"  # a second study healed into the same folder: its own link, raw's stays
    (other / "dataset_description.json").parent.mkdir(parents=True)
    (other / "dataset_description.json").write_text(json.dumps({"Name": "site 2", "BIDSVersion": "1.9.0"}))
    save(other / "sub-02/anat/sub-02_T1w.nii.gz", img, aff)
    save(other / "derivatives/lesions/sub-02/anat/sub-02_label-lesion_mask.nii.gz", empty, aff)
    assert run(other, out, tiny_bundle) == 0
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetLinks"] == {"raw": root.as_uri(), "masks": masks.as_uri(), "raw2": other.as_uri()}
    assert json.loads((out / "sub-02/anat/sub-02_desc-healed_T1w.json").read_text())["Sources"][0] \
        == "bids:raw2:sub-02/anat/sub-02_T1w.nii.gz"
    assert written(out)[1][0] == "bids:raw:sub-01/anat/sub-01_T1w.nii.gz"

    table = tmp_path / "pairs.csv"
    table.write_text(f"image,mask,id\n{scan},{outside_mask},sub-01\n")
    from_csv = tmp_path / "from-csv"
    assert run(table, from_csv, tiny_bundle) == 0
    description = json.loads((from_csv / "dataset_description.json").read_text())
    sources = json.loads((from_csv / "sub-01_desc-healed_T1w.json").read_text())["Sources"]
    assert "DatasetLinks" not in description and sources == [scan.as_uri(), outside_mask.as_uri()]


def test_a_batch_where_no_scan_has_a_mask_says_so_and_an_unfetched_mask_fails_its_scan(tmp_path, tiny_bundle, capsys):
    """Masks in a layout batch does not know leave every scan 'no-mask': the summary warns (exit 0, as for any scan
    without a mask). A mask that is a link to nothing (DataLad, not fetched) fails its scan, saying so."""
    img, _, aff = make_scan("axial")
    root = tmp_path / "bids"
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle) == 0
    err = capsys.readouterr().err
    assert "usb batch: warning: none of the 1 scans has a lesion mask" in err and "--mask-pattern" in err
    mask = root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz"
    mask.parent.mkdir(parents=True)
    mask.symlink_to(tmp_path / "annex/MD5E-s1--0.nii.gz")
    assert run(root, out, tiny_bundle) == 3
    record = records(out)["sub-01"]
    assert record["status"] == "failed" and record["message"].startswith(f"mask not fetched (broken link): {mask}")
    assert "warning" not in capsys.readouterr().err


class _DiesInTheWorker(type(Path())):
    """A scan path that ends the worker process it is sent to (``os._exit`` when the worker unpickles the scan), as
    the out-of-memory killer or a crash in a library would: no timing, no test hook in the code under test."""

    def __reduce__(self):
        import os

        return os._exit, (70,)


def test_a_worker_that_dies_fails_only_its_scan_and_the_batch_goes_on(tmp_path, tiny_bundle):
    """``--jobs 2`` and one scan's worker dies: that scan alone is recorded ('worker process died'), the pool is
    rebuilt and every other scan gets its own outcome (the good records are not overwritten); the output an earlier
    run healed stays, and the next run, finding it up to date, takes its lesion volume and time from its sidecar,
    not from the died record."""
    from dataclasses import replace

    from USBLib.apps.batch import WORKER_DIED, BatchSettings, run_batch

    img, mask, aff = make_scan("axial")
    root = tmp_path / "bids"
    for i in range(1, 5):
        save(root / f"sub-{i:02d}/anat/sub-{i:02d}_T1w.nii.gz", img, aff)
    save(root / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz", mask, aff)
    out = tmp_path / "out"
    assert run(root, out, tiny_bundle) == 0
    healed = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    sidecar = json.loads(healed.with_name("sub-01_desc-healed_T1w.json").read_text())

    subjects = [replace(s, image=_DiesInTheWorker(s.image)) if s.key == "sub-01" else s for s in find_subjects(root)]
    settings = BatchSettings(model=str(tiny_bundle.root), device="cpu", steps=2)
    got = list(run_batch(subjects, out, settings, sidecar["batch_key"], jobs=2))
    assert sorted(r.key for r in got) == ["sub-01", "sub-02", "sub-03", "sub-04"]  # each once
    recs = records(out)
    assert [recs[f"sub-0{i}"]["status"] for i in (2, 3, 4)] == ["no-mask"] * 3
    assert recs["sub-01"]["status"] == "failed" and recs["sub-01"]["message"] == WORKER_DIED
    assert healed.is_file()  # healed with these inputs and settings: kept

    assert run(root, out, tiny_bundle) == 0
    again = records(out)["sub-01"]
    assert again["status"] == "up-to-date" and again["lesion_ml"] == sidecar["lesion_volume_ml"]
    assert again["seconds"] == round(sum(sidecar["timings_s"].values()), 2)


def test_a_bad_usb_threads_with_jobs_is_a_usage_error_not_a_broken_pool(tmp_path, tiny_bundle, monkeypatch, capsys):
    """The workers use a ``USB_THREADS`` the user set; a bad one is refused once, up front (as without ``--jobs``),
    rather than breaking every worker's start."""
    img, _, aff = make_scan("axial")
    root = tmp_path / "bids"
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    monkeypatch.setenv("USB_THREADS", "0")
    assert run(root, tmp_path / "out", tiny_bundle, "--jobs", "2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("usb: error:") and "USB_THREADS" in err[0]


def test_a_second_study_with_the_same_subject_labels_fails_those_scans_and_keeps_the_first_study_s(tmp_path,
                                                                                                  tiny_bundle):
    """Two studies healed into one --out: outputs are named by BIDS entities, so study B's sub-01 replaced study A's
    silently (and each rerun of either redid it). B's sub-01 now fails, saying so, and leaves A's output alone, also
    when B's sub-01 has no mask (which removed an earlier output as stale); B's sub-02 is healed beside A's."""
    img, mask, aff = make_scan("axial")
    empty = np.zeros_like(mask)  # an empty mask: the scan is copied (no heal: fast)

    def study(name: str, labels: tuple[str, ...], shift: int) -> Path:
        root = tmp_path / name
        (root / "dataset_description.json").parent.mkdir(parents=True)
        (root / "dataset_description.json").write_text(json.dumps({"Name": name, "BIDSVersion": "1.9.0"}))
        for label in labels:
            save(root / f"sub-{label}/anat/sub-{label}_T1w.nii.gz", (img + shift).astype(img.dtype), aff)
            save(root / f"derivatives/lesions/sub-{label}/anat/sub-{label}_label-lesion_mask.nii.gz", empty, aff)
        return root

    first, second = study("site1", ("01",), 0), study("site2", ("01", "02"), 1)
    out = tmp_path / "usb"
    assert run(first, out, tiny_bundle) == 0
    output = out / "sub-01/anat/sub-01_desc-healed_T1w.nii.gz"
    kept = {p: sha(p) for p in (output, output.with_name("sub-01_desc-healed_T1w.json"))}
    assert run(second, out, tiny_bundle) == 3
    recs = records(out)
    assert recs["sub-01"]["status"] == "failed" and recs["sub-01"]["message"] == (
        f"sub-01_desc-healed_T1w.nii.gz was healed from another dataset ({first / 'sub-01/anat/sub-01_T1w.nii.gz'}); "
        "use another --out")
    assert recs["sub-02"]["status"] == "copied" and {p: sha(p) for p in kept} == kept
    (second / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz").unlink()
    assert run(second, out, tiny_bundle) == 0
    assert records(out)["sub-01"]["status"] == "no-mask" and {p: sha(p) for p in kept} == kept
    assert run(first, out, tiny_bundle) == 0 and records(out)["sub-01"]["status"] == "up-to-date"


def test_an_empty_shard_does_not_warn_that_no_scan_has_a_mask(tmp_path, tiny_bundle, capsys):
    """``--shard 2/2`` of one scan has no scans: 'none of the 0 scans has a lesion mask' was a false alarm."""
    img, mask, aff = make_scan("axial")
    root = tmp_path / "bids"
    save(root / "sub-01/anat/sub-01_T1w.nii.gz", img, aff)
    save(root / "sub-01/anat/sub-01_label-lesion_mask.nii.gz", mask, aff)
    assert run(root, tmp_path / "out", tiny_bundle, "--shard", "2/2") == 0
    assert "warning" not in capsys.readouterr().err


class _SleepsInTheWorker(type(Path())):
    """A scan path whose worker process sleeps when it unpickles the scan: a scan being worked on, for as long as the
    test needs (the worker is stopped by ``stop_workers``)."""

    def __reduce__(self):
        import time

        return time.sleep, (600,)


def test_ctrl_c_with_jobs_records_the_scans_the_workers_had_started_as_cancelled(tmp_path):
    """``--jobs 2`` and Ctrl-C / SIGTERM while a scan is being worked on: it is recorded ``cancelled``, as with
    ``--jobs 1``. The list of unfinished scans was built after the workers were stopped, when every future had
    ended, so none was recorded."""
    from USBLib.apps.batch import BatchSettings, run_batch
    from USBLib.apps.batch_inputs import Subject

    # (no model: each worker's Editor fails, so scan 'a' is a quick 'failed' record; 'b' never finishes)
    settings = BatchSettings(model=str(tmp_path / "no-model"), device="cpu")
    subjects = [Subject("a", tmp_path / "a.nii.gz", None, Path(".")),
                Subject("b", _SleepsInTheWorker(tmp_path / "b.nii.gz"), None, Path("."))]
    out = tmp_path / "out"
    batch = run_batch(subjects, out, settings, "key", jobs=2)
    assert next(batch).key == "a"
    with pytest.raises(KeyboardInterrupt):
        batch.throw(KeyboardInterrupt())
    recs = records(out)
    assert recs["a"]["status"] == "failed" and recs["b"]["status"] == "cancelled"
