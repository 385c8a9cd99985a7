"""Every user-facing setting of an edit, defined once: name, type, range or choices, fallback and help text.

The engine validates with this table (``validate``), the CLI builds its options from it (``add_cli_options``), the
Slicer module takes its parameter-node ranges from it (``RANGES``) and a test checks that the .ui widgets
(range, tooltip) agree. Per-task defaults come from the model bundle (``bundle.json`` ``defaults``); ``fallback``
is used only where a bundle does not give a value.

Paper symbols (USB, eq. 12-15): ``alpha0`` = alpha_0 and ``k`` = k of ACG's alpha_t = alpha_0 exp(-k t / T), where
t runs from the edit's start step T down to 0; ``eta`` = eta of LCG's lambda_lesion = 1 - eta * prior.

Pure Python (no numpy, no torch): the Slicer module imports it at start-up.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from USBLib.errors import InputError

STAGES = ("latent", "local", "both")
LOCAL_MODES = ("fidelity", "realism")
PREFILLS = ("none", "harmonic", "biharmonic")
FUSION_MODES = ("deviation", "replace")
SAMPLERS = ("ddim", "dpm++2m")
GROWTHS = ("fixed", "rim")


@dataclass(frozen=True)
class Setting:
    """One setting. ``kind`` is "int", "float", "bool" or "choice"; numeric settings have ``low``..``high``
    (inclusive), choice settings ``choices``. ``flag`` is the CLI option; ``help`` is the CLI help and the Slicer
    tooltip."""

    name: str
    kind: str
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    fallback: Any = None
    flag: str = ""

    @property
    def option(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


_SETTINGS = (
    Setting("steps", "int", "Number of denoising (DDIM) steps of the latent stage. More = slower, usually smoother.",
            1, 1000, fallback=50),
    Setting("strength", "float", "Where the latent edit starts, as a fraction of the noise schedule: larger = the "
            "edit may change more.", 0.01, 1.0, fallback=0.5),
    Setting("acg", "bool", "Anatomy Consistency Guidance (eq. 12-13) on or off. Off: the edit is pulled towards the "
            "input only by where it starts.", fallback=True),
    Setting("alpha0", "float", "ACG alpha0 in lambda = exp(-alpha_t |y0 - y0_hat|), alpha_t = alpha0 exp(-k t/T) "
            "(eq. 12): larger = more freedom for the edit, smaller = closer to the input's anatomy (0 = the input "
            "is held everywhere).", 0.0, 200.0, fallback=20.0),
    Setting("k", "float", "ACG decay k in alpha_t = alpha0 exp(-k t/T) (eq. 12): larger k = the early (noisy) steps "
            "are held more tightly to the input; negative k = the early steps are freer than the last ones.",
            -10.0, 10.0, fallback=2.0),
    Setting("eta", "float", "Lesion Consistency Guidance eta in lambda_lesion = 1 - eta * prior (eq. 14-15): inside "
            "the lesion mask the anatomy guidance is released by eta (0 = off, 1 = fully free).", 0.0, 1.0,
            fallback=1.0),
    Setting("margin_mm", "float", "Feather width in mm: the edit fades out over this distance beyond the (dilated) "
            "mask; every voxel farther away is the input's own.", 0.0, 50.0, fallback=3.0, flag="--margin"),
    Setting("dilation_mm", "float", "mm the mask is grown by before editing (real masks miss the lesion's "
            "partial-volume rim); the edit rewrites this region fully.", 0.0, 10.0, fallback=0.0, flag="--dilation"),
    Setting("growth", "choice", "Heal: how the mask grows before the fill. fixed = by dilation_mm everywhere; rim = "
            "only into the voxels around the mask that look like lesion (darker than the tissue around it, fading "
            "outwards), at most dilation_mm: healthy tissue next to a tight mask stays as it is. With either, CSF "
            "beside the lesion (darker than the lesion itself) keeps its values, and the fill never makes a voxel "
            "darker than the scan (a T1-hypointense lesion only darkened it; realism's zero-mean grain may).",
            choices=GROWTHS, fallback="fixed"),
    Setting("boundary_average", "bool", "Heal: average the fills for the drawn mask, the mask one voxel smaller and "
            "the mask one voxel larger, so that the fill does not hinge on where the mask's edge was drawn (+0.4 dB on "
            "the held-out yardstick; the local stage runs three times, about 1.4 s more).", fallback=False),
    Setting("patch_blend", "float", "Heal: weight of a non-local patch fill (the scan's own tissue copied from around "
            "the lesion, as NiftySeg's seg_FillLesions does) blended into the fill over the mask grown by 2 voxels "
            "where it is brighter than the fill; where it is darker or beside CSF, a third of it (0 = off). It adds "
            "the scan's own structure and level to the network's estimate; 1 mm scans only.", 0.0, 1.0,
            fallback=0.0),
    Setting("prior_anchor", "bool", "Heal: inside a large lesion (deeper than 8 mm from its edge, e.g. a territorial "
            "infarct), bring the fill to the level the template's tissue classes predict there (class means fitted "
            "on the tissue around it): without it a large fill sags towards the CSF beside it.", fallback=False),
    Setting("mirror_blend", "float", "Heal: how far the fill moves towards the same place in the scan's other "
            "hemisphere (mirrored across the template's midline, aligned on the tissue around the lesion, its level "
            "matched there), in lesions deeper than 8 mm below the brain's surface; a part whose surroundings do not "
            "match their mirror, or whose mirror is a lesion too, is left alone (0 = off).",
            0.0, 1.0, fallback=0.0),
    Setting("lesion_level", "float", "Embed: how dark the lesion is, as its mean inside the mask over the tissue "
            "2-4 voxels around it (0.5: a dark T1 black hole; 0.9: a faint lesion). The network's lesion is deepened "
            "or lightened to it, its shape, edge and heterogeneity kept, the scan's grain added afterwards. Default: "
            "the network's own level (about 0.8 on the yardstick's lesions).", 0.05, 0.99),
    Setting("stages", "choice", "latent: the USB latent model (2 mm grid, whole-brain context); local: the local "
            "deviation model at the scan's own resolution; both: latent, then local.", choices=STAGES),
    Setting("local_mode", "choice", "Local stage: fidelity = deterministic reconstruction (best PSNR); realism = "
            "heal: the same reconstruction with the scan's grain synthesized into the fill (noise synthesis), embed: "
            "a guided sample with texture.", choices=LOCAL_MODES, fallback="fidelity"),
    Setting("local_steps", "int", "Local stage, realism (embed): denoising steps.", 1, 100, fallback=4),
    Setting("local_strength", "float", "Local stage, realism (embed): noise level of the sample.", 0.01, 1.0,
            fallback=0.3),
    Setting("prefill", "choice", "Smooth fill of the lesion before the latent diffusion starts (heal).",
            choices=PREFILLS, fallback="none"),
    Setting("fusion", "choice", "How the latent result enters the scan: as a deviation from the decoded input "
            "(cancels the autoencoder's blur) or replacing the scan by the decoded image inside the edit region.", choices=FUSION_MODES, fallback="deviation"),
    Setting("sampler", "choice", "Generation: the ODE solver of the reverse diffusion. ddim = first order; "
            "dpm++2m = DPM-Solver++(2M), second order with the same network calls, so fewer steps suffice.",
            choices=SAMPLERS, fallback="ddim"),
    Setting("lesion_guidance", "float", "Generation from a mask: how strongly the lesion is imprinted. The brain "
            "model's estimate for the mask is pushed away from its estimate for an empty mask by this factor "
            "(classifier-free guidance with the empty mask as the null condition); with lesion fusion off, 0 = the "
            "paper's plain eq. 9.", 0.0, 10.0, fallback=0.0),
    Setting("lesion_fusion", "bool", "Generation from a mask: generate a healthy brain and, from the same noise, "
            "the lesion on the latent voxels the mask touches, and fuse the difference at the mask (grown by "
            "dilation_mm, feathered over margin_mm): the rest of the brain is the healthy twin's. Off = the paper's "
            "eq. 9, the whole brain conditioned on the mask (the lesion then also shifts distant anatomy).",
            fallback=False),
    Setting("samples", "int", "Number of samples averaged (the output is their mean); with 2 or more their "
            "per-voxel standard deviation is an uncertainty map (usb --uncertainty; a volume in the Slicer panel). "
            "Generating pairs in the panel: the number of pairs.", 1, 64, fallback=1),
    Setting("seed", "int", "Random seed: the same seed and settings give the same result.", 0, 2**31 - 1,
            fallback=0),
)

SETTINGS: dict[str, Setting] = {s.name: s for s in _SETTINGS}
RANGES: dict[str, tuple[float, float]] = {s.name: (s.low, s.high) for s in _SETTINGS if s.low is not None}
FALLBACKS: dict[str, Any] = {s.name: s.fallback for s in _SETTINGS if s.fallback is not None}
# A heal whose mask already covers the lesion's partial-volume rim (a lesion mask made on FLAIR, or one dilated for
# safety) is healed as drawn: growing it further into the rim cost 1.9 dB on such masks (held out, 1 mm scans;
# docs/model.md, "Generously drawn masks"). ``usb heal --mask-covers-rim``, the GUIs' "Mask covers the lesion's dark
# rim".
COVERS_RIM_DILATION_MM = 0.0
# Where the GUIs' lesion-darkness slider (embed, ``lesion_level``) starts once a person asks for a darkness: a dark
# T1 lesion (the network's own level, used while nobody asks, is about 0.8 of the tissue around the lesion).
DARK_LESION_LEVEL = 0.5
GUIDANCE = ("strength", "acg", "alpha0", "k", "eta", "margin_mm", "dilation_mm", "growth", "boundary_average",
            "patch_blend", "prior_anchor", "mirror_blend",
            "stages", "local_mode", "local_steps", "local_strength")


def value_of(settings: Mapping[str, Any], key: str) -> Any:
    """``settings[key]``, or the table's fallback for ``key`` where it is absent or None."""
    given = settings.get(key)
    return FALLBACKS[key] if given is None else given


def validate(settings: dict[str, Any]) -> dict[str, Any]:
    """Check every known key of ``settings`` against the table and fill in fallbacks for keys the engine needs
    (``fusion``, ``margin_mm``, ``acg``, ``sampler``). Raises ``InputError`` with a one-line message. Returns ``settings``."""
    for key, value in settings.items():
        spec = SETTINGS.get(key)
        if spec is None or value is None:
            continue
        if spec.kind in ("int", "float"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not spec.low <= value <= spec.high:
                raise InputError(f"{key} must be between {_bound(spec.low)} and {_bound(spec.high)}, got {value}")
            if spec.kind == "int" and int(value) != value:
                raise InputError(f"{key} must be a whole number, got {value}")
        elif spec.kind == "bool":
            if not isinstance(value, bool):
                raise InputError(f"{key} must be true or false, got {value!r}")
        elif value not in spec.choices:
            raise InputError(f"{key.replace('_', ' ')} must be one of {', '.join(spec.choices)}, got {value!r}")
    for key in ("fusion", "margin_mm", "acg", "sampler"):
        if settings.get(key) is None:
            settings[key] = FALLBACKS[key]
    return settings


def cli_number(name: str):
    """An argparse ``type`` for setting ``name``: its kind and range (``SETTINGS``), a bad value a usage error."""
    return _number(SETTINGS[name])


def _number(spec: Setting):
    cast = int if spec.kind == "int" else float

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {'whole ' if spec.kind == 'int' else ''}number: {text!r}")
        if not spec.low <= value <= spec.high:
            raise argparse.ArgumentTypeError(f"must be between {_bound(spec.low)} and {_bound(spec.high)}, "
                                             f"got {text}")
        return value

    parse.__name__ = spec.kind
    return parse


def add_cli_options(parser: argparse.ArgumentParser, names: Iterable[str],
                    help_overrides: Mapping[str, str] | None = None) -> None:
    """Add one CLI option per named setting (default None = the bundle's), with its range in the help."""
    for name in names:
        spec = SETTINGS[name]
        text = (help_overrides or {}).get(name, spec.help)
        if spec.kind == "bool":
            parser.add_argument(spec.option, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{text} (default: the bundle's, else {'on' if spec.fallback else 'off'})")
        elif spec.kind == "choice":
            parser.add_argument(spec.option, dest=name, choices=spec.choices, help=f"{text} (default: the bundle's)")
        else:
            parser.add_argument(spec.option, dest=name, type=_number(spec),
                                help=f"{text} [{spec.low:g}..{spec.high:g}] (default: the bundle's)")


def _bound(value: float) -> str:
    """A range's end as a person reads it: whole numbers in full (2147483647, not 2.14748e+09), others as %g."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
