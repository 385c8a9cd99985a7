"""Every layer takes a setting's range, fallback and help from ``USBLib.settings``: engine validation, the CLI,
the Slicer parameter node, the .ui widgets, the Qt-free RunSettings and the shipped bundle's defaults. A layer
that drifts fails here."""
from __future__ import annotations

import ast
import dataclasses
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from USBLib.core import bundle as bundle_mod
from USBLib.apps.cli import build_parser
from USBLib.errors import InputError
from USBLib.settings import FALLBACKS, RANGES, SETTINGS, validate

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "USBEditor"
UI = MODULE / "Resources" / "UI" / "USBEditor.ui"
PARAM_TO_SETTING = {"localMode": "local_mode", "lesionGuidance": "lesion_guidance", "lesionFusion": "lesion_fusion",
                    "lesionLevel": "lesion_level"}


def _ui_bound() -> dict[str, ET.Element]:
    out = {}
    for w in ET.parse(UI).getroot().iter("widget"):
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                name = prop.find("string").text
                out[PARAM_TO_SETTING.get(name, name)] = w
    return out


def _prop(widget: ET.Element, name: str) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == name:
            return prop[0].text
    return None


def test_ui_widgets_use_the_settings_ranges_and_help():
    bound = {k: w for k, w in _ui_bound().items() if k in SETTINGS}
    assert {"acg", "alpha0", "k", "eta", "steps", "strength", "samples", "seed", "lesion_guidance",
            "lesion_fusion", "lesion_level"} <= set(bound)
    for name, widget in bound.items():
        spec = SETTINGS[name]
        if spec.low is not None:
            assert float(_prop(widget, "minimum")) == spec.low, name
            assert float(_prop(widget, "maximum")) == spec.high, name
        assert _prop(widget, "toolTip") == spec.help, name
    assert bound["acg"].get("class") == bound["lesion_fusion"].get("class") == "QCheckBox"


def test_parameter_node_takes_ranges_and_fallbacks_from_the_table():
    tree = ast.parse((MODULE / "USBEditor.py").read_text())
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "USBEditorParameterNode")
    fields = {s.target.id: ast.unparse(s) for s in node.body if isinstance(s, ast.AnnAssign)}
    for name in ("alpha0", "k", "eta", "steps", "strength", "samples", "seed"):
        assert f'WithinRange(*RANGES[\'{name}\'])' in fields[name], fields[name]
        assert fields[name].endswith(f"FALLBACKS['{name}']"), fields[name]
    assert fields["acg"].endswith("FALLBACKS['acg']")
    assert fields["lesionFusion"] == "lesionFusion: bool = FALLBACKS['lesion_fusion']"
    assert fields["lesionGuidance"] == ("lesionGuidance: Annotated[float, WithinRange(*RANGES['lesion_guidance'])] = "
                                        "FALLBACKS['lesion_guidance']")
    assert fields["lesionLevel"] == ("lesionLevel: Annotated[float, WithinRange(*RANGES['lesion_level'])] = "
                                     "DARK_LESION_LEVEL")


def test_run_settings_fields_default_to_the_fallbacks():
    text = (MODULE / "USBEditorLib" / "logic.py").read_text()
    block = text[text.index("class RunSettings"):text.index("def for_task")]
    for name in ("steps", "strength", "acg", "alpha0", "k", "eta", "lesion_guidance"):
        assert re.search(rf"^\s+{name}: \w+ = FALLBACKS\[\"{name}\"\]", block, re.M), name


@pytest.mark.parametrize("name", sorted(RANGES))
def test_engine_accepts_the_bounds_and_refuses_beyond(name):
    lo, hi = RANGES[name]
    assert validate({name: lo})[name] == lo and validate({name: hi})[name] == hi
    step = 1 if SETTINGS[name].kind == "int" else 1e-3 * max(1.0, hi - lo)
    for bad in (lo - step, hi + step):
        with pytest.raises(InputError, match=f"{name} must be between"):
            validate({name: bad})


@pytest.mark.parametrize("name", ["alpha0", "k", "eta", "strength", "steps", "margin_mm", "dilation_mm",
                                  "local_steps", "local_strength"])
def test_cli_refuses_what_the_engine_refuses(name, capsys):
    spec = SETTINGS[name]
    parser = build_parser()
    too_big = spec.high + (1 if spec.kind == "int" else 0.5)
    args = ["heal", "in.nii.gz", "-o", "out.nii.gz", spec.option, str(too_big)]
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(args)
    assert exc.value.code == 2
    assert f"{spec.high:g}" in capsys.readouterr().err
    ok = parser.parse_args(["heal", "in.nii.gz", "-o", "out.nii.gz", spec.option, str(spec.high)])
    assert getattr(ok, name) == spec.high


def test_cli_acg_switch():
    parser = build_parser()
    assert parser.parse_args(["heal", "a.nii", "-o", "b.nii"]).acg is None  # the bundle's
    assert parser.parse_args(["heal", "a.nii", "-o", "b.nii", "--no-acg"]).acg is False
    assert parser.parse_args(["embed", "a.nii", "--mask", "m.nii", "-o", "b.nii", "--acg"]).acg is True


def test_shipped_bundle_defaults_lie_inside_the_ranges():
    b = bundle_mod.load(None)
    for task in ("heal", "embed", "generate", "generate_from_mask"):
        defaults = b.defaults(task)
        assert set(defaults) <= set(SETTINGS), set(defaults) - set(SETTINGS)
        validate(dict(defaults))


def test_batch_settings_know_every_edit_setting():
    from USBLib.apps.batch import BatchSettings

    fields = {f.name for f in dataclasses.fields(BatchSettings)}
    assert {"strength", "acg", "alpha0", "k", "eta", "margin_mm", "dilation_mm", "stages", "local_mode",
            "local_steps", "local_strength", "prefill", "steps", "samples", "seed"} <= fields
    assert set(FALLBACKS) - {"fusion", "sampler", "lesion_guidance", "lesion_fusion"} <= fields  # (batch heals; these are for generation)


def test_a_range_error_shows_whole_numbers_in_full():
    """The seed's range read 'between 0 and 2.14748e+09' (%g)."""
    from USBLib.settings import validate

    with pytest.raises(InputError, match=r"seed must be between 0 and 2147483647, got -1"):
        validate({"seed": -1})
