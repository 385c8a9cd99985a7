"""The page's task form: the model's defaults per task (as the Slicer module sets them) and checked settings."""
from __future__ import annotations

import pytest

pytest.importorskip("slicer", reason="the web page's logic needs slicer-core (pip install -e '.[test]')")

from USBEditorLib.logic import RunSettings, Task, USBEditorError, default_settings  # noqa: E402
from USBWeb import form  # noqa: E402


def test_each_task_brings_the_models_defaults():
    for task in form.TASKS:
        expected = default_settings(task)
        values = form.defaults(task.value)
        assert values == {name: getattr(expected, name) for name in form.FIELDS}
        assert "samples" not in form.guidance_defaults(task.value)
    assert [item["value"] for item in form.task_items()] == ["heal", "embed", "generate_from_mask"]


def test_run_settings_from_the_form_are_checked():
    values = dict(form.defaults("embed"), samples="3", seed="7", alpha0=35.5)
    settings = form.run_settings("embed", values)
    assert isinstance(settings, RunSettings) and settings.samples == 3 and settings.seed == 7
    assert settings.alpha0 == 35.5 and settings.for_task(Task.EMBED)["alpha0"] == 35.5
    with pytest.raises(USBEditorError, match="between"):
        form.run_settings("embed", dict(values, eta=2.0))
    with pytest.raises(USBEditorError, match="must be a number"):
        form.run_settings("heal", dict(values, steps="many"))
