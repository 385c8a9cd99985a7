"""The page's task form: the tasks it offers, its controls with their ranges, the model's defaults per task, and
the ``RunSettings`` of a run. Pure Python over ``USBLib.settings`` and ``USBEditorLib.logic`` (no trame).

The ranges, steps and help texts are ``USBLib.settings``'s, the one table the engine, the CLI and the Slicer module
use; the defaults are the model bundle's for each task (``default_settings``), exactly as the Slicer module sets them.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from USBEditorLib.logic import (RUNS_ONCE_HELP, TASK_INFO, LocalMode, RunSettings, Stages, Task,  # noqa: F401
                                USBEditorError, default_settings, resolved_stages, runs_once)
from USBLib.settings import DARK_LESION_LEVEL, RANGES, SETTINGS

TASKS = (Task.HEAL, Task.EMBED, Task.GENERATE_FROM_MASK)
GUIDANCE = ("alpha0", "k", "eta")                     # the three sliders (paper: alpha_0, k of ACG; eta of LCG)
ADVANCED = ("steps", "strength", "seed", "samples")   # numbers in the advanced section
CHOICES = ("stages", "local_mode")                    # selects in the advanced section
FIELDS = GUIDANCE + ADVANCED + CHOICES
COVERS_RIM_LABEL = "Mask covers the lesion's dark rim (FLAIR-made or dilated)"
COVERS_RIM_HELP = ("Heal: a mask drawn on the lesion's visible edge misses its partial-volume rim, so the fill grows "
                   "into the dark voxels around it (up to 3 mm). A mask that already covers the rim (made on FLAIR, "
                   "or dilated for safety) is healed as drawn: +1.9 dB on such masks in the held-out yardstick. "
                   "Leave it off for a mask drawn on the lesion's visible edge (ticked, those heal 0.8-2.8 dB "
                   "worse) and on thick-slice scans, where it did not help. Same as usb heal --mask-covers-rim.")
LESION_LEVEL_LABEL = "Set the lesion's darkness (off: the network's own, about 0.8)"
LESION_LEVEL_HELP = ("Embed: ask for how dark the lesion is (the slider below); off, the network draws it at its own "
                     "level, about 0.8 of the tissue around it, fainter than a T1 black hole. Same as usb embed "
                     "--lesion-level.")
SLIDER_STEP = {"alpha0": 0.5, "k": 0.1, "eta": 0.05, "strength": 0.01, "lesion_level": 0.05}
LABELS = {"alpha0": "\u03b1\u2080 (anatomy guidance)", "k": "k (guidance decay)", "eta": "\u03b7 (lesion guidance)",
          "steps": "Steps", "strength": "Strength", "seed": "Seed", "samples": "Samples", "stages": "Stages",
          "local_mode": "Local stage", "lesion_level": "Lesion / tissue around it"}


def task_items() -> list[dict[str, str]]:
    """The task select's items (Slicer's labels)."""
    return [{"title": TASK_INFO[t]["label"], "value": t.value} for t in TASKS]


def choice_items(name: str) -> list[dict[str, str]]:
    """Items of the ``stages`` or ``local_mode`` select; "" is the model's default, as in the Slicer module."""
    enum = {"stages": Stages, "local_mode": LocalMode}[name]
    return [{"title": member.label(), "value": member.value} for member in enum]


def slider_spec(name: str) -> dict[str, Any]:
    """min, max, step, label and help of a numeric control, from ``USBLib.settings``."""
    low, high = RANGES[name]
    step = SLIDER_STEP.get(name, 1)
    if name == "samples":
        high = 16  # the page's own cap: each sample is one more run of the model
    return {"min": low, "max": high, "step": step, "label": LABELS[name], "help": SETTINGS[name].help}


def is_edit(task: str) -> bool:
    """Heal and embed are edits: they use the guidance sliders, strength, stages and local mode."""
    return Task(task) in (Task.HEAL, Task.EMBED)


def defaults(task: str, model: Optional[str] = None) -> dict[str, Any]:
    """The model's recommended form values for ``task`` (``default_settings``: bundle.json, samples 1, seed 0)."""
    settings = default_settings(Task(task), model)
    return {name: getattr(settings, name) for name in FIELDS}


def guidance_defaults(task: str, model: Optional[str] = None) -> dict[str, Any]:
    """What a change of task resets (as in the Slicer module: everything but samples and seed)."""
    return {k: v for k, v in defaults(task, model).items() if k not in ("samples", "seed")}


def live_controls(task: str, stages: str, local_mode: str, model: Optional[str] = None) -> dict[str, bool]:
    """Which of steps, strength, local mode and samples the run reads (the others are greyed out), as the Slicer
    panel enables them: steps shape the latent diffusion (generation, or an edit with the latent stage), strength an
    edit's latent stage, the local mode an edit's local stage; samples are off for an edit the engine runs once
    (``runs_once``: a local-only heal, a local fidelity embed)."""
    if not is_edit(task):
        return {"steps": True, "strength": False, "local_mode": False, "samples": True}
    stage, mode = resolved_stages(task, stages, local_mode, model)
    latent = stage is not Stages.LOCAL
    return {"steps": latent, "strength": latent, "local_mode": stage is not Stages.LATENT,
            "samples": not runs_once(Task(task), stage, mode, model)}


def _number(values: Mapping[str, Any], name: str, kind: type) -> Any:
    spec = slider_spec(name)
    try:
        value = kind(float(values[name]))
    except (KeyError, TypeError, ValueError):
        raise USBEditorError(f"{LABELS[name]} must be a number.") from None
    if not spec["min"] <= value <= spec["max"]:
        raise USBEditorError(f"{LABELS[name]} must be between {spec['min']:g} and {spec['max']:g}.")
    return value


def run_settings(task: str, values: Mapping[str, Any], model: Optional[str] = None) -> RunSettings:
    """``RunSettings`` from the form's values (checked against the ranges, ``FIELDS``, and the optional
    ``mask_covers_rim`` box, a property of the mask that no task change resets, and for an embed the lesion's
    darkness ``lesion_level`` when ``set_lesion_level`` is ticked); what the form does not show (lesion guidance,
    lesion fusion, sampler) is the model's default for the task. An edit the engine runs once (``live_controls``:
    samples greyed out) gets one sample, whatever the greyed field holds, as in the Slicer panel."""
    settings = default_settings(Task(task), model)
    for name in GUIDANCE + ("strength",):
        setattr(settings, name, _number(values, name, float))
    for name in ("steps", "seed", "samples"):
        setattr(settings, name, _number(values, name, int))
    settings.stages = Stages(values.get("stages") or "").value
    settings.local_mode = LocalMode(values.get("local_mode") or "").value
    if not live_controls(task, settings.stages, settings.local_mode, model)["samples"]:
        settings.samples = 1
    settings.mask_covers_rim = bool(values.get("mask_covers_rim", False))
    if Task(task) is Task.EMBED and values.get("set_lesion_level"):
        settings.lesion_level = _number(values, "lesion_level", float)
    return settings
