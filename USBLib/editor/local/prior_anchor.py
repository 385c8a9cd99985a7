"""A large heal's interior brought to the level the tissue prior predicts there (inference-time stabilisation).

The local stage's fill is anchored on the fill region's edge: a biharmonic base from the voxels around the region,
which the network corrects. Inside a large lesion (a territorial infarct of 20-50 ml) the edge is far away and
often half CSF (a ventricle or the sulci beside the lesion), so the base sags towards CSF deep inside, and the
network, trained on lesion windows of 32 voxels, lifts it only part of the way: on the tuning sources' territorial
cases the fill came out 0.79-0.92 of the truth's mean and up to 7 dB below the atlas fill (docs/model.md).

The tissue prior knows what the interior should hold: the template's CSF/GM/WM probabilities carried into the
scan by the Editor's registration, with class means fitted on the tissue around the lesion (``SHELL_MM`` past the
fill region, beyond the lesion's darkened rim). Where a lesion is deep (a connected lesion whose deepest voxel lies
more than ``GATE_MM[0]`` from its edge; full weight from ``GATE_MM[1]``), the heal inside its fill region is moved
towards that prediction: a weight that rises with the distance from the region's edge (a smoothstep reaching 1 at
``RAMP_MM``; 0.26 on a 1 mm scan's outermost region voxel), and the correction
smoothed within the region (Gaussian ``LEVEL_SIGMA_MM``), so that the prior sets the fill's level, not the
template's gyri. A lesion up to about 7 mm deep (its mask grown by the boundary average's voxel stays within
8 mm) is left exactly as the network healed it: none of the held-out 1 mm yardstick's lesions is deeper.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from USBLib.editor.local.conditioning import class_level_model
from USBLib.imaging.boxes import Box
from USBLib.imaging.fusion import smoothstep

GATE_MM = (8.0, 12.0)      # a lesion's depth (mm from its edge to its deepest voxel): no anchor below, full above
RAMP_MM = 3.0              # inside the fill region the anchor's weight rises from 0 at its edge to 1 at this depth
LEVEL_SIGMA_MM = 4.0       # the prior's correction, smoothed within the region: a level, not the template's detail
SHELL_MM = (5.0, 12.0)     # class means fitted on the tissue this far outside the fill region (past the dark rim)
RIDGE = 0.05               # pull of the shell's class means towards the box's (a class absent from the shell)
MIN_SHELL = 50             # voxels: fewer and the lesion is left as the network healed it


def lesion_gates(mask: np.ndarray, spacing) -> tuple[np.ndarray, list[float]]:
    """Each connected lesion's anchor weight from its depth: (labels [I, J, K] int of the 26-connected components
    of ``mask``, [the weight of component 1, 2, ...] in [0, 1]). ``spacing``: voxel size in mm (3 values)."""
    labels, count = ndimage.label(np.asarray(mask) > 0, ndimage.generate_binary_structure(3, 3))
    gates = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        component = np.pad(labels[found] == index, 1)
        depth = float(ndimage.distance_transform_edt(component, sampling=spacing).max())
        gates.append(float(smoothstep((depth - GATE_MM[0]) / (GATE_MM[1] - GATE_MM[0]))))
    return labels, gates


def anchor_to_prior(image: np.ndarray, deviation: np.ndarray, mask: np.ndarray, region: np.ndarray,
                    brain: np.ndarray, spacing, read_classes) -> np.ndarray:
    """The heal's ``deviation`` with the interior of each deep lesion's fill region moved towards the tissue
    prior's prediction (see the module docstring). Returns a new array; unchanged where no lesion is deep.

    Args:
        image: the scan [I, J, K] (any units; the class means are fitted in them).
        deviation: the heal's deviation [samples, I, J, K] in the scan's units (healed = image + deviation).
        mask: the lesion mask [I, J, K] the heal was run for (> 0 = lesion).
        region: its fill region [I, J, K] bool (``USBLib.imaging.rim.rim_region``).
        brain: the scan's brain mask [I, J, K] bool.
        spacing: voxel size in mm (3 values).
        read_classes: ``Box`` -> [3, *box.shape] CSF/GM/WM probabilities on the box's voxels (the template's prior
            through the Editor's registration, ``USBLib.editor.local.prior.TissuePrior``).
    """
    spacing = np.asarray(spacing, float)
    labels, gates = lesion_gates(mask, spacing)
    if not any(g > 0 for g in gates):
        return deviation
    region = np.asarray(region, bool)
    parts, _ = ndimage.label(region, ndimage.generate_binary_structure(3, 3))
    weight_of_part: dict[int, float] = {}
    for index, gate in enumerate(gates, start=1):
        if gate <= 0:
            continue
        for part in np.unique(parts[labels == index]):
            if part > 0:
                weight_of_part[int(part)] = max(weight_of_part.get(int(part), 0.0), gate)
    out = np.array(deviation, np.float32, copy=True)
    pad = np.ceil(SHELL_MM[1] / spacing).astype(int) + 1
    found = ndimage.find_objects(parts)
    for part, gate in weight_of_part.items():
        start = np.array([s.start for s in found[part - 1]]) - pad
        stop = np.array([s.stop for s in found[part - 1]]) + pad
        start, stop = np.maximum(start, 0), np.minimum(stop, region.shape)
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        reg = parts[box] == part
        classes = np.asarray(read_classes(Box(tuple(int(a) for a in start), tuple(int(b - a) for a, b in
                                                                                 zip(start, stop)), part)), np.float64)
        img = np.asarray(image, np.float32)[box]
        tissue = (np.asarray(brain)[box] > 0) & ~reg
        outside = ndimage.distance_transform_edt(~reg, sampling=spacing)
        shell = tissue & (outside > SHELL_MM[0]) & (outside <= SHELL_MM[1])
        if int(shell.sum()) < MIN_SHELL or not tissue.any():
            continue
        predicted = class_level_model(img, classes, tissue, shell, RIDGE)
        weight = (gate * smoothstep(ndimage.distance_transform_edt(reg, sampling=spacing) / RAMP_MM)
                  ).astype(np.float32) * reg
        sigma = LEVEL_SIGMA_MM / spacing
        support = np.maximum(ndimage.gaussian_filter(reg.astype(np.float32), sigma), 1e-3)
        for i in range(out.shape[0]):
            gap = (predicted - (img + out[i][box])) * reg
            out[i][box] += weight * ndimage.gaussian_filter(gap, sigma) / support
    return out
