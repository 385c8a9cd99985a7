"""Carry the local network's training to and from a lent GPU machine (``.ci/device_train_local.sh``).

``pack-cache`` (here): the prepared training anatomies and prior maps that window generation reads
(``<cache>/prepared/native1mm`` and ``prepared/prior``) as one xz archive, images in float16 (so that they travel
within the device tool's 64 MiB; 5e-4 of the intensity range at most), ``unpack-cache`` (there) back to float32
``.npz`` files in a cache folder.

``pack`` (there): for each run folder ``<work>/<run>`` with a checkpoint, its EMA weights go into
``<out>/<run>_ema_<k>.safetensors`` files of at most ``PART_BYTES`` each (the step count in their metadata), and its
``config.json``, ``history.json``, the windows' summary and the logs into ``<out>/runs.tar.gz``. Optimizer moments
and the windows stay behind (too large to carry; a run brought back is exported, not resumed).

``unpack`` (here): rebuild ``<dest>/<run>/train/`` from those files (``checkpoint.safetensors`` with the ``ema/``
weights and the step, ``config.json``, ``history.json``, ``windows.json``), ready for
``python -m usb_training.local export --work <dest>/<run>``.
"""
from __future__ import annotations

import argparse
import json
import tarfile
from pathlib import Path
from ..base.common import cli_main

PART_BYTES = 15 * 2 ** 20
RUNS_ARCHIVE = "runs.tar.gz"
CACHE_FOLDERS = ("prepared/native1mm", "prepared/prior")


def pack_cache(cache: Path, archive: Path) -> Path:
    """Write the window generator's prepared inputs of ``cache`` (the training sources' anatomies, site maps and
    prior maps) into the xz tar ``archive``: float32 arrays of the ``.npz`` files as float16, the rest as they are."""
    import io

    import numpy as np

    archive.parent.mkdir(parents=True, exist_ok=True)
    from .__main__ import TRAIN_SOURCES
    from .priors import PRIOR_SOURCES

    wanted = {"prepared/native1mm": set(TRAIN_SOURCES) | {"fsaverage"}, "prepared/prior": set(PRIOR_SOURCES)}
    with tarfile.open(archive, "w:xz") as tar:
        for folder in CACHE_FOLDERS:  # the training sources' files only (never the held-out source's)
            for path in sorted(p for p in (cache / folder).glob("*.npz") if p.stem.split("_")[0] in wanted[folder]):
                with np.load(path) as z:
                    arrays = {k: (z[k].astype(np.float16) if z[k].dtype == np.float32 and z[k].size > 1000 else z[k])
                              for k in z.files}
                buffer = io.BytesIO()
                np.savez(buffer, **arrays)
                member = tarfile.TarInfo(f"{folder}/{path.name}")
                member.size = buffer.tell()
                buffer.seek(0)
                tar.addfile(member, buffer)
    return archive


def unpack_cache(archive: Path, cache: Path) -> Path:
    """Restore ``pack_cache``'s archive into ``cache`` (float16 arrays back to float32); returns ``cache``."""
    import numpy as np

    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(cache, filter="data")
    for folder in CACHE_FOLDERS:
        for path in (cache / folder).glob("*.npz"):
            with np.load(path) as z:
                arrays = {k: (z[k].astype(np.float32) if z[k].dtype == np.float16 else z[k]) for k in z.files}
            np.savez(path, **arrays)
    return cache


def pack(work: Path, out: Path) -> list[Path]:
    """Write the carry files of every run under ``work`` into ``out``; returns them."""
    from safetensors import safe_open

    from ..base.common import CHECKPOINT, module_weights
    from .__main__ import WINDOWS_SUMMARY, data_summary

    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tarfile.open(out / RUNS_ARCHIVE, "w:gz") as tar:
        for log in sorted(out.glob("*.log")):
            tar.add(log, arcname=log.name)
        for run in sorted(p for p in work.iterdir() if (p / "train" / CHECKPOINT).is_file()):
            train = run / "train"
            with safe_open(str(train / CHECKPOINT), framework="pt") as fh:
                meta = fh.metadata()["meta"]
            (train / WINDOWS_SUMMARY).write_text(json.dumps(data_summary(run / "windows"), indent=1))
            for name in ("config.json", "history.json", WINDOWS_SUMMARY):
                tar.add(train / name, arcname=f"{run.name}/{name}")
            part: dict = {}
            size, k = 0, 0
            weights = module_weights(train, "ema")
            for key in sorted(weights):
                tensor = weights[key].contiguous()
                if part and size + tensor.numel() * tensor.element_size() > PART_BYTES:
                    written.append(_save(part, out / f"{run.name}_ema_{k}.safetensors", meta))
                    part, size, k = {}, 0, k + 1
                part[key] = tensor
                size += tensor.numel() * tensor.element_size()
            written.append(_save(part, out / f"{run.name}_ema_{k}.safetensors", meta))
    return written + [out / RUNS_ARCHIVE]


def _save(tensors: dict, path: Path, meta: str) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"meta": meta})
    return path


def unpack(carried: Path, dest: Path) -> list[Path]:
    """Rebuild the run folders of ``pack``'s files in ``carried`` under ``dest``; returns the run folders."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ..base.common import CHECKPOINT

    runs = []
    with tarfile.open(carried / RUNS_ARCHIVE, "r:gz") as tar:
        names = {Path(m.name).parts[0] for m in tar.getmembers() if len(Path(m.name).parts) == 2}
        for run in sorted(names):
            train = dest / run / "train"
            train.mkdir(parents=True, exist_ok=True)
            for member in tar.getmembers():
                parts = Path(member.name).parts
                if len(parts) == 2 and parts[0] == run and member.isfile():
                    (train / parts[1]).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
            tensors, meta = {}, None
            for part in sorted(carried.glob(f"{run}_ema_*.safetensors")):
                tensors.update({f"ema/{k}": v for k, v in load_file(str(part)).items()})
                with safe_open(str(part), framework="pt") as fh:
                    meta = fh.metadata()["meta"]
            if not tensors:
                raise FileNotFoundError(f"no {run}_ema_*.safetensors in {carried}")
            save_file(tensors, str(train / CHECKPOINT), metadata={"meta": meta, "param_groups": "[]"})
            runs.append(dest / run)
    return runs


@cli_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m usb_training.local.device_carry", description=__doc__)
    parser.add_argument("command", choices=["pack-cache", "unpack-cache", "pack", "unpack"])
    parser.add_argument("--cache", type=Path, help="pack-cache: the cache to read; unpack-cache: the one to write")
    parser.add_argument("--archive", type=Path, help="pack-cache / unpack-cache: the archive")
    parser.add_argument("--work", type=Path, help="pack: the folder holding the run folders")
    parser.add_argument("--out", type=Path, help="pack: the folder of files to carry back")
    parser.add_argument("--carried", type=Path, help="unpack: the carried files")
    parser.add_argument("--dest", type=Path, help="unpack: where to rebuild the run folders")
    args = parser.parse_args(argv)
    if args.command == "pack-cache":
        print(pack_cache(args.cache, args.archive))
    elif args.command == "unpack-cache":
        print(unpack_cache(args.archive, args.cache))
    elif args.command == "pack":
        for path in pack(args.work, args.out):
            print(path)
    else:
        for path in unpack(args.carried, args.dest):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
