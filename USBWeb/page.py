"""The page's widgets (Vuetify 3): the side panel in the Slicer module's order (scan, lesion, task, run,
compare) and the views. Only layout here; every value is a ``usb_*`` state entry of ``USBWebApp`` and every
button calls one of its methods. Elements the tests drive have ids."""
from __future__ import annotations

from typing import TYPE_CHECKING

from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3

from . import form
from .uploads import MASK_SUFFIXES, SCAN_SUFFIXES
from .views import LAYOUTS

if TYPE_CHECKING:
    from .app import USBWebApp

BUSY = "usb_running || usb_loading"


def upload_js(trigger: str) -> str:
    """``change`` handler of a file input: refuse a file over the size limit in the browser, else send it through
    trame's websocket upload to ``trigger``."""
    return (
        "const files = $event.target.files; const f = files && files[0];"
        " if (f && f.size > usb_upload_limit_mb * 1048576) {"
        "  usb_error = `'${f.name}' is ${Math.round(f.size / 1048576)} MB; uploads are limited to"
        " ${Math.round(usb_upload_limit_mb)} MB (usb web --max-upload-mb).`;"
        f" }} else if (f) {{ usb_loading = true; usb_error = ''; trigger('{trigger}', [files]); }}"
    )


def _section(title: str) -> None:
    v3.VListSubheader(title, classes="text-uppercase font-weight-bold px-0 mt-2")


def _slider(name: str, disabled: str = "") -> None:
    spec = form.slider_spec(name)
    v3.VSlider(id=f"usb-{name.replace('_', '-')}", v_model=(f"usb_{name}",), min=spec["min"], max=spec["max"],
               step=spec["step"], label=spec["label"], title=spec["help"], thumb_label=True, hide_details=True,
               density="compact", disabled=(f"{BUSY}{' || ' + disabled if disabled else ''}",), classes="my-1")


def _number(name: str, disabled: str = "", title: str = "") -> None:
    """A number field; ``disabled`` an extra JS condition, ``title`` a state entry holding its tooltip (default: the
    setting's help)."""
    spec = form.slider_spec(name)
    v3.VTextField(id=f"usb-{name}", v_model=(f"usb_{name}",), type="number", label=spec["label"],
                  min=spec["min"], max=spec["max"], step=spec["step"], title=(title,) if title else spec["help"],
                  density="compact", hide_details=True,
                  disabled=(f"{BUSY}{' || ' + disabled if disabled else ''}",), classes="my-2")


def _scan() -> None:
    _section("Scan")
    v3.VBtn("Load sample", id="usb-load-sample", block=True, variant="tonal", color="primary",
            click="trigger('usb_load_sample')", disabled=(BUSY,), classes="mb-2")
    v3.VFileInput(id="usb-upload-scan", label="Upload scan (NIfTI, NRRD, MGZ)", accept=",".join(SCAN_SUFFIXES),
                  density="compact", hide_details=True, prepend_icon="", disabled=(BUSY,),
                  change=upload_js("usb_upload_scan"))
    html.Div("Scan: {{ usb_volume || 'none' }}", id="usb-volume", classes="text-body-2 my-2")
    v3.VRangeSlider(id="usb-wl", v_model=("usb_wl",), min=("usb_wl_bounds[0]",), max=("usb_wl_bounds[1]",),
                    label="Window", density="compact", hide_details=True, disabled=("!usb_volume",))
    with html.Div(classes="d-flex align-center justify-space-between"):
        v3.VSwitch(id="usb-crosshair", v_model=("usb_crosshair",), label="Crosshair", density="compact",
                   hide_details=True, color="primary", title="Shift + mouse move places it in every view")
        with v3.VBtnToggle(v_model=("usb_layout",), mandatory=True, density="compact", divided=True,
                           variant="outlined"):
            for value, title in LAYOUTS.items():
                v3.VBtn(title, value=value, size="small", id=f"usb-layout-{value}")


def _lesion() -> None:
    _section("Lesion")
    with v3.VBtnToggle(v_model=("usb_tool",), mandatory=True, density="compact", divided=True, variant="outlined",
                       disabled=(f"{BUSY} || !usb_volume",), classes="mb-2"):
        for value, title in (("none", "Navigate"), ("paint", "Paint"), ("erase", "Erase")):
            v3.VBtn(title, value=value, id=f"usb-tool-{value}", size="small")
    v3.VSlider(id="usb-brush", v_model=("usb_brush_mm",), min=1, max=40, step=1, label="Brush (mm)",
               thumb_label=True, hide_details=True, density="compact", disabled=(BUSY,))
    v3.VFileInput(id="usb-upload-mask", label="Upload mask (NIfTI, NRRD, MGZ, .seg.nrrd)",
                  accept=",".join(MASK_SUFFIXES), density="compact", hide_details=True, prepend_icon="",
                  disabled=(f"{BUSY} || !usb_volume",), change=upload_js("usb_upload_mask"),
                  classes="mt-2")
    with html.Div(classes="d-flex align-center my-2"):
        html.Div("Lesion: {{ usb_lesion_voxels }} voxels ({{ usb_lesion_ml }} ml)", id="usb-lesion",
                 classes="text-body-2 flex-grow-1")
        v3.VBtn("Clear", id="usb-clear-lesion", size="small", variant="text",
                click="trigger('usb_clear_lesion')", disabled=(f"{BUSY} || !usb_lesion_voxels",))
    v3.VSwitch(id="usb-show-lesion", v_model=("usb_show_lesion",), label="Show the lesion", density="compact",
               hide_details=True, color="primary")
    v3.VCheckbox(id="usb-mask-covers-rim", v_model=("usb_mask_covers_rim",), density="compact", hide_details=True,
                 label=form.COVERS_RIM_LABEL, title=form.COVERS_RIM_HELP,
                 disabled=(f"{BUSY} || usb_task !== 'heal'",))


def _task() -> None:
    _section("Task")
    v3.VSelect(id="usb-task", v_model=("usb_task",), items=("usb_task_items", form.task_items()), label="Task",
               density="compact", hide_details=True, disabled=(BUSY,), classes="mb-2")
    generate = "usb_task === 'generate_from_mask'"
    for name in form.GUIDANCE:
        _slider(name, generate)
    v3.VCheckbox(id="usb-set-lesion-level", v_model=("usb_set_lesion_level",), density="compact", hide_details=True,
                 label=form.LESION_LEVEL_LABEL, title=form.LESION_LEVEL_HELP,
                 disabled=(f"{BUSY} || usb_task !== 'embed'",))
    _slider("lesion_level", "usb_task !== 'embed' || !usb_set_lesion_level")
    v3.VBtn("Reset to defaults", id="usb-reset", size="small", variant="text", click="trigger('usb_reset')",
            disabled=(BUSY,))
    with v3.VExpansionPanels(variant="accordion", classes="my-2"):
        with v3.VExpansionPanel(title="Advanced", id="usb-advanced"):
            with v3.VExpansionPanelText():
                # greyed out where the run does not read them (form.live_controls, as the Slicer panel)
                off = {"stages": generate, "local_mode": f"{generate} || !usb_live.local_mode"}
                for name in form.CHOICES:
                    v3.VSelect(id=f"usb-{name.replace('_', '-')}", v_model=(f"usb_{name}",),
                               items=(f"usb_{name}_items", form.choice_items(name)), label=form.LABELS[name],
                               density="compact", hide_details=True, disabled=(f"{BUSY} || {off[name]}",),
                               classes="my-2")
                _number("steps", "!usb_live.steps")
                _slider("strength", "!usb_live.strength")
                _number("seed")
                _number("samples", "!usb_live.samples", "usb_samples_help")
                v3.VCheckbox(id="usb-resample", v_model=("usb_resample",), density="compact", hide_details=True,
                             label="Resample masks drawn on another image", disabled=(BUSY,))


def _run() -> None:
    _section("Run")
    v3.VBtn("Apply", id="usb-apply", v_if=("!usb_running",), block=True, color="primary",
            click="trigger('usb_apply')", disabled=("!usb_volume || usb_loading",))
    v3.VBtn("Cancel", id="usb-cancel", v_else=True, block=True, color="warning", click="trigger('usb_cancel')")
    with html.Div(v_if=("usb_running",), classes="my-2"):
        v3.VProgressLinear(id="usb-progress", model_value=("usb_progress",), height=8, color="primary",
                           aria_valuenow=("usb_progress",))
        html.Div("{{ usb_progress_text }}", id="usb-progress-text", classes="text-caption")
    v3.VProgressLinear(v_if=("usb_loading",), indeterminate=True, color="primary", classes="my-2")
    html.Div("{{ usb_status }}", id="usb-status", classes="text-body-2 my-2")
    html.Div("{{ usb_error }}", id="usb-error", v_if=("usb_error",), role="alert",
             classes="text-body-2 text-error my-2")


def _compare() -> None:
    with html.Div(v_if=("usb_result",), id="usb-compare"):
        _section("Compare")
        v3.VSlider(id="usb-fade", v_model=("usb_fade",), min=0, max=1, step=0.05, label="Scan \u2194 result",
                   hide_details=True, density="compact")
        v3.VSwitch(id="usb-uncertainty", v_if=("usb_has_uncertainty",), v_model=("usb_show_uncertainty",),
                   label="Show the uncertainty map", density="compact", hide_details=True, color="primary")
        # a real download attribute (trame-vuetify's VBtn drops `download=`): a plain link would start a navigation,
        # and the page closes its websocket on navigation even when the answer turns out to be a file
        v3.VBtn("Download (NIfTI + provenance)", id="usb-download", block=True, variant="tonal",
                href=("usb_download_url || undefined",), raw_attrs=["download"], disabled=("!usb_download_url",),
                loading=("!usb_download_url",), classes="my-2")


def build(app: "USBWebApp") -> VAppLayout:
    """The whole page: app bar, side panel, views."""
    with VAppLayout(app.server, full_height=True) as layout:
        layout.root.theme = "dark"
        with v3.VAppBar(density="compact"):
            v3.VToolbarTitle("USB Editor")
            html.Div("{{ usb_model }} \u00b7 {{ usb_device }}", classes="text-caption mr-4")
        with v3.VNavigationDrawer(permanent=True, width=380, location="left"):
            with html.Div(classes="px-4 pb-4"):
                _scan()
                _lesion()
                _task()
                _run()
                _compare()
        with v3.VMain(), html.Div(classes="d-flex fill-height", style="height: calc(100vh - 48px);"):
            app.layout_manager.initialize_layout_grid(layout)
    return layout
