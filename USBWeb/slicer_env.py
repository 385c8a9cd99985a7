"""Give ``slicer.util`` and USBEditorLib the application they expect, built from trame-slicer's ``SlicerApp``.

``slicer-core`` has the MRML classes and ``slicer.util`` but no ``slicer.app``: inside Slicer the application sets
``slicer.mrmlScene``, ``slicer.app`` and ``slicer.modules``. Here they are set from the page's ``SlicerApp`` (its
scene and its module logics), so ``USBEditorLib.logic`` runs unchanged on the scene the views show.
"""
from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import slicer
import slicer.util  # noqa: F401  (the helpers USBEditorLib uses)

_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mgz")
_LABELMAP, _SINGLE_FILE = 1, 8  # vtkSlicerVolumesLogic::AddArchetypeVolume loading options


def node_name(path: str | Path) -> str:
    """Slicer's default node name for a file: the file name without its (double) suffix."""
    name = Path(path).name
    return next((name[: -len(s)] for s in _SUFFIXES if name.lower().endswith(s)), Path(path).stem)


class _Module:
    """``slicer.modules.<name>``: only ``logic()`` is used."""

    def __init__(self, logic: Any):
        self._logic = logic

    def logic(self) -> Any:
        return self._logic


class IOManager:
    """The part of ``qSlicerCoreIOManager`` that ``slicer.util.loadVolume/loadLabelVolume/loadSegmentation`` use,
    on Slicer's own readers (the volumes and segmentations module logics)."""

    def __init__(self, volumes_logic: Any, segmentations_logic: Any):
        self._volumes, self._segmentations = volumes_logic, segmentations_logic

    @staticmethod
    def fileType(file_name: str) -> str:  # noqa: N802 (Slicer's name)
        return "SegmentationFile" if str(file_name).lower().endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, file_type: str, properties: dict, loaded_nodes: Any,  # noqa: N802 (Slicer's name)
                  user_messages: Any = None) -> bool:
        path = str(properties["fileName"])
        name = properties.get("name") or node_name(path)
        if file_type == "SegmentationFile":
            node = self._segmentations.LoadSegmentationFromFile(path, True, name)
        else:
            options = (_LABELMAP if properties.get("labelmap") else 0) | _SINGLE_FILE
            node = self._volumes.AddArchetypeVolume(path, name, options)
        if node is not None:
            loaded_nodes.AddItem(node)
        return node is not None


class _App:
    """``slicer.app`` as far as ``slicer.util`` needs it without Qt."""

    applicationName = "USBWeb"  # noqa: N815

    def __init__(self, io_manager: IOManager, app_logic: Any):
        self._io = io_manager
        self.applicationLogic = app_logic  # noqa: N815

    def coreIOManager(self) -> IOManager:  # noqa: N802
        return self._io

    @staticmethod
    def processEvents() -> None:  # noqa: N802
        return None


def install(slicer_app: Any) -> None:
    """Point ``slicer.mrmlScene``, ``slicer.app`` and ``slicer.modules`` at a trame-slicer ``SlicerApp``."""
    sequences = slicer.vtkSlicerSequencesLogic()
    slicer_app.register_module_logic(sequences, logic_name="Sequences")
    logics = {"volumes": slicer_app.volumes_logic, "segmentations": slicer_app.segmentations_logic,
              "subjecthierarchy": slicer_app.subject_hierarchy_logic, "colors": slicer_app.color_logic,
              "sequences": sequences}
    slicer.mrmlScene = slicer_app.scene
    slicer.app = _App(IOManager(slicer_app.volumes_logic, slicer_app.segmentations_logic), slicer_app.app_logic)
    slicer.modules = types.SimpleNamespace(**{name: _Module(logic) for name, logic in logics.items()})
