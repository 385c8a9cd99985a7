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


def test_the_mask_covers_rim_box_heals_the_mask_as_drawn():
    """The box beside the lesion: a heal with no growth of the mask (``dilation_mm`` 0), only for heal; left
    unticked, the model's own growth (no ``dilation_mm`` sent)."""
    values = form.defaults("heal")
    assert "dilation_mm" not in form.run_settings("heal", values).for_task(Task.HEAL)
    ticked = form.run_settings("heal", dict(values, mask_covers_rim=True))
    assert ticked.for_task(Task.HEAL)["dilation_mm"] == 0.0
    assert "mask_covers_rim" not in ticked.for_task(Task.HEAL)
    embed = form.run_settings("embed", dict(form.defaults("embed"), mask_covers_rim=True))
    assert "dilation_mm" not in embed.for_task(Task.EMBED)  # embed grows its own way


def test_the_lesion_darkness_goes_to_an_embed_only_when_asked_for():
    """The darkness box and slider: unticked, the network's own level (no ``lesion_level`` sent); ticked, the
    slider's value, checked against the setting's range; never for a heal."""
    values = form.defaults("embed")
    assert "lesion_level" not in form.run_settings("embed", dict(values, lesion_level=0.5)).for_task(Task.EMBED)
    asked = form.run_settings("embed", dict(values, set_lesion_level=True, lesion_level=0.5))
    assert asked.for_task(Task.EMBED)["lesion_level"] == 0.5
    with pytest.raises(USBEditorError, match="between 0.05 and 0.99"):
        form.run_settings("embed", dict(values, set_lesion_level=True, lesion_level=1.2))
    heal = form.run_settings("heal", dict(form.defaults("heal"), set_lesion_level=True, lesion_level=0.5))
    assert "lesion_level" not in heal.for_task(Task.HEAL)
    assert form.slider_spec("lesion_level")["min"] == 0.05 and form.DARK_LESION_LEVEL == 0.5



def test_steps_strength_and_local_mode_are_live_only_where_the_run_reads_them():
    """As the Slicer panel: an edit by the local stage alone (the default) reads neither steps nor strength, an edit
    by the latent stage alone no local mode; generation reads steps; "" is the model's default for the task."""
    heal = form.defaults("heal")
    assert heal["stages"] == "local"  # the shipped model's default: the greyed-out case is the one a user meets
    for stages in ("local", ""):
        live = form.live_controls("heal", stages, heal["local_mode"])
        assert not live["steps"] and not live["strength"] and live["local_mode"]
    for task, stages in (("heal", "latent"), ("embed", "latent"), ("embed", "both")):
        live = form.live_controls(task, stages, "realism")
        assert live["steps"] and live["strength"] and live["local_mode"] == (stages == "both")
    live = form.live_controls("generate_from_mask", "", "")
    assert live["steps"] and not live["strength"] and not live["local_mode"]


@pytest.mark.parametrize("task, stages, local_mode, runs", [
    ("heal", "local", "realism", 1), ("heal", "local", "fidelity", 1), ("heal", "", "", 1),
    ("embed", "local", "fidelity", 1), ("embed", "", "fidelity", 1),
    ("heal", "latent", "realism", 3), ("heal", "both", "fidelity", 3), ("embed", "local", "realism", 3),
    ("embed", "", "", 3), ("generate_from_mask", "", "", 3)])
def test_an_edit_the_engine_runs_once_gets_one_sample(task, stages, local_mode, runs):
    """Samples greyed out and one sample sent where the engine runs the edit once (``runs_once``: every local-only
    heal, a local fidelity embed; the worker refused the samples after it had started)."""
    values = dict(form.defaults(task), stages=stages, local_mode=local_mode, samples=3)
    assert form.run_settings(task, values).samples == runs
    assert form.live_controls(task, stages, local_mode)["samples"] == (runs == 3)
