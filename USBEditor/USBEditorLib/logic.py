"""USBEditor's logic without Qt: MRML nodes <-> ``(array, affine)`` <-> the USBLib worker -> new MRML nodes.

Runs inside Slicer (called by the widget) and headless on ``slicer-core`` (tests, scripts). Inputs are only
read: outputs always go to new nodes named after the input (``T1 healed``, ``T1 + lesion``), created only
when a run has finished, so a cancelled or failed run leaves the scene as it was.
"""
from __future__ import annotations

import enum
import json
import logging
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import vtk

import slicer
from USBLib.settings import COVERS_RIM_DILATION_MM, FALLBACKS
from USBLib.apps.worker import load_array, write_job

from .process import WorkerProcess

Progress = Callable[[int, int, str], Optional[bool]]
LESION_COLOR = (0.95, 0.35, 0.15)


class USBEditorError(ValueError):
    """A problem with the user's inputs or the run, told in one sentence."""


class RunCancelled(Exception):
    """The user cancelled the run; nothing was added to the scene."""


class Task(enum.Enum):
    """The four tasks of the paper, as offered by the module's task selector."""

    HEAL = "heal"
    EMBED = "embed"
    GENERATE_FROM_MASK = "generate_from_mask"
    GENERATE = "generate"

    def label(self) -> str:
        return TASK_INFO[self]["label"]


TASK_INFO: dict[Task, dict[str, Any]] = {
    Task.HEAL: {"label": "Remove lesion (pathology \u2192 healthy)", "volume": "required", "mask": "optional",
                "settings": ("steps", "strength", "acg", "alpha0", "k", "eta", "stages", "local_mode", "samples",
                             "seed", "mask_covers_rim"),
                "suffix": "healed"},
    Task.EMBED: {"label": "Embed lesion (healthy \u2192 pathology)", "volume": "required", "mask": "required",
                 "settings": ("steps", "strength", "acg", "alpha0", "k", "eta", "stages", "local_mode", "samples",
                             "seed", "lesion_level"),
                 "suffix": "+ lesion"},
    Task.GENERATE_FROM_MASK: {"label": "Generate brain from mask", "volume": "optional", "mask": "required",
                              "settings": ("steps", "sampler", "lesion_guidance", "lesion_fusion", "samples",
                                           "seed")},
    Task.GENERATE: {"label": "Generate brain + lesion pair", "volume": "unused", "mask": "unused",
                    "settings": ("steps", "sampler", "samples", "seed")},
}


class Device(enum.Enum):
    """Where the worker runs the networks."""

    AUTO = "auto"
    CPU = "cpu"
    GPU = "cuda"

    def label(self) -> str:
        return {"auto": "Auto (GPU when available)", "cpu": "CPU", "cuda": "GPU (CUDA)"}[self.value]


class Stages(enum.Enum):
    """Which model stages an edit runs (the USB latent stage, the local stage at the scan's resolution, both)."""

    DEFAULT = ""
    LOCAL = "local"
    LATENT = "latent"
    BOTH = "both"

    def label(self) -> str:
        return {"": "Model default", "local": "Local (scan resolution)", "latent": "Latent (USB, 2 mm)",
                "both": "Both (latent, then local)"}[self.value]


class Sampler(enum.Enum):
    """The ODE solver of generation (``USBLib.settings``: ddim, dpm++2m); "" = the model's default."""

    DEFAULT = ""
    DDIM = "ddim"
    DPM = "dpm++2m"

    def label(self) -> str:
        return {"": "Model default", "ddim": "DDIM (first order)", "dpm++2m": "DPM-Solver++ 2M (second order)"}[
            self.value]


class LocalMode(enum.Enum):
    """How the local stage makes its edit: a guided sample (texture) or the deterministic reconstruction."""

    DEFAULT = ""
    REALISM = "realism"
    FIDELITY = "fidelity"

    def label(self) -> str:
        return {"": "Model default", "realism": "Realism (sampled texture)",
                "fidelity": "Fidelity (deterministic)"}[self.value]


@dataclass
class RunSettings:
    """Sampling settings of one run (paper symbols: alpha0, k = ACG, eta = LCG). Field defaults are the fallbacks
    of ``USBLib.settings``; ``default_settings`` replaces them with the model's."""

    steps: int = FALLBACKS["steps"]
    strength: float = FALLBACKS["strength"]
    acg: bool = FALLBACKS["acg"]
    alpha0: float = FALLBACKS["alpha0"]
    k: float = FALLBACKS["k"]
    eta: float = FALLBACKS["eta"]
    stages: str = ""       # "" = the model's default
    local_mode: str = ""
    sampler: str = ""      # "" = the model's default
    lesion_guidance: float = FALLBACKS["lesion_guidance"]
    lesion_fusion: Optional[bool] = None  # None = the model's default
    samples: int = 1
    seed: int = 0
    mask_covers_rim: bool = False  # heal: the mask already covers the lesion's dark rim (FLAIR-made, dilated)
    lesion_level: Optional[float] = None  # embed: the lesion's mean over the tissue around it; None = the network's

    def for_task(self, task: Task) -> dict[str, Any]:
        """The engine settings the task uses (the others do not apply to it). ``mask_covers_rim`` becomes the
        heal's growth limit: ``dilation_mm`` ``COVERS_RIM_DILATION_MM`` (the mask healed as drawn) when set, the
        model's default (grow into the lesion-like rim) when not."""
        values = {key: getattr(self, key) for key in TASK_INFO[task]["settings"]}
        if values.pop("mask_covers_rim", False):
            values["dilation_mm"] = COVERS_RIM_DILATION_MM
        return {key: value for key, value in values.items() if value != "" and value is not None}


@dataclass
class Outputs:
    """Nodes a finished run added to the scene."""

    volume: Any = None
    uncertainty: Any = None
    lesion: Any = None
    sequence: Any = None
    nodes: list = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def notes(self) -> list[str]:
        """What the engine adjusted and the user should know (e.g. the part of an embed mask outside the brain)."""
        return list(self.provenance.get("notes", []))


@dataclass
class Run:
    """A started run: what it was asked to do and its worker process."""

    task: Task
    job_dir: Path
    process: WorkerProcess
    volume_node: Any
    mask_name: str
    frames: int
    started: float = field(default_factory=time.perf_counter)
    placed_like: Any = None  # without a volume, the mask node whose transform and folder the outputs take


# ----------------------------------------------------------------- models
def installed_models() -> list[str]:
    """Names of the model bundles installed with USBLib (and under ``$USB_MODELS``), default first."""
    from USBLib.core.bundle import bundle_dirs, default_bundle_name

    names = sorted(bundle_dirs())
    default = default_bundle_name()
    return ([default] if default in names else []) + [n for n in names if n != default]


OTHER_MODEL = "Other folder..."  # the panel's model choice that takes a bundle folder


def chosen_model(choice: str, folder: str = "") -> Optional[str]:
    """The model the panel's choice names: an installed bundle's name, the folder given with ``OTHER_MODEL``, or None
    (the default model) for no choice. ``OTHER_MODEL`` without a folder is a ``USBEditorError``: it ran the
    default model without a word."""
    if choice == OTHER_MODEL:
        if not str(folder or "").strip():
            raise USBEditorError("Choose the model folder (Advanced, Model: Other folder...).")
        return str(folder)
    return choice or None


def model_folder(model: Optional[str] = None) -> str:
    """The absolute folder of the bundle ``model`` names (an installed name, a folder, None for the default), as the
    worker is given it: the worker runs in Slicer's startup environment, where the ``USB_MODELS`` this process
    lists its models from may be missing. Raises ``USBEditorError`` for a model that cannot be found."""
    from USBLib.core.bundle import resolve
    from USBLib.errors import BundleError

    try:
        return str(resolve(model or None).resolve())
    except BundleError as exc:
        message = str(exc)
        raise USBEditorError(message[:1].upper() + message[1:]) from None


def default_settings(task: Task, model: Optional[str] = None) -> RunSettings:
    """The model's recommended settings for ``task`` (bundle.json), samples 1, seed 0."""
    bundle = panel_bundle(model)
    settings = RunSettings()
    for source in ("heal", task.value):  # generation tasks show the edit sliders at the heal defaults
        for key, value in bundle.defaults(source).items():
            if hasattr(settings, key):
                current = getattr(settings, key)
                setattr(settings, key, value if current is None else type(current)(value))
    if settings.lesion_fusion is None:  # a bundle that does not say: the table's fallback (the GUI shows a value)
        settings.lesion_fusion = FALLBACKS["lesion_fusion"]
    if bundle.has_local:  # where a person looks, the local stage samples texture (the bundle says which mode)
        settings.local_mode = str(bundle.config["local"].get("interactive_mode", "realism"))
    else:
        settings.stages, settings.local_mode = "", ""
    return settings


def describe_model(model: Optional[str] = None) -> str:
    """One line about a model bundle (name, tier, grid), or a USBEditorError saying why it cannot be used."""
    bundle = panel_bundle(model)
    spacing = "x".join(f"{s:g}" for s in bundle.spacing)
    return f"{bundle.name} ({bundle.tier} tier, grid {'x'.join(map(str, bundle.grid_shape))} at {spacing} mm)"


# ----------------------------------------------------------------- MRML <-> arrays
def ijk_to_ras(node) -> np.ndarray:
    """4x4 IJK->RAS matrix of a volume node."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def volume_to_array(node) -> tuple[np.ndarray, np.ndarray]:
    """``(data [I,J,K], affine)`` of a scalar volume node; a copy, the node is never modified."""
    if node is None or node.GetImageData() is None:
        raise USBEditorError("Select an input volume (it has no image data).")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise USBEditorError(f"Volume '{node.GetName()}' has several components; USB needs a single T1 image.")
    return np.array(slicer.util.arrayFromVolume(node).transpose(2, 1, 0)), ijk_to_ras(node)


def _same_geometry(a, b) -> bool:
    """True when two volume nodes share their voxels in the world: the same grid under the same parent transform
    (a mask under another transform, or none, is placed where the views show it, as a segmentation is)."""
    return (a.GetImageData().GetDimensions() == b.GetImageData().GetDimensions()
            and np.allclose(ijk_to_ras(a), ijk_to_ras(b), atol=1e-4)
            and a.GetTransformNodeID() == b.GetTransformNodeID())


def _to_world(node) -> Optional[np.ndarray]:
    """4x4 from a node's own coordinates to the world (its parent transforms), or None where they are not linear."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        return None
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _on_volume_lattice(seg_node, segment_id: str, volume_node) -> bool:
    """True when the segment's labelmap voxels are the volume's voxels (same axes, spacing and voxel corners) where
    the views show them: their parent transforms included (under a transform that moves it, Slicer resamples the
    segment to where it is shown; under a non-linear one it is never on the lattice)."""
    if seg_node.GetTransformNodeID() == volume_node.GetTransformNodeID():  # one parent (a warp too): no resampling
        seg_world = vol_world = np.eye(4)
    else:
        seg_world, vol_world = _to_world(seg_node), _to_world(volume_node)
        if seg_world is None or vol_world is None:
            return False
    image = slicer.vtkOrientedImageData()
    seg_node.GetBinaryLabelmapRepresentation(segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    seg, vol = seg_world @ slicer.util.arrayFromVTKMatrix(matrix), vol_world @ ijk_to_ras(volume_node)
    if not np.allclose(seg[:3, :3], vol[:3, :3], atol=1e-4):
        return False
    offset = np.linalg.solve(vol[:3, :3], seg[:3, 3] - vol[:3, 3])
    return bool(np.allclose(offset, np.round(offset), atol=1e-3))


def _other_grid_error(what: str, volume_node) -> USBEditorError:
    return USBEditorError(f"{what} was drawn on another image grid than '{volume_node.GetName()}'; turn on "
                          "'Resample masks drawn on another image' (Advanced) to resample it (nearest neighbour).")


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _remove_nodes_added_since(scene, before: set[str]) -> None:
    """Remove every node added to ``scene`` since the IDs ``before`` were taken (singletons stay)."""
    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        if node.GetID() not in before and not node.GetSingletonTag():
            scene.RemoveNode(node)


@contextmanager
def _scene_kept() -> Iterator[None]:
    """Whatever the block adds to the scene is removed when it ends or raises: a mask is read through temporary
    labelmaps, and Slicer adds display nodes and, for an exported segment, a colour table with them (the colour table
    stayed, visible in the Data module and saved with the scene)."""
    scene = slicer.mrmlScene
    before = _node_ids(scene)
    try:
        yield
    finally:
        _remove_nodes_added_since(scene, before)


@contextmanager
def _voxel_segmentation(seg_node, segment_id: str, volume_node=None) -> Iterator[Any]:
    """The segmentation to read ``segment_id``'s voxels from: ``seg_node`` itself when it holds binary labelmaps;
    else (a segmentation loaded as closed surfaces, from a model or an STL) a temporary copy of that segment
    rasterised on ``volume_node``'s grid, or on the node's own reference geometry without a volume, removed
    afterwards. The user's node is never changed."""
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    source = seg_node.GetSegmentation()
    if source.ContainsRepresentation(binary):
        yield seg_node
        return
    geometry_key = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    geometry = source.GetConversionParameter(geometry_key)
    if volume_node is None and not geometry:
        raise USBEditorError(f"Segmentation '{seg_node.GetName()}' holds surfaces without an image grid: select a "
                             "volume, or convert it to a binary labelmap (Segmentations module) first.")
    temp = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__usb_temp_voxels")
    try:
        temp.SetAndObserveTransformNodeID(seg_node.GetTransformNodeID())
        copy = temp.GetSegmentation()
        copy.SetSourceRepresentationName(source.GetSourceRepresentationName())
        copy.CopySegmentFromSegmentation(source, segment_id)
        if volume_node is not None:
            temp.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        else:
            copy.SetConversionParameter(geometry_key, geometry)
        if not temp.CreateBinaryLabelmapRepresentation():
            raise USBEditorError(f"Segment '{source.GetSegment(segment_id).GetName()}' could not be turned into "
                                 "voxels; convert it to a binary labelmap (Segmentations module) first.")
        yield temp
    finally:
        slicer.mrmlScene.RemoveNode(temp)


def _segment_is_empty(seg_node, segment_id: str) -> bool:
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    labelmap = slicer.util.arrayFromSegmentInternalBinaryLabelmap(seg_node, segment_id)
    return labelmap is None or not np.any(labelmap == segment.GetLabelValue())


def segment_to_mask(seg_node, segment_id: Optional[str], volume_node, resample: bool = True) -> np.ndarray:
    """uint8 mask [I,J,K] of a segment on the volume's grid; one drawn on another grid is resampled by Slicer
    (nearest neighbour) when ``resample``, else refused."""
    segmentation = seg_node.GetSegmentation()
    if not segment_id:
        if segmentation.GetNumberOfSegments() != 1:
            raise USBEditorError(f"Select which segment of '{seg_node.GetName()}' is the lesion.")
        segment_id = segmentation.GetNthSegmentID(0)
    segment = segmentation.GetSegment(segment_id)
    if segment is None:
        raise USBEditorError(f"Segmentation '{seg_node.GetName()}' has no segment '{segment_id}'.")
    name = segment.GetName()
    with _scene_kept(), _voxel_segmentation(seg_node, segment_id, volume_node) as voxels:
        if _segment_is_empty(voxels, segment_id):
            raise USBEditorError(f"Segment '{name}' is empty: paint the lesion or load a mask first.")
        if not resample and not _on_volume_lattice(voxels, segment_id, volume_node):
            raise _other_grid_error(f"Segment '{name}'", volume_node)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(voxels, segment_id, volume_node)
    if mask is None or not mask.any():
        raise USBEditorError(f"Segment '{name}' does not overlap volume '{volume_node.GetName()}': "
                             "it was drawn on another image or in another place.")
    return (mask.transpose(2, 1, 0) > 0).astype(np.uint8)


def labelmap_to_mask(label_node, volume_node, resample: bool = True) -> np.ndarray:
    """uint8 mask [I,J,K] (all non-zero labels, negative ones too) of a labelmap volume on the volume's grid
    (resampled if allowed)."""
    if label_node.GetImageData() is None or not slicer.util.arrayFromVolume(label_node).any():
        raise USBEditorError(f"Labelmap '{label_node.GetName()}' is empty: it marks no lesion voxel.")
    if _same_geometry(label_node, volume_node):
        return (slicer.util.arrayFromVolume(label_node).transpose(2, 1, 0) != 0).astype(np.uint8)
    if not resample:
        raise _other_grid_error(f"Labelmap '{label_node.GetName()}'", volume_node)
    scene = slicer.mrmlScene
    with _scene_kept():
        temp = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__usb_temp_mask")
        temp.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
        binary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__usb_temp_binary")
        binary.CopyOrientation(label_node)
        binary.SetAndObserveTransformNodeID(label_node.GetTransformNodeID())  # imported where the views show it
        slicer.util.updateVolumeFromArray(binary, (slicer.util.arrayFromVolume(label_node) != 0).astype(np.uint8))
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(binary, temp)
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(temp, temp.GetSegmentation().GetNthSegmentID(0),
                                                          volume_node)
    if mask is None or not mask.any():
        raise USBEditorError(f"Labelmap '{label_node.GetName()}' does not overlap volume '{volume_node.GetName()}'.")
    return (mask.transpose(2, 1, 0) > 0).astype(np.uint8)


def mask_from_node(mask_node, segment_id: Optional[str], volume_node, resample: bool = True) -> tuple[np.ndarray, str]:
    """(mask [I,J,K] on the volume's grid, a name for it) from a segmentation or labelmap node."""
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        mask = segment_to_mask(mask_node, segment_id, volume_node, resample)
        segmentation = mask_node.GetSegmentation()
        sid = segment_id or segmentation.GetNthSegmentID(0)
        return mask, segmentation.GetSegment(sid).GetName()
    if mask_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return labelmap_to_mask(mask_node, volume_node, resample), mask_node.GetName()
    raise USBEditorError(f"'{mask_node.GetName()}' is neither a segmentation nor a labelmap.")


def mask_in_own_space(mask_node, segment_id: Optional[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(mask, affine, name) of a mask given without a volume: a labelmap's own grid or the segment's geometry."""
    if mask_node.IsA("vtkMRMLLabelMapVolumeNode"):
        data = slicer.util.arrayFromVolume(mask_node)
        if not data.any():
            raise USBEditorError(f"Labelmap '{mask_node.GetName()}' is empty: it marks no lesion voxel.")
        return (data.transpose(2, 1, 0) != 0).astype(np.uint8), ijk_to_ras(mask_node), mask_node.GetName()
    if not mask_node.IsA("vtkMRMLSegmentationNode"):
        raise USBEditorError(f"'{mask_node.GetName()}' is neither a segmentation nor a labelmap.")
    with _scene_kept():
        grid = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__usb_temp_grid")
        segmentation = mask_node.GetSegmentation()
        sid = segment_id or (segmentation.GetNthSegmentID(0) if segmentation.GetNumberOfSegments() == 1 else "")
        if not sid:
            raise USBEditorError(f"Select which segment of '{mask_node.GetName()}' is the lesion.")
        with _voxel_segmentation(mask_node, sid) as voxels:
            if _segment_is_empty(voxels, sid):
                raise USBEditorError(f"Segment '{segmentation.GetSegment(sid).GetName()}' is empty: "
                                     "paint the lesion or load a mask first.")
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(sid)
            slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
                voxels, ids, grid, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
        data = slicer.util.arrayFromVolume(grid)
        return (data.transpose(2, 1, 0) > 0).astype(np.uint8), ijk_to_ras(grid), segmentation.GetSegment(sid).GetName()


# ----------------------------------------------------------------- panel helpers (Qt-free, used by the widget)
RUNS_ONCE_HELP = ("This edit is deterministic (the local stage alone: every heal, and embed in fidelity mode), so it "
                  "runs once; for several samples and an uncertainty volume choose stages 'latent' or 'both'.")


_PANEL_BUNDLES: dict[tuple, Any] = {}


def panel_bundle(model: Optional[str] = None):
    """The model bundle whose recommended settings the panel shows (``USBLib.core.bundle.load``), read once per
    version of its ``bundle.json``: the panel asks on every change of a setting, and a load checks the sha256 of
    every weight file (about 50 ms for the shipped model, seconds for a large one; three per slider step). A run
    loads and verifies the bundle itself. Raises ``USBEditorError`` for a model that cannot be loaded."""
    from USBLib.core.bundle import BUNDLE_FILE, load, resolve
    from USBLib.errors import BundleError

    try:
        root = resolve(model or None)
        try:
            stat = (root / BUNDLE_FILE).stat()
        except OSError:
            return load(root)  # says what is wrong with the folder
        key = (str(root.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in _PANEL_BUNDLES:
            _PANEL_BUNDLES.clear()
            _PANEL_BUNDLES[key] = load(root)
        return _PANEL_BUNDLES[key]
    except BundleError as exc:
        raise USBEditorError(str(exc)) from None


def resolved_stages(task: Task, stages: Stages, local_mode: LocalMode, model: Optional[str] = None,
                    has_mask: bool = True) -> tuple[Stages, LocalMode]:
    """The stages and local mode an edit runs with: "" (Model default) filled in as the engine fills it
    (``USBLib.editor.input_checks.edit_stages``; the model is read only then); a heal without a mask
    (``has_mask`` False) runs the latent stage whatever was chosen (the engine's ``Editor._stages``: the whole brain,
    no region to fill). Raises ``USBEditorError`` for a model that cannot be loaded."""
    from USBLib.editor.input_checks import edit_stages

    stages, local_mode = Stages(stages or "").value, LocalMode(local_mode or "").value
    if Task(task) is Task.HEAL and not has_mask:
        stages = Stages.LATENT.value
    bundle = panel_bundle(model) if not stages or not local_mode else None
    stages, local_mode = edit_stages(bundle, Task(task).value, stages, local_mode)
    return Stages(stages), LocalMode(local_mode)


def runs_once(task: Task, stages: Stages, local_mode: LocalMode, model: Optional[str] = None,
              has_mask: bool = True) -> bool:
    """True for an edit the engine runs once, whatever the samples asked for (``check_sampling`` refuses several
    samples of it): the local stage alone, for every heal and for an embed in fidelity mode; "Model default" is the
    model's, and a heal without a mask the latent stage (``resolved_stages``). The rule is the engine's
    (``USBLib.editor.input_checks.runs_once``)."""
    from USBLib.editor.input_checks import runs_once as engine_runs_once

    if Task(task) not in (Task.HEAL, Task.EMBED):
        return False
    stage, mode = resolved_stages(task, stages, local_mode, model, has_mask)
    return engine_runs_once(None, Task(task).value, stage.value, mode.value)


def missing_input(task: Task, volume_node, mask_node, segment_id: str) -> Optional[str]:
    """What the user still has to choose before ``task`` can run (the Apply button's tooltip), or None."""
    info = TASK_INFO[Task(task)]
    if info["volume"] == "required" and volume_node is None:
        return "Select an input volume."
    if info["mask"] == "required" and mask_node is None:
        return "Select or paint the lesion."
    if (info["mask"] != "unused" and mask_node is not None and mask_node.IsA("vtkMRMLSegmentationNode")
            and not segment_id):
        return "Select the lesion segment."
    return None


def segment_choices(mask_node) -> list[tuple[str, str]]:
    """(name, segment ID) of every segment of a segmentation node; empty for a labelmap or None."""
    if mask_node is None or not mask_node.IsA("vtkMRMLSegmentationNode"):
        return []
    segmentation = mask_node.GetSegmentation()
    ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    return [(segmentation.GetSegment(sid).GetName(), sid) for sid in ids]


def new_lesion_segmentation(volume_node) -> tuple[Any, str]:
    """A segmentation '<volume> lesion' on the volume's grid with one empty 'lesion' segment, ready to paint."""
    if volume_node is None:
        raise USBEditorError("Select the input volume first: the lesion is painted on it.")
    scene = slicer.mrmlScene
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{volume_node.GetName()} lesion"))
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    return seg, seg.GetSegmentation().AddEmptySegment("lesion", "lesion", LESION_COLOR)


def load_mask(path: str):
    """Load a lesion mask file: ``.seg.nrrd`` as a segmentation, anything else as a labelmap volume."""
    try:
        if str(path).lower().endswith(".seg.nrrd"):
            return slicer.util.loadSegmentation(str(path))
        return slicer.util.loadLabelVolume(str(path))
    except RuntimeError as exc:  # slicer.util's "Failed to load node from file"
        raise USBEditorError(f"Could not read '{Path(path).name}' as a mask ({exc}).") from None


def load_sample() -> tuple[Any, Any]:
    """The bundled 1 mm sample T1 (with a synthetic lesion) and its lesion mask, as a volume and a labelmap."""
    from USBLib.resources import sample_files
    from USBLib.errors import InputError

    try:
        files = sample_files()
    except InputError as exc:
        raise USBEditorError(str(exc)) from None
    return slicer.util.loadVolume(str(files["image"])), slicer.util.loadLabelVolume(str(files["lesion"]))


def segment_editor_node(tag: str = "USBEditor"):
    """The module's own Segment Editor parameter node (a scene singleton, recreated after a scene close)."""
    node = slicer.mrmlScene.GetSingletonNode(tag, "vtkMRMLSegmentEditorNode")
    if node is None:
        node = slicer.vtkMRMLSegmentEditorNode()
        node.SetSingletonTag(tag)
        node = slicer.mrmlScene.AddNode(node)
    return node


# ----------------------------------------------------------------- the logic
def failure_message(code: Optional[int], error: Optional[str], log: list[str]) -> str:
    """One line for a run that failed: the worker's USB-ERROR message; without one, how it ended (killed by a signal:
    out of memory?) and its last line of output (e.g. the end of a traceback)."""
    if error:
        return error
    if code is not None and code < 0:
        number = -code
        try:
            name = f" ({signal.Signals(number).name})"
        except ValueError:
            name = ""
        oom = "; out of memory?" if number == getattr(signal, "SIGKILL", 9) else ""
        message = f"the worker was killed by signal {number}{name}{oom}"
    else:
        message = f"the worker stopped with exit code {code}"
    last = next((" ".join(line.split()) for line in reversed(log) if line.strip()), "")
    return f"{message}; its last output: {last[:300]}" if last else message


class EditorLogic:
    """Start, watch, cancel and import USB runs on MRML nodes. ``python`` overrides the worker interpreter."""

    def __init__(self, python: Optional[str] = None, threads: Optional[int] = None):
        self.python = python
        self.threads = threads

    # ---- starting
    def start(self, task: Task, volume_node=None, mask_node=None, segment_id: Optional[str] = None,
              settings: Optional[RunSettings] = None, model: Optional[str] = None, device: Device = Device.AUTO,
              frames: int = 0, resample_mask: bool = True) -> Run:
        """Check the inputs, write the job and start the worker. Raises ``USBEditorError`` for bad input.

        ``frames`` >= 2 makes an embed a progression series; ``resample_mask`` allows masks on another grid."""
        task, device = Task(task), Device(device)
        info = TASK_INFO[task]
        model = model_folder(model)
        settings = settings or default_settings(task, model)
        if info["volume"] == "required" and volume_node is None:
            raise USBEditorError("Select an input volume.")
        if info["mask"] == "required" and mask_node is None:
            raise USBEditorError("Select the lesion: a segment or a labelmap.")
        if info["volume"] == "unused":
            volume_node = mask_node = None
        frames = int(frames) if int(frames) >= 2 else 0
        if frames and task is not Task.EMBED:
            raise USBEditorError("A progression series is made by 'Embed lesion' only.")
        image = volume_to_array(volume_node) if volume_node is not None else None
        mask, mask_name = None, ""
        if mask_node is not None:
            if volume_node is not None:
                data, mask_name = mask_from_node(mask_node, segment_id, volume_node, resample_mask)
                mask = (data, image[1])
            else:
                data, affine, mask_name = mask_in_own_space(mask_node, segment_id)
                mask = (data, affine)
        if image is not None and not np.isfinite(image[0]).any():  # NaN where a scan has no value is kept as is
            raise USBEditorError(f"Volume '{volume_node.GetName()}' has no voxel with a value (all NaN or infinite).")
        job_dir = Path(tempfile.mkdtemp(prefix="USBEditor-"))
        try:
            write_job(job_dir, task.value, settings.for_task(task), image=image, mask=mask, model=model,
                      device=device.value, frames=frames)
            process = WorkerProcess(job_dir, device=device.value, python=self.python, threads=self.threads)
        except Exception:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        logging.info("USBEditor: %s started (%s)", info["label"], " ".join(process.command))
        return Run(task, job_dir, process, volume_node, mask_name, frames,
                   placed_like=mask_node if volume_node is None else None)

    # ---- finishing
    def cancel(self, run: Run) -> None:
        """Stop the worker and delete its files; the scene is left as it was."""
        run.process.cancel()
        shutil.rmtree(run.job_dir, ignore_errors=True)

    def finish(self, run: Run) -> Outputs:
        """Import a successful run's results as new nodes; raises ``USBEditorError`` with the worker's message."""
        try:
            run.process.poll()
            code = run.process.returncode
            if code is None:
                raise RuntimeError("finish() called while the worker is still running")
            if code != 0 or run.process.result is None:
                message = failure_message(code, run.process.error, run.process.log)
                tail = "\n".join(run.process.log[-20:])
                if tail:
                    logging.error("USBEditor worker output:\n%s", tail)
                raise USBEditorError(message[:1].upper() + message[1:])
            return self._import(run, json.loads(run.process.result.read_text()))
        finally:
            shutil.rmtree(run.job_dir, ignore_errors=True)

    def run(self, task: Task, volume_node=None, mask_node=None, segment_id: Optional[str] = None,
            settings: Optional[RunSettings] = None, model: Optional[str] = None, device: Device = Device.AUTO,
            frames: int = 0, resample_mask: bool = True, progress: Optional[Progress] = None) -> Outputs:
        """Blocking run for scripts and tests; ``progress(done, total, message)`` returning False cancels (raising
        cancels too, and the exception goes on)."""
        handle = self.start(task, volume_node, mask_node, segment_id, settings, model, device, frames, resample_mask)

        def on_event(event) -> Optional[bool]:
            if event.kind == "progress" and progress is not None:
                return progress(event.done, event.total, event.text)
            return None

        try:
            handle.process.wait(on_event)
        except BaseException:  # the callback raised, or Ctrl+C: the worker stops and the job's files (the scan) go
            self.cancel(handle)
            raise
        if handle.process.cancelled:
            self.cancel(handle)
            raise RunCancelled("cancelled")
        return self.finish(handle)

    # ---- results -> nodes
    def _import(self, run: Run, result: dict[str, Any]) -> Outputs:
        out = Outputs(provenance=result.get("provenance", {}), seconds=time.perf_counter() - run.started)
        files = {(e["role"], int(e["index"])): run.job_dir / "out" / e["file"] for e in result["outputs"]}
        source = run.volume_node
        base = self._output_name(run)
        like_dtype = None
        if source is not None and run.task in (Task.HEAL, Task.EMBED, Task.GENERATE_FROM_MASK):  # as `usb` writes
            like_dtype = slicer.util.arrayFromVolume(source).dtype
        try:
            images = sorted(i for role, i in files if role == "image")
            for i in images:
                name = base if len(images) == 1 else f"{base} {i + 1}"
                node = self._add_volume(files[("image", i)], name, source, like_dtype)
                out.nodes.append(node)
                out.volume = out.volume or node
                if ("lesion", i) in files:
                    lesion = self._add_lesion(files[("lesion", i)], node, name.replace("brain", "lesion"))
                    out.nodes.append(lesion)
                    out.lesion = out.lesion or lesion
            if ("uncertainty", 0) in files:
                out.uncertainty = self._add_volume(files[("uncertainty", 0)], f"{base} uncertainty", source, None,
                                                   copy_display=False)
                out.nodes.append(out.uncertainty)
            frames = sorted(i for role, i in files if role == "frame")
            if frames:
                out.sequence, browser = self._add_sequence([files[("frame", i)] for i in frames],
                                                           f"{source.GetName()} lesion progression", source, like_dtype)
                out.nodes += [out.sequence, browser]
            if run.placed_like is not None:  # a brain for a mask without a volume: shown where the mask is
                for node in out.nodes:
                    self._place_like(node, run.placed_like)
        except Exception:
            for node in out.nodes:
                slicer.mrmlScene.RemoveNode(node)
            raise
        for node in out.nodes:
            node.SetAttribute("USB.provenance", json.dumps(out.provenance, default=str))
        logging.info("USBEditor: %s finished in %.1f s", run.task.label(), out.seconds)
        return out

    @staticmethod
    def _output_name(run: Run) -> str:
        if run.task is Task.GENERATE:
            return "USB generated brain"
        if run.task is Task.GENERATE_FROM_MASK:
            return f"USB brain for {run.mask_name}"
        return f"{run.volume_node.GetName()} {TASK_INFO[run.task]['suffix']}"

    def _add_volume(self, path: Path, name: str, like, dtype, copy_display: bool = True):
        data, affine = load_array(path)
        if dtype is not None:
            from USBLib.imaging.io import cast_like

            data = cast_like(data, dtype)
        node = slicer.util.addVolumeFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)), ijkToRAS=affine,
                                              name=slicer.mrmlScene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        if like is not None:
            self._place_like(node, like)
            if copy_display and like.GetDisplayNode() is not None and node.GetDisplayNode() is not None:
                src, dst = like.GetDisplayNode(), node.GetDisplayNode()
                dst.SetAutoWindowLevel(False)
                dst.SetWindowLevel(src.GetWindow(), src.GetLevel())
                if src.GetColorNodeID():
                    dst.SetAndObserveColorNodeID(src.GetColorNodeID())
        return node

    @staticmethod
    def _place_like(node, like) -> None:
        """Same parent transform and subject-hierarchy folder as ``like``."""
        node.SetAndObserveTransformNodeID(like.GetTransformNodeID())
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        like_item = sh.GetItemByDataNode(like) if sh is not None else 0
        item = sh.GetItemByDataNode(node) if like_item else 0
        if item and sh.GetItemParent(like_item):
            sh.SetItemParent(item, sh.GetItemParent(like_item))

    @staticmethod
    def _add_lesion(path: Path, reference, name: str):
        data, _ = load_array(path)
        seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", slicer.mrmlScene.GenerateUniqueName(name))
        seg.CreateDefaultDisplayNodes()
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
        segment_id = seg.GetSegmentation().AddEmptySegment("lesion", "lesion", LESION_COLOR)
        if data.any():  # (an all-zero array crashes the labelmap update; the segment just stays empty)
                slicer.util.updateSegmentBinaryLabelmapFromArray(
                    np.ascontiguousarray(data.transpose(2, 1, 0).astype(np.uint8)), seg, segment_id, reference)
        return seg

    def _add_sequence(self, paths: list[Path], name: str, like, dtype):
        """(sequence, browser) of the frames at ``paths``; a frame that cannot be read leaves no node behind."""
        scene = slicer.mrmlScene
        before = _node_ids(scene)
        try:
            return self._fill_sequence(paths, name, like, dtype)
        except Exception:
            _remove_nodes_added_since(scene, before)
            raise

    def _fill_sequence(self, paths: list[Path], name: str, like, dtype):
        scene = slicer.mrmlScene
        sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", scene.GenerateUniqueName(name))
        sequence.SetIndexName("frame")
        sequence.SetIndexUnit("")
        for i, path in enumerate(paths):
            data, affine = load_array(path)
            if dtype is not None:
                from USBLib.imaging.io import cast_like

                data = cast_like(data, dtype)
            frame = slicer.vtkMRMLScalarVolumeNode()
            frame.SetName(f"{name} {i + 1}")
            frame.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(affine))
            slicer.util.updateVolumeFromArray(frame, np.ascontiguousarray(data.transpose(2, 1, 0)))
            sequence.SetDataNodeAtValue(frame, str(i + 1))
        browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", scene.GenerateUniqueName(f"{name} browser"))
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        sequences = getattr(slicer.modules, "sequences", None)
        if sequences is not None:
            sequences.logic().UpdateProxyNodesFromSequences(browser)
            proxy = browser.GetProxyNode(sequence)
            if proxy is not None:
                self._place_like(proxy, like)
        return sequence, browser


def show_comparison(output_node, input_node=None, opacity: float = 0.5) -> None:
    """Output as background, input as foreground at ``opacity``: fade between them with the slice views' slider."""
    if not hasattr(getattr(slicer, "app", None), "layoutManager"):
        return  # no views (headless)
    slicer.util.setSliceViewerLayers(background=output_node, foreground=input_node,
                                     foregroundOpacity=opacity if input_node is not None else 0.0, fit=True)
