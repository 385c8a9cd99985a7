"""Lesion pre-fill: harmonic and biharmonic interpolation from the surroundings, touching only mask voxels."""
from __future__ import annotations

import numpy as np
import pytest

from USBLib.imaging.prefill import prefill

I, J, K = np.meshgrid(np.arange(30), np.arange(32), np.arange(28), indexing="ij")
LINEAR = (2.0 * I - J + 0.5 * K).astype(np.float32)
QUADRATIC = ((I - 12.0) ** 2 + 0.5 * (J - 10.0) ** 2 - (K - 9.0) ** 2).astype(np.float32)  # Laplacian = 1


def box_mask(*slices) -> np.ndarray:
    mask = np.zeros(LINEAR.shape, np.uint8)
    mask[slices] = 1
    return mask


@pytest.mark.parametrize("method", ["harmonic", "biharmonic"])
def test_linear_trends_are_filled_exactly_and_only_mask_voxels_change(method):
    mask = box_mask(slice(8, 18), slice(10, 20), slice(9, 16))
    corrupted = np.where(mask > 0, -500.0, LINEAR).astype(np.float32)
    out = prefill(corrupted, mask, method)
    np.testing.assert_allclose(out[mask > 0], LINEAR[mask > 0], atol=1e-3)
    assert np.array_equal(out[mask == 0], corrupted[mask == 0])


def test_biharmonic_reproduces_curvature_that_harmonic_cannot():
    mask = box_mask(slice(8, 18), slice(10, 20), slice(9, 16))
    bi = prefill(QUADRATIC, mask, "biharmonic")
    harm = prefill(QUADRATIC, mask, "harmonic")
    np.testing.assert_allclose(bi[mask > 0], QUADRATIC[mask > 0], atol=1e-3)
    assert np.abs(harm - QUADRATIC)[mask > 0].max() > 1.0


def test_two_lesions_an_edge_lesion_and_the_trivial_cases():
    mask = box_mask(slice(3, 7), slice(3, 7), slice(3, 7)) | box_mask(slice(20, 26), slice(22, 28), slice(0, 5))
    out = prefill(LINEAR, mask, "biharmonic")
    inner = box_mask(slice(3, 7), slice(3, 7), slice(3, 7)) > 0
    np.testing.assert_allclose(out[inner], LINEAR[inner], atol=1e-3)
    assert np.isfinite(out).all()
    assert out.dtype == np.float32
    assert np.array_equal(prefill(LINEAR, np.zeros_like(mask), "biharmonic"), LINEAR)
    assert np.array_equal(prefill(LINEAR, mask, "none"), LINEAR)
    with pytest.raises(ValueError, match="unknown prefill"):
        prefill(LINEAR, mask, "median")


@pytest.mark.parametrize("method", ["harmonic", "biharmonic"])
def test_a_lesion_on_the_volume_face_is_filled_there_too(method):
    """Face voxels are filled from a mirrored boundary, not kept at their lesion values: a trend along the face
    (none across it) is reproduced on the face slice itself."""
    along = (-J + 0.5 * K + 100.0).astype(np.float32)  # constant across the i = 0 face
    mask = box_mask(slice(0, 5), slice(10, 18), slice(8, 14))
    out = prefill(np.where(mask > 0, 20.0, along).astype(np.float32), mask, method)
    np.testing.assert_allclose(out[mask > 0], along[mask > 0], atol=1e-2)
    assert np.array_equal(out[mask == 0], along[mask == 0])


def test_a_large_fill_is_solved_iteratively_to_the_direct_solution(monkeypatch):
    """A fill with more unknowns than ``DIRECT_LIMIT`` is solved by conjugate gradients (a direct LU took most of
    a large heal's time): the same fill as the direct solve, to far below a scan's precision, and still exact on
    the trends each fill reproduces. A CG run that does not converge falls back to the direct solve."""
    import USBLib.imaging.prefill as prefill_module

    mask = box_mask(slice(4, 26), slice(4, 28), slice(4, 24))
    assert int(mask.sum()) > prefill_module.DIRECT_LIMIT
    corrupted = np.where(mask > 0, -500.0, QUADRATIC).astype(np.float32)
    iterative = prefill(corrupted, mask, "biharmonic")
    np.testing.assert_allclose(iterative[mask > 0], QUADRATIC[mask > 0], atol=1e-3)
    np.testing.assert_allclose(prefill(np.where(mask > 0, 7.0, LINEAR), mask, "harmonic")[mask > 0],
                               LINEAR[mask > 0], atol=1e-3)
    monkeypatch.setattr(prefill_module, "DIRECT_LIMIT", 10 ** 9)
    direct = prefill(corrupted, mask, "biharmonic")
    np.testing.assert_allclose(iterative, direct, atol=1e-4)
    monkeypatch.setattr(prefill_module, "DIRECT_LIMIT", 0)
    monkeypatch.setattr(prefill_module, "CG_MAXITER", 1)
    assert np.array_equal(prefill(corrupted, mask, "biharmonic"), direct)
