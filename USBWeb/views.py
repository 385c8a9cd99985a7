"""The page's views on trame-slicer: the layouts (three slice views, optionally with 3D), which volume each slice
layer shows (the scan, the result over it with a fade, the uncertainty map), window/level and the crosshair.

Slice views interact as in Slicer (``vtkMRMLSliceViewInteractorStyle``): wheel = slice, right drag = zoom,
middle drag = pan, Shift + move = crosshair.
"""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from slicer import vtkMRMLCrosshairNode
from trame_slicer.core import LayoutManager, SlicerApp, VolumeWindowLevel
from trame_slicer.views import Layout, LayoutDirection, SliceLayer, ViewLayoutDefinition

LAYOUTS = {"slices": "Slices", "slices3d": "Slices + 3D"}


def layouts() -> dict[str, Layout]:
    """Axial large with coronal and sagittal beside it; or the same with a 3D view (slice planes, no volume
    rendering: it would cost seconds per frame on a CPU)."""
    axial, coronal, sagittal = (ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
                                ViewLayoutDefinition.sagittal_view())
    return {
        "slices": Layout(LayoutDirection.Horizontal, [axial, Layout(LayoutDirection.Vertical, [coronal, sagittal])],
                         flex_sizes=["2", "1"]),
        "slices3d": Layout(LayoutDirection.Horizontal,
                           [Layout(LayoutDirection.Vertical, [axial, ViewLayoutDefinition.threed_view()]),
                            Layout(LayoutDirection.Vertical, [coronal, sagittal])]),
    }


class Views:
    """Display of the document in the page's views."""

    def __init__(self, slicer_app: SlicerApp, layout_manager: LayoutManager):
        self._app = slicer_app
        self._layouts = layout_manager
        # Works around trame-slicer 2.0: a view that RemoteViewFactory creates while a page element is open (as
        # LayoutManager.initialize_layout_grid does for lazily registered layouts) is drawn into that element as
        # well. So the slice views are made now, before the page is built; the 3D view when its layout is chosen.
        for name, layout in layouts().items():
            self._layouts.register_layout(name, layout, lazy_initialization=name != "slices")
        self.layout = "slices"
        self._layouts.set_layout(self.layout)

    @property
    def _slice_views(self) -> list:
        return self._app.view_manager.get_slice_views()

    def set_layout(self, name: str) -> None:
        """Switch layouts; in 3D the three slice planes are shown."""
        self.layout = name if name in LAYOUTS else "slices"
        self._layouts.set_layout(self.layout)
        for view in self._slice_views:
            view.set_visible_in_3d(self.layout == "slices3d")
        # trame-slicer does not refit views after a layout change, and the browser resizes their areas only after
        # the new layout arrives: fit them to the scan once it has
        loop = asyncio.get_event_loop()
        for delay in (0.5, 2.0):
            loop.call_later(delay, self.reset)

    def show(self, background, foreground=None, opacity: float = 1.0, fit: bool = False) -> None:
        """``background`` in every slice view, ``foreground`` over it at ``opacity`` (None: nothing over it)."""
        for view in self._slice_views:
            view.set_layer_volume_id(SliceLayer.Background, background.GetID() if background is not None else None)
            view.set_layer_volume_id(SliceLayer.Foreground, foreground.GetID() if foreground is not None else None)
            view.set_foreground_opacity(opacity if foreground is not None else 0.0)
        if fit:
            self.reset()

    def set_fade(self, opacity: float) -> None:
        """Opacity of the foreground layer (0 = the scan, 1 = the result)."""
        for view in self._slice_views:
            view.set_foreground_opacity(float(opacity))

    def reset(self) -> None:
        """Fit every view to the scan, at the middle slice."""
        self._app.display_manager.reset_views()

    @staticmethod
    def window_bounds(volume) -> tuple[float, float]:
        """The range of the window/level control: the scan's scalar range."""
        return tuple(float(v) for v in VolumeWindowLevel.get_volume_scalar_range(volume))

    @staticmethod
    def display_range(volume) -> tuple[float, float]:
        """The scan's displayed intensity range (level -/+ window/2)."""
        return tuple(float(v) for v in VolumeWindowLevel.get_volume_display_range(volume))

    @staticmethod
    def set_display_range(volumes: list[Any], low: float, high: float) -> None:
        """Window/level of the scan and of the result, so a fade compares like with like."""
        for volume in volumes:
            if volume is not None:
                VolumeWindowLevel.set_volume_node_display_min_max_range(volume, low, high)

    def set_crosshair(self, visible: bool) -> None:
        """Slicer's crosshair in every view (Shift + mouse move places it)."""
        node: Optional[vtkMRMLCrosshairNode] = self._app.scene.GetFirstNodeByClass("vtkMRMLCrosshairNode")
        if node is not None:
            node.SetCrosshairMode(vtkMRMLCrosshairNode.ShowBasic if visible else vtkMRMLCrosshairNode.NoCrosshair)
            node.SetCrosshairBehavior(vtkMRMLCrosshairNode.OffsetJumpSlice)

    @staticmethod
    def set_lesion_style(segmentation, visible: bool, outline_only: bool) -> None:
        """The lesion over the slices: filled while it is being drawn, outline only over a result (so the result
        underneath shows), or hidden."""
        display = segmentation.GetDisplayNode() if segmentation is not None else None
        if display is not None:
            display.SetVisibility(bool(visible))
            display.SetOpacity2DFill(0.0 if outline_only else 0.4)
            display.SetOpacity2DOutline(1.0)
