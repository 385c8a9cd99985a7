"""Evaluation metrics against hand-computed values, and the classical baselines."""
from __future__ import annotations

import json

import numpy as np
import pytest

from usb_training.base import baselines, metrics


def test_l1_psnr_on_a_constant_offset():
    a, b = np.zeros((8, 8, 8)), np.full((8, 8, 8), 0.1)
    region = np.zeros((8, 8, 8), bool)
    region[2:5, 2:5, 2:5] = True
    assert metrics.l1(a, b, region) == pytest.approx(0.1)
    assert metrics.psnr(a, b, region) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert metrics.psnr(a, a, region) == float("inf")


def test_ssim_identity_and_degradation():
    img = np.random.default_rng(0).random((16, 16, 16))
    region = np.ones(img.shape, bool)
    assert metrics.ssim(img, img, region) == pytest.approx(1.0)
    assert metrics.ssim(img, img * 0.5, region) < 0.95


def test_dice_by_hand():
    a, b = np.zeros(10, np.uint8), np.zeros(10, np.uint8)
    a[:4], b[2:4] = 1, 1
    assert metrics.dice(a, b) == pytest.approx(2 * 2 / 6)
    assert metrics.dice(np.zeros(3), np.zeros(3)) == 1.0


def test_kid_estimator_by_hand():
    # k(a,b) = (ab + 1)^3 with d = 1: kxx off-diagonal 1, kyy off-diagonal 1, kxy = [1, 1, 1, 27]
    x, y = np.array([[0.0], [1.0]]), np.array([[0.0], [2.0]])
    assert metrics.polynomial_mmd2(x, y) == pytest.approx(1 + 1 - 2 * 30 / 4)
    same = np.random.default_rng(0).standard_normal((50, 4))
    other = same + 3.0
    assert metrics.gaussian_mmd2(same, same) == pytest.approx(0.0, abs=1e-12)
    assert metrics.gaussian_mmd2(same, other) > 0.1


def test_biharmonic_reproduces_a_linear_ramp():
    i, j, k = np.meshgrid(np.arange(20), np.arange(20), np.arange(20), indexing="ij")
    ramp = (0.02 * i + 0.01 * j + 0.3).astype(np.float32)
    hole = np.zeros(ramp.shape, np.uint8)
    hole[8:12, 8:13, 7:11] = 1
    damaged = ramp.copy()
    damaged[hole > 0] = 0.0
    out = baselines.biharmonic(damaged, hole)
    assert np.abs(out - ramp)[hole > 0].max() < 1e-3
    assert np.array_equal(out[hole == 0], damaged[hole == 0])


def test_patch_fill_continues_a_texture_that_biharmonic_blurs():
    """A striped tissue (period 4 along i) with a hole: the patch fill copies the stripes from around the hole,
    the biharmonic fill smooths them to their mean; outside the hole nothing changes, and a hole on the
    volume's face is filled too."""
    i = np.arange(24)[:, None, None] * np.ones((1, 24, 24))
    stripes = np.where((i // 2) % 2 == 0, 0.9, 0.5).astype(np.float32)
    hole = np.zeros(stripes.shape, bool)
    hole[9:15, 9:15, 9:15] = True
    damaged = np.where(hole, 0.1, stripes).astype(np.float32)
    out = baselines.patch_fill(damaged, hole)
    smooth = baselines.biharmonic(damaged, hole.astype(np.uint8))
    assert np.abs(out - stripes)[hole].max() < 1e-5
    assert np.abs(smooth - stripes)[hole].mean() > 0.1
    assert out.dtype == np.float32 and np.array_equal(out[~hole], damaged[~hole])
    face = np.zeros(stripes.shape, bool)
    face[:, 0:3, 10:14] = True
    out = baselines.patch_fill(np.where(face, 0.1, stripes).astype(np.float32), face)
    assert np.abs(out - stripes)[face].max() < 1e-5


def test_lesion_filling_draws_from_white_matter():
    rng = np.random.default_rng(0)
    image = np.full((24, 24, 24), 0.5, np.float32)
    image[6:18, 6:18, 6:18] = 0.9 + 0.01 * rng.standard_normal((12, 12, 12))  # "white matter"
    brain = np.ones(image.shape, np.uint8)
    lesion = np.zeros(image.shape, np.uint8)
    lesion[10:14, 10:14, 10:14] = 1
    image[lesion > 0] = 0.2
    out = baselines.lesion_filling(image, lesion, brain, seed=1)
    assert abs(out[lesion > 0].mean() - 0.9) < 0.02
    assert np.array_equal(out[lesion == 0], image[lesion == 0])


def test_ncc_is_invariant_to_gain_and_offset_and_signed():
    from usb_training.evaluation.generation import ncc

    rng = np.random.default_rng(1)
    a = rng.random((10, 10, 10))
    region = np.ones(a.shape, bool)
    assert ncc(a, 2 * a + 1, region) == pytest.approx(1.0)
    assert ncc(a, -a, region) == pytest.approx(-1.0)
    assert abs(ncc(a, rng.random(a.shape), region)) < 0.1


def test_aligned_ncc_undoes_a_shift_that_raw_ncc_punishes():
    from phantoms import brain_mask, grid_affine, phantom
    from usb_training.evaluation.generation import aligned_ncc, ncc

    shape = (32, 40, 32)
    affine = grid_affine(shape, 5.0)
    brain = brain_mask(shape, affine) > 0
    image = (phantom(shape, affine, skull=False, scale=1.0) * brain).astype(np.float32)
    moved = np.roll(image, (2, -1, 1), axis=(0, 1, 2))
    raw = ncc(moved, image, brain)
    aligned = aligned_ncc(moved, image, brain, affine)
    assert aligned > raw + 0.05 and aligned > 0.9, (raw, aligned)


def test_mask_stats_count_26_connected_components_volume_and_tissue_share():
    from usb_training.evaluation.generation import mask_stats

    mask = np.zeros((10, 10, 10), np.uint8)
    mask[1, 1, 1] = mask[2, 2, 2] = 1  # diagonal neighbours: one component
    mask[6:8, 6:8, 6:8] = 1  # 8 voxels, a second component
    wm = np.zeros(mask.shape, bool)
    wm[5:, 5:, 5:] = True
    stats = mask_stats(mask, 2.0, wm, np.ones(mask.shape, bool))
    assert stats["components"] == 2
    assert stats["volume_ml"] == pytest.approx(10 * 8 / 1000)
    assert stats["in_wm"] == pytest.approx(0.8) and stats["in_tissue"] == 1.0
    empty = mask_stats(np.zeros_like(mask), 2.0, wm, wm)
    assert empty["components"] == 0 and empty["volume_ml"] == 0 and empty["centroid_mm"] is None


def test_tissue_fractions_recover_three_classes():
    from usb_training.evaluation.generation import tissue_fractions

    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0.2, 0.03, 2000), rng.normal(0.6, 0.03, 5000), rng.normal(0.95, 0.03, 3000)])
    image = values.reshape(10, 10, 100).astype(np.float32)
    fractions = tissue_fractions(image, np.ones(image.shape, bool))
    assert fractions == pytest.approx([0.2, 0.5, 0.3], abs=0.02)


def test_paired_comparison_of_two_yardstick_runs(tmp_path, capsys):
    """``evaluation.compare`` matches rows on case and mask: B - A per subset with a bootstrap interval and the
    number of wins; a missing method or disjoint cases is a one-line error, exit 2."""
    from usb_training.evaluation import compare

    def run(name: str, shift: dict[str, float]) -> str:
        rows = [{"case": f"c{i}", "site": "deep_wm", "mask": m, "method": "USB defaults", "mean_ratio": 1.0,
                 "psnr": 20.0 + i + shift[m]} for i in range(6) for m in ("exact", "hasty")]
        path = tmp_path / name / "native_metrics.json"
        path.parent.mkdir()
        path.write_text(json.dumps({"rows": rows}))
        return f"{path}:USB defaults"

    a, b = run("old", {"exact": 0.0, "hasty": 0.0}), run("new", {"exact": 1.0, "hasty": -0.5})
    assert compare.main([a, b]) == 0
    out = capsys.readouterr().out
    assert "| exact | 6 | +1.00 | [+1.00, +1.00]" in out and "| hasty | 6 | -0.50" in out and "| 6/12 |" in out
    assert compare.main([a, b.replace("USB defaults", "USB other")]) == 2
    assert "has no method 'USB other'" in capsys.readouterr().err


def test_comparison_counts_the_worst_case_targets_against_the_per_case_oracle(tmp_path, capsys):
    """The worst-case table of ``evaluation.compare``: heals more than 1 dB below the best classical filler of
    their own case and mask (the oracle is the maximum over the file's classical rows, never the unchanged input),
    the worst gap, and the cases whose exact mask heals worse than their hasty one."""
    from usb_training.evaluation import compare

    usb = {("c0", "exact"): 25.0, ("c0", "hasty"): 26.5, ("c1", "exact"): 30.0, ("c1", "hasty"): 29.0,
           ("c2", "exact"): 20.0, ("c2", "hasty"): 19.9}
    best = {("c0", "exact"): 24.0, ("c0", "hasty"): 24.0, ("c1", "exact"): 31.5, ("c1", "hasty"): 29.5,
            ("c2", "exact"): 21.2, ("c2", "hasty"): 19.0}
    rows = [{"case": c, "site": "cortex", "mask": m, "method": "USB defaults", "kind": "usb", "mean_ratio": 1.0,
             "psnr": v} for (c, m), v in usb.items()]
    rows += [{"case": c, "site": "cortex", "mask": m, "method": name, "kind": "classical", "mean_ratio": 1.0,
              "psnr": v - drop} for (c, m), v in best.items() for name, drop in (("NAWM", 0.0), ("biharmonic", 3.0))]
    rows += [{"case": c, "site": "cortex", "mask": m, "method": "input (no change)", "kind": "input",
              "mean_ratio": 0.9, "psnr": 40.0} for c, m in usb]
    path = tmp_path / "run" / "native_metrics.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"rows": rows}))

    label, got, oracle = compare._rows(f"{path}:USB defaults")
    assert oracle[("c1", "exact")] == 31.5  # the best filler, not the input's 40 dB
    result = compare.worst_cases(got, oracle, sorted(got))
    # gaps: c0 +1.0/+2.5, c1 -1.5/-0.5, c2 -1.2/+0.9: two below -1 dB, the worst -1.5;
    # exact - hasty: c0 -1.5, c1 +1.0, c2 +0.1: one case worse, by more than 1 dB
    assert result == {"n": 6, "below": 2, "worst": pytest.approx(-1.5), "cases": 3, "exact_worse": 1,
                      "exact_worse_db": 1}
    assert compare.main([f"{path}:USB defaults", f"{path}:USB defaults"]) == 0
    out = capsys.readouterr().out
    assert "| heals > 1 dB below the best classical filler of their case | 2/6 | 2/6 |" in out
    assert "| exact mask worse than the hasty one | 1/3 (1 by > 1 dB) | 1/3 (1 by > 1 dB) |" in out


def test_a_held_out_yardstick_run_is_recorded_in_the_bundle_and_usb_info_prints_it(tmp_path, capsys):
    """``evaluation.record`` writes the yardstick of a held-out run (PSNR, interval, the worst-case counts, the
    classical set's size, the commit) into bundle.json, leaving the rest of it as it was, and ``usb info`` prints
    it; a run on a training source or thick slices, without the defaults' row or per-heal rows, with a failed heal,
    or from an engine that was not a committed checkout is refused with a one-line error (exit 2) and the bundle
    is unchanged."""
    import shutil

    from USBLib.apps.info import metric_lines
    from USBLib.core import bundle as bundle_mod
    from usb_training.evaluation import record

    usb = {("c0", "exact"): 25.0, ("c0", "hasty"): 26.5, ("c1", "exact"): 30.0, ("c1", "hasty"): 29.0}
    best = {("c0", "exact"): 24.0, ("c0", "hasty"): 24.0, ("c1", "exact"): 31.5, ("c1", "hasty"): 29.5}
    rows = [{"case": c, "site": "cortex", "mask": m, "method": "USB defaults", "kind": "usb", "psnr": v}
            for (c, m), v in usb.items()]
    rows += [{"case": c, "site": "cortex", "mask": m, "method": name, "kind": "classical", "psnr": v - drop}
             for (c, m), v in best.items() for name, drop in (("NAWM", 0.0), ("biharmonic", 3.0))]
    both = {"usb": 27.625, "vs_best": 0.375, "vs_best_ci": [-1.0, 1.75], "worst": -1.5, "vs_preset": 3.375,
            "vs_preset_ci": [2.0, 4.75]}
    native = {"source": "ixi555", "held_out": True, "cases": 2, "masks": ["exact", "hasty"],
              "classical": ["NAWM", "biharmonic"], "usb_settings": {"USB defaults": {}}, "preset": "biharmonic",
              "classical_brighten_only": False, "engine": {"commit": "0123456789" * 4, "uncommitted_diff_sha1": ""},
              "summary": {"configs": {"USB defaults": {"both": both}}}, "rows": rows}
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    shutil.copy(bundle_mod.resolve(None) / bundle_mod.BUNDLE_FILE, bundle)
    before = json.loads((bundle / bundle_mod.BUNDLE_FILE).read_text())
    run = tmp_path / "native_metrics.json"
    run.write_text(json.dumps(native))

    assert record.main([str(run), "--bundle", str(bundle)]) == 0
    assert "USB defaults 27.62 dB, +0.38 over the best of 2 classical fillers" in capsys.readouterr().out
    after = json.loads((bundle / bundle_mod.BUNDLE_FILE).read_text())
    got = after["metrics"].pop("heal_yardstick")
    before["metrics"].pop("heal_yardstick", None)
    assert after == before  # nothing else changed
    # gaps to the per-case best: c0 +1.0/+2.5, c1 -1.5/-0.5; exact - hasty: c0 -1.5, c1 +1.0
    assert got["configs"]["USB defaults"] == {
        "psnr_db": 27.62, "vs_best_classical_db": 0.38, "vs_best_classical_ci": [-1.0, 1.75],
        "worst_vs_best_classical_db": -1.5, "vs_chosen_filler_db": 3.38, "vs_chosen_filler_ci": [2.0, 4.75],
        "heals": 4, "heals_below_best_classical": 1, "exact_worse_than_hasty": 1, "cases_with_both_masks": 2}
    assert got["classical_fillers"] == 2 and got["commit"] == "0123456789" * 4
    text = "\n".join(metric_lines({"heal_yardstick": got}))
    assert "the best of 2 classical fillers per case" in text and "+0.38 [-1.00, +1.75]" in text
    assert "1 of 4 heals more than 1 dB below" in text and "at commit 0123456" in text

    failed = [dict(rows[0], failed="RuntimeError: out of memory")] + rows[1:]
    for change in ({"source": "mni2009c", "held_out": False}, {"usb_settings": {"USB d1": {"dilation_mm": 1}}},
                   {"source": "ixi555 with 3x thicker slices"}, {"rows": []}, {"rows": failed},
                   {"engine": {"commit": "not a git checkout"}}, {"engine": {"commit": "0" * 40,
                                                                          "uncommitted_diff_sha1": "ab12"}}):
        run.write_text(json.dumps(native | change))
        assert record.main([str(run), "--bundle", str(bundle)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("record: error: ") and err.count("\n") == 1
        assert json.loads((bundle / bundle_mod.BUNDLE_FILE).read_text())["metrics"]["heal_yardstick"] == got
