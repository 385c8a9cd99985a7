"""Which of the edit's stages run for a task, a mask, its settings and the scan's voxel size, and the rules that
shape what they write: a heal only brightens (``signed_effect``), realism's grain goes where the edit does
(``with_grain``), the patch blend refines 1 mm heals only, the mirror blend thick-slice heals too, and the window of
the scan an edit reads (``edit_window``). Used by ``USBLib.editor.editor.Editor``; the numbers behind each rule are in docs/model.md.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from USBLib.imaging.spatial import voxel_spacing
from USBLib.settings import value_of


def heal_shell(spacing) -> bool:
    """Whether a heal's fusion weight is 1 on its fill region's one-voxel shell too (``fusion.with_shell``): on a
    scan whose boxes the local stage resamples (``boxes.needs_resampling``: thick slices above all). There the
    feather along a 3 mm axis skipped the next slice entirely (its weight was 0 one slice away), leaving the
    lesion's partial volume in it, and the network, trained on the lesion's extent + 2 voxels, estimates that tail.
    Tuning, 1 x 1 x 3 mm: +0.29 dB [+0.10, +0.51] (MNI2009c), +0.19 [+0.10, +0.27] (fsaverage); on 1 mm scans it
    measured −0.01 / +0.03, so they are left as they were. ``spacing``: mm per axis."""
    from USBLib.imaging.boxes import needs_resampling

    return needs_resampling(spacing)


def local_settings(settings: dict[str, Any], task: str = "heal"):
    """The local stage's settings; a heal's ``realism`` is the ``fidelity`` reconstruction here, its texture is
    synthesized afterwards (``Editor._texture_stage``)."""
    from USBLib.editor.local.stage import LocalSettings

    mode = "fidelity" if task == "heal" else value_of(settings, "local_mode")
    return LocalSettings(mode=mode, steps=int(value_of(settings, "local_steps")),
                         strength=float(value_of(settings, "local_strength")),
                         dilation_mm=float(value_of(settings, "dilation_mm")), alpha0=float(settings["alpha0"]),
                         k=float(settings["k"]), eta=float(value_of(settings, "eta")), acg=bool(settings["acg"]))


def anchors_to_prior(task: str, region: np.ndarray | None, settings: dict[str, Any], bundle) -> bool:
    """Whether a heal's local fill is anchored to the tissue prior inside deep lesions (``prior_anchor`` on, a rim
    fill region, and a bundle that ships the prior maps)."""
    return (task == "heal" and region is not None and bool(value_of(settings, "prior_anchor"))
            and bundle.has_local_prior)


def signed_effect(task: str, mask: np.ndarray | None, effect: np.ndarray) -> np.ndarray:
    """One mask's weighted deviation [samples, I, J, K] (scan units) with the sign its task allows: the heal of a
    drawn T1-hypointense lesion brightens only (the lesion made every voxel it touched darker, so a voxel its heal
    would make darker than the scan is one where the fill is wrong and the scan is the better estimate: it keeps its
    value), each sample on its own; an embed, and a heal without a mask (a latent edit of the whole brain, mostly
    healthy tissue), keep their deviations as they are. ``realism``'s zero-mean grain comes afterwards and may
    darken a voxel."""
    return np.maximum(effect, np.float32(0)) if task == "heal" and mask is not None else effect


def with_grain(task: str, effect: np.ndarray, grain: np.ndarray) -> np.ndarray:
    """``realism``: the weighted edits ``effect`` [samples, I, J, K] (scan units, after ``signed_effect``) with the
    synthesized ``grain`` (same shape, weighted) added; a heal's grain only where its edit is not zero, since a voxel
    that ``signed_effect`` left as the scan already has the scan's own grain."""
    return effect + grain * ((effect != 0) if task == "heal" else np.float32(1))

PATCH_BLEND_GROWTH = 2  # voxels: the patch fill of ``patch_blend`` covers the mask grown by this much
PATCH_BLEND_MAX_PULL = 0.1  # the patch fill pulls a voxel's fill down by at most this x the scan's 99th brain
#                            percentile (before the blend weight): a patch fill grown to CSF copies CSF inwards


PATCH_BLEND_DOWN_SHARE = 1 / 3  # where the patch fill lies below the fill, the blend moves this share of
#                                 ``patch_blend`` towards it: the network's fill errs dark more often than bright


PATCH_BLEND_CSF_LEVEL = 0.35  # x the 99th brain percentile: a voxel whose 3x3x3 neighbourhood reaches below this
#                               is beside CSF, and the blend pulls it up by the down share only


def blends_patches(task: str, mask: np.ndarray | None, settings: dict[str, Any], affine: np.ndarray) -> bool:
    """Whether a heal blends a patch fill into its fill (``patch_blend`` > 0, a mask, and a scan whose boxes the
    local stage does not resample: it was measured on 1 mm scans only, ``Editor._patch_blend_stage``)."""
    from USBLib.imaging.boxes import needs_resampling

    return refines_heal(task, mask, settings, "patch_blend") and not needs_resampling(voxel_spacing(affine))


def blends_mirror(task: str, mask: np.ndarray | None, settings: dict[str, Any], affine: np.ndarray) -> bool:
    """Whether a heal moves its fill towards the scan's other hemisphere (``mirror_blend`` > 0, a mask, ``growth``
    ``rim``): on 1 mm and thick-slice scans alike (measured on both: docs/model.md, "The other hemisphere" and "The
    other hemisphere on thick slices"). ``affine`` is not read (the signature is the other refinements')."""
    return refines_heal(task, mask, settings, "mirror_blend") and value_of(settings, "growth") == "rim"


def refines_heal(task: str, mask: np.ndarray | None, settings: dict[str, Any], weight: str) -> bool:
    """A heal with a mask and the fill refinement's setting ``weight`` above 0."""
    return task == "heal" and mask is not None and float(value_of(settings, weight) or 0) > 0


def brain_p99(task: str, image: np.ndarray, mask: np.ndarray | None, brain: np.ndarray, settings: dict[str, Any],
              affine: np.ndarray) -> float | None:
    """The whole scan's 99th percentile inside ``brain`` (``image`` as float32), which the patch blend measures CSF
    and its pull by; None when the edit blends no patch fill (``blends_patches``)."""
    if not blends_patches(task, mask, settings, affine):
        return None
    return float(np.percentile(np.asarray(image, np.float32)[np.asarray(brain) > 0], 99))

EDIT_WINDOW_MM = 20.0  # past the edit region, what the stages around a lesion read at most: the prior anchor's class
#                        means come from a shell 12 mm past the fill region, with a voxel more; the local stage's boxes
#                        reach 16 mm past a small lesion (32 mm sides) and 10 mm past a large one


EDIT_WINDOW_VOX = 8    # ... and this many voxels more (the texture's ring box: its 5 mm + 4 voxels)


def edit_window(mask: np.ndarray | None, affine: np.ndarray, settings: dict[str, Any],
                shape: tuple[int, ...]) -> tuple[slice, slice, slice]:
    """The part of the scan an edit with ``mask`` reads and writes after its registration and latent stage: the
    mask's bounding box grown per side by the edit region (``dilation_mm`` + ``margin_mm``) + ``EDIT_WINDOW_MM``,
    in voxels, + ``EDIT_WINDOW_VOX``, within the scan ``shape``; the whole scan without a mask. Every stage cut
    there reads the same voxels as on the whole scan (their own boxes around the lesion lie inside), so the
    result is the whole scan's heal at a fraction of the cost: on a 1 mm brain most of the time went to
    morphology and labelling over seven million voxels for a lesion of a few thousand. ``affine``: the scan's."""
    if mask is None or not np.any(mask):
        return tuple(slice(0, n) for n in shape)  # type: ignore[return-value]
    from scipy import ndimage

    reach_mm = float(value_of(settings, "dilation_mm") or 0.0) + float(settings["margin_mm"]) + EDIT_WINDOW_MM
    reach = np.ceil(reach_mm / voxel_spacing(affine)).astype(int) + EDIT_WINDOW_VOX
    found = ndimage.find_objects((np.asarray(mask) > 0).astype(np.uint8))[0]
    return tuple(slice(max(s.start - r, 0), min(s.stop + r, n))  # type: ignore[return-value]
                 for s, r, n in zip(found, reach, shape))


def averages_boundary(task: str, mask: np.ndarray | None, settings: dict[str, Any]) -> bool:
    """Whether an edit averages the edits of the mask's boundary variants (a heal with a mask and
    ``boundary_average``; ``Editor._edit_masks``)."""
    return task == "heal" and mask is not None and bool(value_of(settings, "boundary_average"))


def local_box_count(mask: np.ndarray | None, affine: np.ndarray) -> int:
    """Number of lesion groups the local stage will process (one progress tick each)."""
    if mask is None:
        return 0
    from USBLib.imaging.boxes import group_labels
    from USBLib.editor.local.stage import CONTEXT_MM

    return int(group_labels(mask, np.ceil(CONTEXT_MM / voxel_spacing(affine)))[1])
