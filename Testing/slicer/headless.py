"""A headless Slicer for tests: MRML scene + application logic + module logics from the ``slicer-core`` wheel.

``slicer-core`` has the MRML and logic classes but no application: this builds what ``slicer.util`` expects
(``slicer.mrmlScene``, ``slicer.app.coreIOManager()``, ``slicer.modules.<name>.logic()``) from real
Slicer logic objects, so USBEditorLib runs exactly as it does inside Slicer, minus the views.
"""
from __future__ import annotations

import types
from pathlib import Path

import slicer
import slicer.util  # noqa: F401  (loads the helpers the logic uses)
import vtk

_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha", ".mgz")


class _Module:
    def __init__(self, name: str, logic):
        self.name, self._logic = name, logic

    def logic(self):
        return self._logic


class _IOManager:
    """The part of qSlicerCoreIOManager that ``slicer.util.loadVolume/loadLabelVolume/loadSegmentation`` use."""

    def __init__(self, volumes, segmentations):
        self.volumes, self.segmentations = volumes, segmentations

    @staticmethod
    def fileType(file_name) -> str:  # noqa: N802 (Slicer's name)
        return "SegmentationFile" if str(file_name).lower().endswith(".seg.nrrd") else "VolumeFile"

    def loadNodes(self, file_type, properties, loaded_nodes, user_messages=None) -> bool:  # noqa: N802
        path = str(properties["fileName"])
        name = properties.get("name") or next((Path(path).name[: -len(s)] for s in _SUFFIXES
                                               if path.lower().endswith(s)), Path(path).stem)
        if file_type == "SegmentationFile":
            node = self.segmentations.LoadSegmentationFromFile(path, True, name)
        else:
            options = (1 if properties.get("labelmap") else 0) | 8
            node = self.volumes.AddArchetypeVolume(path, name, options)
        if node is not None:
            loaded_nodes.AddItem(node)
        return node is not None


class _App:
    applicationName = "USBHeadlessTests"  # noqa: N815

    def __init__(self, io_manager, app_logic):
        self._io = io_manager
        self.applicationLogic = app_logic  # noqa: N815 (kept alive here: the module logics only point to it)

    def coreIOManager(self):  # noqa: N802
        return self._io

    @staticmethod
    def processEvents() -> None:  # noqa: N802
        return None


def bootstrap() -> "slicer.vtkMRMLScene":
    """Create the scene and logics once per test session and install them on the ``slicer`` module."""
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colors = app_logic.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    app_logic.SetViewLogics(vtk.vtkCollection())
    colors.SetMRMLApplicationLogic(app_logic)
    app_logic.SetModuleLogic("Colors", colors)
    logics = {"Colors": colors}
    for name, cls in (("Volumes", slicer.vtkSlicerVolumesLogic), ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("Sequences", slicer.vtkSlicerSequencesLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app_logic)
        app_logic.SetModuleLogic(name, logic)
        logics[name] = logic
    slicer.mrmlScene = scene
    slicer.app = _App(_IOManager(logics["Volumes"], logics["Segmentations"]), app_logic)
    slicer.modules = types.SimpleNamespace(**{name.lower(): _Module(name, logic) for name, logic in logics.items()})
    return scene


# ----------------------------------------------------------------- helpers for the test modules
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402


def load_nifti(folder: Path, name: str, data: np.ndarray, affine: np.ndarray, labelmap: bool = False):
    """Write ``data`` as ``name.nii.gz`` and load it with Slicer's own reader (volume or labelmap node)."""
    path = folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return (slicer.util.loadLabelVolume if labelmap else slicer.util.loadVolume)(str(path))


def segmentation_from_mask(name: str, mask_ijk: np.ndarray, reference, segment_name: str = "lesion"):
    """A segmentation node with one segment painted from an [I,J,K] mask on ``reference``'s grid."""
    seg = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg.CreateDefaultDisplayNodes()
    seg.SetReferenceImageGeometryParameterFromVolumeNode(reference)
    sid = seg.GetSegmentation().AddEmptySegment(segment_name, segment_name)
    if mask_ijk.any():
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.ascontiguousarray(mask_ijk.transpose(2, 1, 0)).astype(np.uint8), seg, sid, reference)
    return seg, sid
