"""The local stage over several lesion groups of one scan (each group its own box)."""
from __future__ import annotations

import numpy as np
import torch


def test_several_lesion_groups_heal_box_by_box():
    """Three lesions far apart: three boxes, each healed from its own surroundings (a name reused inside the box
    loop once made every box after the first fail)."""
    from USBLib.editor.local.network import build_local_unet
    from USBLib.editor.local.stage import LocalSettings, LocalStage

    network = {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False], "norm_num_groups": 4}
    stage = LocalStage(build_local_unet(network).eval(), {"network": network, "schedule": {
        "num_train_timesteps": 100, "schedule": "linear_beta"}}, torch.device("cpu"))
    shape = (120, 120, 100)
    image = np.full(shape, 0.8, np.float32)
    mask = np.zeros(shape, np.uint8)
    for c in [(20, 20, 20), (90, 90, 70), (30, 95, 50)]:
        mask[c[0] - 2:c[0] + 2, c[1] - 2:c[1] + 2, c[2] - 2:c[2] + 2] = 1
    image[mask > 0] = 0.3
    d = stage.deviation(image, mask, (1.0, 1.0, 1.0), "heal", LocalSettings(mode="fidelity", dilation_mm=1.0),
                        torch.Generator().manual_seed(0))
    healed = image + d[0]
    assert np.allclose(healed[mask > 0], 0.8, atol=0.02)  # the network's output is zero: the base fills all three
