"""The local stage's pieces: lesion boxes, resampling, condition channels, the fusion region and the direction
of ACG/LCG on the deviation estimate."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from USBLib.imaging.fusion import edit_weight, fuse
from USBLib.imaging.boxes import Box, lesion_boxes, needs_resampling, to_grid, work_shape
from USBLib.editor.local.conditioning import EMBED, HEAL, condition, fill_region, lesion_prior
from USBLib.editor.local.sampler import sample_deviation
from USBLib.core.schedule import NoiseSchedule

pytestmark = pytest.mark.slow  # started first (Testing/conftest.py): the long files must not end the run


def _ball(shape, centre, r):
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (np.linalg.norm(ijk - np.asarray(centre), axis=-1) <= r).astype(np.uint8)


def test_close_lesions_share_a_box_and_far_ones_do_not():
    shape = (80, 80, 80)
    mask = _ball(shape, (20, 20, 20), 3) | _ball(shape, (20, 20, 30), 3) | _ball(shape, (65, 65, 65), 2)
    boxes, labels = lesion_boxes(mask, 8, 4, min_side=32)
    assert len(boxes) == 2 and labels.max() == 2
    for box in boxes:
        assert all(s % 4 == 0 and s >= 32 for s in box.shape)
        inside = box.read(labels) == box.label
        assert inside.sum() == (labels == box.label).sum()  # the box holds its whole group
    edge = [b for b in boxes if b.start[0] + b.shape[0] > shape[0]]
    assert edge, "the lesion near the corner gets a box that reaches past the volume"


def test_box_read_pads_and_add_into_writes_only_inside():
    vol = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    box = Box((-1, 0, 1), (3, 3, 3), 1)
    window = box.read(vol, fill=-5.0)
    assert window[0].max() == -5.0 and window[1, 0, 0] == vol[0, 0, 1]
    out = np.zeros_like(vol)
    box.add_into(out, np.ones((3, 3, 3), np.float32), np.ones((3, 3, 3), bool))
    assert out[:2, :, 1:].all() and not out[2].any() and not out[:, :, 0].any()


def test_resampling_decision_and_round_trip():
    assert not needs_resampling((1.0, 1.0, 1.0)) and not needs_resampling((0.9, 1.1, 1.0))
    assert needs_resampling((1.0, 1.0, 3.0)) and needs_resampling((0.5, 0.5, 0.5)) and needs_resampling((2, 2, 2))
    assert work_shape((20, 20, 10), (1.0, 1.0, 3.0), 4) == (20, 20, 32)
    x = ndimage.gaussian_filter(np.random.default_rng(0).standard_normal((20, 20, 10)), 2)
    back = to_grid(to_grid(x, (20, 20, 30), 1), x.shape, 1)
    assert np.abs(back - x).max() < 0.1 * np.abs(x).max()


def test_condition_channels_per_direction():
    rng = np.random.default_rng(1)
    img = (0.8 + 0.01 * rng.standard_normal((24, 24, 24))).astype(np.float32)
    mask = _ball(img.shape, (12, 12, 12), 3)
    img[mask > 0] = 0.3
    heal = condition(img, mask, HEAL, 2)
    region = fill_region(mask, HEAL, 2)
    assert heal.shape == (4, 24, 24, 24)
    assert np.array_equal(heal[2] > 0, region) and region.sum() > mask.sum()
    assert np.array_equal(heal[3][~region], img[~region])  # the classical fill only rewrites its region
    assert abs(heal[3][mask > 0].mean() - 0.8) < 0.05  # ... from the surrounding tissue, not the dark lesion
    embed = condition(img, mask, EMBED, 2)
    assert np.array_equal(embed[2] > 0, mask > 0) and np.array_equal(embed[3], img)
    prior = lesion_prior(region)
    assert prior[region].min() == 1.0 and 0 < prior[~region].max() < 1


class _Constant(torch.nn.Module):
    """Stands in for the network: the same scaled deviation everywhere."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x, t, class_labels=None):
        return torch.full_like(x[:, :1], self.value)


@pytest.mark.parametrize("mode", ["fidelity", "realism"])
def test_acg_holds_the_input_outside_and_lcg_frees_the_lesion(mode):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 100, "schedule": "linear_beta"})
    cond = torch.zeros(1, 4, 16, 16, 16)
    region = np.zeros((16, 16, 16), bool)
    region[5:11, 5:11, 5:11] = True
    lcg = torch.from_numpy(np.clip(1 - 1.0 * lesion_prior(region), 0, 1))[None, None]
    run = lambda alpha0, weight: sample_deviation(  # noqa: E731
        _Constant(0.2), schedule, cond, HEAL, mode=mode, alpha0=alpha0, k=2.0, eta_weight=weight, steps=3,
        strength=0.3, generator=torch.Generator().manual_seed(0), acg=alpha0 > 0)[0, 0].numpy()
    free = run(0.0, None)  # ACG off: the network's deviation everywhere
    assert np.allclose(free, 0.2, atol=1e-3)
    # ACG (eq. 12): lambda = exp(-alpha |0 - d|); a small alpha0 holds the estimate to the input (d = 0) ...
    outside = ~ndimage.binary_dilation(region, iterations=3)
    held = run(0.5, lcg)
    assert np.abs(held[outside]).max() < 0.2 * 0.15
    assert np.allclose(held[region], 0.2, atol=1e-3)  # ... while LCG (eta 1) leaves the lesion free
    no_lcg = run(0.5, None)  # without LCG the lesion is held too
    assert np.abs(no_lcg[region]).max() < 0.2 * 0.15
    freer = run(5.0, lcg)  # a larger alpha0 gives more freedom outside the lesion
    assert 0.2 * 0.5 < np.abs(freer[outside]).mean() < 0.2


def test_edit_region_is_mask_plus_dilation_plus_feather():
    shape = (50, 50, 50)
    spacing = np.array([1.0, 1.0, 1.5])
    mask = _ball(shape, (25, 25, 25), 4)
    brain = np.ones(shape, np.uint8)
    w = edit_weight(mask, brain, spacing, 2.0, 3.0)
    dist = ndimage.distance_transform_edt(mask == 0, sampling=spacing)
    assert np.all(w[dist <= 2.0] == 1.0)
    assert not np.any(w[dist > 2.0 + 3.0 + 1e-6])  # nothing beyond dilation + feather
    assert np.any((w > 0) & (w < 1))
    for axis in range(3):  # the seam has no step
        assert np.abs(np.diff(w, axis=axis)).max() <= 1.5 * spacing[axis] / 3.0 + 1e-6
    rng = np.random.default_rng(0)
    original = rng.integers(0, 3000, shape).astype(np.int16)
    out = fuse(original, rng.normal(0, 100, shape), w)
    assert np.array_equal(out[w == 0], original[w == 0])


def test_edit_region_fades_out_beyond_the_brain():
    shape = (40, 40, 40)
    brain = np.zeros(shape, np.uint8)
    brain[:20] = 1
    mask = np.zeros(shape, np.uint8)
    mask[16:19, 18:22, 18:22] = 1  # a lesion at the brain's edge
    w = edit_weight(mask, brain, (1, 1, 1), 1.0, 3.0)
    assert w[mask > 0].min() == 1.0
    assert w[20:23].any() and not w[23:].any()  # at most the feather beyond the brain
    assert np.array_equal(edit_weight(None, brain, (1, 1, 1), 1.0, 3.0) > 0, brain > 0)


class _Recorder(torch.nn.Module):
    """Wraps a network and keeps the spatial shape of every call's input."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.shapes = net, []

    def forward(self, x, t, class_labels=None):
        self.shapes.append(tuple(x.shape[2:]))
        return self.net(x, t, class_labels=class_labels)


class _Pointwise(torch.nn.Module):
    """A network whose output at a voxel depends only on that voxel's input (so windows must agree exactly)."""

    def forward(self, x, t, class_labels=None):
        return torch.tanh(x[:, 1:2] - 0.5 * x[:, 4:5]) + 1e-4 * t.float().view(-1, 1, 1, 1, 1)


class _DarkerSample(torch.nn.Module):
    """Stands in for a network whose samples drift darker than its conditional mean: the deterministic class
    gives 0.2 everywhere, the sampling class -0.1 plus a fixed texture."""

    def __init__(self, texture: torch.Tensor):
        super().__init__()
        self.texture = texture

    def forward(self, x, t, class_labels=None):
        if int(class_labels[0]) >= 2:  # deterministic (fidelity) label
            return torch.full_like(x[:, :1], 0.2)
        return (-0.1 + self.texture).expand_as(x[:, :1]).clone()


def test_a_realism_sample_keeps_its_texture_at_the_fidelity_level_over_the_region():
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 100, "schedule": "linear_beta"})
    region = np.zeros((16, 16, 16), bool)
    region[4:12, 4:12, 4:12] = True
    weight = torch.from_numpy(lesion_prior(region))[None, None]
    texture = 0.1 * torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    run = lambda level: sample_deviation(  # noqa: E731
        _DarkerSample(texture), schedule, torch.zeros(1, 4, 16, 16, 16), EMBED, mode="realism", alpha0=20.0,
        k=2.0, eta_weight=None, steps=2, strength=0.3, generator=torch.Generator().manual_seed(0), acg=False,
        level_weight=level)[0, 0]
    drawn, anchored = run(None), run(weight)
    w = weight[0, 0]
    assert float((w * drawn).sum() / w.sum()) < 0.0  # the sample as drawn is darker than the fidelity estimate
    assert abs(float((w * anchored).sum() / w.sum()) - 0.2) < 1e-4  # anchored: the fidelity level over the region
    inside = torch.from_numpy(region)
    assert torch.allclose(anchored[inside] - anchored[inside].mean(), drawn[inside] - drawn[inside].mean(),
                          atol=1e-5)  # the texture inside is the sample's
    far = w < 1e-4
    assert far.sum() > 1000 and torch.allclose(anchored[far], drawn[far], atol=1e-4)  # nothing moves far outside


@pytest.mark.parametrize("mode", ["fidelity", "realism"])
def test_large_boxes_run_in_windows_that_stitch_back_in_place(mode):
    schedule = NoiseSchedule.from_config({"num_train_timesteps": 100, "schedule": "linear_beta"})
    gen = torch.Generator().manual_seed(3)
    cond = torch.rand(1, 4, 40, 24, 16, generator=gen)
    run = lambda net, window: sample_deviation(  # noqa: E731
        net, schedule, cond, HEAL, mode=mode, alpha0=20.0, k=2.0, eta_weight=None, steps=2, strength=0.3,
        generator=torch.Generator().manual_seed(0), window=window)
    whole = _Recorder(_Pointwise())
    tiled = _Recorder(_Pointwise())
    one_call, windowed = run(whole, 64), run(tiled, 16)
    assert set(whole.shapes) == {(40, 24, 16)}
    assert tiled.shapes and all(max(s) <= 16 for s in tiled.shapes)
    assert len(tiled.shapes) > len(whole.shapes)
    assert torch.allclose(one_call, windowed, atol=1e-5)  # every window back where it came from


def test_a_large_lesion_heals_in_bounded_windows():
    """A lesion group bigger than the window (the 62 GB attention crash of a big lesion) runs window by window
    through the real local U-Net, and the deviation still covers the whole lesion."""
    from USBLib.core.devices import use_onednn_convs
    from USBLib.editor.local.network import build_local_unet
    from USBLib.editor.local.sampler import WINDOW
    from USBLib.editor.local.stage import LocalSettings, LocalStage

    torch.manual_seed(0)
    network = {"channels": [8, 8, 8], "num_res_blocks": 1, "attention_levels": [False, False, False],
               "norm_num_groups": 4}
    net = _Recorder(use_onednn_convs(build_local_unet(network).eval()))  # as ``LocalStage.from_state_dict`` on a CPU
    stage = LocalStage(net, {"network": network, "schedule": {"num_train_timesteps": 100,
                                                              "schedule": "linear_beta"}}, torch.device("cpu"))
    shape = (100, 100, 90)
    mask = _ball(shape, (50, 50, 45), 32)
    image = np.full(shape, 0.8, np.float32)
    image[mask > 0] = 0.4
    d = stage.deviation(image, mask, (1.0, 1.0, 1.0), "heal", LocalSettings(mode="fidelity"),
                        torch.Generator().manual_seed(0))
    assert max(max(s) for s in net.shapes) <= WINDOW and len(net.shapes) > 1
    assert np.isfinite(d).all()
    lesion = mask > 0
    assert np.abs(d[0][lesion]).min() > 0 and np.abs(d[0][lesion]).mean() > 0.1  # the fill reaches the centre


def test_a_lesion_at_the_image_border_is_filled_from_tissue_not_from_black():
    """The box of a lesion that touches the border reaches past the image; it is continued with the edge tissue
    (zero padding filled the border slice at about half the truth's intensity). With the network's output at zero
    (MONAI zero-initialises the last layer) the heal is the stage's classical base alone."""
    from USBLib.editor.local.stage import LocalSettings

    stage = _zero_output_stage()
    shape = (40, 40, 40)
    image = np.full(shape, 0.8, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[:5, 16:24, 16:24] = 1  # touches the i = 0 face
    image[mask > 0] = 0.3
    d = stage.deviation(image, mask, (1.0, 1.0, 1.0), "heal", LocalSettings(mode="fidelity", dilation_mm=0.0),
                        torch.Generator().manual_seed(0))
    healed = image + d[0]
    assert np.allclose(healed[mask > 0], 0.8, atol=0.02), healed[:5, 20, 20]


def test_box_read_mirrored_mirrors_the_volume_at_its_faces():
    volume = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    box = Box((-2, 1, 3), (5, 3, 5), 1)
    window = box.read_mirrored(volume)
    assert window.shape == (5, 3, 5)
    np.testing.assert_array_equal(window[2:, :, :3], volume[:3, 1:4, 3:6])  # the inside, as it is
    np.testing.assert_array_equal(window[1], window[2])                    # before the first slice: the first,
    np.testing.assert_array_equal(window[0], window[3])                    # then the second
    np.testing.assert_array_equal(window[:, :, 3], window[:, :, 2])        # past the last: the last, then
    np.testing.assert_array_equal(window[:, :, 4], window[:, :, 1])        # the one before it


def test_a_lesion_cut_by_the_image_border_is_a_closed_hole_in_the_network_s_window():
    """The network sees a lesion cut by the scan's face as a closed hole in (mirrored) tissue: repeating the face
    voxels ran the lesion and its fill region on to the window's end, where the fill met no tissue."""
    from USBLib.editor.local.stage import LocalSettings, LocalStage

    net = _Inputs()
    stage = LocalStage(net, {"inputs": ["mask", "region", "fill"], "network": {"channels": [8, 8, 8]},
                             "schedule": {"num_train_timesteps": 100, "schedule": "linear_beta"}},
                       torch.device("cpu"))
    shape = (40, 40, 40)
    image = np.full(shape, 0.8, np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[:4, 16:24, 16:24] = 1  # cut by the i = 0 face, 4 voxels deep
    image[mask > 0] = 0.3
    stage.deviation(image, mask, (1.0, 1.0, 1.0), "heal", LocalSettings(mode="fidelity", dilation_mm=0.0),
                    torch.Generator().manual_seed(0))
    lesion = net.calls[0][0, 1].numpy() > 0  # the mask channel of the window, which starts before the face
    box = lesion_boxes(mask, np.ceil(10.0), 1, min_side=np.array([32, 32, 32]))[0][0]
    before = -box.start[0]  # window slices before the scan's first slice
    assert before >= 5
    column = lesion[:, 20 - box.start[1], 20 - box.start[2]]
    assert column[before:before + 4].all() and not column[before + 4:].any()  # the scan's lesion, 4 deep
    assert column[before - 4:before].all() and not column[:before - 4].any()  # its mirror, then tissue


# ---------------------------------------------------------------------------------------------------------------
# Input channels per bundle (``local.inputs``) and the template's tissue prior


def test_the_default_inputs_are_the_four_condition_channels_themselves():
    from USBLib.editor.local.conditioning import BASE_INPUTS, input_names, needs_prior, network_input

    assert input_names({}) == BASE_INPUTS and not needs_prior(BASE_INPUTS)
    img = np.full((16, 16, 16), 0.8, np.float32)
    mask = _ball(img.shape, (8, 8, 8), 3)
    cond = condition(img, mask, HEAL, 1)
    assert network_input(cond, BASE_INPUTS) is cond  # bundles without the key see exactly what they saw
    with pytest.raises(ValueError):
        input_names({"inputs": ["mask", "region"]})  # no base
    with pytest.raises(ValueError):
        input_names({"inputs": ["fill", "colour"]})


def test_the_heal_input_without_image_shows_no_lesion_intensities():
    """Review M3: with the lesion voided (no raw image channel) the heal input is the same whatever the lesion's
    darkness inside the fill region, so the network cannot brighten more for a darker lesion."""
    from USBLib.editor.local.conditioning import PRIOR_INPUTS, network_input

    rng = np.random.default_rng(0)
    healthy = ndimage.gaussian_filter(rng.uniform(0.6, 1.0, (24, 24, 24)), 2).astype(np.float32)
    mask = _ball(healthy.shape, (12, 12, 12), 3)
    region = fill_region(mask, HEAL, 2)
    names = ("mask", "region", "fill") + PRIOR_INPUTS
    prior = rng.uniform(0, 1, (len(PRIOR_INPUTS), 24, 24, 24)).astype(np.float32)
    inputs = []
    for k in (0.5, 1.0, 1.5):  # the lesion's deviation scaled inside the fill region
        lesioned = np.where(region, healthy - k * 0.3 * region, healthy).astype(np.float32)
        inputs.append(network_input(condition(lesioned, mask, HEAL, 2), names, prior))
    assert inputs[0].shape == (len(names), 24, 24, 24)
    np.testing.assert_array_equal(inputs[0], inputs[1])
    np.testing.assert_array_equal(inputs[1], inputs[2])
    np.testing.assert_array_equal(inputs[0][3:], prior)


def test_a_network_that_reads_the_deep_grey_map_gets_the_fifth_prior_map_or_an_error():
    from USBLib.editor.local.conditioning import PRIOR_INPUTS, network_input

    cond = np.random.default_rng(0).uniform(0, 1, (4, 8, 8, 8)).astype(np.float32)
    prior = np.stack([np.full((8, 8, 8), float(c), np.float32) for c in range(5)])
    shipped = ("mask", "region", "fill") + PRIOR_INPUTS[:4]  # usb-tiny's inputs: a 4-map prior serves
    np.testing.assert_array_equal(network_input(cond, shipped, prior[:4])[3:], prior[:4])
    deep = shipped + ("prior_deep_gm",)
    assert network_input(cond, deep, prior)[-1].min() == 4.0  # the deep grey map, last
    with pytest.raises(ValueError, match="prior_deep_gm"):
        network_input(cond, deep, prior[:4])


def _mapping(native_shape=(40, 44, 36), angle=12.0):
    from scipy.spatial.transform import Rotation

    from USBLib.imaging.spatial import SpaceMapping

    model_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    model_affine[:3, 3] = [-30, -34, -28]
    native_affine = np.eye(4)
    native_affine[:3, :3] = Rotation.from_euler("z", angle, degrees=True).as_matrix() * 1.1
    native_affine[:3, 3] = [-22, -25, -18]
    model_to_native = np.eye(4)
    model_to_native[:3, 3] = [1.5, -2.0, 0.5]
    return SpaceMapping(native_shape, native_affine, (32, 36, 30), model_affine, model_to_native)


def test_the_prior_read_in_a_box_is_the_registered_maps_there():
    from USBLib.editor.local.prior import TissuePrior
    from USBLib.imaging.boxes import Box

    rng = np.random.default_rng(0)
    maps = ndimage.gaussian_filter(rng.uniform(0, 1, (4, 32, 36, 30)), (0, 2, 2, 2)).astype(np.float32)
    mapping = _mapping()
    prior = TissuePrior(maps, mapping)
    whole = np.stack([mapping.to_native(m) for m in maps])
    inside = Box((4, 6, 2), (20, 24, 28), 1)
    np.testing.assert_allclose(prior.read(inside), whole[:, 4:24, 6:30, 2:30], atol=1e-5)
    past = Box((-6, 30, 20), (16, 20, 24), 1)  # reaches past the scan: the template is read there too
    got = prior.read(past)
    assert got.shape == (4, 16, 20, 24)
    np.testing.assert_allclose(got[:, 6:, :14, :16], whole[:, :10, 30:44, 20:36], atol=1e-5)


class _Inputs(torch.nn.Module):
    """Keeps every call's input channels; outputs zero (the stage's base)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, class_labels=None):
        self.calls.append(x.detach().clone())
        return torch.zeros_like(x[:, :1])


def test_a_prior_network_reads_the_prior_of_each_box_and_refuses_to_run_without():
    from USBLib.editor.local.conditioning import PRIOR_INPUTS
    from USBLib.editor.local.prior import TissuePrior
    from USBLib.editor.local.stage import LocalSettings, LocalStage

    names = ["mask", "region", "fill", *PRIOR_INPUTS]
    net = _Inputs()
    stage = LocalStage(net, {"inputs": names, "network": {"channels": [8, 8, 8]},
                             "schedule": {"num_train_timesteps": 100, "schedule": "linear_beta"}},
                       torch.device("cpu"))
    assert stage.needs_prior
    mapping = _mapping()
    rng = np.random.default_rng(1)
    maps = rng.uniform(0, 1, (len(PRIOR_INPUTS), 32, 36, 30)).astype(np.float32)
    image = np.full(mapping.native_shape, 0.8, np.float32)
    mask = _ball(image.shape, (20, 22, 18), 3)
    image[mask > 0] = 0.3
    settings = LocalSettings(mode="fidelity", dilation_mm=0.0)
    with pytest.raises(ValueError, match="tissue prior"):
        stage.deviation(image, mask, (1.1, 1.1, 1.1), "heal", settings, torch.Generator().manual_seed(0))
    prior = TissuePrior(maps, mapping)
    d = stage.deviation(image, mask, (1.1, 1.1, 1.1), "heal", settings, torch.Generator().manual_seed(0),
                        prior=prior)
    assert np.isfinite(d).all() and len(net.calls) == 1
    x = net.calls[0][0].numpy()
    assert x.shape[0] == 1 + len(names)
    box = lesion_boxes(mask, np.ceil(10.0 / 1.1), 1, min_side=np.ceil(32.0 / 1.1).astype(int))[0][0]
    assert x.shape[1:] == tuple(-(-s // 4) * 4 for s in box.shape)  # padded at the far end to the size multiple
    inside = (slice(None),) + tuple(slice(0, s) for s in box.shape)
    np.testing.assert_allclose(x[4:][inside], prior.read(box), atol=1e-6)  # the prior channels, box by box
    assert np.array_equal(x[1][inside[1:]] > 0, box.read_mirrored(mask) > 0)


def _zero_output_stage():
    """A local stage whose network outputs zero (MONAI zero-initialises its last layer): its heal is the base."""
    from USBLib.core.devices import use_onednn_convs
    from USBLib.editor.local.network import build_local_unet
    from USBLib.editor.local.stage import LocalStage

    network = {"channels": [8, 8], "num_res_blocks": 1, "attention_levels": [False, False], "norm_num_groups": 4}
    return LocalStage(use_onednn_convs(build_local_unet(network).eval()), {"network": network, "schedule": {
        "num_train_timesteps": 100, "schedule": "linear_beta"}}, torch.device("cpu"))


def test_several_lesion_groups_heal_box_by_box():
    """Three lesions far apart: three boxes, each healed from its own surroundings (a name reused inside the box
    loop once made every box after the first fail)."""
    from USBLib.editor.local.stage import LocalSettings

    stage = _zero_output_stage()
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


def test_prior_fill_follows_the_tissue_classes_into_the_region_and_keeps_the_outside():
    from USBLib.editor.local.conditioning import classical_fill, condition, prior_fill

    shape = (32, 32, 32)
    gm = np.zeros(shape, np.float32)
    gm[:, :16] = 1.0  # grey matter on one side of a plane, white matter on the other
    prior = np.stack([np.zeros(shape, np.float32), gm, 1.0 - gm, 0.5 + 0.3 * (1 - gm)])
    rng = np.random.default_rng(0)
    healthy = (0.6 * gm + 0.9 * (1 - gm) + rng.normal(0, 0.01, shape)).astype(np.float32)
    region = _ball(shape, (16, 16, 16), 7) > 0  # across the boundary
    lesioned = np.where(region, 0.3, healthy).astype(np.float32)
    base = prior_fill(lesioned, region, prior)
    assert np.array_equal(base[~region], lesioned[~region])  # outside the region: the scan itself
    err_prior = np.abs(base - healthy)[region].mean()
    err_biharmonic = np.abs(classical_fill(lesioned, region) - healthy)[region].mean()
    assert err_prior < 0.02 and err_prior < 0.5 * err_biharmonic
    cond = condition(lesioned, region, HEAL, 0, region=region, base="prior", prior=prior)
    np.testing.assert_array_equal(cond[3], base)
    with pytest.raises(ValueError, match="needs the tissue prior"):
        condition(lesioned, region, HEAL, 0, region=region, base="prior")
    # no tissue around the region in the prior: the biharmonic fill
    np.testing.assert_array_equal(prior_fill(lesioned, region, np.zeros_like(prior)),
                                  classical_fill(lesioned, region))


def test_a_prior_base_stage_needs_the_prior_and_an_unknown_base_is_a_bundle_error():
    from USBLib.errors import BundleError
    from USBLib.editor.local.stage import LocalStage

    config = {"network": {"channels": [8, 8, 8]}, "schedule": {"num_train_timesteps": 100, "schedule": "linear_beta"}}
    assert LocalStage(_Inputs(), dict(config, base="prior"), torch.device("cpu")).needs_prior
    assert not LocalStage(_Inputs(), config, torch.device("cpu")).needs_prior
    with pytest.raises(BundleError, match="base 'atlas' is unknown"):
        LocalStage(_Inputs(), dict(config, base="atlas"), torch.device("cpu"))


def test_a_thick_slice_fill_region_on_the_working_grid_is_anchored_on_tissue_outside_it():
    """A 3 mm-slice box goes to ~1 mm before the network: the fill region there must reach far enough that the
    voxels just outside it (the classical fill's boundary) take their values from native voxels outside the region
    (left as they are by the fusion), not half from the region's own darkened last slice."""
    from USBLib.editor.local.stage import _resampled_region

    box = (12, 12, 8)
    region = np.zeros(box, bool)
    region[4:8, 4:8, 3:5] = True                        # two 3 mm slices
    shape = work_shape(box, (1.0, 1.0, 3.0), 4)         # (12, 12, 24)
    work_region = _resampled_region(region, shape)
    nearest = to_grid(region.astype(np.float32), shape, 1) >= 0.5
    assert (work_region & ~nearest).any() and not (nearest & ~work_region).any()  # reaches further, loses nothing
    outside_share = to_grid((~region).astype(np.float32), shape, 1)  # how much of a voxel comes from outside
    boundary = ndimage.binary_dilation(work_region) & ~work_region
    assert outside_share[boundary].min() >= 0.99
    old_boundary = ndimage.binary_dilation(nearest) & ~nearest
    assert outside_share[old_boundary].min() < 0.6      # (the rule before: half from the region's last slice)


def test_a_heal_on_thick_slices_undoes_the_upsampled_darkening_on_the_native_slices():
    """The working box is the native box interpolated, so a heal's deviation is read back at the native slice
    centres: the deviation that undoes a native lesion's darkening as the working grid shows it (interpolated) comes
    back as that darkening's inverse on every native voxel, within the small mismatch of the two grids' centres. The low-pass of a generic downsampling would mix
    in the unedited slices beside a thin lesion and leave it too dark."""
    from USBLib.editor.local.stage import heal_back_to_native

    box = (12, 12, 8)
    darkening = np.zeros(box, np.float32)
    darkening[4:8, 4:8, 3:5] = 0.2                      # a lesion two 3 mm slices thick
    shape = work_shape(box, (1.0, 1.0, 3.0), 4)
    heal = to_grid(darkening, shape, 1)                 # what the heal adds back on the working grid
    back = heal_back_to_native(heal, box)
    assert back.shape == box
    lesion = darkening > 0
    assert back[lesion].min() > 0.19 and np.abs(back - darkening).max() < 0.02  # (the grids' centres differ a bit)
    low_passed = to_grid(heal, box, 1)
    assert low_passed[lesion].max() < 0.175             # (with the low-pass: a sixth of the heal lost)


def test_the_heal_correction_is_gated_in_model_units_and_without_a_seam(monkeypatch):
    """``LocalStage.deviation`` gives the level gate the network's correction in model units (x0 / scale) and puts
    the gated one back: a lesion whose boundary voxels are darkened inside tissue at 0.85 (the biharmonic base
    carries that slope inwards and sags to about 0.38), a network that lifts by 0.6 everywhere: the fill ends on
    the band, 0.85, and the lift around the region is scaled with it. Ungated it would be about 0.98; with the
    correction in the diffusion variable, about 0.61."""
    import USBLib.editor.local.stage as stage_module
    from USBLib.editor.local.stage import LocalSettings

    stage = _zero_output_stage()
    lift = 0.6

    def lifting_sampler(net, schedule, cond, direction, **kwargs):
        return torch.full((cond.shape[0], 1, *cond.shape[2:]), lift * stage.scale)

    monkeypatch.setattr(stage_module, "sample_deviation", lifting_sampler)
    shape = (40, 40, 40)
    mask = _ball(shape, (20, 20, 20), 3)
    image = np.full(shape, 0.85, np.float32)
    to_mask = ndimage.distance_transform_edt(mask == 0)
    image[(to_mask > 0) & (to_mask <= 1.0)] = 0.6  # the base's boundary, not the gate's ring (1-2 mm out)
    image[mask > 0] = 0.3
    d = stage.deviation(image, mask, (1.0, 1.0, 1.0), "heal", LocalSettings(mode="fidelity", dilation_mm=0.0),
                        torch.Generator().manual_seed(0))[0]
    healed = image + d
    assert np.isclose(healed[mask > 0].mean(), 0.85, atol=2e-3), healed[mask > 0].mean()
    factor = d[to_mask == 3.0].mean() / lift  # the correction three voxels out, where the base is the scan
    assert 0.3 < factor < 0.9 and np.allclose(d[to_mask == 3.0], lift * factor, atol=1e-5)
