"""``LocalStage``: the local deviation model applied to every lesion group of a scan, box by box.

Input and output live on the scan's own grid in model intensity units (``USBLib.imaging.intensity``): the stage returns
the deviation d (result = image + d) for each of ``samples`` draws; the caller converts it to the scan's units
and fuses it (``USBLib.imaging.fusion``). Nothing here reads files or knows about registration: a network that
reads the template's tissue prior gets it from the caller as a ``prior.TissuePrior`` (the maps and the mapping).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch

from USBLib.core.schedule import NoiseSchedule
from USBLib.imaging.boxes import lesion_boxes, needs_resampling, to_grid, work_shape
from USBLib.editor.local.conditioning import (BASES, DEVIATION_SCALE, DIRECTIONS, condition, input_names,
                                              lesion_prior, needs_prior, network_input)
from USBLib.editor.local.level_gate import limit_to_surroundings
from USBLib.editor.local.network import build_local_unet, size_multiple
from USBLib.editor.local.prior import TissuePrior
from USBLib.editor.local.sampler import sample_deviation

CONTEXT_MM = 10.0   # context around each lesion group, per side
MIN_SIDE_MM = 32.0  # smallest box side (training windows are boxes of the same kind)
REGION_REACH = 0.01  # a resampled fill region takes every working voxel this much of a region voxel reaches
LEVEL_GATE = True    # heal: the network's correction kept within the level of the tissue around (``level_gate``)


@dataclass(frozen=True)
class LocalSettings:
    """Settings of one local-stage run (see ``USBLib.settings`` for ranges and help)."""

    mode: str = "fidelity"       # fidelity | realism
    steps: int = 4               # realism: guided DDIM steps
    strength: float = 0.3        # realism: noise level the fidelity estimate is diffused to (fraction of T)
    dilation_mm: float = 2.0     # heal: fill region = mask grown by this (real masks miss the rim)
    alpha0: float = 20.0         # ACG (eq. 12)
    k: float = 2.0
    eta: float = 1.0             # LCG (eq. 14)
    acg: bool = True


class LocalStage:
    """The local network of a bundle on a device. ``config`` is the bundle's ``local`` section."""

    def __init__(self, net: torch.nn.Module, config: Mapping[str, Any], device: torch.device):
        self.net, self.config, self.device = net, dict(config), device
        self.schedule = NoiseSchedule.from_config(config["schedule"])
        self.multiple = size_multiple(config["network"])
        self.inputs = input_names(config)  # the condition channels the network reads, in order
        self.base = str(config.get("base", "biharmonic"))  # how a heal's base is made (conditioning.BASES)
        if self.base not in BASES:
            from USBLib.errors import BundleError

            raise BundleError(f"the local stage's base '{self.base}' is unknown (known: {', '.join(BASES)})")

    @classmethod
    def from_state_dict(cls, config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                        device: torch.device) -> "LocalStage":
        from USBLib.errors import BundleError

        try:
            net = build_local_unet(config["network"], len(input_names(config)))
        except ValueError as exc:
            raise BundleError(f"the local stage's config is invalid ({exc})") from None
        try:
            net.load_state_dict(dict(state), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise BundleError(f"the local stage's weights do not fit its network ({first})") from None
        net.eval().requires_grad_(False).to(device)
        if device.type == "cpu":
            from USBLib.core.devices import use_onednn_convs

            use_onednn_convs(net)
        return cls(net, config, device)

    def deviation(self, image: np.ndarray, mask: np.ndarray, spacing, task: str, settings: LocalSettings,
                  generator: torch.Generator, samples: int = 1,
                  tick: Optional[Callable[[], None]] = None, clip: tuple[float, float] = (0.0, 1.5),
                  region: Optional[np.ndarray] = None, prior: Optional[TissuePrior] = None,
                  noise_frame: Optional[tuple[tuple[int, ...], tuple[slice, ...]]] = None) -> np.ndarray:
        """Deviation [samples, I, J, K] (model units) for ``image`` [I, J, K] (model units, not clipped) and its
        lesion ``mask``; zero outside the lesion groups' context regions. ``task``: ``heal`` or ``embed``.
        ``region``: a heal's fill region [I, J, K] on the scan's grid (e.g. ``USBLib.imaging.rim``), or None for
        the mask grown by ``settings.dilation_mm``. ``prior``: the template's tissue prior on the scan's grid
        (``USBLib.editor.local.prior``), needed when the network reads it (``needs_prior``), else ignored.
        ``noise_frame``: (the scan's shape, the slices of it that ``image`` is) when ``image`` is a window of a
        larger scan (``stage_rules.edit_window``): the realism noise is drawn over the whole scan and read there, so
        a voxel's noise does not depend on the window.

        The network sees the image clipped to ``clip`` (its training range); for heal, the clipped-off part of
        the fill region is added back to the deviation, so the result is the healed clipped image there."""
        direction = DIRECTIONS[task]
        if self.needs_prior and prior is None:
            raise ValueError("this local network reads the template's tissue prior; pass it as `prior`")
        spacing = np.asarray(spacing, float)
        resample = needs_resampling(spacing)
        grid_mm = np.ones(3) if resample else spacing
        boxes, labels = lesion_boxes(mask, np.ceil(CONTEXT_MM / spacing), 1,
                                     min_side=np.ceil(MIN_SIDE_MM / spacing).astype(int))
        out = np.zeros((samples, *image.shape), np.float32)
        draws = samples if settings.mode == "realism" else 1  # the fidelity estimate is deterministic
        # realism noise is one field over the whole scan, read box by box: the same voxel gets the same noise
        # whatever box it falls in, so a growing mask (progression series) keeps its texture in place
        field = None
        if settings.mode == "realism" and not resample and draws <= 8:
            scan_shape, window = noise_frame or (image.shape, (slice(None),) * 3)
            field = torch.randn((draws, *scan_shape), generator=generator).numpy()[(slice(None), *window)]
        dilation = int(round(settings.dilation_mm / float(np.mean(grid_mm)))) if task == "heal" else 0
        for box in boxes:
            group = box.read(labels) == box.label
            # past the image border the scan and its lesion are mirrored at the border, so that the fill is anchored
            # in the tissue around the lesion all round, not in a black frame or a lesion running on to the box's end
            group_edge = box.read_mirrored(labels) == box.label
            raw = box.read_mirrored(np.asarray(image, np.float32))
            img = np.clip(raw, *clip)
            lesion = (box.read_mirrored(mask) > 0) & group_edge
            region_box = None if region is None else ((box.read_mirrored(region) > 0) & group_edge) | lesion
            region_w = prior_w = None
            prior_box = prior.read(box) if self.needs_prior else None
            if resample:
                shape = work_shape(box.shape, spacing, self.multiple)
                img_w = to_grid(img, shape, 1)
                lesion_w = _resampled_mask(lesion, shape)
                if region_box is not None:
                    region_w = _resampled_region(region_box, shape) | lesion_w
                if prior_box is not None:
                    prior_w = np.stack([to_grid(p, shape, 1) for p in prior_box])
            else:
                shape = tuple(int(-(-s // self.multiple) * self.multiple) for s in box.shape)
                pad = [(0, a - b) for a, b in zip(shape, box.shape)]
                img_w = np.pad(img, pad, mode="edge")
                lesion_w = np.pad(lesion, pad)
                region_w = None if region_box is None else np.pad(region_box, pad)
                if prior_box is not None:
                    prior_w = np.pad(prior_box, [(0, 0)] + pad, mode="edge")
            cond = condition(img_w, lesion_w, direction, dilation, region=region_w, base=self.base, prior=prior_w)
            inputs = network_input(cond, self.inputs, prior_w)
            x_lesion = lesion_prior(cond[2] > 0)  # the smoothed fill region: LCG's weight and realism's level
            weight = None
            if settings.eta > 0:
                weight = torch.from_numpy(np.clip(1.0 - settings.eta * x_lesion, 0.0, 1.0))[None, None].to(self.device)
            level = torch.from_numpy(x_lesion)[None, None] if settings.mode == "realism" else None
            cond_t = torch.from_numpy(inputs)[None].expand(draws, *inputs.shape).contiguous().to(self.device)
            noise = None
            if field is not None:
                noise = np.stack([_noise_window(box, f, pad, generator) for f in field])[:, None]
                noise = torch.from_numpy(np.ascontiguousarray(noise))
            base_shift = cond[3] - cond[0]  # base - input: the classical fill's change (zero outside the region)
            reference = torch.from_numpy(-base_shift * self.scale)[None, None]  # the input, in the network's variable
            x0 = sample_deviation(self.net, self.schedule, cond_t, direction, mode=settings.mode,
                                  alpha0=settings.alpha0, k=settings.k, eta_weight=weight, steps=settings.steps,
                                  strength=settings.strength, generator=generator, acg=settings.acg, noise=noise,
                                  reference=reference, level_weight=level)
            if direction == DIRECTIONS["heal"] and LEVEL_GATE:  # x0 = scale x the correction of the base
                gated = limit_to_surroundings(x0[:, 0].float().cpu().numpy() / self.scale, cond[0], cond[3],
                                              cond[2] > 0, grid_mm)
                x0 = torch.from_numpy(gated * np.float32(self.scale))[:, None]
            d = x0[:, 0].float().cpu().numpy() / self.scale + base_shift  # deviation from the input
            clipped_off = None  # heal: the part of the fill region the clip took off, given back
            if direction == DIRECTIONS["heal"]:
                filled = to_grid(cond[2], box.shape, 0) > 0 if resample else \
                    cond[2][tuple(slice(0, s) for s in box.shape)] > 0
                clipped_off = np.where(filled, img - raw, 0.0)
            for i in range(samples):
                di = d[min(i, draws - 1)]
                # a heal's working box is the native box interpolated: its deviation is read back at the native
                # voxel centres (``heal_back_to_native``); an embedded lesion is new 1 mm content, whose partial
                # volume over a thick voxel the low-pass keeps
                if resample and direction == DIRECTIONS["heal"]:
                    di = heal_back_to_native(di, box.shape)
                elif resample:
                    di = to_grid(di, box.shape, 1)
                else:
                    di = di[tuple(slice(0, s) for s in box.shape)]
                if clipped_off is not None:
                    di = di + clipped_off
                box.add_into(out[i], di.astype(np.float32), group)
            if tick is not None:
                tick()
        return out

    @property
    def needs_prior(self) -> bool:
        """Whether the network reads the template's tissue prior (the bundle's ``local.inputs``)."""
        return needs_prior(self.inputs, self.base)

    @property
    def scale(self) -> float:
        """Scale of the diffusion's deviation variable (x0 = scale x d), from the bundle."""
        return float(self.config.get("deviation_scale", DEVIATION_SCALE))


def _resampled_mask(lesion: np.ndarray, shape) -> np.ndarray:
    """A binary mask on the working grid; never empty for a non-empty mask (the voxel nearest its centroid)."""
    soft = to_grid(lesion.astype(np.float32), shape, 1)
    if (soft >= 0.5).any():
        return soft >= 0.5
    if soft.max() > 0:
        return soft >= soft.max() / 2
    out = np.zeros(shape, bool)
    centre = np.argwhere(lesion).mean(0) * (np.asarray(shape) - 1) / np.maximum(np.asarray(lesion.shape) - 1, 1)
    out[tuple(np.clip(np.round(centre).astype(int), 0, np.asarray(shape) - 1))] = True
    return out


def _resampled_region(region: np.ndarray, shape) -> np.ndarray:
    """A heal's fill region [box shape] on the working grid ``shape``: every working voxel that a region voxel
    reaches by linear interpolation (``REGION_REACH``), so that the classical fill's boundary, the voxels just
    outside, take their values from native voxels outside the region, which the fusion leaves as they are.

    At 0.5 (nearest region) a thick-slice scan's region ended halfway to the next slice, and the voxels beyond it,
    half of them the region's own darkened last slice, anchored the fill, which came out too dark: on the tuning
    scans with 3 mm slices this rule heals +0.47 dB (MNI2009c) and +0.84 dB (fsaverage) better (docs/model.md). The
    fusion still writes the native region only."""
    return to_grid(region.astype(np.float32), shape, 1) >= REGION_REACH


def heal_back_to_native(deviation: np.ndarray, shape) -> np.ndarray:
    """A heal's deviation on the working grid [working shape] back on the box's native grid ``shape``: linear
    interpolation at the native voxel centres, without the low-pass ``to_grid`` puts on axes that get coarser.

    The working box is the native box interpolated, so its content along a thick axis changes only between native
    slice centres, and reading it there is the exact way back. A low-pass (Gaussian, 1.2 working voxels on 3 mm
    slices) mixed each native slice's deviation with its neighbours', the unedited ones outside the fill region
    included, and left thin lesions too dark: on the tuning scans with 3 mm slices reading back at the centres
    heals better (docs/model.md)."""
    return to_grid(deviation, shape, 1, low_pass=False)


def _noise_window(box, field: np.ndarray, pad, generator: torch.Generator) -> np.ndarray:
    """The scan-wide noise field in ``box`` (fresh noise where the box leaves the volume), padded like the box."""
    window = box.read(field, fill=np.nan)
    outside = np.isnan(window)
    if outside.any():
        window[outside] = torch.randn(int(outside.sum()), generator=generator).numpy()
    padded = np.pad(window, pad)
    grown = np.ones(padded.shape, bool)
    grown[tuple(slice(0, s) for s in window.shape)] = False
    if grown.any():
        padded[grown] = torch.randn(int(grown.sum()), generator=generator).numpy()
    return padded
