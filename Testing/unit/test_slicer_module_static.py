"""Static checks of the Slicer module that need no Slicer: UI names, CMake file lists, light imports."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "USBEditor"
UI = MODULE / "Resources" / "UI" / "USBEditor.ui"


def ui_widgets() -> dict[str, str]:
    """name -> class of every widget in the .ui file."""
    return {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}


def cmake_list(path: Path, variable: str) -> list[str]:
    text = path.read_text()
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not set in {path}"
    return [line.strip() for line in match.group(1).splitlines() if line.strip() and not line.strip().startswith("#")]


def test_every_ui_name_used_in_the_code_exists_in_the_ui_file():
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE / "USBEditor.py").read_text()))
    widgets = ui_widgets()
    assert used, "the widget uses no ui names?"
    assert sorted(used - set(widgets)) == []


def test_ui_parameter_names_are_fields_of_the_parameter_node():
    tree = ast.parse((MODULE / "USBEditor.py").read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "USBEditorParameterNode")
    fields = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    bound = {}
    for w in ET.parse(UI).getroot().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[w.get("name")] = prop.find("string").text
    assert bound and sorted(set(bound.values()) - fields) == []
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"
    # enums need combo boxes, nodes need node combo boxes
    widgets = ui_widgets()
    by_param = {p: widgets[w] for w, p in bound.items()}
    assert by_param["task"] == by_param["device"] == "QComboBox"
    assert by_param["inputVolume"] == by_param["maskNode"] == "qMRMLNodeComboBox"


def test_ui_connections_point_at_existing_widgets():
    root = ET.parse(UI).getroot()
    widgets = ui_widgets()
    receivers = [c.findtext("receiver") for c in root.iter("connection")]
    assert set(receivers) <= set(widgets) and "segmentEditorWidget" in receivers


def test_every_lib_file_is_in_module_python_scripts():
    listed = cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")
    on_disk = {str(p.relative_to(MODULE)) for p in (MODULE / "USBEditorLib").glob("*.py")}
    assert on_disk and on_disk <= set(listed), sorted(on_disk - set(listed))
    assert "${MODULE_NAME}.py" in listed
    resources = cmake_list(MODULE / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")
    for item in resources:
        assert (MODULE / item.replace("${MODULE_NAME}", "USBEditor")).is_file(), item


def test_every_usblib_file_and_the_default_model_are_packaged():
    cmake = ROOT / "CMakeLists.txt"
    scripts = cmake_list(cmake, "USBLIB_PYTHON_SCRIPTS")
    resources = cmake_list(cmake, "USBLIB_PYTHON_RESOURCES")
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "USBLib").rglob("*.py")}
    assert sorted(on_disk ^ set(scripts)) == []
    models = {str(p.relative_to(ROOT)) for p in (ROOT / "USBLib" / "models").rglob("*") if p.is_file()}
    samples = {str(p.relative_to(ROOT)) for p in (ROOT / "USBLib" / "resources" / "sample").glob("*.nii.gz")}
    registrations = {str(p.relative_to(ROOT)) for p in (ROOT / "USBLib" / "resources" / "registrations").glob("*")}
    assert registrations and sorted((models | samples | registrations) ^ set(resources)) == []
    text = cmake.read_text()
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in text and "add_subdirectory(USBEditor)" in text
    assert (ROOT / "Resources" / "Icons" / "USB.png").is_file()


def test_module_file_imports_nothing_heavy_at_top_level():
    tree = ast.parse((MODULE / "USBEditor.py").read_text())
    allowed = {"__future__", "logging", "os", "time", "typing", "qt", "vtk", "slicer", "USBEditorLib"}
    for node in tree.body:
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed or name == "USBLib.settings", \
                f"USBEditor.py imports {name} at module level"


def test_lib_imports_without_torch_monai_or_image_libraries():
    code = ("import sys; sys.path.insert(0, sys.argv[1]);"
            "import USBEditorLib.logic, USBEditorLib.process, USBEditorLib.dependencies;"
            "heavy = sorted({'torch', 'monai', 'nibabel', 'SimpleITK', 'scipy', 'safetensors'} & set(sys.modules));"
            "print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code, str(MODULE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_union_of_node_types_in_the_parameter_node_admits_none():
    """Slicer's parameterNodeWrapper writes a new parameter node's defaults: a Union of MRML node types defaults to
    None (its first member's default) and UnionSerializer can write None only through a None member. Without it
    ``getParameterNode()`` raised TypeError, so the panel could not set up in Slicer."""
    tree = ast.parse((MODULE / "USBEditor.py").read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "USBEditorParameterNode")
    unions = {}
    for field in (s for s in node.body if isinstance(s, ast.AnnAssign)):
        note = field.annotation
        if isinstance(note, ast.Subscript) and getattr(note.value, "id", "") in ("Union", "Optional"):
            members = note.slice.elts if isinstance(note.slice, ast.Tuple) else [note.slice]
            names = [getattr(m, "id", None) if not isinstance(m, ast.Constant) else repr(m.value) for m in members]
            if any(str(n).startswith("vtkMRML") for n in names):
                unions[field.target.id] = (getattr(note.value, "id"), names)
    assert "maskNode" in unions, "the mask selector's field is no longer a union of node types?"
    lacking = [f for f, (kind, names) in unions.items() if kind == "Union" and "None" not in names]
    assert lacking == [], f"Union of node types without None (Slicer cannot write their default): {lacking}"


def widget_methods(names: tuple[str, ...], namespace: dict) -> dict:
    """The named methods of ``USBEditorWidget``, compiled from the module's source alone (no Qt, no Slicer) with the
    module-level names they use taken from ``namespace``."""
    tree = ast.parse((MODULE / "USBEditor.py").read_text())
    widget = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "USBEditorWidget")
    functions = [f for f in widget.body if isinstance(f, ast.FunctionDef) and f.name in names]
    assert sorted(f.name for f in functions) == sorted(names)
    future = ast.ImportFrom(module="__future__", names=[ast.alias(name="annotations")], level=0)
    module = ast.fix_missing_locations(ast.Module(body=[future, *functions], type_ignores=[]))
    exec(compile(module, str(MODULE / "USBEditor.py"), "exec"), namespace)
    return {name: namespace[name] for name in names}


def test_reconnecting_the_panel_keeps_a_saved_task_s_settings():
    """Slicer's ``QComboBoxToEnumConnector`` clears and refills the task combo on every ``connectGui`` (each
    ``enter()``, each scene reopening): its index goes to -1, to 0 (the first task) and back to the saved task, and
    ``onTaskChanged(0)`` reset a saved embed's sliders (alpha0, k, eta, steps, strength, stages, local mode) to the
    heal's defaults. The widget's real ``setParameterNode`` and ``onTaskChanged`` run here on a parameter node whose
    ``connectGui`` moves the combo as the connector does; a task the user picks afterwards still brings its
    defaults."""
    import enum
    from types import SimpleNamespace

    logic = ast.parse((MODULE / "USBEditorLib" / "logic.py").read_text())
    tasks = next(n for n in logic.body if isinstance(n, ast.ClassDef) and n.name == "Task")
    Task = enum.Enum("Task", [(s.targets[0].id, s.value.value) for s in tasks.body if isinstance(s, ast.Assign)])
    vtk = SimpleNamespace(vtkCommand=SimpleNamespace(ModifiedEvent=33))
    methods = widget_methods(("setParameterNode", "onTaskChanged"), {"Task": Task, "vtk": vtk})

    class Widget:
        setParameterNode = methods["setParameterNode"]
        onTaskChanged = methods["onTaskChanged"]

        def __init__(self):
            self.ui, self._parameterNode, self._parameterNodeGuiTag, self.applied = SimpleNamespace(), None, None, []

        def _applyDefaults(self, task, guidanceOnly=True):
            self.applied.append(task)
            self._parameterNode.guidanceTask = task.value

        def addObserver(self, *args):
            pass

        removeObserver = _showModel = _fillSegments = _updateState = addObserver

    widget = Widget()

    class SavedEmbed:
        """A parameter node saved with the embed task and its tuned sliders."""

        task, guidanceTask, model = Task.EMBED, "embed", ""

        def connectGui(self, ui):
            for index in (-1, 0, list(Task).index(self.task)):  # clear(), addItem(first label), write(saved)
                widget.onTaskChanged(index)
            return 1

        def disconnectGui(self, tag):
            pass

    node = SavedEmbed()
    widget.setParameterNode(node)
    widget.setParameterNode(node)  # enter() again
    assert widget.applied == [], "connecting the panel reset the saved task's settings"
    widget.onTaskChanged(list(Task).index(Task.HEAL))  # the user picks another task: its defaults
    assert widget.applied == [Task.HEAL] and node.guidanceTask == "heal"
