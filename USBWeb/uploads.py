"""Files that come from the browser and go back to it: a private folder, size-limited uploads with safe names,
download tokens, and error messages that never name a server path.

The browser only ever sees file names it sent itself and opaque download tokens; every file lives in one private
temporary folder (mode 0700) that ``PrivateFolder.remove`` deletes when the server stops.
"""
from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional

SCAN_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mgz", ".mgh")  # single files (a .nhdr needs its data file)
MASK_SUFFIXES = SCAN_SUFFIXES + (".seg.nrrd",)
DEFAULT_LIMIT_MB = 512


class UploadError(ValueError):
    """An upload that is refused, told in one sentence."""


def suffix(name: str, allowed: tuple[str, ...]) -> str:
    """The file's (possibly double) suffix if it is one of ``allowed`` (longest match), else ""."""
    lower = name.lower()
    return max((s for s in allowed if lower.endswith(s)), key=len, default="")


def safe_stem(name: str, ext: str) -> str:
    """The file name without directories and suffix, reduced to letters, digits, ``-``, ``_`` and ``.``."""
    base = re.split(r"[\\/]", name)[-1]
    stem = base[: len(base) - len(ext)] if ext else base
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "upload"


def shown_name(name: str, fallback: str = "upload") -> str:
    """A browser's file name as the page shows it in a message: without directories, control characters (a newline
    cut the message in two) or more than 120 characters."""
    base = re.split(r"[\\/]", str(name or ""))[-1]
    base = re.sub(r"[\x00-\x1f\x7f]+", " ", base).strip()
    return (base[:117] + "...") if len(base) > 120 else (base or fallback)


def one_line(message: str, private: Optional[Path] = None) -> str:
    """The first line of an error message with every path inside ``private`` (and any other absolute path)
    shortened to its file name: the page shows what went wrong, never where the server keeps files."""
    line = next((part.strip() for part in str(message).splitlines() if part.strip()), "Something went wrong.")
    if private is not None:
        line = re.sub(re.escape(str(private)) + r"[^\s'\"),]*", lambda m: Path(m.group(0)).name, line)
    line = re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+([\w.+-]+)", r"\1", line)
    return line[:1].upper() + line[1:]


class PrivateFolder:
    """A temporary folder only this user can read, for uploads, job files and downloads."""

    def __init__(self, limit_mb: float = DEFAULT_LIMIT_MB):
        self.path = Path(tempfile.mkdtemp(prefix="usb-web-"))
        self.path.chmod(0o700)
        self.limit_bytes = int(limit_mb * 1024 * 1024)
        self._downloads: dict[str, Path] = {}
        self._count = 0

    def _new_dir(self, kind: str) -> Path:
        self._count += 1
        folder = self.path / f"{kind}-{self._count}"
        folder.mkdir(mode=0o700)
        return folder

    def save_upload(self, client_file: Mapping[str, Any], allowed: tuple[str, ...] = SCAN_SUFFIXES) -> Path:
        """Write one file the browser sent (trame's ``{name, size, content}``) under a safe name in its own folder.

        Raises ``UploadError`` for a file that is too large, empty, or of a type the page does not read."""
        name = str(client_file.get("name") or "")
        ext = suffix(name, allowed)
        shown = shown_name(name)
        if not ext:
            raise UploadError(f"'{safe_stem(name, '')}' is not a file type the page reads "
                              f"({', '.join(allowed)}).")
        content = client_file.get("content") or b""
        if isinstance(content, list) and all(isinstance(c, (bytes, bytearray)) for c in content):
            content = b"".join(content)
        if not isinstance(content, (bytes, bytearray, memoryview)):
            raise UploadError(f"'{shown}' did not arrive as a file.")
        size = max(len(content), int(client_file.get("size") or 0))
        if size > self.limit_bytes:
            raise UploadError(f"'{shown}' is {size / 2**20:.0f} MB; uploads are limited to "
                              f"{self.limit_bytes / 2**20:.0f} MB (usb web --max-upload-mb).")
        if not content:
            raise UploadError(f"'{shown}' is empty.")
        path = self._new_dir("upload") / (safe_stem(name, ext) + ext)
        try:
            path.write_bytes(content)
        except BaseException:  # a full disk, say: no folder is left behind
            shutil.rmtree(path.parent, ignore_errors=True)
            raise
        return path

    def new_folder(self, kind: str) -> Path:
        """An empty folder inside the private folder (for an export, a job)."""
        return self._new_dir(kind)

    def publish(self, path: Path) -> str:
        """An opaque token under which ``path`` (inside the private folder) can be downloaded."""
        token = secrets.token_urlsafe(16)
        self._downloads[token] = path
        return token

    def published(self, token: str) -> Optional[Path]:
        """The file published under ``token``, or None."""
        path = self._downloads.get(token)
        return path if path is not None and path.is_file() else None

    def discard(self, path: Optional[Path]) -> None:
        """Delete the folder inside the private folder that holds ``path`` (an upload once read, an old download),
        and the downloads published from it: a server that runs for days keeps only what its page still shows."""
        if path is None:
            return
        try:
            relative = Path(path).resolve().relative_to(self.path.resolve())
        except ValueError:
            return  # not ours (the bundled sample, say): left alone
        if not relative.parts:
            return
        folder = self.path / relative.parts[0]
        for token, published in list(self._downloads.items()):
            if published.resolve().is_relative_to(folder.resolve()):
                del self._downloads[token]
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)

    def remove(self) -> None:
        """Delete the folder and everything in it."""
        self._downloads.clear()
        shutil.rmtree(self.path, ignore_errors=True)
