"""``usb web``: the USB Editor as one web page (trame-slicer), on the Slicer module's Qt-free logic and worker.

Optional extra ``[web]``. The page mirrors ``USBEditor/USBEditor.py``: load a scan (or the sample), paint or upload
the lesion, pick the task and its guidance, Apply in the background worker with progress and Cancel, compare and
download. Start it with ``usb web`` (``USBWeb.server.serve``).
"""
import os
import sys

if sys.platform.startswith("linux"):  # render off screen through EGL (Mesa llvmpipe without a GPU); no X needed
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
