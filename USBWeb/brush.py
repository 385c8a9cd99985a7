"""Painting the lesion: trame-slicer's Segment Editor (the Paint and Erase effects of Slicer's Segment Editor) on the
document's lesion segment, with the brush diameter in millimetres."""
from __future__ import annotations

from typing import Callable

from trame_slicer.core import SegmentationEditor
from trame_slicer.segmentation import (BrushDiameterMode, SegmentationEffectErase, SegmentationEffectNoTool,
                                       SegmentationEffectPaint)

TOOLS = {"none": SegmentationEffectNoTool, "paint": SegmentationEffectPaint, "erase": SegmentationEffectErase}


class Brush:
    """Paint / erase on one segment; ``on_stroke`` is called after every change of the segmentation."""

    def __init__(self, editor: SegmentationEditor, on_stroke: Callable[[], None]):
        self._editor = editor
        self.tool = "none"
        self.diameter_mm = 8.0
        editor.segmentation_modified.connect(on_stroke)

    def attach(self, segmentation, volume, segment_id: str) -> None:
        """Edit ``segment_id`` of ``segmentation`` on ``volume``'s grid (the tool is reset to none)."""
        self._editor.set_active_segmentation(segmentation, volume)
        self._editor.set_active_segment_id(segment_id)
        self.set_tool("none")

    def set_tool(self, tool: str) -> None:
        """"paint", "erase" or "none" (the mouse navigates the views)."""
        self.tool = tool if tool in TOOLS and self._editor.active_segmentation is not None else "none"
        effect = self._editor.set_active_effect_type(TOOLS[self.tool])
        if self.tool != "none" and effect is not None:
            effect.set_brush_diameter(self.diameter_mm, BrushDiameterMode.Absolute)

    def set_diameter(self, millimetres: float) -> None:
        """Brush diameter in mm (paint and erase share it)."""
        self.diameter_mm = float(millimetres)
        for effect_type in (SegmentationEffectPaint, SegmentationEffectErase):
            self._editor.get_effect(effect_type).set_brush_diameter(self.diameter_mm, BrushDiameterMode.Absolute)
