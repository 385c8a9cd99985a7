"""The shipped ``usb-tiny`` local stage (four input channels, no tissue prior) gives bit for bit the deviations it
gave before bundles could list their local inputs and read a tissue prior.

The reference digests are the sha256 of the float32 deviations that ``LocalStage.deviation`` returned on the
bundled sample scan with the code of commit 8c74788 (before the change), torch 2.13.0+cpu on the project's 2-core
x86_64 CPU; they were the same with 1 and 2 torch threads. A different torch or CPU (another vector instruction
set in oneDNN's convolutions) may change the last bits of the network's output, so the test holds the sum of the
deviation to a relative 1e-4 (a changed input channel, region or guidance moves it by percents) and reports whether
the bytes are identical too; regenerate the references with that commit's code, not with the code under test.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from scipy import ndimage

from USBLib.core import bundle as bundle_mod
from USBLib.editor.local.stage import LocalSettings, LocalStage
from USBLib.imaging.io import read_volume
from USBLib.resources import sample_files

REFERENCE = {  # name: (sha256 of the deviation, its sum for a readable failure)
    "heal_fixed": ("8b6f95ddaf20bb1318f3fc409cc80b5489415ef0f070c44161d6f32f0d7521f0", 1991.7901502779455),
    "heal_region": ("fcb361963ecf1fa6a8a4b5bd4814fb2bb066d09bb7c4be9b182769107e4bcc98", 1325.101539581257),
    "embed_fidelity": ("7b0c5fefe964ae9db699e158dde17d8e27a5ac2ee10a5fd9331ec586ec15a529", -646.1148131044288),
    "embed_realism": ("31b648ac96898e23cd878fe5b2057efa15f3f08aaa81a1c692af81fdcb7da37b", -804.9054759512895),
    "heal_resampled": ("da8043284627fe7277b5576cfd10c28f27a3d9b4b71d8db0bc010b21cdd49813", 1586.9204651166658),
}


@pytest.fixture(scope="module")
def shipped_stage():
    b = bundle_mod.load("usb-tiny")
    assert "inputs" not in b.config["local"] and "prior" not in b.config["local"]
    stage = LocalStage.from_state_dict(b.config["local"], b.load_state_dict("local"), torch.device("cpu"))
    assert not stage.needs_prior
    return stage


@pytest.fixture(scope="module")
def sample():
    files = sample_files()
    image = read_volume(files["image"], "image").data.astype(np.float32)
    return (image / np.float32(np.percentile(image[image > 0], 99)), read_volume(files["lesion"], "lesion").data,
            read_volume(files["embed"], "embed").data)


@pytest.mark.parametrize("name", ["heal_fixed", "embed_realism", "heal_resampled"])  # (the other two: by hand)
def test_the_shipped_local_stage_is_unchanged_bit_for_bit(shipped_stage, sample, name):
    image, lesion, embed = sample
    runs = {
        "heal_fixed": (lesion, "heal", LocalSettings(mode="fidelity", dilation_mm=2.0), None, 1.0),
        "heal_region": (lesion, "heal", LocalSettings(mode="fidelity", dilation_mm=2.0),
                        ndimage.binary_dilation(lesion > 0), 1.0),
        "embed_fidelity": (embed, "embed", LocalSettings(mode="fidelity", dilation_mm=1.0), None, 1.0),
        "embed_realism": (embed, "embed", LocalSettings(mode="realism", dilation_mm=1.0), None, 1.0),
        "heal_resampled": (lesion, "heal", LocalSettings(mode="fidelity", dilation_mm=2.0), None, 1.5),
    }
    mask, task, settings, region, spacing = runs[name]
    d = shipped_stage.deviation(image, mask, (spacing,) * 3, task, settings, torch.Generator().manual_seed(0),
                                samples=1, region=region)
    digest, total = REFERENCE[name]
    same_bytes = hashlib.sha256(np.ascontiguousarray(d).tobytes()).hexdigest() == digest
    measured = float(d.astype(np.float64).sum())
    assert measured == pytest.approx(total, rel=1e-4, abs=1e-3), \
        f"{name}: sum {measured!r} (reference {total!r}; bytes identical: {same_bytes})"
