"""The heal yardstick (``usb_training.evaluation.native``) on the analytic phantom with a random-init bundle: the
cases (exact and hasty masks, a rim past the exact mask, a lesion cut by the field of view), the score over the
changed voxels, the classical fillers' regions, the bootstrap, the ``--usb`` parser and one end-to-end run.
No network, no shipped data."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import phantoms
from USBLib.editor.editor import Editor
from usb_training.base import baselines
from usb_training.base.scores import (CHANGE_TOL, COLLATERAL_REACH, changed_region, edge_profile, embed_scores,
                                      half_depth_dice, ring, scoring_box, yardstick_scores)
from usb_training.evaluation import native
from usb_training.local.cases import drawn_mask, generous_mask, hasty_mask, thick_slices, yardstick_case

SHAPE = (56, 64, 56)


@pytest.fixture(scope="module")
def anatomy():
    return phantoms.phantom_anatomy(shape=(64, 72, 64), spacing=2.5)


@pytest.fixture(scope="module")
def case(anatomy):
    return yardstick_case(*anatomy, "deep_wm", seed=3, shape=SHAPE)


def _priors(case) -> np.ndarray:
    """CSF/GM/WM probabilities from the case's own labels, blurred (a stand-in for registered atlas maps)."""
    maps = [ndimage.gaussian_filter((case.labels == k).astype(np.float32), 1.5) for k in (1, 2, 3)]
    total = np.maximum(sum(maps), 1e-6)
    return np.stack([m / total for m in maps])


def test_cases_have_exact_and_hasty_masks_and_a_rim_past_the_exact_mask(case):
    exact, hasty = case.mask > 0, case.hasty > 0
    assert exact.sum() >= 6 and hasty.any()
    assert not (hasty & ~exact).any() and hasty.sum() < exact.sum()
    changed = changed_region(case.lesioned, case.healthy, case.brain)
    outside = changed & ~exact
    assert outside.any()
    reach = ndimage.distance_transform_edt(~exact)[outside]
    assert reach.max() >= 2.0  # the darkening reaches past the drawn mask
    assert case.healthy.shape == case.lesioned.shape == SHAPE
    assert np.array_equal(case.healthy, np.rint(case.healthy))  # scanner units, int16-valued
    assert case.contrast in ("template", "labels")


def test_hasty_mask_keeps_every_lesion_and_a_border_lesion_touches_the_face(anatomy):
    dots = np.zeros((20, 20, 20), np.uint8)
    dots[5, 5, 5] = 1
    dots[10:15, 10:15, 10:15] = 1
    hasty = hasty_mask(dots)
    assert hasty[5, 5, 5] == 1 and hasty[10:15, 10:15, 10:15].sum() == 27
    border = yardstick_case(*anatomy, "border", seed=5, shape=SHAPE)
    faces = [border.mask.take(end, axis).any() for axis in range(3) for end in (0, -1)]
    assert any(faces) and border.hasty.any()
    assert min(border.mask.shape) < min(SHAPE) or border.mask.shape != SHAPE


def test_a_thick_slice_case_averages_slices_along_the_superior_axis_and_keeps_its_place_in_the_world(case):
    """``thick_slices``: 3 slices into one along the axis closest to superior; every thick voxel holds the mean of
    its 3 thin ones and sits at their mean position in the world; the mask is the averaged soft extent's 0.5
    iso-surface and the hasty mask is eroded in-plane only."""
    thick = thick_slices(case, 3)
    axis = int(np.argmax(np.abs(case.affine[2, :3])))
    n = case.healthy.shape[axis] // 3
    assert thick.healthy.shape[axis] == n and thick.name.endswith("-slices3") and thick.site == case.site
    assert np.linalg.norm(thick.affine[:3, axis]) == pytest.approx(3 * np.linalg.norm(case.affine[:3, axis]))
    k = int(np.argmax((thick.mask > 0).sum(axis=tuple(a for a in range(3) if a != axis))))  # the lesion's slab
    thin = np.take(case.lesioned, [3 * k, 3 * k + 1, 3 * k + 2], axis=axis).astype(np.float64)
    assert np.abs(np.take(thick.lesioned, k, axis=axis) - thin.mean(axis)).max() <= 0.5  # int-valued mean
    ijk = np.zeros(3)
    ijk[axis] = k
    centres = [case.affine[:3, :3] @ np.where(np.arange(3) == axis, 3 * k + j, 0) + case.affine[:3, 3]
               for j in range(3)]
    assert np.allclose(thick.affine[:3, :3] @ ijk + thick.affine[:3, 3], np.mean(centres, 0), atol=1e-4)
    assert np.array_equal(thick.mask > 0, thick.soft >= 0.5) and thick.mask.any()
    hasty, exact = thick.hasty > 0, thick.mask > 0
    assert hasty.any() and not (hasty & ~exact).any()
    in_plane = ndimage.generate_binary_structure(3, 1)
    for side in (0, 2):
        in_plane[tuple(side if a == axis else 1 for a in range(3))] = False
    assert np.array_equal(hasty, _eroded_once(exact, in_plane)) and hasty.sum() < exact.sum()
    assert thick_slices(case, 1) is case
    with pytest.raises(ValueError, match="slice factor"):
        thick_slices(case, 0)


def _eroded_once(exact: np.ndarray, structure: np.ndarray) -> np.ndarray:
    """The exact mask eroded once with ``structure``, every component kept (``mask_edges``)."""
    from USBLib.imaging.mask_edges import eroded_keeping_components

    return eroded_keeping_components(exact, 1, structure)


def test_rim_score_covers_the_rim(case):
    changed = changed_region(case.lesioned, case.healthy, case.brain, case.mask)
    assert (changed >= (case.mask > 0)).all() and (changed & (case.mask == 0)).any()
    mask_only = case.lesioned.copy()
    mask_only[case.mask > 0] = case.healthy[case.mask > 0]  # perfect inside the drawn mask, rim left dark
    s = yardstick_scores(mask_only, case.healthy, changed, case.mask, case.brain)
    assert s["psnr_mask"] == float("inf") and np.isfinite(s["psnr"])
    box = scoring_box(changed)
    scale = float(np.percentile(case.healthy[case.brain > 0], 99))
    cropped = yardstick_scores(mask_only[box], case.healthy[box], changed[box], case.mask[box], case.brain[box], scale)
    assert cropped == s  # scores of the scoring box equal those of the whole scan
    perfect = yardstick_scores(case.healthy, case.healthy, changed, case.mask, case.brain)
    assert perfect["psnr"] == float("inf") and perfect["mean_ratio"] == pytest.approx(1.0)
    assert perfect["texture"] == pytest.approx(1.0) and perfect["collateral"] == 0.0
    assert s["collateral"] < 100 * CHANGE_TOL  # the lesion left the tissue around its changes as it was
    # a fill that is perfect where the lesion is but paints over the healthy tissue around it: PSNR cannot see
    # that, the collateral score does
    around = ring(changed, 0, 2, case.brain)
    painted = case.healthy.copy()
    painted[around] += 0.1 * scale
    spilled = yardstick_scores(painted, case.healthy, changed, case.mask, case.brain)
    assert spilled["psnr"] == float("inf")
    share = around.sum() / ring(changed, 0, COLLATERAL_REACH, case.brain).sum()
    assert spilled["collateral"] == pytest.approx(10 * share, rel=1e-3)


def _ball(shape, centre, radius) -> np.ndarray:
    grid = np.indices(shape).astype(np.float64)
    return np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre))) <= radius


def test_embed_location_reads_a_lesion_drawn_at_its_half_depth_border_as_in_place():
    """A dark ball lesion blurred as a scanner blurs a sharp border (Gaussian 0.6 voxel): the mask is its
    half-depth border. The 5 % threshold counts the partial-volume edge past the mask as spill, the half-depth Dice
    does not, and a lesion twice as wide as its mask is caught by both; the profile reads the edge."""
    shape, centre = (40, 40, 40), (20, 20, 20)
    healthy = np.full(shape, 1000.0)
    brain = np.ones(shape, np.uint8)
    mask = _ball(shape, centre, 3.5).astype(np.uint8)
    dark = ndimage.gaussian_filter(mask.astype(np.float64), 0.6)
    out = healthy * (1 - 0.4 * dark)
    s = embed_scores(out, healthy, mask, brain, out)
    assert s["dice_half_depth"] > 0.9
    assert s["dice_change"] < s["dice_half_depth"] - 0.05
    inside, first, second = edge_profile((healthy - out) / 1000.0, mask, brain)
    assert 0.5 < inside < 1.0 and 0.0 < first < inside and second < 0.05
    spread = healthy * (1 - 0.4 * ndimage.gaussian_filter(_ball(shape, centre, 5.5).astype(np.float64), 0.6))
    assert half_depth_dice((healthy - spread) / 1000.0, mask) < 0.6
    assert half_depth_dice(np.zeros(shape), mask) == 0.0


def test_classical_fillers_leave_the_outside_of_their_region_bit_for_bit(case):
    ctx = {"seed": 0, "priors": _priors(case)}
    fillers = native.classical_fillers(dilation=2)
    from USBLib.editor.local.conditioning import HEAL, fill_region

    for drawn in (case.mask, case.hasty):
        regions = {"NAWM constant": drawn > 0, "FSL-style lesion filling": drawn > 0,
                   "biharmonic, mask": baselines.grown(drawn, 0, case.brain),
                   "biharmonic, mask + 2 vox": baselines.grown(drawn, 2, case.brain),
                   native.PRESET: baselines.grown(drawn, 3, case.brain),
                   "local stage base (d=2, 18-nbh)": fill_region(drawn, HEAL, 2),
                   "atlas fill (MNI2009a, mask + 2)": baselines.grown(drawn, 2, case.brain),
                   native.PATCH: drawn > 0, native.PATCH + ", mask + 2 vox": baselines.grown(drawn, 2, case.brain)}
        assert set(regions) == set(fillers)
        for name, fill in fillers.items():
            out = fill(case, drawn, ctx)
            region = regions[name]
            assert out.dtype == np.float32 and out.shape == case.lesioned.shape
            assert np.array_equal(out[~region], case.lesioned[~region].astype(np.float32)), name
            assert not np.array_equal(out[region], case.lesioned[region]), name


def test_brighten_only_fillers_are_the_fills_never_below_the_scan(case):
    """``--classical-brighten-only``: each classical filler given USB's rule that a heal never darkens a voxel;
    some plain fills do dip below the scan (a fixed growth spreads the lesion's darkness into healthy tissue)."""
    ctx = {"seed": 0, "priors": _priors(case)}
    plain, rule = native.classical_fillers(2), native.classical_fillers(2, brighten_only=True)
    assert set(plain) == set(rule)
    lesioned = case.lesioned.astype(np.float32)
    dipped = 0
    for name in plain:
        fill, kept = plain[name](case, case.mask, ctx), rule[name](case, case.mask, ctx)
        assert np.array_equal(kept, np.maximum(fill, lesioned)), name
        dipped += int((fill < lesioned).any())
    assert dipped >= 1


def test_biharmonic_fills_a_lesion_on_the_volume_face():
    image = np.full((20, 20, 20), 100.0, np.float32)
    image[:4, 8:12, 8:12] = 10.0  # a dark lesion cut by the face i = 0
    mask = (image < 50).astype(np.uint8)
    out = baselines.biharmonic_grown(image, mask, np.ones_like(mask), 0)
    assert np.allclose(out, 100.0, atol=1e-3)


def test_atlas_fit_recovers_class_means():
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], (30, 30, 30)).transpose(3, 0, 1, 2).astype(np.float32)
    image = (p * np.array([100.0, 500.0, 900.0])[:, None, None, None]).sum(0)
    brain = np.ones(image.shape, bool)
    shell = np.zeros(image.shape, bool)
    shell[5:25, 5:25, 5:10] = True
    assert np.allclose(baselines.atlas_fit(image, p, shell, brain), [100, 500, 900], atol=1e-3)


def test_bootstrap_interval_contains_the_mean():
    rng = np.random.default_rng(1)
    values = rng.normal(0.7, 2.0, 24)
    lo, hi = native.bootstrap_ci(values, seed=0)
    assert lo < values.mean() < hi and hi - lo < 3.0
    assert native.bootstrap_ci(values, seed=0) == (lo, hi)  # seeded
    paired = np.concatenate([values, values + 0.3])
    lo2, hi2 = native.bootstrap_ci(paired, clusters=np.tile(np.arange(24), 2), seed=0)
    assert lo2 < paired.mean() < hi2


def test_usb_parser():
    assert native.parse_usb("local d1=dilation_mm:1") == ("USB local d1", {"dilation_mm": 1})
    name, settings = native.parse_usb("realism=local_mode:realism, acg:false,alpha0:2.5,local_steps:8")
    assert name == "USB realism"
    assert settings == {"local_mode": "realism", "acg": False, "alpha0": 2.5, "local_steps": 8}
    assert isinstance(settings["local_steps"], int) and isinstance(settings["acg"], bool)
    assert native.parse_usb("plain") == ("USB plain", {})
    for bad in ("=dilation_mm:1", "x=dilation_mm", "x=dilation_mm:"):
        with pytest.raises(ValueError):
            native.parse_usb(bad)
    configs = native.usb_configs(["d1=dilation_mm:1", "d3=dilation_mm:3.0"])
    assert list(configs) == ["USB defaults", "USB d1", "USB d3"] and configs["USB d3"] == {"dilation_mm": 3.0}


@pytest.fixture(scope="module")
def local_editor(tmp_path_factory):
    bundle = phantoms.make_bundle(tmp_path_factory.mktemp("bundles") / "tiny-yardstick", local=True)
    return Editor(bundle, device="cpu", registration="none")


def test_usb_settings_are_checked_before_any_case(local_editor):
    native.check_usb_settings(local_editor, native.usb_configs(["d1=dilation_mm:1"]))
    with pytest.raises(ValueError, match="unknown heal setting"):
        native.check_usb_settings(local_editor, native.usb_configs(["x=dilatoin_mm:1"]))
    from USBLib.errors import InputError

    with pytest.raises(InputError):
        native.check_usb_settings(local_editor, native.usb_configs(["x=dilation_mm:-4"]))


def test_yardstick_end_to_end_on_the_phantom(anatomy, local_editor, tmp_path):
    cases = [yardstick_case(*anatomy, site, seed=10 + i, shape=SHAPE) for i, site in enumerate(("deep_wm", "cortex"))]
    shape = local_editor.bundle.grid_shape
    priors = np.stack([np.full(shape, v, np.float32) for v in (0.2, 0.3, 0.5)])
    configs = native.usb_configs(["d1=dilation_mm:1"])
    result = native.run(local_editor, cases, tmp_path, configs, embed="none", model_priors=priors, log=None)
    assert result["cases"] == 2 and len(result["rows"]) == 2 * 2 * (9 + 2 + 1)  # 9 classical, 2 USB, the input
    for name in ("USB defaults", "USB d1"):
        per = result["summary"]["configs"][name]
        assert set(per) == {"exact", "hasty", "both"} and per["both"]["n"] == 4
        lo, hi = per["both"]["vs_best_ci"]
        assert lo <= per["both"]["vs_best"] <= hi
    assert "USB d1" in result["table_markdown"] and "hasty" in result["table_markdown"]
    assert (tmp_path / "native_metrics.json").is_file() and (tmp_path / "heal_yardstick.png").is_file()


def test_segmentation_fallback_and_scores(case, monkeypatch, tmp_path):
    from usb_training.evaluation import segment

    monkeypatch.setattr(segment, "segmenter", lambda: "kmeans-fallback")
    box = segment.segment_box(case.mask, (1.0, 1.0, 1.0), margin_mm=12)
    truth = segment.segment(case.healthy[box], case.brain[box], tmp_path)
    assert set(np.unique(truth)) <= {0, 1, 2, 3} and (truth[case.brain[box] == 0] == 0).all()
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert np.array_equal(segment.segment(case.healthy[box], case.brain[box], tmp_path), truth)  # cached, same
    same = segment.seg_scores(truth, truth, case.mask[box], (1.0, 1.0, 1.0))
    assert same["seg_agree_mask"] == 1.0 and same["seg_dvol_box_ml"] == 0.0 and same["seg_dvol_10mm_ml"] == 0.0
    lesioned = segment.seg_scores(segment.segment(case.lesioned[box], case.brain[box]), truth, case.mask[box],
                                  (1.0, 1.0, 1.0))
    assert lesioned["seg_agree_mask"] < 1.0


def test_downstream_tables_pair_usb_with_the_best_classical_filler_per_score():
    rows = []
    for c in range(3):
        for mask in ("exact", "hasty"):
            for method, agree, dvol in (("A", 0.6, 0.5), ("B", 0.7, 0.9), ("USB", 0.8 + 0.01 * c, 0.2)):
                rows.append({"case": f"c{c}", "mask": mask, "method": method, "group": "deep_wm",
                             "seg_agree_mask": agree, "seg_agree_ring": agree, "seg_dvol_box_ml": dvol,
                             "seg_dvol_10mm_ml": dvol})
    result = {"rows": rows, "classical": ["A", "B"], "usb": ["USB"], "segmenter": "atropos"}
    means = native.method_means(rows, list(native.SEG_KEYS))
    text = "\n".join(native.downstream_lines(result, means))
    assert text.count("USB - best classical filler") == 2  # exact and hasty apart
    # agreement is compared with B (the higher), volume error with A (the lower): +0.11 and -0.30
    assert "agree_mask +0.110" in text and "vs B" in text and "dvol_10mm_ml -0.300" in text and "vs A" in text


def test_a_generous_mask_covers_the_rim_within_2_mm_and_the_brain(case):
    """``--masks generous``: the exact mask grown by 2 mm (Euclidean) within the brain, mostly into the darkened rim
    past the exact mask; on 3 mm slices it grows in-plane only; ``drawn_mask`` names the three."""
    exact = case.mask > 0
    generous = drawn_mask(case, "generous") > 0
    assert (generous >= exact).all() and not (generous & ~exact & (case.brain == 0)).any()
    distance = ndimage.distance_transform_edt(~exact)
    assert distance[generous].max() <= 2.0 and (generous == ((distance <= 2.0) & ((case.brain > 0) | exact))).all()
    rim = changed_region(case.lesioned, case.healthy, case.brain, case.mask) & ~exact
    assert (generous & rim).any() and (generous & rim).sum() > (generous & ~exact & ~rim).sum()  # it grows into the rim
    assert np.array_equal(drawn_mask(case, "exact"), case.mask)
    assert np.array_equal(drawn_mask(case, "hasty"), case.hasty)
    with pytest.raises(ValueError, match="unknown mask kind"):
        drawn_mask(case, "sloppy")
    cube = np.zeros((12, 12, 12), np.uint8)
    cube[4:8, 4:8, 4:8] = 1
    thick = generous_mask(cube, np.ones_like(cube), spacing=(1.0, 1.0, 3.0)) > 0
    assert thick[4:8, 4:8, :].sum() == 4 * 4 * 4 and thick[2:10, 2:10, 4:8].sum() > 4 * 4 * 4  # in-plane only


def test_summaries_and_tables_report_each_mask_healed(tmp_path):
    """A run with the generous mask reports it as its own subset (with exact and hasty, ``both`` stays exact +
    hasty), in the tables and in ``compare``."""
    from usb_training.evaluation import compare

    def rows(masks, shift=0.0):
        out = []
        for c in range(4):
            for mask in masks:
                for method, psnr in (("A", 20.0 + c), (native.PRESET, 21.0), ("USB", 22.0 + shift + 0.1 * c)):
                    out.append({"case": f"c{c}", "site": "deep_wm", "group": "deep_wm", "mask": mask,
                                "method": method, "kind": "usb" if method == "USB" else "classical", "psnr": psnr,
                                "psnr_mask": psnr, "mean_ratio": 1.0, "texture": 1.0, "collateral": 0.1,
                                "seconds": 1.0})
        return out

    for masks, subsets in ((("generous",), ["generous"]),
                           (("exact", "hasty", "generous"), ["exact", "hasty", "generous", "both"])):
        r = rows(masks)
        summary = native.summarise(r, ["A", native.PRESET], ["USB"])
        assert list(summary["configs"]["USB"]) == subsets
        assert summary["configs"]["USB"].get("both", {"n": 8})["n"] == 8
        result = {"cases": 4, "source": "test", "held_out": True, "classical": ["A", native.PRESET], "rows": r,
                  "summary": summary, "means": native.method_means(r, ["psnr", "psnr_mask", "mean_ratio", "texture",
                                                                       "collateral", "seconds"]), "masks": list(masks)}
        text = native.table(result)
        assert "PSNR generous" in text and "| USB | generous | 4 |" in text
        assert ("PSNR exact" in text) == ("exact" in masks)
    a, b = ({(x["case"], x["mask"]): x for x in rows(("exact", "generous"), shift) if x["method"] == "USB"}
            for shift in (0.0, 0.5))
    got = compare.compare(a, b)
    assert list(got) == ["exact", "generous"] and got["generous"]["mean"] == pytest.approx(0.5)


def test_a_territorial_case_is_a_large_csf_dark_infarct(anatomy):
    """``--sites territorial`` (not a default site): a chronic infarct many times larger than the default sites'
    lesions, brought towards the CSF's level."""
    from usb_training.local.cases import CSF, WM, YARDSTICK_SITES

    assert "territorial" not in YARDSTICK_SITES  # the default yardstick's cases and numbers stay as they are
    infarct = yardstick_case(*anatomy, "territorial", seed=7, shape=SHAPE)
    deep = yardstick_case(*anatomy, "deep_wm", seed=7, shape=SHAPE)
    exact = infarct.mask > 0
    voxel_ml = float(np.prod(np.linalg.norm(infarct.affine[:3, :3], axis=0))) / 1000
    assert exact.sum() * voxel_ml > 5.0 and exact.sum() > 3 * (deep.mask > 0).sum()
    csf = float(np.median(infarct.healthy[infarct.labels == CSF]))
    wm = float(np.median(infarct.healthy[infarct.labels == WM]))
    assert np.median(infarct.lesioned[exact]) < csf + 0.45 * (wm - csf)
    assert np.median(deep.lesioned[deep.mask > 0]) > np.median(infarct.lesioned[exact])


def test_the_level_embed_asks_for_each_reference_lesions_own_level(case, local_editor, monkeypatch):
    """``--embed level``: the bundle's embed, and the same asked for the reference lesion's own lesion/surround ratio
    (measured as the engine measures it, on the scan with its darkest voxel at 0)."""
    from USBLib.imaging.lesion_level import lesion_surround_ratio

    asked = []
    monkeypatch.setattr(local_editor, "embed", lambda *a, **kw: asked.append(kw) or type("R", (), {"image": a[0]}))
    methods = native.embed_methods(local_editor, "level")
    assert list(methods) == ["USB defaults", "USB at the reference lesion's level"]
    for method in methods.values():
        method(case, 3)
    expected = lesion_surround_ratio(case.lesioned - case.healthy.min(), case.mask > 0, case.brain > 0)
    assert "lesion_level" not in asked[0] and asked[1]["lesion_level"] == pytest.approx(expected)
    assert 0.05 < expected < 0.99 and asked[1]["seed"] == 3
