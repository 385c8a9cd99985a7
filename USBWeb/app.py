"""The USB Editor page: trame state and actions wired to the document, the views, the brush and the edit jobs.

This is the web counterpart of ``USBEditor/USBEditor.py`` (the Slicer widget): it holds no algorithm; every step
goes to ``USBEditorLib`` (via ``document`` and ``jobs``) or to trame-slicer (via ``views`` and ``brush``).
The state is the server's, shared by every tab that opens the page: one scan, one edit at a time.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from trame.app import TrameApp
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories

from USBEditorLib import logic as L

from . import form, page, slicer_env
from .brush import Brush
from .document import Document, Result
from .jobs import BUSY, EditJobs, Progress
from .uploads import MASK_SUFFIXES, SCAN_SUFFIXES, PrivateFolder, UploadError, one_line, shown_name
from .views import Views

log = logging.getLogger("USBWeb")
DOWNLOAD_ROUTE = "/usb/download"
UNPACKED_PER_UPLOAD_BYTE = 4  # a scan's voxels may take this many times the upload limit once unpacked (real scans
#                               compress 2-4 times; a few MB of .nii.gz of zeros can unpack to gigabytes)
TRIGGERS = {"usb_load_sample": "load_sample", "usb_upload_scan": "upload_scan", "usb_upload_mask": "upload_mask",
            "usb_clear_lesion": "clear_lesion", "usb_reset": "reset_defaults", "usb_apply": "apply",
            "usb_cancel": "cancel"}


class USBWebApp(TrameApp):
    """One page, one scan, one edit at a time."""

    def __init__(self, server=None, private: Optional[PrivateFolder] = None, model: Optional[str] = None,
                 device: str = "auto"):
        super().__init__(server, client_type="vue3")
        self.private = private or PrivateFolder()
        self.model = model or None
        self.slicer_app = SlicerApp()
        slicer_env.install(self.slicer_app)
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.document = Document(max_bytes=UNPACKED_PER_UPLOAD_BYTE * self.private.limit_bytes)
        self.views = Views(self.slicer_app, self.layout_manager)
        self.brush = Brush(self.slicer_app.segmentation_editor, self._on_stroke)
        self.jobs = EditJobs(model=self.model, device=device)
        self._watch_task: Optional[asyncio.Task] = None
        self._download: Optional[Path] = None  # the file the Download button serves (the latest result's)
        self._count_scheduled = False
        self._init_state()
        for name, action in TRIGGERS.items():  # fixed names: the page (and a test) calls trigger('usb_apply')
            self.server.trigger(name)(self._guarded(action))
        self.server.controller.on_client_connected.add(self._clear_stale_loading)
        self.server.controller.on_client_exited.add(self._clear_stale_loading)
        self.ui = page.build(self)
        self.server.controller.on_server_bind.add(self._add_routes)

    def _guarded(self, action: str):
        """The trigger's handler: arguments the page does not send are refused in one line on the page (a
        hand-made call got trame's traceback back, with the server's paths)."""
        method = getattr(self, action)
        upload = action in ("upload_scan", "upload_mask")

        def handler(*args, **kwargs):
            if kwargs or len(args) != int(upload) or (upload and not isinstance(args[0], list)):
                with self.state:
                    self.state.update({"usb_error": "That request is not one the page sends.", "usb_loading": False})
                return None
            return method(*args)

        return handler

    def _clear_stale_loading(self, **_) -> None:
        """A tab that set ``usb_loading`` and then closed, or whose upload never arrived, must not leave every tab's
        controls disabled: when a tab connects or leaves, loading is over (an upload is read within one handler, so
        none is being read then; a transfer still on its way re-enables the controls until it arrives)."""
        if self.state.usb_loading:
            with self.state:
                self.state.usb_loading = False

    # ----------------------------------------------------------------- state
    def _init_state(self) -> None:
        s = self.state
        s.trame__title = "USB Editor"
        s.update({
            "usb_volume": "", "usb_lesion_voxels": 0, "usb_lesion_ml": 0.0, "usb_tool": "none", "usb_brush_mm": 8.0,
            "usb_task": L.Task.HEAL.value, "usb_resample": True, "usb_mask_covers_rim": False, "usb_running": False,
            "usb_set_lesion_level": False, "usb_lesion_level": form.DARK_LESION_LEVEL,
            "usb_loading": False,
            "usb_progress": 0.0, "usb_progress_text": "", "usb_status": "Load a scan or the sample to start.",
            "usb_error": "", "usb_result": "", "usb_fade": 1.0, "usb_has_uncertainty": False,
            "usb_show_uncertainty": False, "usb_download_url": "", "usb_wl": [0.0, 1.0], "usb_wl_bounds": [0.0, 1.0],
            "usb_crosshair": False, "usb_layout": "slices", "usb_show_lesion": True,
            "usb_upload_limit_mb": self.private.limit_bytes / 2**20,
            "usb_model": self._describe_model(), "usb_device": self.jobs.device.label(),
        })
        s.update({f"usb_{k}": v for k, v in self._defaults(L.Task.HEAL.value).items()})
        s.usb_live = dict.fromkeys(("steps", "strength", "local_mode", "samples"), True)
        self._update_live()
        s.change("usb_task")(self._on_task)
        s.change("usb_stages", "usb_local_mode")(lambda **_: self._update_live())
        s.change("usb_tool")(lambda usb_tool, **_: self.brush.set_tool(usb_tool))
        s.change("usb_brush_mm")(lambda usb_brush_mm, **_: self.brush.set_diameter(usb_brush_mm))
        s.change("usb_fade")(lambda usb_fade, **_: self.views.set_fade(usb_fade))
        s.change("usb_show_uncertainty")(lambda **_: self._show())
        s.change("usb_wl")(self._on_window_level)
        s.change("usb_crosshair")(lambda usb_crosshair, **_: self.views.set_crosshair(bool(usb_crosshair)))
        s.change("usb_layout")(lambda usb_layout, **_: self.views.set_layout(usb_layout))
        s.change("usb_show_lesion")(lambda **_: self._style_lesion())

    def _describe_model(self) -> str:
        try:
            return L.describe_model(self.model)
        except L.USBEditorError as exc:
            return one_line(str(exc), self.private.path)

    def _defaults(self, task: str, guidance_only: bool = False) -> dict[str, Any]:
        try:
            return (form.guidance_defaults if guidance_only else form.defaults)(task, self.model)
        except L.USBEditorError as exc:
            self.state.usb_error = one_line(str(exc), self.private.path)
            return {}

    def _on_task(self, usb_task: str, **_) -> None:
        """A new task brings the model's defaults for it (as in the Slicer module)."""
        self.state.update({f"usb_{k}": v for k, v in self._defaults(usb_task, guidance_only=True).items()})
        self._update_live()

    def _update_live(self) -> None:
        """Grey out what the run would not read (``form.live_controls``), as the Slicer panel does."""
        s = self.state
        try:
            s.usb_live = form.live_controls(s.usb_task, s.usb_stages, s.usb_local_mode, self.model)
        except L.USBEditorError:  # a model that cannot be loaded: Apply says so; the controls stay as they are
            pass
        s.usb_samples_help = form.slider_spec("samples")["help"] if s.usb_live["samples"] else form.RUNS_ONCE_HELP

    def reset_defaults(self) -> None:
        """Reset to defaults: the model's settings for the task, and the lesion's options as the Slicer panel resets
        them (the network's own darkness, the slider at ``DARK_LESION_LEVEL``, the mask not covering the rim)."""
        self.state.update({f"usb_{k}": v for k, v in self._defaults(self.state.usb_task).items()})
        self.state.update({"usb_set_lesion_level": False, "usb_lesion_level": form.DARK_LESION_LEVEL,
                           "usb_mask_covers_rim": False})
        self._update_live()

    def _fail(self, exc: Exception, what: str = "") -> None:
        """Show an error as one line (no server path); unexpected ones are logged with their traceback."""
        if not isinstance(exc, (L.USBEditorError, UploadError)):
            log.exception("USB web: %s failed", what or "an action")
        self.state.usb_error = one_line(str(exc) or type(exc).__name__, self.private.path)

    # ----------------------------------------------------------------- loading
    def load_sample(self) -> None:
        """The bundled sample with its lesion, Remove lesion selected: Apply right after it heals the sample."""
        if self._refuse_while_running():
            return
        try:
            self.document.load_sample()
        except Exception as exc:  # noqa: BLE001 - shown on the page
            self._fail(exc, "loading the sample")
            return
        self._after_load(f"Sample loaded with its lesion ({self.document.volume.GetName()}).")
        self.state.usb_task = L.Task.HEAL.value

    async def upload_scan(self, files: list[dict]) -> None:
        """A scan sent by the browser (NIfTI, NRRD, MGZ)."""
        if not files or self._refuse_while_running():
            self.state.usb_loading = False  # (the page set it before sending)
            return
        with self.state:
            self.state.usb_loading, self.state.usb_error = True, ""
        path: Optional[Path] = None
        try:
            path = self.private.save_upload(files[0], SCAN_SUFFIXES)
            self.document.load_scan(path, shown_name(files[0].get("name"), path.name))
        except Exception as exc:  # noqa: BLE001 - shown on the page
            with self.state:
                self._fail(exc, "loading a scan")
                self.state.usb_loading = False
            return
        finally:
            self.private.discard(path)  # read into the scene (or refused): the file is not kept
        with self.state:
            self._after_load(f"Loaded {self.document.volume.GetName()}: paint the lesion or upload a mask.")

    async def upload_mask(self, files: list[dict]) -> None:
        """A lesion mask sent by the browser: into the lesion segment, resampled or refused as in Slicer."""
        if not files or self._refuse_while_running():
            self.state.usb_loading = False  # (the page set it before sending)
            return
        with self.state:
            self.state.usb_loading, self.state.usb_error = True, ""
        path: Optional[Path] = None
        try:
            path = self.private.save_upload(files[0], MASK_SUFFIXES)
            voxels = self.document.import_mask(path, bool(self.state.usb_resample),
                                               shown_name(files[0].get("name"), path.name))
            status = f"Mask loaded: {voxels} lesion voxels."
        except Exception as exc:  # noqa: BLE001 - shown on the page
            status = ""
            self._fail(exc, "loading a mask")
        finally:
            self.private.discard(path)
        with self.state:
            self.state.usb_loading = False
            if status:
                self.state.usb_status = status
            self._count_lesion()

    def _after_load(self, status: str) -> None:
        doc = self.document
        self.brush.attach(doc.segmentation, doc.volume, doc.segment_id)
        low, high = self.views.window_bounds(doc.volume)
        self.state.update({"usb_volume": doc.volume.GetName(), "usb_loading": False, "usb_error": "",
                           "usb_status": status, "usb_tool": "none", "usb_wl_bounds": [low, high],
                           "usb_wl": list(self.views.display_range(doc.volume))})
        self._clear_result_state()
        self._style_lesion()
        self._show(fit=True)
        self._count_lesion()

    def clear_lesion(self) -> None:
        if self._refuse_while_running():
            return
        self.document.clear_lesion()
        self._style_lesion()
        self._count_lesion()

    # ----------------------------------------------------------------- lesion
    def _on_stroke(self, *_: Any) -> None:
        """After a paint/erase stroke: count the lesion once the stroke's events have settled."""
        if not self._count_scheduled:
            self._count_scheduled = True
            asyncio.get_event_loop().call_later(0.3, self._count_later)

    def _count_later(self) -> None:
        self._count_scheduled = False
        with self.state:
            self._count_lesion()

    def _count_lesion(self) -> None:
        voxels = self.document.lesion_voxels()
        volume = self.document.volume
        voxel_ml = abs(float(np.linalg.det(L.ijk_to_ras(volume)[:3, :3]))) / 1000 if volume is not None else 0
        self.state.usb_lesion_voxels, self.state.usb_lesion_ml = voxels, round(voxels * voxel_ml, 2)

    # ----------------------------------------------------------------- views
    def _show(self, fit: bool = False) -> None:
        doc = self.document
        over = None
        if doc.result is not None:
            over = doc.result.uncertainty if self.state.usb_show_uncertainty and doc.result.uncertainty else \
                doc.result.volume
        self.views.show(doc.volume, over, float(self.state.usb_fade), fit=fit)

    def _style_lesion(self) -> None:
        self.views.set_lesion_style(self.document.segmentation, bool(self.state.usb_show_lesion),
                                    outline_only=self.document.result is not None)

    def _on_window_level(self, usb_wl: list, **_) -> None:
        if self.document.volume is not None and usb_wl and len(usb_wl) == 2:
            result = self.document.result.volume if self.document.result is not None else None
            self.views.set_display_range([self.document.volume, result], float(usb_wl[0]), float(usb_wl[1]))

    # ----------------------------------------------------------------- running
    def _refuse_while_running(self) -> bool:
        if self.jobs.running:
            self.state.usb_error = "An edit is running: wait for it to finish or press Cancel first."
            return True
        return False

    def apply(self) -> None:
        """Start the edit in the background worker; a second Apply while one runs is refused."""
        s, doc = self.state, self.document
        s.usb_error = ""
        if self.jobs.running:
            s.usb_error = BUSY
            return
        if doc.volume is None:
            s.usb_error = "Load a scan or the sample first."
            return
        try:
            values = {name: s[f"usb_{name}"] for name in form.FIELDS}
            values["mask_covers_rim"] = bool(s.usb_mask_covers_rim)
            values.update(set_lesion_level=bool(s.usb_set_lesion_level), lesion_level=s.usb_lesion_level)
            settings = form.run_settings(s.usb_task, values, self.model)
            self.jobs.start(L.Task(s.usb_task), doc.volume, doc.segmentation, doc.segment_id, settings,
                            bool(s.usb_resample))
        except Exception as exc:  # noqa: BLE001 - shown on the page
            self._fail(exc, "starting the edit")
            return
        self.brush.set_tool("none")
        s.update({"usb_tool": "none", "usb_running": True, "usb_progress": 0.0, "usb_progress_text": "Starting",
                  "usb_status": f"Running: {L.TASK_INFO[L.Task(s.usb_task)]['label']}"})
        self._watch_task = asyncio.ensure_future(self._watch())

    def cancel(self) -> None:
        if self.jobs.cancel():
            self.state.update({"usb_running": False, "usb_progress": 0.0, "usb_progress_text": "", "usb_error": "",
                               "usb_status": "Cancelled: the scan is as it was; no result was added."})

    def _on_progress(self, progress: Progress) -> None:
        with self.state:
            self.state.usb_progress, self.state.usb_progress_text = round(progress.percent, 1), progress.text

    async def _watch(self) -> None:
        started = time.perf_counter()
        try:
            result = await self.jobs.watch(self._on_progress)
        except Exception as exc:  # noqa: BLE001 - the worker's one-line message
            with self.state:
                self.state.update({"usb_running": False, "usb_status": "Failed."})
                self._fail(exc, "the edit")
            return
        if result is None:  # cancelled: cancel() has set the state
            return
        with self.state:
            self._show_result(result, time.perf_counter() - started)
        await self._publish(result)

    def _show_result(self, result: Result, seconds: float) -> None:
        self.document.set_result(result)
        notes = " ".join(n[:1].upper() + n[1:] + "." for n in result.outputs.notes)
        self.state.update({
            "usb_running": False, "usb_progress": 100.0, "usb_progress_text": "", "usb_error": "",
            "usb_result": result.volume.GetName(), "usb_fade": 1.0, "usb_show_uncertainty": False,
            "usb_has_uncertainty": result.uncertainty is not None, "usb_download_url": "",
            "usb_status": f"Done in {seconds:.1f} s (engine {result.engine_seconds:.1f} s): "
                          f"{result.volume.GetName()}. {notes}".strip(),
        })
        self._on_window_level(self.state.usb_wl)
        self._show()
        self._style_lesion()

    def _clear_result_state(self) -> None:
        self.private.discard(self._download)  # the result it served is gone from the page
        self._download = None
        self.state.update({"usb_result": "", "usb_has_uncertainty": False, "usb_show_uncertainty": False,
                           "usb_download_url": "", "usb_fade": 1.0})

    async def _publish(self, result: Result) -> None:
        """Write the download (NIfTI + sidecar, zipped) in a thread; then the Download button is enabled."""
        folder = self.private.new_folder("result")
        try:
            archive = await asyncio.to_thread(self.document.export().write, folder)
        except Exception as exc:  # noqa: BLE001 - shown on the page
            self.private.discard(folder)  # what was written before it failed (a full disk: it only fills it more)
            with self.state:
                self._fail(exc, "writing the download")
            return
        if self.document.result is not result:  # a newer run or a new scan came while it was written
            self.private.discard(archive)
            return
        self.private.discard(self._download)
        self._download = archive
        with self.state:
            self.state.usb_download_url = f"{DOWNLOAD_ROUTE}/{self.private.publish(archive)}/{archive.name}"

    # ----------------------------------------------------------------- HTTP
    def _add_routes(self, wslink_server: Any) -> None:
        from aiohttp import web

        async def download(request: "web.Request") -> "web.StreamResponse":
            path = self.private.published(request.match_info["token"])
            if path is None:
                raise web.HTTPNotFound(
                    text="No such download (never made, or replaced by a newer result): run the edit again.")
            return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{path.name}"',
                                                   "Cache-Control": "no-store"})

        wslink_server.app.router.add_get(DOWNLOAD_ROUTE + "/{token}/{name}", download)
