"""The checks an edit makes of its inputs before and while it runs, each with a one-line ``InputError`` that says
what to fix: a lesion mask outside the brain, an embed too small to embed, samples that could not differ; and the
scan's intensity offset, which every stage works without (``offset_free``). Used by ``USBLib.editor.editor.Editor``.
"""
from __future__ import annotations

import numpy as np

from USBLib.core import bundle as bundle_mod
from USBLib.errors import InputError
from USBLib.imaging.spatial import voxel_spacing


MAX_LESION_SHARE = 0.5  # a lesion mask covering more of the brain than this is refused: a brain mask given by mistake


def check_lesion_share(mask: np.ndarray | None, brain: np.ndarray, affine: np.ndarray) -> None:
    """Refuse a lesion mask that covers more than ``MAX_LESION_SHARE`` of the brain: a brain mask (or a probability
    map thresholded at 0) given as the lesion mask, whose "heal" would rewrite the whole brain voxel by voxel in the
    local stage for tens of minutes; no lesion the model can heal or embed is that large (the largest measured:
    63 ml), and a whole-brain heal is what leaving the mask out asks for.

    Args:
        mask: the lesion mask [I, J, K] (> 0 = lesion), or None (nothing to check).
        brain: the scan's brain [I, J, K] bool (the registered template's, or the given brain mask).
        affine: the scan's 4x4 voxel-to-RAS affine (mm), for the volumes in the message.
    """
    if mask is None or not brain.any():
        return
    share = float(np.count_nonzero((mask > 0) & brain)) / float(np.count_nonzero(brain))
    if share > MAX_LESION_SHARE:
        ml = float(np.count_nonzero(mask)) * float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
        raise InputError(f"the lesion mask covers {share:.0%} of the brain ({ml:.0f} ml): a lesion mask marks the "
                         "lesions only (is it a brain mask?); for a whole-brain heal give no mask")


def check_inside_brain(image: np.ndarray, mask: np.ndarray | None, brain: np.ndarray) -> None:
    """Refuse a lesion mask that lies outside the brain: outside the registered template's brain, or on the
    image's own background (at most 1 % of the brain's 99th percentile, as the zeros of a skull-stripped scan);
    a dark lesion (a cavity, a black hole) is above that floor and is accepted."""
    if mask is None:
        return
    lesion = mask > 0
    inside = float(brain[lesion].mean())
    if inside < 0.5:
        raise InputError(f"the lesion mask lies outside the brain ({inside:.0%} of it inside); "
                         "check that mask and image belong together")
    values = np.asarray(image, np.float64)
    floor = values.min() + 0.01 * (np.percentile(values[brain], 99) - values.min()) if brain.any() else values.min()
    on_tissue = float((values[lesion] > floor).mean())
    if on_tissue < 0.2:
        raise InputError(f"the lesion mask lies outside the brain (only {on_tissue:.0%} of it on image "
                         "content above the background); check that mask and image belong together")


def offset_free(image: np.ndarray) -> tuple[np.ndarray, float]:
    """The scan shifted so that its minimum is 0, and that minimum (in the scan's units).

    A scan is a scan whatever its intensity offset (pipelines write scans shifted below zero, e.g. by -500): every
    stage works on ``image - minimum``, and the edit (a deviation in the scan's units) is fused into the scan as it
    was, so ``a * x + b`` (a > 0) gives ``a * result + b``. A scan whose minimum is 0 is returned as it is.

    Args:
        image: the scan [I, J, K] in its own dtype and units.

    Returns ``(shifted [I, J, K] float64, or ``image`` itself when the minimum is 0; the minimum as a float)``.
    """
    low = float(np.min(image))
    if low == 0.0:
        return image, 0.0
    return np.asarray(image, np.float64) - low, low


def contrast_notes(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain: np.ndarray,
                   dilation_mm: float) -> list[str]:
    """Heal: one line for each drawn lesion that is not darker than the tissue around it by a clear margin
    (``rim.MIN_CONTRAST_NOISE`` noise SDs; ``rim.lesion_contrasts``), at most ``MAX_CONTRAST_NOTES`` of them (the
    brighter ones first), the rest counted. A heal fills T1-hypointense lesions and only brightens: a lesion with no
    T1 contrast (a mask drawn on FLAIR over tissue that looks normal on T1) has that tissue replaced by an estimate,
    a brighter one is left (as good as) unchanged.
    ``image``: the offset-free scan; ``mask`` [I, J, K]; ``brain`` [I, J, K] bool; ``dilation_mm``: the growth limit."""
    from USBLib.imaging.rim import MIN_CONTRAST_NOISE, lesion_contrasts

    voxel_ml = float(abs(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    bright, plain = [], []
    for voxels, contrast, centre in lesion_contrasts(image, mask, brain, voxel_spacing(affine), dilation_mm):
        where = f"the lesion of {voxels * voxel_ml:.2f} ml at voxel {centre}"
        if contrast <= -MIN_CONTRAST_NOISE:
            bright.append(f"{where} is brighter than the tissue around it ({-contrast:.0f} noise SDs): a heal fills "
                          "T1-dark lesions and only brightens what it rewrites, so it cannot remove this one")
        elif contrast < MIN_CONTRAST_NOISE:
            plain.append(f"{where} looks like the tissue around it on this scan (contrast {contrast:.1f} noise SDs): "
                         "the heal rewrote tissue that looks normal with its estimate; check the mask (drawn on "
                         "another contrast?)")
    notes = bright + plain  # the lesions a heal cannot remove first
    if len(notes) > MAX_CONTRAST_NOTES:
        rest_bright = max(len(bright) - MAX_CONTRAST_NOTES, 0)
        rest_plain = len(notes) - MAX_CONTRAST_NOTES - rest_bright
        counts = [f"{n} more lesions {kind}" for n, kind in ((rest_bright, "brighter than the tissue around them"),
                                                              (rest_plain, "that look like the tissue around them")) if n]
        notes = notes[:MAX_CONTRAST_NOTES] + ["and " + " and ".join(counts)]
    return notes

MAX_CONTRAST_NOTES = 3  # lesions named one by one in a heal's notes (the rest are counted)

MIN_EMBED_MM3 = 8.0  # a lesion mask with less than this inside the brain is refused: too small to embed


def confine_to_brain(image: np.ndarray, affine: np.ndarray, mask: np.ndarray, brain: np.ndarray):
    """Embed: a lesion belongs to brain tissue. The mask is cut to the brain (the registered template's brain, or the
    given brain mask) on image content above the background (the floor of ``check_inside_brain``), and the edit
    may change image content only, so that nothing is painted into the air around a skull-stripped brain.

    Returns ``(mask [I, J, K] uint8, content [I, J, K] bool: voxels above the background, notes)``: ``notes`` holds
    one line saying how much of the mask was dropped (empty when nothing was). Raises ``InputError`` when less than
    ``MIN_EMBED_MM3`` of the mask is left.
    """
    values = np.asarray(image, np.float64)
    floor = values.min() + 0.01 * (np.percentile(values[brain], 99) - values.min())
    content = values > floor
    kept = (mask > 0) & brain & content
    voxel_mm3 = float(abs(np.linalg.det(np.asarray(affine)[:3, :3])))
    total, inside = int((mask > 0).sum()), int(kept.sum())
    if inside * voxel_mm3 < MIN_EMBED_MM3 * (1 - 1e-3):  # (8 voxels of 0.99999 mm3 are 8 mm3)
        if inside == total:
            raise InputError(f"the lesion mask is too small to embed ({total * voxel_mm3:.1f} mm3; at least "
                             f"{MIN_EMBED_MM3:g} mm3 is needed)")
        raise InputError(f"the lesion mask lies outside the brain (only {inside * voxel_mm3:.1f} mm3 of its "
                         f"{total * voxel_mm3:.0f} mm3 on brain tissue; at least {MIN_EMBED_MM3:g} mm3 is needed to "
                         "embed a lesion)")
    notes = []
    if inside < total:
        notes.append(f"{1 - inside / total:.0%} of the lesion mask ({(total - inside) * voxel_mm3 / 1000:.2f} ml) lies "
                     f"outside the brain and was dropped; the lesion embedded is {inside * voxel_mm3 / 1000:.2f} ml")
    return kept.astype(np.uint8), content, notes


def edit_stages(bundle: bundle_mod.ModelBundle | None, task: str, stages: str | None,
                local_mode: str | None) -> tuple[str, str]:
    """(stages, local mode) an edit runs with: those asked for, or where None/"" the bundle's defaults for ``task``,
    else the local stage when the bundle has one (the latent otherwise) and ``fidelity``."""
    if stages and local_mode:  # nothing to fill in (``bundle`` may then be None)
        return stages, local_mode
    defaults = bundle.defaults(task)
    stages = stages or defaults.get("stages") or ("local" if bundle.has_local else "latent")
    return stages, local_mode or defaults.get("local_mode") or "fidelity"


def runs_once(bundle: bundle_mod.ModelBundle | None, task: str, stages: str | None, local_mode: str | None) -> bool:
    """True for an edit whose every stage is deterministic, which runs once whatever the samples asked for: the
    local stage alone, for every heal (``realism`` only adds synthesized noise to one reconstruction) and for an
    embed in ``fidelity`` mode. ``stages``/``local_mode`` as in ``edit_stages`` (``bundle`` may be None when both
    are given)."""
    if task not in ("heal", "embed"):
        return False
    stages, local_mode = edit_stages(bundle, task, stages, local_mode)
    return stages == "local" and (task == "heal" or local_mode == "fidelity")


def check_sampling(bundle: bundle_mod.ModelBundle, task: str, samples: int, stages: str | None,
                   local_mode: str | None) -> None:
    """Refuse several samples of an edit whose every stage is deterministic: the local stage alone in ``fidelity``
    mode, or for heal in either mode (a heal's ``realism`` adds synthesized noise to the same reconstruction, which
    is no uncertainty): the samples would be identical up to that noise, their uncertainty map meaningless.

    Args:
        bundle: the model; its defaults for ``task`` fill ``stages`` and ``local_mode`` when they are None.
        task: ``"heal"`` or ``"embed"``.
        samples: number of samples asked for.
        stages, local_mode: the settings asked for, or None for the bundle's defaults.
    """
    if samples < 2 or not runs_once(bundle, task, stages, local_mode):
        return
    if task == "heal":  # for a heal, 'realism' is no way out
        raise InputError(f"{samples} samples of a local-stage heal differ only by synthesized noise (its "
                         "reconstruction is deterministic), so their spread is no uncertainty; for an uncertainty map "
                         "use stages 'both' or 'latent'")
    raise InputError(f"{samples} samples would be identical: the 'fidelity' local stage is deterministic, so the "
                     "uncertainty map would be zero; for samples that differ use local mode 'realism' or stages "
                     "'latent' or 'both'")


def check_samples(n: int, what: str = "samples") -> int:
    if int(n) != n or int(n) < 1 or int(n) > 64:
        raise InputError(f"{what} must be a whole number from 1 to 64, got {n}")
    return int(n)
