"""``Editor``: USB's four tasks end to end on ``(array, affine)`` volumes in the scan's own space.

Data flow: native volume (+ mask) -> registration to the bundle template -> model grid -> intensity
normalisation -> latent (autoencoder mean x scale factor) -> guided diffusion -> decoded deviation
-> native grid -> seam-aware fusion into the original. Every output keeps the input's grid and affine, and
every voxel outside the edit region is the input's own value.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from USBLib.core import bundle as bundle_mod
from USBLib.errors import Cancelled, InputError
from USBLib.imaging.checks import check_image, check_mask, fill_missing
from USBLib.imaging.fusion import edit_weight, fuse
from USBLib.imaging.intensity import IntensityMap
from USBLib.settings import validate, value_of
from USBLib.editor import input_checks, stage_rules
from USBLib.imaging.spatial import SpaceMapping, register, voxel_spacing, window_affine

if TYPE_CHECKING:
    from USBLib.imaging.mirror import MirrorSource

MAPPINGS_KEPT = 8  # registrations an Editor keeps for scans that come again (each a few hundred bytes)

Progress = Callable[[int, int, str], Optional[bool]]


@dataclass
class EditResult:
    """One task's result. ``image``/``affine`` are on the input's grid (model grid for plain generation)."""

    image: np.ndarray
    affine: np.ndarray
    mask: Optional[np.ndarray] = None
    uncertainty: Optional[np.ndarray] = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __iter__(self):  # ``image, affine = editor.heal(...)``
        return iter((self.image, self.affine))


def _set_aside_notes(aside) -> list[str]:
    """The notes on the voxels an edit set aside and wrote back as they were (``checks.fill_missing``)."""
    notes = []
    nan = int(aside.where.sum()) - aside.far_out
    if nan:
        notes.append(f"{nan} voxels without a value (NaN or Inf, e.g. outside a normalised scan's bounding box) were "
                     "read as the scan's darkest value and are written back as they were")
    if aside.far_out:
        notes.append(f"{aside.far_out} voxels with values far outside the scan's range (a fill value outside the field "
                     "of view, or corrupt voxels) were read as the nearest ordinary value and are written back as "
                     "they were")
    return notes


class _Progress:
    """Wraps the user callback: counts steps, records stage timings, raises ``Cancelled`` on a False return."""

    def __init__(self, callback: Progress | None, total: int):
        self.callback, self.total, self.done = callback, total, 0
        self.timings: dict[str, float] = {}
        self._stage, self._t0 = "", time.perf_counter()

    def stage(self, name: str) -> None:
        now = time.perf_counter()
        if self._stage:
            self.timings[self._stage] = round(self.timings.get(self._stage, 0.0) + now - self._t0, 3)
        self._stage, self._t0 = name, now
        self._report(name)

    def tick(self) -> None:
        self.done += 1
        self._report(self._stage)

    def _report(self, message: str) -> None:
        if self.callback is not None and self.callback(min(self.done, self.total), self.total, message) is False:
            raise Cancelled("cancelled")


class Editor:
    """USB engine on volumes. ``model``: bundle name, path or ``ModelBundle`` (None = default model).

    ``device``: ``auto`` (GPU when present), ``cpu``, ``cuda`` or ``mps``. Networks load lazily on first use.
    ``USB_THREADS`` in the environment, when set, sizes torch's intra-op pool (``threads_from_env``).
    """

    def __init__(self, model: Any = None, device: str = "auto", registration: str = "affine"):
        threads_from_env()
        self.bundle = model if isinstance(model, bundle_mod.ModelBundle) else bundle_mod.load(model)
        from USBLib.core.devices import pick_device

        self.device = pick_device(device)
        self.registration = registration
        self._nets: dict[str, Any] | None = None
        self._space: dict[str, np.ndarray] | None = None
        self._empty_latent = None
        self._mappings: OrderedDict[str, SpaceMapping] = OrderedDict()  # the last MAPPINGS_KEPT registrations
        self._local = None

    # ----------------------------------------------------------------- model pieces
    @property
    def nets(self) -> dict[str, Any]:
        if self._nets is None:
            from USBLib.core.devices import use_onednn_convs
            from USBLib.core.networks import load_networks

            nets = load_networks(self.bundle, self.device)
            if self.device.type == "cpu":
                for net in nets.values():
                    use_onednn_convs(net)
            self._nets = nets
        return self._nets

    @property
    def space(self) -> dict[str, np.ndarray]:
        """The bundle's template image and brain mask on the model grid."""
        if self._space is None:
            import nibabel as nib

            template = np.asarray(nib.load(str(self.bundle.path("template"))).dataobj, dtype=np.float32)
            brain = np.asarray(nib.load(str(self.bundle.path("brain_mask"))).dataobj) > 0
            self._space = {"template": template, "brain": brain}
        return self._space

    def _denoisers(self):
        from USBLib.core.schedule import NoiseSchedule
        from USBLib.core.tasks import Denoisers

        clip = self.bundle.config["latent"].get("clip")
        return Denoisers(self.nets["unet_lesion"], self.nets["unet_brain"],
                         NoiseSchedule.from_config(self.bundle.config["schedule"]),
                         tuple(clip) if clip else None)

    @property
    def scale_factor(self) -> float:
        return float(self.bundle.config["latent"]["scale_factor"])

    def encode(self, volumes: np.ndarray):
        """Latents (posterior mean x scale factor) of model-grid volumes [B, I, J, K]."""
        import torch

        x = torch.as_tensor(np.asarray(volumes, dtype=np.float32))[:, None].to(self.device)
        with torch.no_grad():
            mu, _ = self.nets["autoencoder"].encode(x)
        return mu * self.scale_factor

    def decode(self, latents) -> np.ndarray:
        """Model-grid volumes [B, I, J, K] from latents."""
        import torch

        with torch.no_grad():
            out = self.nets["autoencoder"].decode(latents / self.scale_factor)
        return out[:, 0].float().cpu().numpy()

    def empty_condition(self):
        """x_empty: the empty mask through the same encoding path as every training mask."""
        if self._empty_latent is None:
            self._empty_latent = self.encode(np.zeros((1, *self.bundle.grid_shape), np.float32))
        return self._empty_latent

    def _settings(self, task: str, **given: Any) -> dict[str, Any]:
        settings = self.bundle.defaults(task)
        settings.update({k: v for k, v in given.items() if v is not None})
        validate(settings)
        return settings

    # ----------------------------------------------------------------- geometry
    def _map(self, image: np.ndarray, affine: np.ndarray, brain_mask: np.ndarray | None, seed: int) -> SpaceMapping:
        """Scan <-> model mapping; reused when the same scan comes again with the same settings (a progression
        series, or a person going back and forth between a few scans): the last ``MAPPINGS_KEPT`` are kept, and
        every registration is kept on disk for the next process (``registration_cache``: a Slicer run or a ``usb``
        command on a scan registered before)."""
        from USBLib.editor import registration_cache

        key = _fingerprint(image, np.asarray(affine, float), brain_mask, seed, self.registration)
        if key in self._mappings:
            self._mappings.move_to_end(key)
            return self._mappings[key]
        stored = self._stored_key(key)
        kept = self.registration != "none"  # (``none`` is the identity: nothing to keep)
        transform = registration_cache.load(stored) if kept else None
        if transform is None:
            transform = self.register_scan(image, affine, brain_mask, seed)
            if kept:
                registration_cache.save(stored, transform)
        mapping = SpaceMapping(tuple(image.shape), np.asarray(affine, float), self.bundle.grid_shape,
                               self.bundle.grid_affine, transform)
        self._mappings[key] = mapping
        while len(self._mappings) > MAPPINGS_KEPT:
            self._mappings.popitem(last=False)
        return mapping

    def registration_key(self, image: np.ndarray, affine: np.ndarray, brain_mask: np.ndarray | None = None,
                         seed: int = 0) -> str:
        """The key (hex digest) of the scan's registration to this model in ``registration_cache``: over the scan's
        voxels (dtype included) and affine, its brain mask, the seed, the registration mode, and the model's grid,
        template and brain mask."""
        return self._stored_key(_fingerprint(image, np.asarray(affine, float), brain_mask, seed, self.registration))

    def register_scan(self, image: np.ndarray, affine: np.ndarray, brain_mask: np.ndarray | None = None,
                      seed: int = 0) -> np.ndarray:
        """The scan registered to the model's template afresh (no cache): the 4x4 ``model_to_native`` (model RAS mm
        -> scan RAS mm). ``image`` [I, J, K] with its 4x4 ``affine``; ``brain_mask`` [I, J, K] or None."""
        space = self.space
        return register(image, affine, space["template"], self.bundle.grid_affine, space["brain"], brain_mask,
                        self.registration, seed)

    def _stored_key(self, key: str) -> str:
        files = self.bundle.config.get("files", {})
        return _fingerprint(key, self.bundle.grid_shape, self.bundle.grid_affine,
                            *(files.get(self.bundle.config["model_space"][k]) for k in ("template", "brain_mask")))

    def _native_brain(self, mapping: SpaceMapping, brain_mask: np.ndarray | None) -> np.ndarray:
        """The scan's brain [I, J, K] bool: ``brain_mask`` if given, else the model's brain mask carried onto the
        scan's grid (computed once per mapping: a whole-scan resampling, 0.6 s at 1 mm; read-only)."""
        if brain_mask is not None:
            return brain_mask > 0
        if "brain" not in mapping.derived:
            brain = mapping.to_native(self.space["brain"].astype(np.float32), order=1) > 0.5
            brain.flags.writeable = False
            mapping.derived["brain"] = brain
        return mapping.derived["brain"]

    @staticmethod
    def _model_mask(mapping: SpaceMapping, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Partial-volume mask on the model grid and its binary version (never empty for a non-empty mask)."""
        pv = np.clip(mapping.to_model(mask.astype(np.float32), order=1, antialias=False), 0.0, 1.0)
        binary = pv >= 0.5
        if not binary.any() and pv.max() > 0:
            binary = pv >= pv.max() / 2
        return pv, binary.astype(np.float32)

    @property
    def local(self):
        """The bundle's local stage (``USBLib.editor.local.stage.LocalStage``), or None for a latent-only bundle."""
        if not self.bundle.has_local:
            return None
        if self._local is None:
            from USBLib.editor.local.stage import LocalStage

            self._local = LocalStage.from_state_dict(self.bundle.config[bundle_mod.LOCAL],
                                                     self.bundle.load_state_dict(bundle_mod.LOCAL), self.device)
        return self._local

    def interactive_local_mode(self) -> str:
        """The local mode for results a person looks at (Slicer, demo): the bundle's ``local.interactive_mode``."""
        if not self.bundle.has_local:
            return "fidelity"
        return str(self.bundle.config[bundle_mod.LOCAL].get("interactive_mode", "realism"))

    # ----------------------------------------------------------------- tasks
    def heal(self, image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None = None,
             brain_mask: np.ndarray | None = None, *, steps: int | None = None, strength: float | None = None,
             alpha0: float | None = None, k: float | None = None, eta: float | None = None,
             acg: bool | None = None, margin_mm: float | None = None, prefill: str | None = None,
             stages: str | None = None,
             local_mode: str | None = None, local_steps: int | None = None, local_strength: float | None = None,
             dilation_mm: float | None = None, growth: str | None = None, boundary_average: bool | None = None,
             patch_blend: float | None = None, prior_anchor: bool | None = None, mirror_blend: float | None = None,
             samples: int = 1, seed: int = 0,
             mask_affine: np.ndarray | None = None, resample_mask: bool = False,
             progress: Progress | None = None) -> EditResult:
        """Pathology -> healthy. With ``mask`` the edit stays inside the mask grown by ``dilation_mm`` plus a
        ``margin_mm`` feather; without, it is a whole-brain latent edit (an empty mask is refused: ``InputError``).

        ``stages``: ``latent`` (the USB latent stage), ``local`` (the local deviation model at the scan's own
        resolution), ``both`` (latent, then local on its result); default: the bundle's. ``local_mode``:
        ``fidelity`` (deterministic reconstruction) or ``realism`` (a guided sample, ``local_steps`` DDIM steps
        from ``local_strength``). ``prefill`` (latent stage: ``none``, ``harmonic``, ``biharmonic``) replaces
        the lesion by a smooth fill before the latent diffusion starts. ``acg``: Anatomy Consistency Guidance on
        or off (``alpha0``/``k`` shape it; see ``USBLib.settings`` for every setting's range and meaning). ``growth``:
        ``fixed`` (the mask grown by ``dilation_mm``) or ``rim`` (grown only into its lesion-like rim, at most
        ``dilation_mm``; ``USBLib.imaging.rim``). ``boundary_average``: average the edits for the drawn mask, it a
        voxel smaller and a voxel larger (``USBLib.imaging.mask_edges``; the latent stage runs once, the local stage
        and fusion once per mask); the edit region is then the union of the three. ``patch_blend``: weight of a
        non-local patch fill of the mask grown by 2 voxels blended into the fill there (``Editor._patch_blend_stage``;
        1 mm scans only). ``prior_anchor``: inside a lesion
        deeper than 8 mm from its edge, the fill is brought to the level the template's tissue classes predict
        (``USBLib.editor.local.prior_anchor``; the edit region is unchanged). ``mirror_blend``: how far the fill
        moves towards the same place in the scan's other hemisphere, aligned on the tissue around it, in lesions
        deeper than 8 mm below the brain's surface (``USBLib.imaging.mirror``; thick slices too)."""
        return self._edit("heal", image, affine, mask, brain_mask, steps=steps, strength=strength, alpha0=alpha0,
                          k=k, eta=eta, acg=acg, margin_mm=margin_mm, prefill=prefill, stages=stages, local_mode=local_mode,
                          local_steps=local_steps, local_strength=local_strength, dilation_mm=dilation_mm, growth=growth,
                          boundary_average=boundary_average, patch_blend=patch_blend, prior_anchor=prior_anchor,
                          mirror_blend=mirror_blend, samples=samples, seed=seed,
                          mask_affine=mask_affine, resample_mask=resample_mask, progress=progress)

    def embed(self, image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain_mask: np.ndarray | None = None,
              *, steps: int | None = None, strength: float | None = None, alpha0: float | None = None,
              k: float | None = None, eta: float | None = None, acg: bool | None = None,
              margin_mm: float | None = None, stages: str | None = None, local_mode: str | None = None, local_steps: int | None = None,
              local_strength: float | None = None, dilation_mm: float | None = None,
              lesion_level: float | None = None, samples: int = 1,
              seed: int = 0, mask_affine: np.ndarray | None = None, resample_mask: bool = False,
              progress: Progress | None = None) -> EditResult:
        """Healthy -> pathology: a lesion of the mask's shape embedded into the scan (ACG x LCG); settings as
        for ``heal``. ``lesion_level``: each lesion's mean inside the mask over the tissue 2-4 voxels around it
        (``USBLib.imaging.lesion_level``), e.g. 0.5 for a dark T1 lesion; None: the network's own level."""
        if mask is None:
            raise InputError("embedding needs a lesion mask")
        return self._edit("embed", image, affine, mask, brain_mask, steps=steps, strength=strength, alpha0=alpha0,
                          k=k, eta=eta, acg=acg, margin_mm=margin_mm, stages=stages, local_mode=local_mode,
                          local_steps=local_steps, local_strength=local_strength, dilation_mm=dilation_mm,
                          lesion_level=lesion_level, samples=samples, seed=seed, mask_affine=mask_affine,
                          resample_mask=resample_mask, progress=progress)

    def _edit(self, task: str, image, affine, mask, brain_mask, *, samples: int, seed: int, mask_affine,
              resample_mask: bool, progress: Progress | None, **given: Any) -> EditResult:
        """Heal/embed as a sequence of named stages: inputs -> registration -> latent stage -> local stage ->
        fusion -> provenance."""
        import torch

        original, affine, mask, brain_mask, missing = self._edit_inputs(task, image, affine, mask, brain_mask,
                                                                        mask_affine, resample_mask)
        # every stage works on the offset-free scan; the fusion on the original
        image, offset = input_checks.offset_free(original)
        settings = self._settings(task, **given)
        samples = input_checks.check_samples(samples)
        stages = self._stages(settings, mask)
        settings["stages"] = stages
        input_checks.check_sampling(self.bundle, task, samples, stages, settings.get("local_mode"))
        latent = stages in ("latent", "both")
        n_latent = self._network_steps(settings, start_step_of(settings, self.bundle)) if latent else 0
        n_local = stage_rules.local_box_count(mask, affine) if stages in ("local", "both") else 0
        n_masks = 3 if stage_rules.averages_boundary(task, mask, settings) else 1
        # ticks: registration, fusion; latent: encoding, each step, decoding; local: each lesion group per mask
        prog = _Progress(progress, 2 + (n_latent + 2 if n_latent else 0) + n_local * n_masks)
        generator = torch.Generator().manual_seed(int(seed))

        mapping, brain, imap = self._registration_stage(task, image, affine, mask, brain_mask, seed, prog)
        extra: dict[str, Any] = {"intensity_offset": offset} if offset else {}
        if missing is not None:
            _add_notes(extra, _set_aside_notes(missing))
        content = None
        if task == "embed":
            mask, content, notes = input_checks.confine_to_brain(image, affine, mask, brain)
            _add_notes(extra, notes)
        elif mask is not None:  # heal: say so when a lesion does not look like a T1-hypointense one
            _add_notes(extra, input_checks.contrast_notes(image, affine, mask, brain,
                                                          float(value_of(settings, "dilation_mm"))))
        latent_deviation = np.zeros((samples, *image.shape), np.float32)  # scan units, result = image + deviation
        if latent:
            latent_deviation += self._latent_stage(task, image, mapping, imap, mask, settings, samples, generator, prog)
            extra.update(start_step=start_step_of(settings, self.bundle), network_steps=n_latent)
        # the rest reads and writes the lesion's neighbourhood only (``stage_rules.edit_window``): the scan outside it
        # is kept
        window = stage_rules.edit_window(mask, affine, settings, image.shape)
        edited, window_uncertainty, reach = self._window_stages(
            task, original[window], image[window], window_affine(affine, window),
            None if mask is None else mask[window], brain[window], None if content is None else content[window],
            latent_deviation[(slice(None),) + window], imap, mapping.window(window), settings, samples, seed,
            generator, prog, n_local, extra, (image.shape, window),
            stage_rules.brain_p99(task, image, mask, brain, settings, affine),
            self._mirror_source(image, affine, mask, mapping, window)
            if stage_rules.blends_mirror(task, mask, settings, affine) else None)
        result, uncertainty = original.copy(), None
        result[window] = edited
        if missing is not None:  # voxels without a value stay without one, bit for bit
            result[missing[0]] = missing[1]
        if window_uncertainty is not None:
            uncertainty = np.zeros(image.shape, np.float32)
            uncertainty[window] = window_uncertainty
        extra.update({"intensity_map": {"low": imap.low + offset, "high": imap.high + offset},
                      "mask_voxels": int(mask.sum()) if mask is not None else 0,
                      "edit_region_voxels": int(reach.sum())})
        provenance = self._provenance(task, settings, seed, samples, prog.timings, mapping, extra=extra)
        return EditResult(result, affine.copy(), mask, uncertainty, provenance)

    # ----------------------------------------------------------------- edit stages
    def _window_stages(self, task: str, original: np.ndarray, image: np.ndarray, affine: np.ndarray,
                       mask: np.ndarray | None, brain: np.ndarray, content: np.ndarray | None,
                       latent_deviation: np.ndarray, imap: IntensityMap, mapping: SpaceMapping,
                       settings: dict[str, Any], samples: int, seed: int, generator, prog: "_Progress", n_local: int,
                       extra: dict[str, Any], noise_frame, brain_p99: float | None,
                       mirror: MirrorSource | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """The edit's stages after registration and the latent stage, on the window of the scan that
        ``stage_rules.edit_window`` cut: boundary masks, fill region, local stage, prior anchor, mirror blend, fusion
        weight, patch blend, texture, fusion. Every array is the window's [I', J', K'] (``latent_deviation``
        [samples, I', J', K']); ``affine`` and ``mapping`` are the window's own, ``imap`` the whole scan's;
        ``noise_frame`` (the scan's shape, the window's slices) lets the local stage draw its realism noise over the
        whole scan; ``brain_p99``: the whole scan's 99th brain percentile, for the patch blend
        (``stage_rules.brain_p99``); ``mirror``: the whole scan's other hemisphere, for ``mirror_blend``
        (``_mirror_source``), or None. Returns (the edited window in ``original``'s dtype, the
        uncertainty or None, the voxels the edit may change, bool)."""
        import torch

        variants = self._edit_masks(task, mask, affine, settings, original, brain)
        if len(variants) > 1:
            extra["boundary_masks_voxels"] = [int(v.sum()) for v in variants]
        effect = np.zeros((samples, *image.shape), np.float32)  # weight x deviation, averaged over the masks
        reach = np.zeros(image.shape, bool)  # the voxels any of the masks' edits may change
        mean_deviation = np.zeros_like(effect)  # the deviations averaged over the masks, unweighted
        for index, variant in enumerate(variants):
            deviation = latent_deviation.copy()
            region = self._fill_region(task, image, affine, variant, brain, settings)
            if n_local:
                local_generator = torch.Generator().manual_seed(int(seed)) if len(variants) > 1 else generator
                deviation += self._local_stage(task, image, affine, imap, variant, deviation.mean(axis=0), settings,
                                               samples, local_generator, prog, region, mapping, noise_frame)
                extra["local_boxes"] = n_local
                if stage_rules.anchors_to_prior(task, region, settings, self.bundle):
                    deviation = self._prior_anchor_stage(image, affine, variant, region, deviation, brain, mapping)
                if mirror is not None and region is not None:
                    deviation = self._mirror_stage(image, affine, region, deviation, brain, mirror, settings,
                                                   extra if index == 0 else None)
            prog.stage("fusing into the scan")
            weight = self._edit_weight(task, original, affine, variant, brain, settings, content, region)
            effect += stage_rules.signed_effect(task, variant, weight * deviation) / np.float32(len(variants))
            mean_deviation += deviation / np.float32(len(variants))
            reach |= weight > 0
            if index == 0:  # the drawn mask's: where the grain goes
                drawn_region, drawn_weight = region, weight
        if task == "embed" and settings.get("lesion_level") is not None:
            effect, mean_deviation = self._lesion_level_stage(image, affine, mask, brain, effect, mean_deviation,
                                                              float(settings["lesion_level"]), extra)
        if stage_rules.blends_patches(task, mask, settings, affine):
            effect, reach = self._patch_blend_stage(image, affine, mask, brain, effect, reach, settings, brain_p99)
            extra["patch_blend"] = float(value_of(settings, "patch_blend"))
        if n_local and value_of(settings, "local_mode") == "realism":  # heal and embed: the scan's grain in the edit
            # once, on the masks' mean: noise drawn per mask and averaged would lose a third of its grain or more
            textured = self._texture_stage(image, affine, mask, brain, mean_deviation, settings, seed, drawn_region)
            effect = stage_rules.with_grain(task, effect, drawn_weight * (textured - mean_deviation))
            extra["texture"] = "noise synthesis (the scan's grain matched inside the fill region)"
        result, uncertainty = self._fusion_stage(original, effect, reach, prog)
        return result, uncertainty, reach

    def _registration_stage(self, task: str, image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                            brain_mask: np.ndarray | None, seed: int, prog: "_Progress"):
        """Scan -> model mapping, the scan's brain [I, J, K] bool, and the intensity map fitted in that brain;
        refuses a lesion mask that covers most of the brain (``input_checks.check_lesion_share``) and a lesion mask
        to heal that lies outside the brain (an embed mask is cut to the brain instead,
        ``input_checks.confine_to_brain``)."""
        prog.stage("registering to the model template")
        mapping = self._map(image, affine, brain_mask, seed)
        brain = self._native_brain(mapping, brain_mask)
        input_checks.check_lesion_share(mask, brain, affine)
        if task == "heal":
            input_checks.check_inside_brain(image, mask, brain)
        imap = IntensityMap.fit(image, brain, self.bundle.config["intensity"])
        prog.tick()
        return mapping, brain, imap

    def _fill_region(self, task: str, image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None,
                     brain: np.ndarray, settings: dict[str, Any]) -> np.ndarray | None:
        """Heal with ``growth`` ``rim``: the region the heal rewrites, the mask grown into its lesion-like rim
        (at most ``dilation_mm``), [I, J, K] bool; None otherwise (the mask grown by ``dilation_mm``)."""
        if task != "heal" or mask is None or value_of(settings, "growth") != "rim":
            return None
        from USBLib.imaging.rim import rim_region

        return rim_region(image, mask, brain, voxel_spacing(affine), float(value_of(settings, "dilation_mm")))

    def _local_stage(self, task: str, image: np.ndarray, affine: np.ndarray, imap: IntensityMap,
                     mask: np.ndarray, previous: np.ndarray, settings: dict[str, Any], samples: int, generator,
                     prog: "_Progress", region: np.ndarray | None = None,
                     mapping: SpaceMapping | None = None, noise_frame=None) -> np.ndarray:
        """PathoSyn's local stage on the scan with the earlier stages' mean deviation ``previous`` [I, J, K]
        applied: deviations [samples, I, J, K] in scan units, zero outside the lesion boxes. ``region``: the fill
        region [I, J, K] of a heal (None: the mask grown by ``dilation_mm``). ``noise_frame``: (the whole scan's
        shape, the slices of it that ``image`` is), or None when ``image`` is the whole scan."""
        prog.stage("local stage")
        current = np.asarray(image, np.float32) + previous
        prior = self._local_prior(mapping) if self.local.needs_prior else None
        local = self.local.deviation((current - imap.low) / imap.units_per_model_unit, mask, voxel_spacing(affine),
                                     task, stage_rules.local_settings(settings, task), generator, samples, prog.tick,
                                     imap.clip, region, prior=prior, noise_frame=noise_frame)
        return np.stack([imap.delta_to_native(d) for d in local])

    def _prior_anchor_stage(self, image: np.ndarray, affine: np.ndarray, mask: np.ndarray, region: np.ndarray,
                            deviation: np.ndarray, brain: np.ndarray, mapping: SpaceMapping) -> np.ndarray:
        """``prior_anchor``: a deep lesion's fill brought to the level the tissue prior predicts inside it
        (``USBLib.editor.local.prior_anchor``). ``deviation`` [samples, I, J, K] in scan units, for the heal of
        ``mask`` with fill region ``region`` [I, J, K] bool; returns the anchored deviation."""
        from USBLib.editor.local.prior_anchor import anchor_to_prior

        prior = self._local_prior(mapping)
        return anchor_to_prior(image, deviation, mask, region, brain, voxel_spacing(affine),
                               lambda box: prior.read(box)[1:4])

    def _mirror_source(self, image: np.ndarray, affine: np.ndarray, mask: np.ndarray, mapping: SpaceMapping,
                       window: tuple[slice, ...]) -> MirrorSource:
        """The whole scan's other hemisphere for ``mirror_blend`` (``USBLib.imaging.mirror``): the offset-free scan
        ``image`` and the drawn ``mask`` [I, J, K], the mirror map from the registration ``mapping`` (the template's
        mid-sagittal plane), the depth below the model brain's surface, and where the edit's ``window`` starts."""
        from USBLib.imaging.mirror import MirrorSource, depth_below_surface, mirror_matrix

        depth = depth_below_surface(self.space["brain"], self.bundle.grid_affine,
                                    np.linalg.inv(mapping.model_vox_to_native_vox()))
        lesion = (np.asarray(mask) > 0).astype(np.float32)
        return MirrorSource(image, lesion, mirror_matrix(affine, mapping.model_to_native), depth,
                            tuple(int(w.start) for w in window))

    @staticmethod
    def _mirror_stage(image: np.ndarray, affine: np.ndarray, region: np.ndarray, deviation: np.ndarray,
                      brain: np.ndarray, mirror: MirrorSource, settings: dict[str, Any],
                      extra: dict[str, Any] | None) -> np.ndarray:
        """``mirror_blend`` w: the heal's ``deviation`` [samples, I, J, K] (scan units) inside the fill ``region``
        [I, J, K] bool moved w of the way towards the scan's other hemisphere (``USBLib.imaging.mirror``); the
        parts' records (NCC, used) go to ``extra["mirror"]`` when ``extra`` is given (the drawn mask's heal)."""
        from USBLib.imaging.mirror import blend_towards_mirror

        w = float(value_of(settings, "mirror_blend"))
        out, records = blend_towards_mirror(mirror, image, deviation, region, brain, voxel_spacing(affine), w)
        if extra is not None:
            extra["mirror"] = {"weight": w, "parts": records}
        return out

    def _local_prior(self, mapping: SpaceMapping | None):
        """The template's tissue prior on the scan's grid (``USBLib.editor.local.prior.TissuePrior``), for a local
        network that reads it: the bundle's maps carried by this scan's registration ``mapping`` (from the edit's
        registration stage)."""
        from USBLib.editor.local.prior import TissuePrior, load_prior_maps

        if mapping is None:
            raise RuntimeError("the local stage's tissue prior needs the scan's registration")
        maps = getattr(self, "_prior_maps", None)
        if maps is None:
            maps = self._prior_maps = load_prior_maps(self.space["template"], self.bundle.path(bundle_mod.LOCAL_PRIOR))
        return TissuePrior(maps, mapping)

    @staticmethod
    def _lesion_level_stage(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                            effect: np.ndarray, mean_deviation: np.ndarray, level: float, extra: dict[str, Any]
                            ) -> tuple[np.ndarray, np.ndarray]:
        """``lesion_level`` (embed): each lesion's weighted deviation ``effect`` [samples, I, J, K] and the
        unweighted ``mean_deviation`` (which ``realism``'s grain is matched on) scaled so that the lesion's mean
        over the tissue around it is ``level`` (``USBLib.imaging.lesion_level``), measured on the offset-free scan
        ``image`` as every stage is, before the grain is synthesized. Inside the brain no voxel is made darker than
        the window's darkest brain voxel; the level each lesion reached with that floor goes to ``extra`` (its
        records, ``lesion_levels``), and a lesion that misses the level by more than 0.02 gets a note."""
        from USBLib.imaging.lesion_level import MAX_SCALE, lesion_labels, lesion_surround_ratio, level_scales

        scales, records = level_scales(image, effect.mean(axis=0), mask, brain, level, voxel_spacing(affine))
        scaled = effect * scales
        if brain.any():
            floor = np.float32(np.min(image[brain])) - np.asarray(image, np.float32)
            scaled = np.where(brain, np.maximum(scaled, floor), scaled)
        labels, _ = lesion_labels(mask)
        healed = np.asarray(image, np.float64) + scaled.mean(axis=0)
        notes = []
        for index, record in enumerate(records, start=1):
            reached = lesion_surround_ratio(healed, labels == index, brain)
            record["ratio"] = round(reached, 3) if np.isfinite(reached) else None
            if not np.isfinite(reached) or abs(reached - level) > 0.02:
                notes.append(f"an embedded lesion of {record['voxels']} voxels reached "
                             f"{'no measurable level' if not np.isfinite(reached) else f'{reached:.2f}'} of the "
                             f"tissue around it, not the {level:g} asked (the network drew it at "
                             f"{record['ratio_network']}; its darkening was scaled {record['scale']:g} times, at most "
                             f"{MAX_SCALE:g}, and no voxel goes below the scan's darkest brain voxel)")
        extra["lesion_levels"] = records
        _add_notes(extra, notes)
        return scaled, mean_deviation * scales

    @staticmethod
    def _texture_stage(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                       deviation: np.ndarray, settings: dict[str, Any], seed: int,
                       region: np.ndarray | None) -> np.ndarray:
        """``realism``: noise synthesis on the reconstruction (``USBLib.imaging.texture``): each sample's fill
        region (heal: the filled lesion; embed: the embedded one) gets the grain of the scan around it, seeded, as
        much as its own fine detail lacks (an embed's sampled deviation may carry some). Returns the deviations
        [samples, I, J, K] with it."""
        from USBLib.editor.local.conditioning import fusion_core
        from USBLib.imaging.texture import matched_noise

        spacing = voxel_spacing(affine)
        if region is None:
            region = fusion_core(mask, spacing, float(value_of(settings, "dilation_mm")))
        out = deviation.copy()
        for i in range(deviation.shape[0]):
            healed = np.asarray(image, np.float32) + deviation[i]
            out[i] += matched_noise(healed, region, brain, spacing, np.random.default_rng([int(seed), i]))
        return out

    @staticmethod
    def _edit_masks(task: str, mask: np.ndarray | None, affine: np.ndarray, settings: dict[str, Any],
                    image: np.ndarray, brain: np.ndarray) -> list:
        """The masks an edit's local stage and fusion run for: a heal with ``boundary_average`` and a mask, the
        drawn mask and it a voxel smaller and larger (``USBLib.imaging.mask_edges``; the larger one never takes in
        the CSF beside the lesion, ``rim.darker_than_lesion`` as the fusion keeps it), whose edits are averaged;
        otherwise the mask alone. ``image``: the scan in its own units, ``brain`` its brain mask [I, J, K]."""
        if not stage_rules.averages_boundary(task, mask, settings):
            return [mask]
        from USBLib.imaging.mask_edges import boundary_masks
        from USBLib.imaging.rim import darker_than_lesion

        dilation = float(value_of(settings, "dilation_mm"))
        csf = darker_than_lesion(image, mask, brain, voxel_spacing(affine), dilation,
                                 dilation + float(settings["margin_mm"]))
        return [m.astype(np.uint8) for m in boundary_masks(mask, voxel_spacing(affine), keep_out=csf)]

    @staticmethod
    def _edit_weight(task: str, image: np.ndarray, affine: np.ndarray, mask: np.ndarray | None, brain: np.ndarray,
                     settings: dict[str, Any], content: np.ndarray | None = None,
                     region: np.ndarray | None = None) -> np.ndarray:
        """Seam-aware fusion weight [I, J, K] in [0, 1] of one mask's edit (``USBLib.imaging.fusion.edit_weight``).
        ``image``: the scan in its own units. ``content`` [I, J, K] bool, when given: the only voxels the edit may
        change (image content above the background; an embedded lesion is never painted into the air). ``region``: a
        heal's fill region when it is not the mask grown by ``dilation_mm`` (``growth`` ``rim``); it is rewritten
        fully, except (heal) the voxels darker than the lesion itself (``rim.darker_than_lesion``: CSF beside it),
        which keep their values."""
        dilation = float(value_of(settings, "dilation_mm"))
        core = region
        if core is None and mask is not None and task == "heal":
            from USBLib.editor.local.conditioning import fusion_core

            core = fusion_core(mask, voxel_spacing(affine), dilation)
        weight = edit_weight(mask, brain, voxel_spacing(affine), dilation, float(settings["margin_mm"]), core,
                             shell=task == "heal" and stage_rules.heal_shell(voxel_spacing(affine)))
        if task == "heal" and mask is not None:  # CSF beside the lesion stays as it is (``rim.darker_than_lesion``)
            from USBLib.imaging.rim import darker_than_lesion

            weight = weight * ~darker_than_lesion(image, mask, brain, voxel_spacing(affine), dilation,
                                                  dilation + float(settings["margin_mm"]))
        if content is not None:
            weight = weight * content
        return weight

    @staticmethod
    def _patch_blend_stage(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                           effect: np.ndarray, reach: np.ndarray, settings: dict[str, Any], p99: float
                           ) -> tuple[np.ndarray, np.ndarray]:
        """``patch_blend`` w: the heal's weighted deviation ``effect`` [samples, I, J, K] (scan units, after
        ``stage_rules.signed_effect``, averaged over the boundary masks) moved towards a non-local patch fill's
        deviation (``USBLib.imaging.patch_fill``, NiftySeg's method) over the drawn ``mask`` grown by
        ``PATCH_BLEND_GROWTH`` voxels (26-neighbourhood; this and the constants below are ``stage_rules``') within
        ``brain``, less the CSF beside the lesion (``rim.darker_than_lesion``) and within the edit's ``reach``;
        brightening only, as every heal. Where the patch fill is brighter than the fill the fill moves w of the way up
        to it, except beside CSF (a voxel whose 3x3x3 neighbourhood is darker than ``PATCH_BLEND_CSF_LEVEL`` of the
        scan's 99th brain percentile: a full up-pull there paints tissue onto a ventricle's edge); there, and where the
        patch fill is darker, w x ``PATCH_BLEND_DOWN_SHARE`` of the way, and a patch fill more than
        ``PATCH_BLEND_MAX_PULL`` of the scan's range below the fill counts as that much below: a patch fill whose region
        reaches CSF copies CSF inwards layer by layer, and it must not darken a fill much. The patch fill copies the
        scan's own tissue from around the lesion, structure and grain included: a second estimate whose errors differ
        from the network's, and whose level corrects the network's fill where that came out too dark (the commoner
        error: fill mean 0.98 of the truth's on both tuning sources). Returns (effect, reach), reach unchanged.
        ``image``: the offset-free scan [I, J, K] (or the edit's window of it); ``p99``: the whole scan's 99th brain
        percentile (``stage_rules.brain_p99``)."""
        from scipy import ndimage

        from USBLib.imaging.mask_edges import grown as grown_by
        from USBLib.imaging.patch_fill import patch_fill
        from USBLib.imaging.rim import darker_than_lesion

        dilation = float(value_of(settings, "dilation_mm"))
        grown = grown_by(mask, stage_rules.PATCH_BLEND_GROWTH, brain)
        keep = darker_than_lesion(image, mask, brain, voxel_spacing(affine), dilation,
                                  dilation + float(settings["margin_mm"]))
        region = grown & reach & ~keep
        if not region.any():
            return effect, reach
        filled = patch_fill(image, grown)
        w = np.float32(value_of(settings, "patch_blend"))
        scan = np.asarray(image, np.float32)
        target = (filled - scan)[region]
        out = effect.copy()
        pull = np.maximum(target - out[:, region], np.float32(-stage_rules.PATCH_BLEND_MAX_PULL * p99))
        # the full weight only up, and only away from CSF: an up-pull beside CSF paints tissue onto its edge
        box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in ndimage.find_objects(region.astype(np.uint8))[0])
        near_csf = (ndimage.minimum_filter(scan[box], size=3) < stage_rules.PATCH_BLEND_CSF_LEVEL * p99)[region[box]]
        pull *= np.where((pull > 0) & ~near_csf, w, w * np.float32(stage_rules.PATCH_BLEND_DOWN_SHARE))
        out[:, region] = np.maximum(out[:, region] + pull, np.float32(0))
        return out, reach

    @staticmethod
    def _fusion_stage(image: np.ndarray, effect: np.ndarray, reach: np.ndarray, prog: "_Progress"):
        """Fusion of the weighted deviations ``effect`` [samples, I, J, K] (edit weight x deviation, scan units)
        into the scan ``image`` [I, J, K] (its own dtype) inside ``reach`` [I, J, K] bool: (result [I, J, K],
        uncertainty: the std over samples of the weighted deviation as ``stage_rules.signed_effect`` left it, or None
        for one sample).
        Every voxel outside ``reach`` is the scan's own value, bit for bit."""
        prog.stage("fusing into the scan")
        result = fuse(image, effect.mean(axis=0), reach.astype(np.float32))
        uncertainty = (reach * effect.std(axis=0)).astype(np.float32) if effect.shape[0] > 1 else None
        prog.tick()
        prog.stage("")
        return result, uncertainty

    def _edit_inputs(self, task: str, image, affine, mask, brain_mask, mask_affine, resample_mask: bool):
        """Checked image (its voxels without a value read as its darkest value), float64 affine, binary mask (None
        when absent), brain mask, and the voxels without a value with their values (``checks.fill_missing``; None
        when there are none). An empty mask is refused: a heal without a mask edits the whole brain, which is not
        what a mask that marks no lesion asks for (``usb batch`` copies such a scan unchanged)."""
        image = check_image(image, affine, missing_ok=True)
        affine = np.asarray(affine, dtype=np.float64)
        if mask is not None:
            mask = check_mask(mask, image.shape, mask_affine, affine, resample_mask)
            if not mask.any():
                if task == "embed":
                    raise InputError("the lesion mask is empty; paint or load a lesion to embed")
                raise InputError("the lesion mask is empty: there is no lesion to heal (without a mask a heal edits "
                                 "the whole brain)")
        if brain_mask is not None:
            brain_mask = check_mask(brain_mask, image.shape, None, affine, False, "brain mask")
            if not brain_mask.any():
                raise InputError("the brain mask is empty")
        image, missing = fill_missing(image, mask)
        return image, affine, mask, brain_mask, missing

    def _stages(self, settings: dict[str, Any], mask: np.ndarray | None) -> str:
        """Which stages run: the setting, restricted to what the bundle has; a heal without mask is latent."""
        stages = settings.get("stages") or ("local" if self.bundle.has_local else "latent")
        if stages != "latent" and not self.bundle.has_local:
            raise InputError(f"model '{self.bundle.name}' has no local stage (bundle schema 1); "
                             "use stages 'latent'")
        return "latent" if mask is None else stages

    def _network_steps(self, settings: dict[str, Any], start: int | None = None) -> int:
        """Network calls of one latent trajectory from ``start`` (default: the last training step, i.e. pure
        noise, as generation starts) with ``settings["steps"]``: the progress bar's length."""
        from USBLib.core.schedule import timesteps

        if start is None:
            start = int(self.bundle.config["schedule"].get("num_train_timesteps", 1024)) - 1
        return len(timesteps(start, settings["steps"]))

    def _latent_stage(self, task: str, image: np.ndarray, mapping: SpaceMapping, imap: IntensityMap,
                      mask: np.ndarray | None, settings: dict[str, Any], samples: int,
                      generator, prog: "_Progress") -> np.ndarray:
        """USB's latent edit (paper sec. 3.2): deviations [samples, I, J, K] in scan units on the scan's grid.

        For heal with a ``prefill`` the diffusion starts from the scan with its lesion pre-filled, and the
        pre-fill is part of the deviation."""
        import torch

        from USBLib.core import tasks
        from USBLib.core.guidance import lcg_weight, lesion_prior
        from USBLib.core.networks import downsampling_factor

        prog.stage("encoding")
        base = image  # what the diffusion starts from: the scan, or for heal the scan with its lesion pre-filled
        if task == "heal" and mask is not None and value_of(settings, "prefill") != "none":
            from USBLib.imaging.prefill import prefill

            base = prefill(image, mask, settings["prefill"])
        model_image = imap.to_model(mapping.to_model(base))
        y0 = self.encode(model_image[None])
        factor = downsampling_factor(self.bundle.config["networks"])
        lesion_w = None
        if mask is not None:
            pv, binary = self._model_mask(mapping, mask)
            prior = lesion_prior(torch.as_tensor(pv)[None, None].to(self.device), factor)
            lesion_w = lcg_weight(prior, float(value_of(settings, "eta")))
            cond = self.encode(binary[None]) if task == "embed" else self.empty_condition()
        else:
            cond = self.empty_condition()
        prog.tick()

        prog.stage("denoising")
        batch = lambda t: t.expand(samples, *t.shape[1:]).contiguous()  # noqa: E731
        edited = tasks.edit(self._denoisers(), batch(y0), batch(cond), start_step_of(settings, self.bundle),
                            settings["steps"], float(settings["alpha0"]), float(settings["k"]), generator,
                            None if lesion_w is None else batch(lesion_w), prog.tick, acg=bool(settings["acg"]))

        prog.stage("decoding")
        decoded = self.decode(edited)
        reference = self.decode(y0)[0] if settings["fusion"] == "deviation" else model_image
        prog.tick()
        prefilled = np.asarray(base, np.float32) - np.asarray(image, np.float32)  # zero outside the lesion
        return np.stack([prefilled + imap.delta_to_native(mapping.to_native(sample - reference))
                         for sample in decoded])

    def generate(self, n: int = 1, *, steps: int | None = None, seed: int = 0, sampler: str | None = None,
                 progress: Progress | None = None) -> list[EditResult]:
        """New (brain, lesion mask) pairs from noise, on the model grid, in model intensity units.
        ``sampler``: "ddim" or "dpm++2m" (default: the bundle's)."""
        import torch

        from USBLib.core import tasks

        n = input_checks.check_samples(n, "number of pairs")
        settings = self._settings("generate", steps=steps, sampler=sampler)

        n_steps = self._network_steps(settings)
        prog = _Progress(progress, n_steps + 1)
        generator = torch.Generator().manual_seed(int(seed))
        shape = (n, *self.empty_condition().shape[1:])
        prog.stage("denoising")
        lesion_lat, brain_lat = tasks.generate(self._denoisers(), shape, settings["steps"], generator, self.device,
                                               prog.tick, sampler=settings["sampler"])
        prog.stage("decoding")
        images, lesions = self.decode(brain_lat), self.decode(lesion_lat)
        prog.tick()
        prog.stage("")
        brain = self.space["brain"]
        out = []
        for i in range(n):
            image = np.clip(images[i], 0.0, None) * brain
            mask = ((lesions[i] > float(settings.get("mask_threshold", 0.5))) & brain).astype(np.uint8)
            # one pair, not a mean of n samples: the run's n and the pair's index say where it came from
            prov = self._provenance("generate", settings, seed, 1, prog.timings, None, extra={"index": i, "n": n})
            out.append(EditResult(image.astype(np.float32), self.bundle.grid_affine.copy(), mask, None, prov))
        return out

    def generate_from_mask(self, mask: np.ndarray, affine: np.ndarray, reference: np.ndarray | None = None,
                           reference_affine: np.ndarray | None = None, *, steps: int | None = None, seed: int = 0,
                           samples: int = 1, resample_mask: bool = False, sampler: str | None = None,
                           lesion_guidance: float | None = None, lesion_fusion: bool | None = None,
                           margin_mm: float | None = None, dilation_mm: float | None = None,
                           progress: Progress | None = None) -> EditResult:
        """A brain showing the given lesion (eq. 9).

        Without ``reference`` the mask is taken to be in template space (any grid) and the brain is returned on
        the model grid; with a reference scan the mask must lie on the reference's grid (or ``resample_mask``),
        and the brain is returned on that grid in the reference's intensity units.

        ``lesion_fusion`` (default: the bundle's): generate a healthy brain for the noise and, from the same noise,
        the brain with the lesion (the mask's estimate counts only on the latent voxels the lesion touches), then
        fuse their difference into the healthy brain inside the mask grown by ``dilation_mm`` and feathered over
        ``margin_mm`` (``tasks.generate_with_healthy_twin``). Off: the paper's eq. 9, the whole brain conditioned
        on the mask. ``lesion_guidance`` w strengthens the lesion in both modes (``guidance.lesion_guided``).
        """
        import torch

        settings = self._settings("generate_from_mask", steps=steps, sampler=sampler, lesion_guidance=lesion_guidance,
                                  lesion_fusion=lesion_fusion, margin_mm=margin_mm, dilation_mm=dilation_mm)
        samples = input_checks.check_samples(samples)
        affine = np.asarray(affine, dtype=np.float64)
        offset = 0.0
        if reference is not None:
            reference = check_image(reference, reference_affine, "reference image", missing_ok=True)
            mask = check_mask(mask, reference.shape, affine, np.asarray(reference_affine, float), resample_mask)
            reference, missing = fill_missing(reference, mask)  # voxels without a value (outside an SPM box)
            reference, offset = input_checks.offset_free(reference)
        else:
            mask = check_mask(mask, np.shape(mask), affine, affine, False)
        if not mask.any():
            raise InputError("the lesion mask is empty")
        n_steps = self._network_steps(settings)
        prog = _Progress(progress, n_steps + 3)
        generator = torch.Generator().manual_seed(int(seed))
        prog.stage("registering to the model template")
        if reference is not None:
            mapping = self._map(reference, np.asarray(reference_affine, float), None, seed)
        else:
            mapping = SpaceMapping(tuple(mask.shape), affine, self.bundle.grid_shape, self.bundle.grid_affine,
                                   np.eye(4))
        prog.tick()
        pv, binary = self._model_mask(mapping, mask)
        if not binary.any():
            raise InputError("the lesion mask lies outside the model's field of view")
        brain = self.space["brain"] > 0
        if not ((binary > 0) & brain).any():
            raise InputError("the lesion mask lies outside the brain (in the model template's space)")
        input_checks.check_lesion_share(binary, brain, self.bundle.grid_affine)
        images = self._brains_for_mask(pv, binary, settings, samples, generator, prog)
        uncertainty = images.std(axis=0) if samples > 1 else None
        image = images.mean(axis=0)
        prov = self._provenance("generate_from_mask", settings, seed, samples, prog.timings,
                                mapping if reference is not None else None)
        if reference is None:
            return EditResult(image.astype(np.float32), self.bundle.grid_affine.copy(), binary.astype(np.uint8),
                              None if uncertainty is None else uncertainty.astype(np.float32), prov)
        imap = IntensityMap.fit(reference, self._native_brain(mapping, None), self.bundle.config["intensity"])
        native = imap.to_native(mapping.to_native(image)) + np.float32(offset)
        if missing is not None:  # they stay without one, as in a heal
            native = native.astype(np.float32)
            native[missing[0]] = missing[1]
        unc = None if uncertainty is None else imap.delta_to_native(mapping.to_native(uncertainty))
        return EditResult(native.astype(np.float32), np.asarray(reference_affine, float).copy(), mask, unc, prov)

    def _brains_for_mask(self, pv: np.ndarray, binary: np.ndarray, settings: dict[str, Any], samples: int,
                         generator, prog: "_Progress") -> np.ndarray:
        """Brains [samples, I, J, K] on the model grid (model units, zero outside the brain) for the lesion mask
        ``binary`` (partial-volume ``pv``), both [I, J, K] on the model grid. Records the effective
        ``lesion_guidance`` and ``lesion_fusion`` in ``settings``."""
        import torch

        from USBLib.core import tasks

        prog.stage("encoding")
        cond = self.encode(binary[None])
        cond = cond.expand(samples, *cond.shape[1:]).contiguous()
        prog.tick()
        prog.stage("denoising")
        guidance = settings["lesion_guidance"] = float(value_of(settings, "lesion_guidance"))
        fused = settings["lesion_fusion"] = bool(value_of(settings, "lesion_fusion"))
        if fused:
            from USBLib.core.guidance import lesion_prior
            from USBLib.core.networks import downsampling_factor

            prior = lesion_prior(torch.as_tensor(pv)[None, None].to(self.device),
                                 downsampling_factor(self.bundle.config["networks"]))
            lesioned, healthy = tasks.generate_with_healthy_twin(
                self._denoisers(), cond, self.empty_condition(), prior, settings["steps"], generator, prog.tick,
                sampler=settings["sampler"], guidance=guidance)
            lat = torch.cat([lesioned, healthy])
            settings["dilation_mm"] = float(value_of(settings, "dilation_mm"))
        else:
            settings.pop("dilation_mm", None)  # (they shape the fusion only)
            settings.pop("margin_mm", None)
            lat = tasks.generate_from_mask(self._denoisers(), cond, settings["steps"], generator, prog.tick,
                                           sampler=settings["sampler"], guidance=guidance,
                                           empty_latent=self.empty_condition() if guidance else None)
        prog.stage("decoding")
        images = self.decode(lat)
        if fused:  # the lesion's deviation from the healthy twin, fused at the mask as an embed is
            weight = edit_weight(binary, self.space["brain"], voxel_spacing(self.bundle.grid_affine),
                                 settings["dilation_mm"], float(settings["margin_mm"]))
            healthy_images = images[samples:]
            images = healthy_images + weight * (images[:samples] - healthy_images)
        prog.tick()
        prog.stage("")
        return np.clip(images, 0.0, None) * self.space["brain"]

    # ----------------------------------------------------------------- provenance
    def _provenance(self, task: str, settings: dict, seed: int, samples: int, timings: dict,
                    mapping: SpaceMapping | None, extra: dict | None = None) -> dict[str, Any]:
        import torch

        prov: dict[str, Any] = {
            "task": task,
            "model": {"name": self.bundle.name, "tier": self.bundle.tier, "path": str(self.bundle.root),
                      "bundle_sha256": bundle_mod.sha256_of(self.bundle.root / bundle_mod.BUNDLE_FILE)},
            "settings": dict(settings), "seed": int(seed), "samples": int(samples),
            "device": str(self.device), "registration": self.registration,
            "timings_s": dict(timings), "software": software_versions(), "torch_threads": torch.get_num_threads(),
        }
        if mapping is not None:
            prov["template_to_scan_ras"] = np.round(mapping.model_to_native, 6).tolist()
        prov.update(extra or {})
        return prov


def _fingerprint(*parts: Any) -> str:
    """sha1 over arrays (bytes, shape, dtype) and plain values: identifies a registration's inputs."""
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str((part.shape, part.dtype.str)).encode())
            h.update(np.ascontiguousarray(part).tobytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()


def start_step_of(settings: dict[str, Any], bundle: bundle_mod.ModelBundle) -> int:
    """Latent edit start step for the settings' strength on the bundle's schedule."""
    from USBLib.core.schedule import start_step

    return start_step(settings["strength"], int(bundle.config["schedule"].get("num_train_timesteps", 1024)))


def _add_notes(extra: dict[str, Any], notes: list[str]) -> None:
    """Append ``notes`` (what the user should know about an edit) to the provenance's ``notes``; none: no key."""
    if notes:
        extra["notes"] = list(extra.get("notes", [])) + list(notes)


def software_versions() -> dict[str, str]:
    """Versions of the packages that shape the numbers, for provenance sidecars."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("usb-slicer", "torch", "monai", "numpy", "scipy", "nibabel", "SimpleITK"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    out["platform"] = platform.platform()
    return out


def threads_from_env() -> None:
    """Honour ``USB_THREADS`` for torch's intra-op pool (pipelines running several workers)."""
    import torch

    given = os.environ.get("USB_THREADS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise InputError(f"USB_THREADS must be a whole number of threads of 1 or more, got {given!r}")
        torch.set_num_threads(int(given))
