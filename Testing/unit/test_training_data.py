"""Synthetic data generators: shapes, ranges, binary masks inside the brain, determinism, lesion appearance."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from phantoms import phantom_anatomy
from usb_training.data import anatomy, lesions, pathology
from usb_training.data.prepare import CSF, GM, WM
from usb_training.data.synth import build, load, make_sample
from usb_training.data.warp import max_norm


@pytest.fixture(scope="module")
def phantom():
    return phantom_anatomy()[0]


def test_deform_keeps_shapes_labels_and_is_seeded(phantom):
    a = anatomy.deform(phantom, np.random.default_rng(3))
    b = anatomy.deform(phantom, np.random.default_rng(3))
    c = anatomy.deform(phantom, np.random.default_rng(4))
    assert a.image.shape == a.brain.shape == a.labels.shape == phantom.image.shape
    assert set(np.unique(a.labels)) <= {0, CSF, GM, WM}
    assert np.all(a.image[~a.brain] == 0) and np.all(a.labels[~a.brain] == 0)
    assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
    assert abs(int(a.brain.sum()) - int(phantom.brain.sum())) / phantom.brain.sum() < 0.5  # deformed, not destroyed
    assert not np.array_equal(a.brain, phantom.brain > 0)


def test_label_contrast_is_t1_ordered(phantom):
    for seed in range(5):
        img = anatomy.synthesize_contrast(phantom.labels, phantom.brain, np.random.default_rng(seed))
        core = [ndimage.binary_erosion(phantom.labels == c, iterations=1) for c in (CSF, GM, WM)]
        means = [img[m].mean() for m in core if m.any()]
        assert means == sorted(means), f"seed {seed}: tissue means {means} are not CSF < GM < WM"
        assert np.all(img[phantom.brain == 0] == 0)


def test_divergence_free_flow_has_the_requested_displacement():
    disp = lesions.divergence_free_flow((24, 28, 24), np.random.default_rng(0), 4.0, 6)
    assert disp.shape == (1, 3, 24, 28, 24)
    assert float(max_norm(disp)) == pytest.approx(4.0, rel=1e-4)
    # the curl construction: divergence of the velocity is ~0 compared with its gradient magnitude
    pot = np.random.default_rng(1).standard_normal((3, 20, 20, 20))
    pot = ndimage.gaussian_filter(pot, (0, 3, 3, 3))
    g = [np.gradient(pot[c]) for c in range(3)]
    curl = np.stack([g[2][1] - g[1][2], g[0][2] - g[2][0], g[1][0] - g[0][1]])
    div = sum(np.gradient(curl[d])[d] for d in range(3))
    inner = (slice(3, -3),) * 3
    assert np.abs(div[inner]).mean() < 0.05 * np.abs(np.gradient(curl[0])[1][inner]).mean()


def test_lesions_are_binary_inside_tissue_and_seeded(phantom):
    for seed in range(6):
        soft, binary = lesions.random_lesions(phantom.labels, np.random.default_rng(seed))
        assert soft.min() >= 0 and soft.max() <= 1
        assert set(np.unique(binary)) == {0, 1}
        assert np.all(np.isin(phantom.labels[binary > 0], lesions.TISSUE)), "lesion outside brain tissue"
        assert np.all(soft[~np.isin(phantom.labels, lesions.TISSUE)] == 0)
    s1, b1 = lesions.random_lesions(phantom.labels, np.random.default_rng(11))
    s2, b2 = lesions.random_lesions(phantom.labels, np.random.default_rng(11))
    assert np.array_equal(s1, s2) and np.array_equal(b1, b2)


@pytest.mark.parametrize("shape", list(lesions.SHAPES))
def test_every_shape_makes_voxels(phantom, shape):
    rng = np.random.default_rng(5)
    grid = lesions._grid(phantom.labels.shape)
    center = np.argwhere(phantom.labels == WM).mean(0).astype(np.float32)
    assert lesions.SHAPES[shape](grid, center, 4.0, phantom.labels, rng).sum() > 0


def test_pathology_is_hypointense_smooth_and_local(phantom):
    rng = np.random.default_rng(2)
    soft, binary = lesions.random_lesions(phantom.labels, rng)
    dev = pathology.lesion_deviation(phantom.image, soft, binary, phantom.labels, np.random.default_rng(2))
    assert np.all(dev[soft == 0] == 0)
    assert dev[binary > 0].mean() < -0.1  # darker than the healthy tissue it replaces
    # heterogeneity is spatially smooth: neighbouring lesion voxels are strongly correlated
    inner = ndimage.binary_erosion(binary > 0)
    if inner.sum() > 20:
        a, b = dev[:-1][inner[:-1] & inner[1:]], dev[1:][inner[:-1] & inner[1:]]
        assert np.corrcoef(a, b)[0, 1] > 0.5


def test_a_lesion_in_grey_matter_never_brightens_it():
    """The lesion's levels are set against the white matter; where it reaches grey matter darker than its border
    level, the old model painted a bright halo (a T1-hyperintense lesion). It must only darken."""
    labels = np.full((24, 24, 24), WM, np.uint8)
    labels[:, :12] = GM
    healthy = np.where(labels == WM, 1.0, 0.45).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(24.0)] * 3, indexing="ij"), -1)
    soft = np.clip(6.0 - np.linalg.norm(grid - 11.5, axis=-1), 0, 1).astype(np.float32)  # straddles GM and WM
    binary = (soft >= 0.5).astype(np.uint8)
    darkened_gm = 0
    for seed in range(12):
        dev = pathology.lesion_deviation(healthy, soft, binary, labels, np.random.default_rng(seed))
        assert dev.max() <= 0.0, f"seed {seed}: a lesion brightened the tissue by {dev.max():.3f}"
        assert dev[(labels == WM) & (binary > 0)].mean() < -0.1
        darkened_gm += int(dev[(labels == GM) & (binary > 0)].min() < -0.05)
    assert darkened_gm >= 3  # a dark core still shows in grey matter (a mild lesion's does not, as on real T1)


def test_sample_healthy_and_lesioned_agree_away_from_the_lesion(phantom):
    s = make_sample(phantom, 7, lesion=True)
    assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) <= {0, 1} and s.mask.any()
    assert s.image.min() >= 0 and s.image.max() <= 1.5
    far = (s.brain > 0) & ~ndimage.binary_dilation(s.mask > 0, iterations=6)
    assert np.abs(s.image - s.healthy)[far].max() < 1e-3
    assert (s.image - s.healthy)[s.mask > 0].mean() < 0
    h = make_sample(phantom, 7, lesion=False)
    assert not h.mask.any() and np.array_equal(h.image, h.healthy)


def test_build_writes_memmaps_with_healthy_fraction(phantom, tmp_path):
    folder = build([phantom], 10, seed=0, healthy_fraction=0.5, out=tmp_path / "set")
    images, masks = load(folder)
    assert images.shape == (10, *phantom.image.shape) and images.dtype == np.float16
    empty = sum(not masks[i].any() for i in range(10))
    assert 1 <= empty <= 9
    assert set(np.unique(np.asarray(masks))) <= {0, 1}
    stamp = (folder / "shard_000" / "images.npy").stat().st_mtime_ns
    again = build([phantom], 10, seed=0, healthy_fraction=0.5, out=tmp_path / "set")  # complete: not rebuilt
    assert again == folder and (folder / "shard_000" / "images.npy").stat().st_mtime_ns == stamp


def test_build_grows_by_shards_and_readers_see_only_finished_ones(phantom, tmp_path):
    folder = build([phantom], 5, seed=0, healthy_fraction=0.5, out=tmp_path / "set", shard=3)
    images, masks = load(folder)
    assert len(images) == 5 and images.shape == (5, *phantom.image.shape)
    first = np.array(images[0:5])
    (folder / "shard_001" / "complete").unlink()  # a shard being written is not read
    assert len(load(folder)[0]) == 3
    build([phantom], 8, seed=0, healthy_fraction=0.5, out=tmp_path / "set", shard=3)  # grows: 3 + 3 + 2
    images, _ = load(folder)
    assert len(images) == 8 and images[-1].shape == phantom.image.shape
    assert np.array_equal(np.array(images[0:3]), first[:3])  # finished shards are kept as they were
    with pytest.raises(IndexError):
        images[8]


def test_the_device_cache_carries_the_training_sources_in_float16_and_never_the_held_out_one(tmp_path):
    """``device_carry pack-cache`` / ``unpack-cache``: what window generation reads on a lent GPU machine comes back
    as float32 within float16's rounding, labels exact, and the held-out source's anatomy never travels."""
    from usb_training.local.device_carry import pack_cache, unpack_cache

    rng = np.random.default_rng(0)
    native = tmp_path / "cache" / "prepared" / "native1mm"
    native.mkdir(parents=True)
    (tmp_path / "cache" / "prepared" / "prior").mkdir()
    image = rng.uniform(0, 1.1, (16, 18, 20)).astype(np.float32)
    labels = rng.integers(0, 4, image.shape).astype(np.uint8)
    np.savez(native / "mni2009c.npz", image=image, labels=labels, affine=np.eye(4))
    np.savez(native / "mni2009c_sites.npz", sites=labels)
    np.savez(native / "ixi555.npz", image=image, labels=labels, affine=np.eye(4))
    np.savez(tmp_path / "cache" / "prepared" / "prior" / "mni2009a_80x96x80_2mm.npz", maps=image[None], affine=np.eye(4))
    back = unpack_cache(pack_cache(tmp_path / "cache", tmp_path / "carry" / "cache.tar.xz"), tmp_path / "there")
    assert sorted(p.name for p in (back / "prepared" / "native1mm").iterdir()) == ["mni2009c.npz", "mni2009c_sites.npz"]
    with np.load(back / "prepared" / "native1mm" / "mni2009c.npz") as z:
        assert z["image"].dtype == np.float32 and np.abs(z["image"] - image).max() <= 1e-3
        assert np.array_equal(z["labels"], labels) and np.array_equal(z["affine"], np.eye(4))
    with np.load(back / "prepared" / "prior" / "mni2009a_80x96x80_2mm.npz") as z:
        assert z["maps"].dtype == np.float32 and z["maps"].shape == (1, *image.shape)
