"""The web page's file handling without a browser: safe names, size limit, refused types, messages without paths,
download tokens, the private folder's lifetime, and the page's form over USBLib.settings."""
from __future__ import annotations

import stat

import pytest

pytest.importorskip("trame_slicer", reason="the web page needs the [web] extra (pip install -e '.[test]')")

from USBWeb.server import host_warning, is_loopback  # noqa: E402
from USBWeb.uploads import MASK_SUFFIXES, PrivateFolder, UploadError, one_line, safe_stem, suffix  # noqa: E402


@pytest.fixture
def private():
    folder = PrivateFolder(limit_mb=1)
    yield folder
    folder.remove()


def test_upload_gets_a_safe_name_in_a_private_folder(private):
    path = private.save_upload({"name": "../../etc/My Scan (1).nii.gz", "size": 3, "content": b"abc"})
    assert path.parent.parent == private.path and path.name == "My_Scan_1.nii.gz" and path.read_bytes() == b"abc"
    assert stat.S_IMODE(private.path.stat().st_mode) == 0o700
    assert private.save_upload({"name": "mask.seg.nrrd", "content": [b"a", b"b"]}, MASK_SUFFIXES).name \
        == "mask.seg.nrrd"


@pytest.mark.parametrize("client_file, words", [
    ({"name": "big.nii.gz", "size": 2 * 2**20, "content": b"x"}, "limited to 1 MB"),
    ({"name": "notes.txt", "content": b"x"}, "not a file type"),
    ({"name": "empty.nii", "content": b""}, "is empty"),
])
def test_refused_uploads_say_why_in_one_line(private, client_file, words):
    with pytest.raises(UploadError, match=words):
        private.save_upload(client_file)
    assert not any(private.path.rglob("*.*"))


def test_messages_never_name_a_server_path(private):
    message = f"Failed to load node from file: {private.path}/upload-1/T1.nii.gz\nsecond line"
    assert one_line(message, private.path) == "Failed to load node from file: T1.nii.gz"
    assert one_line("cannot open /home/alice/data/scan.nii.gz for reading") == "Cannot open scan.nii.gz for reading"
    assert suffix("a.SEG.nrrd", MASK_SUFFIXES) == ".seg.nrrd" and safe_stem("x/y.nii", ".nii") == "y"


def test_downloads_are_opaque_tokens_and_the_folder_goes(private):
    out = private.new_folder("result") / "r.zip"
    out.write_bytes(b"zip")
    token = private.publish(out)
    assert "/" not in token and str(private.path) not in token and private.published(token) == out
    assert private.published("guess") is None
    private.remove()
    assert not private.path.exists() and private.published(token) is None


def test_a_read_upload_and_an_old_download_are_discarded_with_their_tokens(private, tmp_path):
    upload = private.save_upload({"name": "T1.nii.gz", "content": b"abc"})
    old = private.new_folder("result") / "old.zip"
    old.write_bytes(b"zip")
    new = private.new_folder("result") / "new.zip"
    new.write_bytes(b"zip")
    old_token, new_token = private.publish(old), private.publish(new)
    outside = tmp_path / "sample.nii.gz"
    outside.write_bytes(b"x")
    for path in (upload, old, outside, None):
        private.discard(path)
    assert sorted(p.name for p in private.path.iterdir()) == ["result-3"]  # only the latest download's folder
    assert private.published(old_token) is None and private.published(new_token) == new
    assert outside.exists() and private.path.exists()  # a file outside the folder, and the folder itself, stay
    private.discard(private.path)
    assert private.path.exists()


def test_a_download_that_fails_to_be_written_leaves_nothing_behind(private):
    """A result whose download cannot be written (a full disk, say): the page shows why and the server keeps none of
    what was written before the failure, while the download the page still offers stays."""
    import asyncio
    from types import SimpleNamespace

    from USBWeb.app import USBWebApp

    class State(SimpleNamespace):
        def __enter__(self):
            return self

        def __exit__(self, *_):
            return False

    class Export:
        def write(self, folder):
            (folder / "T1_healed.nii.gz").write_bytes(b"partial")
            raise OSError(28, "No space left on device")

    shown = private.new_folder("result") / "T1_healed.zip"
    shown.write_bytes(b"zip")
    errors: list[str] = []
    result = object()
    app = SimpleNamespace(private=private, state=State(usb_download_url="shown"), _download=shown,
                          document=SimpleNamespace(result=result, export=Export),
                          _fail=lambda exc, what: errors.append(f"{what}: {exc}"))
    asyncio.run(USBWebApp._publish(app, result))
    assert errors == ["writing the download: [Errno 28] No space left on device"]
    assert sorted(p.name for p in private.path.iterdir()) == [shown.parent.name], "the failed write was kept"
    assert app._download == shown and app.state.usb_download_url == "shown"


def test_only_loopback_listens_without_a_warning():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    assert host_warning("127.0.0.1", 8080) is None
    assert "there is no login" in host_warning("0.0.0.0", 8080)


def test_an_upload_that_cannot_be_written_or_is_not_bytes_leaves_no_folder(private, monkeypatch):
    from pathlib import Path

    for content in ("text, not bytes", 5, [b"a", 5]):
        with pytest.raises(UploadError, match="did not arrive as a file"):
            private.save_upload({"name": "T1.nii.gz", "content": content})

    def full_disk(self, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError, match="No space"):
        private.save_upload({"name": "T1.nii.gz", "content": b"abc"})
    assert list(private.path.iterdir()) == []


class _State(dict):
    """trame's state as the page's methods use it: items, attributes and ``with state:``."""

    __getattr__, __setattr__ = dict.__getitem__, dict.__setitem__

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False


def test_a_refused_or_vanished_upload_does_not_leave_every_tab_loading_and_old_errors_go():
    """The page sets usb_loading before it sends a file: an upload refused while an edit runs, or one whose tab
    closed before it arrived, left the (server-wide) state loading and every tab's controls disabled until the
    server restarted. A request the page never sends gets one line, not trame's traceback; Cancel and a finished
    edit clear an earlier error line."""
    import asyncio
    from types import SimpleNamespace

    from USBWeb.app import USBWebApp

    state = _State(usb_loading=True, usb_error="An edit is running: wait for it to finish or press Cancel first.")
    app = SimpleNamespace(state=state, _refuse_while_running=lambda: True)
    asyncio.run(USBWebApp.upload_scan(app, [{"name": "T1.nii.gz", "content": b"x"}]))
    assert state.usb_loading is False
    state.usb_loading = True  # a tab set it, then closed before its upload arrived
    USBWebApp._clear_stale_loading(app)  # a tab connects or leaves
    assert state.usb_loading is False

    calls = []
    app.apply = lambda: calls.append("apply")
    app.upload_scan = lambda files: calls.append(("upload", len(files)))
    handler, upload = USBWebApp._guarded(app, "apply"), USBWebApp._guarded(app, "upload_scan")
    for bad in (lambda: handler(1), lambda: upload(), lambda: upload("x"), lambda: upload([], 2)):
        state.usb_error = ""
        assert bad() is None and calls == [] and state.usb_error == "That request is not one the page sends."
    handler()
    upload([{"name": "T1.nii.gz"}])
    assert calls == ["apply", ("upload", 1)]

    app.jobs = SimpleNamespace(cancel=lambda: True)
    USBWebApp.cancel(app)
    assert state.usb_error == "" and state.usb_status.startswith("Cancelled")


def test_a_file_name_with_a_newline_is_shown_whole_on_one_line(private):
    """A browser's file name is shown without its folders and control characters: a newline in it cut the page's
    one-line message in the middle of the name."""
    from USBWeb.uploads import shown_name

    with pytest.raises(UploadError) as info:
        private.save_upload({"name": "../scans/T1\nrun 2.nii.gz", "content": b""})
    assert str(info.value) == "'T1 run 2.nii.gz' is empty." and one_line(str(info.value)) == str(info.value)
    assert shown_name("") == "upload" and len(shown_name("x" * 300 + ".nii")) == 120
