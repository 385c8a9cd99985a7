"""Training windows shaped like the local stage's inference boxes, from deformed anatomies.

One window: a lesion site is drawn (``sites.SITES``) and a centre in its pool; a work box around that centre is cut
from a deformed anatomy (``scenes.Scene``) and given label-driven contrast (``data.anatomy.synthesize_contrast``,
random class levels; always for fsaverage, else ``SYNTH_FRACTION``) or the source's own T1 contrast with a gamma; a
lesion is painted (``crops.paint_lesion``) and the same scanner artefacts go onto the healthy and lesioned copies;
the user's mask is drawn (``masks.draw_mask``: exact, hasty, tight, generous or shifted).

Then the box is the one the stage would take (``USBLib.imaging.boxes.lesion_boxes``: the mask's group grown by
``CONTEXT_MM``, sides at least ``MIN_SIDE_MM``, padded at the far end to the network's size multiple); the fill
region is a fixed growth or a rim growth of the mask (``masks.draw_region_kind``) and the classical fill is the
biharmonic fill of the clipped lesioned box, computed on the whole box as the stage does. A box side above
``MAX_SIDE`` is cut to one window of ``MAX_SIDE`` that holds lesion voxels, as the stage's sliding windows cut it.
The template prior is read into the window through the scene's simulated registration (``scenes.Scene.prior``),
from a prior source drawn among ``priors.PRIOR_SOURCES`` other than the window's own source.

A share ``thick_fraction`` of the work boxes (0 in the shipped recipe) is measured as a thick-slice scanner would
measure it before the stage's box is taken: slices ``slices.SLICE_FACTORS`` mm thick along a random axis, then back
on the 1 mm grid as the stage resamples a thick scan's box (``thick_work_box``); the drawn mask is drawn on the
thick slices. The target (healthy) goes through the same, so the network learns to fill the scan it is given.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from USBLib.editor.local.conditioning import classical_fill
from USBLib.editor.local.sampler import WINDOW
from USBLib.editor.local.stage import CONTEXT_MM, MIN_SIDE_MM
from USBLib.imaging.boxes import Box, lesion_boxes

from ..data.anatomy import LABELS_ONLY, synthesize_contrast
from ..data.prepare import Anatomy
from .crops import MAX_LEVEL, _artefacts, _NoLesion, paint_lesion
from .masks import draw_mask, draw_region_kind, fixed_fill_region, rim_fill_region
from .scenes import Scene
from .sites import PAINT_KIND, site_mix, site_pools
from .slices import SLICE_FACTORS, thick_mask_on_fine_grid, thick_on_fine_grid

SYNTH_FRACTION = 0.5   # label-driven contrast for sources with a usable T1 (LABELS_ONLY sources: always)
MAX_SIDE = WINDOW      # largest window side (the stage's network window)
WORK_SIDE = {"large": 96}  # side of the work box a lesion is painted in (default 64)


@dataclass
class Window:
    """One training window (1 mm voxels, model units), shape [I, J, K] with sides in 32..``MAX_SIDE``.

    ``healthy``/``lesioned``/``fill``/``soft`` float32; ``mask`` (the drawn mask of this box's group) and
    ``region`` (the heal's fill region) bool; ``prior`` [5, I, J, K] float32 (template T1, CSF, GM, WM, deep grey
    matter); ``info``: site, source, prior source, contrast, mask kind, region kind, the box's own shape."""

    healthy: np.ndarray
    lesioned: np.ndarray
    fill: np.ndarray
    soft: np.ndarray
    mask: np.ndarray
    region: np.ndarray
    prior: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """One training anatomy with what windows need: its structure codes, RAS affine and site pools."""

    anatomy: Anatomy
    sites: np.ndarray
    affine: np.ndarray
    pools: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.pools:
            self.pools = site_pools(self.anatomy, self.sites)


class WindowMaker:
    """Windows from training anatomies and prior maps.

    Args:
        sources: the anatomies (``Source``).
        priors: prior source name -> (maps [5, ...], affine) on a model grid (``priors.prior_maps``).
        multiple: the network's size multiple (box sides are multiples of it).
        site_weights: lesion site -> relative weight, overriding ``SITES`` for the sites it names
            (``sites.site_mix``).
        thick_fraction: share of the windows measured with thick slices (``thick_work_box``), 0..1.
    """

    def __init__(self, sources: list[Source], priors: dict[str, tuple[np.ndarray, np.ndarray]], multiple: int = 4,
                 site_weights: dict[str, float] | None = None, thick_fraction: float = 0.0):
        if not 0.0 <= thick_fraction <= 1.0:
            raise ValueError(f"thick_fraction must be in 0..1, got {thick_fraction}")
        self.sources, self.priors, self.multiple = sources, priors, int(multiple)
        self.site_weights = site_mix(site_weights)
        self.thick_fraction = float(thick_fraction)

    def scene(self, rng: np.random.Generator) -> tuple[Scene, Source]:
        """A new deformed anatomy from a source drawn uniformly, and that source."""
        src = self.sources[int(rng.integers(len(self.sources)))]
        return Scene.make(src.anatomy, src.sites, src.affine, rng), src

    def windows(self, rng: np.random.Generator, count: int, per_scene: int = 8) -> Iterator[Window]:
        """``count`` windows, ``per_scene`` from each deformed anatomy."""
        for i in range(count):
            if i % per_scene == 0:
                scene, src = self.scene(rng)
            yield self.window(scene, src, rng)

    def window(self, scene: Scene, src: Source, rng: np.random.Generator) -> Window:
        """One window from a scene of ``src`` (a site where no lesion fits gets new centres, then another site)."""
        for attempt in range(30):
            if attempt % 6 == 0:  # a site keeps its share: new centres first, another site after six misses
                site = str(rng.choice(list(self.site_weights), p=list(self.site_weights.values())))
            try:
                return self._window(scene, src.pools[site], site, rng)
            except _NoLesion:
                continue
        raise RuntimeError(f"no lesion could be placed in {scene.anatomy.name}")

    def _window(self, scene: Scene, pool: np.ndarray, site: str, rng: np.random.Generator) -> Window:
        """The window of a lesion at ``site`` centred on a voxel of ``pool`` (flat indices in the source's grid)."""
        point = np.array(np.unravel_index(int(pool[rng.integers(pool.size)]), scene.anatomy.labels.shape), float)
        side = WORK_SIDE.get(site, 64)
        start = np.round(scene.locate(point)).astype(int) - side // 2
        work = _lesioned_work_box(scene, start, side, site, rng)
        slices = (0, 1)  # (axis, slice thickness in mm) of the scan the window is measured as
        if self.thick_fraction > 0 and rng.random() < self.thick_fraction:  # no draw at 0: old seeds unchanged
            slices = (int(rng.integers(3)), int(rng.choice(SLICE_FACTORS)))
            work = thick_work_box(work, *slices)
        box, arrays, region_kind = self._stage_box(work, rng)
        padded = arrays["mask"].shape
        cut = _cut(padded, arrays["mask"], rng)
        arrays = {k: v[cut] for k, v in arrays.items()}
        others = sorted(n for n in self.priors if n != scene.anatomy.name) or sorted(self.priors)
        prior_name = others[int(rng.integers(len(others)))]  # another template than the window's, where there is one
        prior = scene.prior(start + np.asarray(box.start), box.shape, *self.priors[prior_name], rng)
        pad = [(0, n - b) for n, b in zip(padded, box.shape)]
        prior = np.pad(prior, [(0, 0)] + pad, mode="edge")[(slice(None),) + cut]
        info = {"site": site, "source": scene.anatomy.name, "prior": prior_name, "contrast": work["contrast"],
                "mask_kind": work["mask_kind"], "region_kind": region_kind, "box": list(box.shape),
                "slice_axis": slices[0], "slice_mm": slices[1]}
        return Window(prior=prior.astype(np.float32), info=info,
                      **{k: (v if v.dtype == bool else v.astype(np.float32)) for k, v in arrays.items()})

    def _stage_box(self, work: dict[str, Any], rng: np.random.Generator
                   ) -> tuple[Box, dict[str, np.ndarray], str]:
        """(the stage's box in the work box, its arrays [padded box shape], the fill region's kind).

        The box: the drawn mask's group grown by the context, at least ``MIN_SIDE_MM``, padded at its far end to the
        size multiple (images by their edge voxels, masks by zeros). Its arrays: healthy, lesioned, soft extent,
        drawn mask, the fill region of a drawn kind and the biharmonic fill of the clipped lesioned box in it."""
        drawn, binary = work["drawn"], work["binary"]
        boxes, groups = lesion_boxes(drawn, CONTEXT_MM, 1, min_side=int(MIN_SIDE_MM))
        box = max(boxes, key=lambda b: int(((groups == b.label) & binary).sum()))
        pad = [(0, -(-n // self.multiple) * self.multiple - n) for n in box.shape]
        edge = lambda v: np.pad(box.read_mirrored(v), pad, mode="edge")  # noqa: E731
        group = box.read_mirrored(groups) == box.label
        lesion = np.pad((box.read_mirrored(drawn.astype(np.uint8)) > 0) & group, pad)
        kind, value = draw_region_kind(rng)
        if kind == "rim":
            grown = rim_fill_region(work["lesioned"], drawn, work["brain"], value)
            region = np.pad(((box.read_mirrored(grown.astype(np.uint8)) > 0) & group), pad) | lesion
        else:
            region = fixed_fill_region(lesion, value)
        lesioned = edge(work["lesioned"])
        fill = classical_fill(np.clip(lesioned, 0.0, MAX_LEVEL), region)
        arrays = {"healthy": edge(work["healthy"]), "lesioned": lesioned, "fill": fill, "soft": edge(work["soft"]),
                  "mask": lesion, "region": region}
        return box, arrays, f"{kind} {value:g}"


def _lesioned_work_box(scene: Scene, start: np.ndarray, side: int, site: str, rng: np.random.Generator) -> dict:
    """A work box of the scene (``side`` voxels from ``start``) with its contrast, a lesion of ``site``'s kind at
    its centre, the shared scanner artefacts and the drawn mask. Raises ``_NoLesion``."""
    work = scene.window(start, (side,) * 3)
    brain, labels = work["brain"], work["labels"]
    synth = scene.anatomy.name in LABELS_ONLY or rng.random() < SYNTH_FRACTION
    if synth:
        img, head = synthesize_contrast(labels, brain, rng), brain
    else:
        img = np.clip(work["image"], 0, None) ** float(np.exp(rng.normal(0, 0.12)))
        head = (img > 0.01) | brain
    soft, binary, deviation = paint_lesion(img, labels, np.full(3, side / 2.0, np.float32),
                                           PAINT_KIND.get(site, "deep_wm"), rng)
    healthy, lesioned = _artefacts([img, np.clip(img + deviation, 0, None)], head.astype(np.float32), rng)
    drawn, mask_kind = draw_mask(binary, rng)
    return {"healthy": healthy, "lesioned": lesioned, "soft": soft, "binary": binary, "drawn": drawn,
            "brain": brain, "contrast": "labels" if synth else "template", "mask_kind": mask_kind}


def thick_work_box(work: dict[str, Any], axis: int, factor: int) -> dict[str, Any]:
    """A lesioned work box (``_lesioned_work_box``, 1 mm) as a scanner with ``factor`` mm slices along ``axis``
    measures it, back on the 1 mm grid (``slices.thick_on_fine_grid``): images and soft extent averaged over the
    slices; brain and lesion extent where the averaged one is >= 0.5; the drawn mask drawn on the thick slices
    (``slices.thick_mask_on_fine_grid``). Raises ``_NoLesion`` when no thick slice keeps the drawn mask."""
    drawn = thick_mask_on_fine_grid(work["drawn"], axis, factor)
    if not drawn.any():
        raise _NoLesion
    out = dict(work, drawn=drawn)
    for name in ("healthy", "lesioned", "soft"):
        out[name] = thick_on_fine_grid(work[name], axis, factor)
    out["binary"] = out["soft"] >= 0.5
    out["brain"] = thick_on_fine_grid(work["brain"], axis, factor) >= 0.5
    return out


def _cut(shape, lesion: np.ndarray, rng: np.random.Generator) -> tuple[slice, ...]:
    """The window of a box: the whole box, or along a side above ``MAX_SIDE`` a ``MAX_SIDE`` stretch that holds
    a lesion voxel drawn at random (a tile of the stage's sliding windows)."""
    voxels = np.argwhere(lesion)
    anchor = voxels[rng.integers(len(voxels))] if len(voxels) else np.asarray(shape) // 2
    out = []
    for n, a in zip(shape, anchor):
        if n <= MAX_SIDE:
            out.append(slice(0, n))
            continue
        lo = int(rng.integers(max(0, a - MAX_SIDE + 1), min(a, n - MAX_SIDE) + 1))
        out.append(slice(lo, lo + MAX_SIDE))
    return tuple(out)


def training_sources(cache: Path, names: list[str]) -> list[Source]:
    """The native anatomies of ``names`` with their structure codes (the aseg's, mapped onto the MNI sources) and
    deep grey matter as its own class (``sites.with_deep_grey``)."""
    from .anatomies import native_affine, native_anatomies
    from .sites import site_map, with_deep_grey

    anatomies = native_anatomies(cache, sorted(set(names) | {"fsaverage"}))
    fs, fs_affine = anatomies["fsaverage"], native_affine(cache, "fsaverage")
    out = []
    for name in names:
        affine = native_affine(cache, name)
        codes = site_map(cache, name, anatomies[name], affine, fs, fs_affine)
        out.append(Source(with_deep_grey(anatomies[name], codes), codes, affine))
    return out
