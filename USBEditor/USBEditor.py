"""USB Editor: remove or embed brain lesions, or generate brains, with the USB latent diffusion model.

This file only wires Qt widgets to ``USBEditorLib`` (Qt-free, tested headless). Nothing heavy is imported
here: torch and MONAI load in the background worker process when Apply is pressed.
"""
from __future__ import annotations

import logging
import time
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from USBEditorLib import dependencies
from USBEditorLib.process import close_warm_workers
from USBLib.settings import DARK_LESION_LEVEL, FALLBACKS, RANGES
from USBEditorLib.logic import (OTHER_MODEL, TASK_INFO, Device, EditorLogic, LocalMode, RunSettings, Sampler,
                                Stages, Task, USBEditorError, chosen_model,
                                default_settings,
                                describe_model, installed_models, load_mask, load_sample, missing_input, resolved_stages,
                                runs_once, RUNS_ONCE_HELP,
                                new_lesion_segmentation, segment_choices, segment_editor_node, show_comparison)

POLL_MS = 200


class USBEditor(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("USB Editor")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["USB for 3D Slicer developers"]
        self.parent.helpText = _(
            "Edit brain MRI in both directions with a latent diffusion model (USB): remove a lesion "
            "(pathology \u2192 healthy, e.g. before FreeSurfer), embed a realistic lesion into a healthy scan, generate a "
            "brain for a lesion mask, or generate new brain + lesion pairs. Voxels outside the edit region are left "
            "unchanged and every result keeps the input's geometry. "
            '<a href="https://github.com/usb-slicer/SlicerUSB#usb-editor-in-3d-slicer">Documentation</a>.')
        self.parent.acknowledgementText = _(
            "Method: USB, a unified synthetic brain framework for bidirectional pathology-healthy generation "
            "(latent diffusion with anatomy and lesion consistency guidance). Default model trained on MNI152, "
            "fsaverage and IXI555 templates with synthetic deformations and lesions; see the model card.")


@parameterNodeWrapper
class USBEditorParameterNode:
    """Module state saved with the scene."""

    task: Task = Task.HEAL
    inputVolume: vtkMRMLScalarVolumeNode
    # None is a member: Slicer's UnionSerializer writes a new node's default (None) through the union's members, and
    # without one it raises TypeError: the panel could not set up
    maskNode: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode, None]
    segmentId: str = ""
    # ranges and fallbacks: USBLib.settings, the one table every layer uses; the model's defaults replace them
    acg: bool = FALLBACKS["acg"]
    alpha0: Annotated[float, WithinRange(*RANGES["alpha0"])] = FALLBACKS["alpha0"]
    k: Annotated[float, WithinRange(*RANGES["k"])] = FALLBACKS["k"]
    eta: Annotated[float, WithinRange(*RANGES["eta"])] = FALLBACKS["eta"]
    steps: Annotated[int, WithinRange(*RANGES["steps"])] = FALLBACKS["steps"]
    strength: Annotated[float, WithinRange(*RANGES["strength"])] = FALLBACKS["strength"]
    samples: Annotated[int, WithinRange(*RANGES["samples"])] = FALLBACKS["samples"]
    seed: Annotated[int, WithinRange(*RANGES["seed"])] = FALLBACKS["seed"]
    frames: Annotated[int, WithinRange(0, 16)] = 0
    device: Device = Device.AUTO
    stages: Stages = Stages.DEFAULT
    localMode: LocalMode = LocalMode.DEFAULT
    sampler: Sampler = Sampler.DEFAULT
    lesionGuidance: Annotated[float, WithinRange(*RANGES["lesion_guidance"])] = FALLBACKS["lesion_guidance"]
    lesionFusion: bool = FALLBACKS["lesion_fusion"]
    model: str = ""
    showComparison: bool = True
    resampleMask: bool = True
    maskCoversRim: bool = False  # heal: the mask already covers the lesion's dark rim (FLAIR-made, dilated)
    setLesionLevel: bool = False  # embed: ask for the lesion's darkness (off: the network's own level)
    lesionLevel: Annotated[float, WithinRange(*RANGES["lesion_level"])] = DARK_LESION_LEVEL
    guidanceTask: str = ""  # the task whose defaults the sliders were last set to ("" = never)


class USBEditorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, lesion painting, guidance sliders, background run with progress and Cancel."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[USBEditorLogic] = None
        self._parameterNode: Optional[USBEditorParameterNode] = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._observedSegmentation = None  # the mask segmentation whose segment list the panel follows
        self._connectingGui = False  # connectGui refills the task combo: its index changes are no user's choice
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self._onPoll)

    # ----------------------------------------------------------------- setup
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/USBEditor.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = USBEditorLogic()

        editor = self.ui.segmentEditorWidget
        editor.setEffectNameOrder(["Paint", "Draw", "Erase", "Islands", "Threshold", "Smoothing"])
        editor.unorderedEffectsVisible = False

        self.ui.modelComboBox.addItems(installed_models() + [OTHER_MODEL])
        self.ui.modelPathLineEdit.visible = False
        self._segmentEditorNode()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resetDefaultsButton.connect("clicked(bool)", self.onResetDefaults)
        self.ui.newLesionButton.connect("clicked(bool)", self.onNewLesion)
        self.ui.loadMaskButton.connect("clicked(bool)", self.onLoadMask)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.segmentComboBox.connect("currentIndexChanged(int)", self.onSegmentChanged)
        self.ui.segmentEditorWidget.connect("currentSegmentIDChanged(QString)", self.onEditorSegmentChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.maskSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onMaskChanged)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)

        self.initializeParameterNode()
        self.onModelChanged()

    def cleanup(self) -> None:
        self._stopRun()
        self.removeObservers()
        close_warm_workers()  # the kept worker's memory (GPU included) goes with the module

    def onReload(self) -> None:
        """Also re-import USBEditorLib (Slicer's generic reload only re-reads this file). A run and the kept worker
        end first: re-importing ``USBEditorLib.process`` empties its list of warm workers, so ``cleanup``, which
        Slicer calls after this, would no longer find them (their memory, GPU included, held until the idle timer)."""
        import importlib
        import sys

        self._stopRun()
        close_warm_workers()
        for name in sorted(n for n in sys.modules if n.startswith("USBEditorLib.")):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def enter(self) -> None:
        self.initializeParameterNode()
        self._segmentEditorNode()
        self.ui.segmentEditorWidget.installKeyboardShortcuts()

    def exit(self) -> None:
        editor = self.ui.segmentEditorWidget
        editor.setActiveEffect(None)  # otherwise the brush stays active in the views after leaving the module
        editor.uninstallKeyboardShortcuts()
        editor.removeViewObservations()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None:
            self.ui.statusLabel.text = _("Cancelled: the scene was closed.")
        self._stopRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ----------------------------------------------------------------- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.guidanceTask:  # a new parameter node: start from the model's defaults
            self._applyDefaults(self._parameterNode.task, guidanceOnly=False)
        if not self._parameterNode.inputVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = first

    def setParameterNode(self, inputParameterNode: Optional[USBEditorParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._connectingGui = True  # (see onTaskChanged)
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            finally:
                self._connectingGui = False
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateState)
            self._showModel(self._parameterNode.model)
            self._fillSegments()
            self._updateState()

    def _showModel(self, model: str) -> None:
        """Select a saved model (installed name or folder) in the Advanced section. The widgets' signals are held
        meanwhile: a restored scene keeps its own settings (the combo's switch to "Other folder..." ran
        ``onModelChanged`` before the folder was set, which reset every slider to a model's defaults)."""
        combo, path = self.ui.modelComboBox, self.ui.modelPathLineEdit
        index = combo.findText(model) if model else 0
        held = combo.blockSignals(True), path.blockSignals(True)
        try:
            if index < 0:
                path.currentPath = model
                combo.currentIndex = combo.findText(OTHER_MODEL)
            else:
                combo.currentIndex = index
        finally:
            combo.blockSignals(held[0])
            path.blockSignals(held[1])
        self._describeModel()

    def _segmentEditorNode(self) -> None:
        self.ui.segmentEditorWidget.setMRMLSegmentEditorNode(segment_editor_node())

    # ----------------------------------------------------------------- state of the panel
    def _updateState(self, caller=None, event=None) -> None:
        """Enable the controls the task uses; say on the Apply button what is missing."""
        p = self._parameterNode
        if p is None:
            return
        info = TASK_INFO[p.task]
        edit = p.task in (Task.HEAL, Task.EMBED)
        self.ui.inputVolumeSelector.enabled = info["volume"] != "unused"
        for widget in (self.ui.maskSelector, self.ui.segmentComboBox, self.ui.newLesionButton, self.ui.loadMaskButton):
            widget.enabled = info["mask"] != "unused"
        self.ui.acgCheckBox.enabled = edit
        # steps and strength shape the latent diffusion only: an edit by the local stage alone does not read them
        latent = self._resolvedStages()[0] is not Stages.LOCAL
        self.ui.stepsSliderWidget.enabled = not edit or latent
        self.ui.strengthSliderWidget.enabled = edit and latent
        for widget in (self.ui.alpha0SliderWidget, self.ui.kSliderWidget):
            widget.enabled = edit and p.acg
        self.ui.etaSliderWidget.enabled = edit and p.acg and p.maskNode is not None  # LCG scales ACG's weight
        self.ui.samplesSpinBox.enabled = not self._deterministicEdit()
        self.ui.samplesSpinBox.toolTip = _(RUNS_ONCE_HELP) if self._deterministicEdit() else _(
            "Several samples give their mean and a per-voxel uncertainty volume.")
        self.ui.maskCoversRimCheckBox.enabled = p.task is Task.HEAL and p.maskNode is not None
        self.ui.framesSpinBox.enabled = p.task is Task.EMBED
        self.ui.stagesComboBox.enabled = edit and p.maskNode is not None
        self.ui.localModeComboBox.enabled = edit and p.maskNode is not None and p.stages is not Stages.LATENT
        self.ui.samplerComboBox.enabled = not edit
        self.ui.lesionGuidanceSliderWidget.enabled = p.task is Task.GENERATE_FROM_MASK
        self.ui.lesionFusionCheckBox.enabled = p.task is Task.GENERATE_FROM_MASK
        self.ui.setLesionLevelCheckBox.enabled = p.task is Task.EMBED
        self.ui.lesionLevelSliderWidget.enabled = p.task is Task.EMBED and p.setLesionLevel
        reason = missing_input(p.task, p.inputVolume, p.maskNode, p.segmentId)
        running = self._run is not None
        self.ui.applyButton.enabled = reason is None and not running
        self.ui.applyButton.toolTip = reason or _("Run: {task}").format(task=info["label"])

    def _resolvedStages(self) -> tuple[Stages, LocalMode]:
        """The stages and local mode the run would use ("Model default" filled in as the engine fills it)."""
        p = self._parameterNode
        try:
            return resolved_stages(p.task, p.stages, p.localMode, self._model(), p.maskNode is not None)
        except USBEditorError:  # a model that cannot be loaded: Apply says so
            return p.stages, p.localMode

    def _deterministicEdit(self) -> bool:
        p = self._parameterNode
        try:
            return runs_once(p.task, p.stages, p.localMode, self._model(), p.maskNode is not None)
        except USBEditorError:
            return False

    def onTaskChanged(self, index: int = 0) -> None:
        """A new task brings its own recommended guidance (e.g. heal and embed start at different strengths). Not
        while ``connectGui`` runs: Slicer's enum connector clears and refills the task combo (on every enter and
        scene reopening), which passes through the first task and reset a saved embed's sliders to the heal's."""
        if self._connectingGui or not self._parameterNode or not 0 <= index < len(Task):
            return
        task = list(Task)[index]  # (the combo lists the tasks in Enum order)
        if task.value != self._parameterNode.guidanceTask:  # not when a saved scene restores its own values
            self._applyDefaults(task)
        self._updateState()

    def onMaskChanged(self, node=None) -> None:
        """Keep the segment list and the embedded Segment Editor on the selected segmentation and volume."""
        if not self._parameterNode:
            return
        self._observeSegments(self.ui.maskSelector.currentNode())
        self._fillSegments()
        mask, volume = self.ui.maskSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()
        editor = self.ui.segmentEditorWidget
        self._segmentEditorNode()
        editor.setSegmentationNode(mask if mask is not None and mask.IsA("vtkMRMLSegmentationNode") else None)
        editor.setSourceVolumeNode(volume)

    def _observeSegments(self, mask) -> None:
        """Keep the segment list current while segments are added, removed or renamed (in this panel's Segment
        Editor or anywhere else)."""
        events = (slicer.vtkSegmentation.SegmentAdded, slicer.vtkSegmentation.SegmentRemoved,
                  slicer.vtkSegmentation.SegmentModified)
        if self._observedSegmentation is not None:
            for event in events:
                self.removeObserver(self._observedSegmentation, event, self._onSegmentsChanged)
        self._observedSegmentation = mask if mask is not None and mask.IsA("vtkMRMLSegmentationNode") else None
        if self._observedSegmentation is not None:
            for event in events:
                self.addObserver(self._observedSegmentation, event, self._onSegmentsChanged)

    def _onSegmentsChanged(self, caller=None, event=None) -> None:
        self._fillSegments()
        self._updateState()

    def onEditorSegmentChanged(self, segmentId: str) -> None:
        """The segment picked in the embedded Segment Editor is the lesion the run uses."""
        combo = self.ui.segmentComboBox
        index = combo.findData(segmentId) if segmentId else -1
        if self._parameterNode and index >= 0 and index != combo.currentIndex:
            combo.currentIndex = index  # (onSegmentChanged stores it)

    def _fillSegments(self) -> None:
        combo, p = self.ui.segmentComboBox, self._parameterNode
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        # (the selector, not the parameter node: the node may not have seen the change yet)
        choices = segment_choices(self.ui.maskSelector.currentNode())
        for name, sid in choices:
            combo.addItem(name, sid)
        ids = [sid for _name, sid in choices]
        if p.segmentId not in ids:  # a segment that is gone (or none left) is not kept as the lesion
            p.segmentId = ids[0] if ids else ""
        if p.segmentId in ids:
            combo.currentIndex = ids.index(p.segmentId)
        combo.blockSignals(wasBlocked)

    def onSegmentChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.segmentId = self.ui.segmentComboBox.itemData(index) or ""
            self.ui.segmentEditorWidget.setCurrentSegmentID(self._parameterNode.segmentId)

    def onNewLesion(self) -> None:
        """A new segmentation with an empty 'lesion' segment on the input volume, ready to paint."""
        try:
            seg, sid = new_lesion_segmentation(self.ui.inputVolumeSelector.currentNode())
        except USBEditorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._parameterNode.maskNode = seg
        self._parameterNode.segmentId = sid
        self.onMaskChanged()
        self.ui.paintCollapsibleButton.collapsed = False
        self.ui.segmentEditorWidget.setActiveEffectByName("Paint")

    def onLoadMask(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Load lesion mask"), "",
                                              _("Masks (*.nii *.nii.gz *.nrrd *.mha *.mgz *.seg.nrrd);;All files (*)"))
        if not path:
            return
        try:
            node = load_mask(path)
        except USBEditorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._parameterNode.maskNode = node
        self.onMaskChanged()

    def onLoadSample(self) -> None:
        """The bundled sample scan and its lesion mask, selected as inputs: a first run in two clicks."""
        try:
            volume, lesion = load_sample()
        except USBEditorError as exc:
            slicer.util.errorDisplay(str(exc))
            return
        self._parameterNode.inputVolume = volume
        self._parameterNode.maskNode = lesion
        self.onMaskChanged()

    def onResetDefaults(self) -> None:
        self._applyDefaults(self._parameterNode.task, guidanceOnly=False)

    def _applyDefaults(self, task: Task, guidanceOnly: bool = True) -> None:
        """The model's recommended settings for ``task``; samples, seed and frames too unless ``guidanceOnly``."""
        p = self._parameterNode
        try:
            settings = default_settings(task, self._model())
        except USBEditorError as exc:  # e.g. a model folder that is not a bundle: keep the sliders as they are
            self.ui.statusLabel.text = str(exc)
            return
        keys = ["acg", "alpha0", "k", "eta", "steps", "strength"] + ([] if guidanceOnly else ["samples", "seed"])
        for key in keys:
            setattr(p, key, getattr(settings, key))
        p.stages = Stages(settings.stages)
        p.localMode = LocalMode(settings.local_mode)
        p.lesionGuidance = settings.lesion_guidance
        p.lesionFusion = settings.lesion_fusion
        if not guidanceOnly:
            p.frames = 0
            p.sampler = Sampler(settings.sampler) if settings.sampler else Sampler.DEFAULT
            p.setLesionLevel = False  # the network's own darkness
            p.lesionLevel = DARK_LESION_LEVEL
            p.maskCoversRim = False
        p.guidanceTask = task.value

    def _model(self) -> Optional[str]:
        """The chosen model (None: the default); "Other folder..." without a folder is a ``USBEditorError``."""
        return chosen_model(self.ui.modelComboBox.currentText, self.ui.modelPathLineEdit.currentPath)

    def _describeModel(self) -> None:
        """Show the folder field for "Other folder..." and what the chosen model is."""
        self.ui.modelPathLineEdit.visible = self.ui.modelComboBox.currentText == OTHER_MODEL
        try:
            self.ui.modelInfoLabel.text = describe_model(self._model())
        except USBEditorError as exc:
            self.ui.modelInfoLabel.text = str(exc)

    def onModelChanged(self, *args) -> None:
        self._describeModel()
        try:
            model = self._model() or ""
        except USBEditorError:  # "Other folder..." before its folder is chosen: the label asks for it
            return
        if self._parameterNode:
            changed = self._parameterNode.model != model
            self._parameterNode.model = model
            if changed:  # the new model's recommended settings (not when a saved scene restores its own model)
                self._applyDefaults(self._parameterNode.task)

    # ----------------------------------------------------------------- running
    def onApplyButton(self) -> None:
        if not self._ensureDependencies():
            return
        p = self._parameterNode
        settings = RunSettings(steps=int(p.steps), strength=p.strength, acg=bool(p.acg), alpha0=p.alpha0, k=p.k,
                               eta=p.eta,
                               stages=p.stages.value, local_mode=p.localMode.value, sampler=p.sampler.value,
                               lesion_guidance=p.lesionGuidance, lesion_fusion=bool(p.lesionFusion),
                               samples=1 if self._deterministicEdit() else int(p.samples), seed=int(p.seed),
                               mask_covers_rim=bool(p.maskCoversRim),
                               lesion_level=float(p.lesionLevel) if p.setLesionLevel else None)
        info = TASK_INFO[p.task]
        mask = p.maskNode if info["mask"] != "unused" else None
        volume = p.inputVolume if info["volume"] != "unused" else None
        try:
            with slicer.util.tryWithErrorDisplay(_("USB could not start."), waitCursor=True):
                self._run = self.logic.start(p.task, volume, mask, p.segmentId or None, settings, self._model(),
                                             p.device, frames=int(p.frames) if p.task is Task.EMBED else 0,
                                             resample_mask=p.resampleMask)
        except Exception:  # shown to the user by tryWithErrorDisplay
            return
        self._setRunning(True, _("Starting ({task})...").format(task=info["label"]))
        self._timer.start()

    def onCancelButton(self) -> None:
        self._stopRun()
        self.ui.statusLabel.text = _("Cancelled; nothing was added to the scene.")

    def _stopRun(self) -> None:
        self._timer.stop()
        if self._run is not None:
            self.logic.cancel(self._run)
            self._run = None
        if hasattr(self, "ui"):
            self._setRunning(False)

    def _onPoll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        for event in run.process.poll():
            if event.kind == "progress" and event.total > 0:
                self.ui.progressBar.maximum = event.total
                self.ui.progressBar.value = event.done
                elapsed = time.perf_counter() - run.started
                eta = f", {elapsed * (event.total - event.done) / event.done:.0f} s left" if event.done else ""
                self.ui.progressBar.format = f"{event.text} %p%{eta}"
            elif event.kind == "log":
                logging.info("USB worker: %s", event.text)
        if run.process.running:
            return
        self._timer.stop()
        self._run = None
        try:
            with slicer.util.tryWithErrorDisplay(_("USB failed."), waitCursor=True):
                outputs = self.logic.finish(run)
                if self._parameterNode.showComparison and outputs.volume is not None:
                    show_comparison(outputs.volume, run.volume_node)
                names = ", ".join(node.GetName() for node in outputs.nodes if not node.IsA("vtkMRMLSequenceBrowserNode"))
                self.ui.statusLabel.text = " ".join([_("Done in {s:.0f} s: {names}").format(s=outputs.seconds, names=names),
                                                     *(note[:1].upper() + note[1:] + "." for note in outputs.notes)])
        except Exception as exc:  # already shown by tryWithErrorDisplay
            self.ui.statusLabel.text = str(exc)
        finally:
            self._setRunning(False)

    def _setRunning(self, running: bool, message: str = "") -> None:
        self.ui.cancelButton.visible = running
        self.ui.applyButton.visible = not running
        self.ui.progressBar.visible = running
        if running:  # the last run's text and length go: they showed until the first progress event
            self.ui.progressBar.maximum = 100
            self.ui.progressBar.value = 0
            self.ui.progressBar.format = "%p%"
            self.ui.statusLabel.text = message
        for section in (self.ui.inputsCollapsibleButton, self.ui.guidanceCollapsibleButton,
                        self.ui.advancedCollapsibleButton):
            section.enabled = not running
        if self._parameterNode:
            self._updateState()

    def _ensureDependencies(self) -> bool:
        """Ask once, listing every missing package; install torch via the PyTorch extension, the rest via pip."""
        plan = dependencies.install_plan()
        if plan.empty:
            return True
        if not slicer.util.confirmOkCancelDisplay(plan.describe(), windowTitle=_("USB needs Python packages")):
            return False
        try:
            with slicer.util.tryWithErrorDisplay(_("Installing USB's Python packages failed."), waitCursor=True):
                dependencies.install(plan, log=lambda message: setattr(self.ui.statusLabel, "text", message))
        except dependencies.DependencyError as exc:
            if exc.restart_required and slicer.util.confirmYesNoDisplay(_("Restart Slicer now?")):
                slicer.util.restart()
            return False
        except Exception:
            return False
        return True


class USBEditorLogic(ScriptedLoadableModuleLogic, EditorLogic):
    """Slicer logic: the Qt-free ``EditorLogic`` plus the module's parameter node."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        EditorLogic.__init__(self)

    def getParameterNode(self) -> USBEditorParameterNode:
        return USBEditorParameterNode(super().getParameterNode())


class USBEditorTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer: heals and embeds on the bundled sample with the default model (few steps)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_the_parameter_node_takes_every_kind_of_mask()
        self.setUp()
        self.test_heal_and_embed_sample()
        self.setUp()
        self.test_bad_input_is_a_clear_error()

    def test_the_parameter_node_takes_every_kind_of_mask(self):
        """The panel's state in Slicer's own parameterNodeWrapper: a new node (its mask None), a segmentation and a
        labelmap as the mask, and None again (a Union of node types without None could not write its default, and
        the panel failed to set up)."""
        parameters = USBEditorLogic().getParameterNode()
        self.assertIsNone(parameters.maskNode)
        volume, lesion, _embed = self._sample()
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        for node in (segmentation, lesion, None):
            parameters.maskNode = node
            self.assertIs(parameters.maskNode, node)
        parameters.inputVolume = volume
        self.assertIs(parameters.inputVolume, volume)
        self.delayDisplay("Parameter node test passed")

    def _sample(self):
        from USBLib.resources import sample_files

        files = sample_files()
        volume = slicer.util.loadVolume(str(files["image"]))
        lesion = slicer.util.loadLabelVolume(str(files["lesion"]))
        embed = slicer.util.loadLabelVolume(str(files["embed"]))
        return volume, lesion, embed

    def test_heal_and_embed_sample(self):
        import numpy as np

        self.delayDisplay("Loading the sample scan")
        if not dependencies.install_plan().empty:
            self.delayDisplay("USB's Python packages are not installed; skipping the model run")
            return
        volume, lesion, embed = self._sample()
        before = slicer.util.arrayFromVolume(volume).copy()
        logic = USBEditorLogic()
        fast = RunSettings(steps=10, strength=0.3)
        self.delayDisplay("Removing the lesion")
        healed = logic.run(Task.HEAL, volume, lesion, settings=fast)
        self.assertEqual(healed.volume.GetName(), f"{volume.GetName()} healed")
        inside = slicer.util.arrayFromVolume(lesion) > 0
        self.assertGreater(slicer.util.arrayFromVolume(healed.volume)[inside].mean(), before[inside].mean())
        self.delayDisplay("Embedding a lesion")
        embedded = logic.run(Task.EMBED, volume, embed, settings=RunSettings(steps=10, strength=0.6))
        self.assertEqual(embedded.volume.GetName(), f"{volume.GetName()} + lesion")
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), before), "the input was modified")
        show_comparison(healed.volume, volume)
        self.delayDisplay("Test passed")

    def test_bad_input_is_a_clear_error(self):
        volume, _lesion, _embed = self._sample()
        empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
        empty.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        sid = empty.GetSegmentation().AddEmptySegment("lesion")
        with self.assertRaises(USBEditorError):
            USBEditorLogic().run(Task.EMBED, volume, empty, sid)
        self.delayDisplay("Test passed")

