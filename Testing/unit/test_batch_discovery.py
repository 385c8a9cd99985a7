"""How ``usb batch`` finds its scans and masks (``USBLib.apps.batch_inputs``) in layouts a pipeline meets, and how it
stops its worker processes (``batch.stop_workers``): each refusal is a one-line ``InputError`` before any scan runs.
Files here are empty stand-ins: discovery reads names, never voxels."""
from __future__ import annotations

from pathlib import Path

import pytest

from USBLib.apps.batch import stop_workers
from USBLib.apps.batch_inputs import find_subjects
from USBLib.errors import InputError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_a_flat_folder_of_sub_files_is_a_folder_of_scans_not_bids(tmp_path):
    for name in ("sub-01_T1w.nii.gz", "sub-01_T1w_mask.nii.gz", "sub-02_T1w.nii.gz"):
        touch(tmp_path / name)
    found = [(s.key, s.mask.name if s.mask else None) for s in find_subjects(tmp_path)]
    assert found == [("sub-01_T1w", "sub-01_T1w_mask.nii.gz"), ("sub-02_T1w", None)]


def test_a_plain_folder_finds_scans_in_every_format_usb_reads(tmp_path):
    """A folder of NRRD headers (``.nhdr`` beside its ``.raw.gz``, as Slicer and 3D Slicer scripts save them) was
    silently empty: .nhdr was an input format of every command but not of a plain folder's scan list."""
    for name in ("a.nhdr", "a.raw.gz", "a_mask.nhdr", "a_mask.raw.gz", "b.mgz", "b_lesion.nii.gz"):
        touch(tmp_path / name)
    found = [(s.key, s.image.name, s.mask.name if s.mask else None) for s in find_subjects(tmp_path)]
    assert found == [("a", "a.nhdr", "a_mask.nhdr"), ("b", "b.mgz", "b_lesion.nii.gz")]


def test_a_spreadsheet_csv_is_read_and_a_csv_without_a_mask_column_or_with_a_path_id_is_refused(tmp_path):
    touch(tmp_path / "a.nii.gz")
    touch(tmp_path / "a_roi.nii.gz")
    table = tmp_path / "excel.csv"
    table.write_bytes("\ufeffImage, Mask\na.nii.gz, a_roi.nii.gz\n".encode("utf-8"))  # BOM, capitals, spaces
    [subject] = find_subjects(table)
    assert subject.image == (tmp_path / "a.nii.gz").resolve() and subject.mask == (tmp_path / "a_roi.nii.gz").resolve()
    (tmp_path / "nomask.csv").write_text("image\na.nii.gz\n")  # every scan would be a silent 'no-mask'
    with pytest.raises(InputError, match="'image' and 'mask' columns"):
        find_subjects(tmp_path / "nomask.csv")
    for bad in ("../escaped", "site A/sub-01", ".hidden"):
        (tmp_path / "ids.csv").write_text(f"image,mask,id\na.nii.gz,a_roi.nii.gz,{bad}\n")
        with pytest.raises(InputError, match="is a path"):
            find_subjects(tmp_path / "ids.csv")
    (tmp_path / "latin1.csv").write_bytes("image,mask\nscan_\xe9.nii.gz,\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        find_subjects(tmp_path / "latin1.csv")


@pytest.mark.parametrize("pattern,message", [("{subject}/anat/*mask*", "unknown field {subject}"),
                                             ("/abs/{sub}_mask.nii.gz", "relative"), ("{sub", "mask-pattern")])
def test_a_mistyped_mask_pattern_is_a_usage_error(tmp_path, pattern, message):
    touch(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    with pytest.raises(InputError, match=message):
        find_subjects(tmp_path, mask_pattern=pattern)


def test_two_scans_with_one_output_are_refused(tmp_path):
    touch(tmp_path / "sub-03/anat/sub-03_T1w.nii")
    touch(tmp_path / "sub-03/anat/sub-03_T1w.nii.gz")
    with pytest.raises(InputError, match="two scans would write one output 'sub-03'"):
        find_subjects(tmp_path)


def test_a_mask_in_two_derivatives_folders_is_not_picked_by_name(tmp_path):
    touch(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    for pipeline in ("lesion_auto", "lesion_manual"):
        touch(tmp_path / f"derivatives/{pipeline}/sub-01/anat/sub-01_label-lesion_mask.nii.gz")
    [subject] = find_subjects(tmp_path)
    assert subject.mask is None and "several masks match" in subject.problem and "--masks" in subject.problem
    [chosen] = find_subjects(tmp_path, masks=tmp_path / "derivatives/lesion_manual")
    assert chosen.mask.parts[-4] == "lesion_manual" and not chosen.problem


def test_a_participant_label_without_scans_is_refused_not_ignored(tmp_path):
    touch(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    assert [s.key for s in find_subjects(tmp_path, participants=["sub-01"])] == ["sub-01"]
    with pytest.raises(InputError, match="participant label.s. 99"):
        find_subjects(tmp_path, participants=["01", "99"])
    with pytest.raises(InputError, match="no T1w scans found for the given participant labels"):
        find_subjects(tmp_path, participants=["99"])


def test_stopping_the_workers_ends_their_processes():
    """The cancel path of ``usb batch --jobs N`` (Ctrl-C, SIGTERM): CPython's ``ProcessPoolExecutor.shutdown`` sets
    its process table to None (3.9+), so the table must be read before it; then every worker is terminated. A stand-in
    pool that does what CPython's does, so that the test does not hang on real processes' timing."""
    class Worker:
        terminated = joined = False

        def terminate(self):
            self.terminated = True

        def join(self, timeout=None):
            self.joined = self.terminated  # joined after it was told to end

        def is_alive(self):
            return not self.joined

    class Pool:
        def __init__(self):
            self._processes = {1: Worker(), 2: Worker()}
            self.shut = None

        def shutdown(self, wait=True, cancel_futures=False):
            self.shut, self._processes = (wait, cancel_futures), None

    pool = Pool()
    workers = list(pool._processes.values())
    stop_workers(pool)
    assert pool.shut == (False, True) and all(w.terminated and w.joined for w in workers)
    stop_workers(pool)  # again, on a pool already shut down: nothing to do, no error


def _slow_to_stop(folder: str) -> None:
    """A worker's task that, told to end (SIGTERM), takes a while to clean up, as a heal removing its temporary
    files does."""
    import os
    import signal
    import time

    def on_terminate(*_):
        time.sleep(0.5)
        Path(folder, "cleaned").write_text("yes")
        os._exit(0)

    signal.signal(signal.SIGTERM, on_terminate)
    Path(folder, "started").write_text("yes")
    time.sleep(120)


def test_stopping_the_workers_waits_until_they_have_cleaned_up(tmp_path):
    """Once ``stop_workers`` returns, its workers have ended: the batch reports and exits only then (the executor, shut
    down without waiting, no longer joins them; a worker still cleaning up left a temporary file behind the report)."""
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("fork")) as pool:
        pool.submit(_slow_to_stop, str(tmp_path))
        deadline = time.monotonic() + 60  # only turns a worker that never starts into a failure, not a hang
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.01)
        stop_workers(pool)
        assert (tmp_path / "cleaned").read_text() == "yes"


def _deaf_to_terminate(folder: str) -> None:
    """A worker's task that ignores SIGTERM, as one stuck in a long native call does until the call returns."""
    import os
    import signal
    import time

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(folder, f"started-{os.getpid()}").write_text("yes")
    time.sleep(120)


def test_workers_that_ignore_terminate_are_killed_after_one_wait_for_all(tmp_path, monkeypatch):
    """Workers that do not end when terminated are killed once ``STOP_WAIT_S`` has passed for all of them together,
    not ``STOP_WAIT_S`` for each in turn (``--jobs 8`` would hold a Ctrl-C for 8 times the wait)."""
    import multiprocessing as mp
    import time
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing.connection import wait

    from USBLib.apps import batch

    monkeypatch.setattr(batch, "STOP_WAIT_S", 1.5)
    with ProcessPoolExecutor(3, mp_context=mp.get_context("fork")) as pool:
        for _ in range(3):
            pool.submit(_deaf_to_terminate, str(tmp_path))
        deadline = time.monotonic() + 60  # only turns a worker that never starts into a failure, not a hang
        while len(list(tmp_path.glob("started-*"))) < 3:
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.01)
        processes = list(pool._processes.values())
        started = time.monotonic()
        stop_workers(pool)
        took = time.monotonic() - started
    # a process's sentinel is ready once it has ended (is_alive can say True for one the executor's thread reaped)
    assert len(wait([p.sentinel for p in processes], timeout=0)) == 3, "a worker outlived stop_workers"
    assert 1.4 < took < 3.5, f"stop_workers took {took:.1f} s for 3 stuck workers (1.5 s to wait for all)"


def test_a_killed_record_write_or_a_damaged_record_does_not_stop_the_report(tmp_path, capsys):
    """A record write killed before its rename leaves ``atomic_path``'s hidden temporary file (``.<key>.XXXX.json``,
    here empty), and a record can be damaged: neither may make the report fail ('internal error: JSONDecodeError')
    on this and every later run. The hidden file is not a record; a damaged one is left out with one warning line."""
    from USBLib.apps.batch import Record, load_records, records_dir, save_record
    from USBLib.apps.qc_report import write_report

    save_record(tmp_path, Record("sub-01", "healed", image="sub-01_T1w.nii.gz"))
    touch(records_dir(tmp_path) / ".sub-02.k3j9x_1a.json")
    (records_dir(tmp_path) / "sub-03.json").write_text('{"key": "sub-03", "sta')
    (records_dir(tmp_path) / "sub-04.json").write_text('[1, 2]')
    loaded = load_records(tmp_path)
    assert [r["key"] for r in loaded] == ["sub-01"]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("usb batch: warning: ") for line in err)
    assert "sub-03.json" in err[0] and "sub-04.json" in err[1] and ".sub-02" not in "".join(err)
    assert "sub-01" in write_report(tmp_path, loaded, {}).read_text()


def test_workers_split_the_cpus_this_process_may_use_and_keep_a_users_usb_threads(monkeypatch):
    """``--jobs N`` under SLURM or ``taskset``: the threads per worker come from the CPUs this process may run on
    (its affinity), not from every CPU of the machine; a ``USB_THREADS`` the user set is left to the workers."""
    from USBLib.apps import batch

    monkeypatch.delenv("USB_THREADS", raising=False)
    monkeypatch.setattr(batch.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(batch.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert batch.worker_threads(2) == 2 and batch.worker_threads(8) == 1
    monkeypatch.setenv("USB_THREADS", "3")
    assert batch.worker_threads(2) is None
    monkeypatch.delenv("USB_THREADS")
    monkeypatch.delattr(batch.os, "sched_getaffinity", raising=False)  # a platform without affinity
    assert batch.worker_threads(4) == 16


def test_bids_masks_are_matched_by_entities_and_a_guess_is_refused(tmp_path):
    """Masks named with the scan's entities plus entities derivatives add (``space``, ``desc``, ...), in any order,
    are found; the accepted exact names win over them; two such names for one scan fail it (a guess); a mask of
    another run, or with an entity that is not a derivative's, is not the scan's."""
    lesions = tmp_path / "derivatives/lesions"
    scans = {"sub-01_run-1": ["sub-01_run-1_space-orig_label-lesion_mask.nii.gz"],
             "sub-02": ["sub-02_label-lesion_desc-manual_mask.nii.gz"],
             "sub-03": ["sub-03_space-orig_label-lesion_mask.nii.gz", "sub-03_space-MNI152_label-lesion_mask.nii"],
             "sub-04": ["sub-04_label-lesion_mask.nii.gz", "sub-04_space-MNI152_label-lesion_mask.nii.gz"],
             "sub-05_run-1": ["sub-05_run-2_label-lesion_mask.nii.gz", "sub-05_run-1_acq-x_label-lesion_mask.nii.gz",
                              "sub-05_run-1_label-brain_mask.nii.gz"],
             "sub-06_run-1_run-2": ["sub-06_space-orig_label-lesion_mask.nii.gz"]}  # an entity twice: no match
    for entities, masks in scans.items():
        sub = entities.split("_")[0]
        touch(tmp_path / f"{sub}/anat/{entities}_T1w.nii.gz")
        for name in masks:
            touch(lesions / f"{sub}/anat/{name}")
    found = {s.key: s for s in find_subjects(tmp_path)}
    assert found["sub-01_run-1"].mask.name == "sub-01_run-1_space-orig_label-lesion_mask.nii.gz"
    assert found["sub-02"].mask.name == "sub-02_label-lesion_desc-manual_mask.nii.gz"
    assert found["sub-03"].mask is None and found["sub-03"].problem.startswith("several masks match sub-03_T1w.nii.gz")
    assert "sub-03_space-MNI152_label-lesion_mask.nii" in found["sub-03"].problem
    assert found["sub-04"].mask.name == "sub-04_label-lesion_mask.nii.gz" and not found["sub-04"].problem
    assert found["sub-05_run-1"].mask is None and not found["sub-05_run-1"].problem
    assert not any(found[k].problem for k in ("sub-01_run-1", "sub-02"))
    assert all(s.mask is None for k, s in found.items() if k.startswith("sub-06"))


def test_a_mask_or_scan_not_fetched_is_its_own_failure_not_a_scan_without_mask(tmp_path):
    """DataLad / git-annex: a file not fetched is a link to nothing. Its scan fails saying so (``datalad get``),
    in a BIDS dataset, a plain folder and a CSV alike, rather than being passed over as a scan without a mask."""
    touch(tmp_path / "bids/sub-01/anat/sub-01_T1w.nii.gz")
    mask = tmp_path / "bids/derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz"
    mask.parent.mkdir(parents=True)
    mask.symlink_to(tmp_path / ".git/annex/objects/XX/MD5E-s1--0.nii.gz")
    touch(tmp_path / "bids/sub-02/anat/sub-02_T1w.nii.gz")
    scan = tmp_path / "bids/sub-03/anat/sub-03_T1w.nii.gz"
    scan.parent.mkdir(parents=True)
    scan.symlink_to(tmp_path / ".git/annex/objects/YY/MD5E-s1--1.nii.gz")
    found = {s.key: s for s in find_subjects(tmp_path / "bids")}
    assert found["sub-01"].mask == mask
    assert found["sub-01"].problem == f"mask not fetched (broken link): {mask}; datalad get it"
    assert found["sub-02"].mask is None and not found["sub-02"].problem
    assert found["sub-03"].problem == f"image not fetched (broken link): {scan}; datalad get it"

    touch(tmp_path / "plain/a.nii.gz")
    (tmp_path / "plain/a_mask.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    [plain] = find_subjects(tmp_path / "plain")
    assert plain.problem.startswith("mask not fetched (broken link)") and plain.mask.name == "a_mask.nii.gz"
    (tmp_path / "plain/b.nii.gz").symlink_to(tmp_path / "nowhere_b.nii.gz")  # a scan of a plain folder too
    unfetched_scan = {s.key: s for s in find_subjects(tmp_path / "plain")}["b"]
    assert unfetched_scan.problem.startswith("image not fetched (broken link)")
    (tmp_path / "plain/b.nii.gz").unlink()
    (tmp_path / "pairs.csv").write_text(f"image,mask\nplain/a.nii.gz,{mask}\n")
    [row] = find_subjects(tmp_path / "pairs.csv")
    assert row.mask == mask and row.problem.startswith("mask not fetched (broken link)")


def test_hidden_files_of_a_plain_folder_are_not_scans(tmp_path):
    """macOS leaves ``._scan.nii`` (AppleDouble) beside ``scan.nii`` on shared drives: it was a scan that failed
    (exit 3) while the report passed over its record."""
    for name in ("scan.nii", "._scan.nii", "scan_mask.nii", "._scan_mask.nii", ".hidden.nii.gz"):
        touch(tmp_path / name)
    found = [(s.key, s.mask.name if s.mask else None) for s in find_subjects(tmp_path)]
    assert found == [("scan", "scan_mask.nii")]
    patterned = find_subjects(tmp_path, mask_pattern="*{sub}_mask.nii")  # nor a mask found by a wildcard
    assert [(s.key, s.mask.name if s.mask else None, s.problem) for s in patterned] == [("scan", "scan_mask.nii", "")]


def test_a_plain_folder_pairs_masks_whose_suffix_is_upper_case(tmp_path):
    """Scans were found with suffixes in any case, their masks only in lower case: ``P01_mask.NII.GZ`` was never
    ``P01.NII.GZ``'s mask (and two masks differing only in case are two masks)."""
    for name in ("P01.NII.GZ", "P01_mask.NII.GZ", "P02.nii", "P02_LESION.Nii", "P03.mgz", "P03_mask.MGZ",
                 "P03_mask.mgz"):
        touch(tmp_path / name)
    found = {s.key: s for s in find_subjects(tmp_path)}
    assert sorted(found) == ["P01", "P02", "P03"]  # a mask in any case is no scan of its own either
    assert found["P01"].mask.name == "P01_mask.NII.GZ" and found["P02"].mask.name == "P02_LESION.Nii"
    assert found["P03"].mask is None and found["P03"].problem.startswith("several masks match P03.mgz")


def test_a_mask_pattern_reaching_into_derivatives_finds_one_mask_once_and_none_in_the_output(tmp_path):
    """``**/`` from the dataset and from ``derivatives/lesions`` find the same file: one mask, not 'several masks
    match'; a file under the output folder (``exclude``: --out) is never a mask."""
    touch(tmp_path / "dataset_description.json")
    touch(tmp_path / "sub-01/anat/sub-01_T1w.nii.gz")
    mask = touch(tmp_path / "derivatives/lesions/sub-01/anat/sub-01_label-lesion_mask.nii.gz")
    touch(tmp_path / "derivatives/usb/sub-01/anat/sub-01_label-lesion_mask.nii.gz")
    [subject] = find_subjects(tmp_path, mask_pattern="**/{entities}_label-lesion_mask.nii.gz",
                              exclude=[tmp_path / "derivatives/usb"])
    assert not subject.problem and subject.mask.resolve() == mask.resolve()


def test_fmriprep_inputs_get_one_desc_entity(tmp_path):
    """``sub-01_desc-preproc_T1w`` (fMRIPrep) became ``..._desc-preproc_desc-healed_T1w``, two ``desc`` entities: not
    BIDS. The healed mark goes into the one ``desc``; names without one keep ``_desc-healed_T1w``."""
    for name in ("sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
                 "sub-02/ses-1/anat/sub-02_ses-1_space-MNI152NLin2009cAsym_desc-preproc_T1w.nii.gz",
                 "sub-03/anat/sub-03_run-1_T1w.nii.gz"):
        touch(tmp_path / name)
    names = [s.output_name for s in find_subjects(tmp_path)]
    assert names == ["sub-01_desc-preprochealed_T1w.nii.gz",
                     "sub-02_ses-1_space-MNI152NLin2009cAsym_desc-preprochealed_T1w.nii.gz",
                     "sub-03_run-1_desc-healed_T1w.nii.gz"]


def test_csv_errors_name_the_row_s_line_and_a_home_path_is_expanded(tmp_path, monkeypatch):
    """The line of a bad row counts blank lines (they were skipped before numbering); an image of an unsupported
    type is refused with the row's line; ``~`` is the user's home folder."""
    touch(tmp_path / "a.nii.gz")
    table = tmp_path / "pairs.csv"
    table.write_text("image,mask\n\na.nii.gz,\n\n,\n")
    with pytest.raises(InputError, match=r"pairs\.csv:5: empty 'image'"):
        find_subjects(table)
    table.write_text("image,mask\n\na.nii.gz,\nscan.img,\n")
    with pytest.raises(InputError, match=r"pairs\.csv:4: .*scan\.img: unsupported file type"):
        find_subjects(table)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    touch(tmp_path / "home/b.nii.gz")
    table.write_text("image,mask\n~/b.nii.gz,~/b_mask.nii.gz\n")
    [subject] = find_subjects(table)
    assert subject.image == tmp_path / "home/b.nii.gz" and subject.mask == tmp_path / "home/b_mask.nii.gz"


def test_a_record_that_is_not_an_object_is_no_earlier_record(tmp_path):
    """``qc/records/KEY.json`` holding valid JSON that is not an object (``[]``) raised AttributeError in the
    up-to-date path: the scan 'failed' and its valid output was removed as stale."""
    from USBLib.apps.batch import _previous, records_dir

    records_dir(tmp_path).mkdir(parents=True)
    for text in ("[]", "null", '"qc"', "{bad"):
        (records_dir(tmp_path) / "sub-01.json").write_text(text)
        assert _previous(tmp_path, "sub-01") == {}
    (records_dir(tmp_path) / "sub-01.json").write_text('{"qc": "sub-01.png"}')
    assert _previous(tmp_path, "sub-01") == {"qc": "sub-01.png"}


def test_the_report_links_a_montage_by_its_url(tmp_path):
    """A key with ``#`` (``scan#1``): its montage ``scan#1.png`` was linked as ``src="scan#1.png"``, a URL whose
    ``#1.png`` is a fragment, so the picture was missing."""
    from USBLib.apps.qc_report import write_report

    touch(tmp_path / "qc/scan#1 a.png")
    page = write_report(tmp_path, [{"key": "scan#1 a", "status": "healed", "qc": "scan#1 a.png"}], {}).read_text()
    assert 'src="scan%231%20a.png"' in page and 'href="scan%231%20a.png"' in page


def test_each_worker_s_gpu_is_one_of_the_gpus_this_process_may_use(monkeypatch):
    """``--jobs N`` with GPUs under a scheduler that set ``CUDA_VISIBLE_DEVICES=2,3`` (or GPU UUIDs): the worker
    given the 2nd GPU must see GPU 3, not GPU 1 of the machine (another job's)."""
    import os
    import signal

    from USBLib.apps import batch

    class OneGpu:
        def get(self):
            return 1

    monkeypatch.setattr(batch, "_WORKER_EDITOR", None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    handler = signal.getsignal(signal.SIGTERM)
    try:  # (a missing model: the worker's Editor fails, which each scan's record would say)
        batch._init_worker("/nonexistent/model", "cpu", "none", None, OneGpu())
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert batch.worker_gpu(1, "GPU-aa, GPU-bb") == "GPU-bb" and batch.worker_gpu(1, None) == "1"
