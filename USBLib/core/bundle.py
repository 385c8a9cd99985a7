"""Model bundles: a folder with ``bundle.json``, ``*.safetensors`` weights, model-space files and ``MODEL_CARD.md``.

A bundle is data only. Loading it reads JSON and safetensors, checks the sha256 of every listed file, and never
executes code from the bundle (no pickles, no imports by name).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from USBLib.errors import BundleError
from USBLib.hashing import sha256_of  # noqa: F401  (re-exported: bundle checksums)

SCHEMA_VERSION = 2
SUPPORTED_SCHEMAS = (1, 2)  # version 1: latent stage only; version 2 adds the optional ``local`` section
LOCAL = "local"             # bundle.json section and weights name of the local stage (PathoSyn)
LOCAL_PRIOR = "local_prior"  # ``path`` key of the local stage's tissue-prior maps (``local.prior.tissue``)
BUNDLE_FILE = "bundle.json"
CARD_FILE = "MODEL_CARD.md"
NETWORK_NAMES = ("autoencoder", "unet_lesion", "unet_brain")
TASKS = ("heal", "embed", "generate", "generate_from_mask")
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
DEFAULT_POINTER = MODELS_DIR / "DEFAULT"
REQUIRED_KEYS = ("schema_version", "name", "tier", "model_space", "intensity", "latent", "schedule",
                 "networks", "defaults", "files")


def autoencoder_factor(ae_cfg: Mapping[str, Any]) -> int:
    """Image-to-latent size ratio f of an autoencoder section of ``bundle.json``: ``patch`` for the patch
    autoencoder (``kind: patch_kl``), else 2 per MONAI AutoencoderKL level after the first."""
    if ae_cfg.get("kind", "monai_kl") == "patch_kl":
        return int(ae_cfg["patch"])
    return 2 ** (len(ae_cfg.get("channels", ())) - 1)


@dataclass
class ModelBundle:
    """A verified model bundle. ``config`` is the parsed ``bundle.json``; file paths are resolved under ``root``.

    Args:
        root: the bundle folder.
        config: the parsed ``bundle.json`` (checked by ``load``; see ``REQUIRED_KEYS``).
    """

    root: Path
    config: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        """The bundle's ``name`` in ``bundle.json``."""
        return self.config["name"]

    @property
    def tier(self) -> str:
        """The bundle's size tier (``tier`` in ``bundle.json``, e.g. ``tiny``)."""
        return self.config["tier"]

    @property
    def has_local(self) -> bool:
        """Whether the bundle carries the local stage (schema 2 with a ``local`` section)."""
        return LOCAL in self.config

    @property
    def has_local_prior(self) -> bool:
        """Whether the bundle ships the local stage's tissue-prior maps (``local.prior.tissue``)."""
        return self.has_local and "tissue" in self.config[LOCAL].get("prior", {})

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Shape (I, J, K) in voxels of the model grid (``model_space.shape``)."""
        return tuple(int(s) for s in self.config["model_space"]["shape"])  # type: ignore[return-value]

    @property
    def grid_affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine (mm) of the model grid (``model_space.affine``, template space), float64."""
        return np.asarray(self.config["model_space"]["affine"], dtype=np.float64)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size of the model grid in mm per axis (column norms of ``grid_affine``)."""
        return tuple(float(s) for s in np.linalg.norm(self.grid_affine[:3, :3], axis=0))  # type: ignore[return-value]

    def path(self, key: str) -> Path:
        """Path of a file named in ``model_space`` (``template``, ``brain_mask``) or ``networks``.

        Args:
            key: a network name (``autoencoder``, ``unet_lesion``, ``unet_brain``) for its weights, ``local`` for the
                local stage's weights, ``local_prior`` for its tissue-prior maps (bundles whose local network reads
                them), or a ``model_space`` key such as ``template`` or ``brain_mask``.
        """
        if key in self.config["networks"]:
            return self.root / self.config["networks"][key]["weights"]
        if key == LOCAL:
            return self.root / self.config[LOCAL]["weights"]
        if key == LOCAL_PRIOR:
            return self.root / self.config[LOCAL]["prior"]["tissue"]
        return self.root / self.config["model_space"][key]

    def defaults(self, task: str) -> dict[str, Any]:
        """Default sampling settings of one task (a copy of ``defaults[task]`` in ``bundle.json``).

        Args:
            task: one of ``TASKS``: ``heal``, ``embed``, ``generate``, ``generate_from_mask``.
        """
        return dict(self.config["defaults"][task])

    def load_state_dict(self, network: str) -> dict[str, Any]:
        """Weights of one network as a tensor dict, read with safetensors (no pickle); tensors are on the CPU.

        Args:
            network: a name in ``NETWORK_NAMES``, or ``local`` (see ``path``).
        """
        from safetensors.torch import load_file

        return load_file(str(self.path(network)))

    def parameter_counts(self) -> dict[str, int]:
        """Number of parameters per network, counted from the safetensors headers without loading tensors.

        Returns network name -> count, for ``NETWORK_NAMES`` and, when present, ``local``.
        """
        from safetensors import safe_open

        counts = {}
        for net in NETWORK_NAMES + ((LOCAL,) if self.has_local else ()):
            with safe_open(str(self.path(net)), framework="numpy") as fh:
                counts[net] = int(sum(int(np.prod(fh.get_slice(k).get_shape())) for k in fh.keys()))
        return counts


def _check_config(config: Mapping[str, Any], where: Path) -> None:
    """Refuse a ``bundle.json`` that lacks what a bundle needs or holds it in the wrong shape (``BundleError``, one
    line: a list where an object belongs, a grid size that is not a number, ...), never a Python error."""
    try:
        _check_fields(config, where)
    except (TypeError, ValueError, AttributeError, KeyError, IndexError) as exc:
        raise BundleError(f"{where}: bundle.json is malformed ({type(exc).__name__}: {exc})") from None


def _check_fields(config: Mapping[str, Any], where: Path) -> None:
    missing = [k for k in REQUIRED_KEYS if k not in config]
    if missing:
        raise BundleError(f"{where}: bundle.json lacks {', '.join(missing)}")
    if config["schema_version"] not in SUPPORTED_SCHEMAS:
        raise BundleError(f"{where}: bundle schema version {config['schema_version']} is not supported "
                          f"(this USBLib reads versions {', '.join(map(str, SUPPORTED_SCHEMAS))})")
    if LOCAL in config:
        if config["schema_version"] < 2:
            raise BundleError(f"{where}: a '{LOCAL}' section needs bundle schema version 2")
        if not isinstance(config[LOCAL], dict) or not isinstance(config[LOCAL].get("network"), dict) \
                or not config[LOCAL]["network"].get("channels"):
            raise BundleError(f"{where}: the '{LOCAL}' section must be an object with a 'network' that has "
                              "'channels'")
        missing = [k for k in ("weights", "network", "schedule") if k not in config[LOCAL]]
        if missing:
            raise BundleError(f"{where}: the '{LOCAL}' section lacks {', '.join(missing)}")
        prior = config[LOCAL].get("prior")
        if prior is not None and not (isinstance(prior, dict) and isinstance(prior.get("tissue"), str)):
            raise BundleError(f"{where}: the '{LOCAL}' section's 'prior' must name its 'tissue' file")
    for net in NETWORK_NAMES:
        if net not in config["networks"] or "weights" not in config["networks"][net]:
            raise BundleError(f"{where}: bundle.json has no weights entry for network '{net}'")
    for task in TASKS:
        if task not in config["defaults"]:
            raise BundleError(f"{where}: bundle.json has no default settings for task '{task}'")
    if any(not isinstance(config["defaults"][task], dict) for task in TASKS):
        raise BundleError(f"{where}: bundle.json's default settings must be an object per task")
    files = config["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{where}: bundle.json's 'files' must map each file name to its sha256")
    scale = config["latent"].get("scale_factor")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise BundleError(f"{where}: bundle.json's 'latent' needs a positive number 'scale_factor'")
    space = config["model_space"]
    if len(space.get("shape", ())) != 3 or np.asarray(space.get("affine", [])).shape != (4, 4):
        raise BundleError(f"{where}: model_space needs a 3D 'shape' and a 4x4 'affine'")
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in space["shape"]):
        raise BundleError(f"{where}: model_space's 'shape' must be 3 positive whole numbers, not {space['shape']}")
    nets = config["networks"]
    factor = autoencoder_factor(nets["autoencoder"]) * 2 ** (len(nets["unet_brain"].get("channels", ())) - 1)
    if any(int(s) % factor for s in space["shape"]):
        raise BundleError(f"{where}: model grid {space['shape']} is not divisible by {factor} "
                          "(autoencoder x U-Net downsampling)")


def verify(root: Path, config: Mapping[str, Any]) -> None:
    """Check that every file listed in ``config['files']`` exists and matches its sha256.

    Also checks that every network's weights, the template and the brain mask (and the local weights and tissue
    prior, when present) are listed, and that no listed name leaves the bundle folder. Raises ``BundleError`` on
    the first problem.

    Args:
        root: the bundle folder.
        config: the parsed ``bundle.json``.
    """
    listed = dict(config["files"])
    needed = [config["networks"][n]["weights"] for n in NETWORK_NAMES]
    needed += [config["model_space"][k] for k in ("template", "brain_mask")]
    if LOCAL in config:
        needed.append(config[LOCAL]["weights"])
        if config[LOCAL].get("prior"):  # the local network's tissue-prior maps (``USBLib.editor.local.prior``)
            needed.append(config[LOCAL]["prior"]["tissue"])
    for name in needed:
        if name not in listed:
            raise BundleError(f"{root}: '{name}' is not listed with a sha256 in bundle.json")
    for name, expected in listed.items():
        path = root / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root}: file name '{name}' leaves the bundle folder")
        if not path.is_file():
            raise BundleError(f"{root}: missing file '{name}'")
        if sha256_of(path) != expected:
            raise BundleError(f"{root}: checksum mismatch for '{name}' (file changed or corrupt)")


def bundle_dirs() -> dict[str, Path]:
    """Installed bundles by name: folders under ``USBLib/models`` and under each path in ``$USB_MODELS``.

    Returns folder name -> folder, for folders that hold a ``bundle.json``; the first folder found for a name wins
    (``USBLib/models`` first, then ``$USB_MODELS`` in order).
    """
    roots = [MODELS_DIR] + [Path(p) for p in os.environ.get("USB_MODELS", "").split(os.pathsep) if p]
    found: dict[str, Path] = {}
    for root in roots:
        if root.is_dir():
            for sub in sorted(root.iterdir()):
                if (sub / BUNDLE_FILE).is_file():
                    found.setdefault(sub.name, sub)
    return found


def default_bundle_name() -> str | None:
    """Name of the default bundle (``USBLib/models/DEFAULT``), or None when none is installed."""
    if DEFAULT_POINTER.is_file():
        name = DEFAULT_POINTER.read_text().strip()
        return name or None
    return None


def resolve(model: str | os.PathLike | None) -> Path:
    """Folder of a bundle given by name, by path, or None for the default.

    Args:
        model: None, ``""`` or ``"default"`` for the default bundle; a bundle folder; a path to its ``bundle.json``;
            or the name of an installed bundle (see ``bundle_dirs``). Raises ``BundleError`` if none fits.
    """
    if model is None or str(model) in ("", "default"):
        name = default_bundle_name()
        if name is None or name not in bundle_dirs():
            raise BundleError("no default model is installed (USBLib/models has none); "
                              "train and export one with usb_training, or pass --model PATH")
        return bundle_dirs()[name]
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.name == BUNDLE_FILE and path.is_file():
        return path.parent
    installed = bundle_dirs()
    if str(model) in installed:
        return installed[str(model)]
    names = ", ".join(sorted(installed)) or "none"
    raise BundleError(f"model '{model}' is neither a bundle folder nor an installed bundle (installed: {names})")


def load(model: str | os.PathLike | None = None) -> ModelBundle:
    """Read and verify a bundle by name or path; ``None`` means the default model.

    Raises ``BundleError`` for invalid JSON, a missing key, an unsupported schema, a model grid not divisible by
    the autoencoder x U-Net downsampling, or a missing or changed file.

    Args:
        model: a bundle name, folder or ``bundle.json`` path, or None (see ``resolve``).
    """
    root = resolve(model)
    cfg_path = root / BUNDLE_FILE
    if not cfg_path.is_file():
        raise BundleError(f"{root}: no {BUNDLE_FILE} in this folder")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise BundleError(f"{cfg_path}: top level must be a JSON object")
    _check_config(config, root)
    verify(root, config)
    return ModelBundle(root=root, config=config)


def write(root: Path, config: dict[str, Any], state_dicts: Mapping[str, Mapping[str, Any] | str | Path],
          extra_files: Mapping[str, Path] | None = None, card: str | None = None) -> ModelBundle:
    """Write a bundle: weights as safetensors, extra files copied, sha256 of each recorded in bundle.json.

    Returns the written bundle, read back and verified with ``load``.

    Args:
        root: the bundle folder, created if needed.
        config: the ``bundle.json`` content; ``schema_version``, the weights names and ``files`` are filled in here
            (on a copy).
        state_dicts: network name -> tensor dict for every name in ``NETWORK_NAMES``, plus ``local`` optionally;
            or a path to an existing safetensors file, copied byte for byte (an unchanged network keeps its bytes).
        extra_files: bundle file name -> source file (e.g. the template and brain mask), copied into ``root``.
        card: text of ``MODEL_CARD.md``, or None to write none.
    """
    import shutil

    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(config))  # deep copy, JSON-clean
    config["schema_version"] = SCHEMA_VERSION
    files: dict[str, str] = {}
    def save(net: str) -> str:
        fname = f"{net}.safetensors"
        weights = state_dicts[net]
        if isinstance(weights, (str, Path)):
            if Path(weights).resolve() != (root / fname).resolve():
                shutil.copyfile(weights, root / fname)
        else:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
            save_file(tensors, str(root / fname), metadata={"network": net, "bundle": config.get("name", "")})
        files[fname] = sha256_of(root / fname)
        return fname

    for net in NETWORK_NAMES:
        config["networks"][net]["weights"] = save(net)
    if LOCAL in state_dicts:
        config.setdefault(LOCAL, {})["weights"] = save(LOCAL)
    for name, src in (extra_files or {}).items():
        if Path(src).resolve() != (root / name).resolve():
            shutil.copyfile(src, root / name)
        files[name] = sha256_of(root / name)
    config["files"] = files
    (root / BUNDLE_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if card is not None:
        (root / CARD_FILE).write_text(card)
    return load(root)
