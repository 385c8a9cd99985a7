"""Image-quality and distribution metrics used by the evaluation, restricted to regions of the volume."""
from __future__ import annotations

import numpy as np


def l1(a: np.ndarray, b: np.ndarray, region: np.ndarray) -> float:
    """Mean absolute difference inside ``region``."""
    r = region > 0
    return float(np.abs(a[r].astype(np.float64) - b[r]).mean())


def psnr(a: np.ndarray, b: np.ndarray, region: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(range^2 / MSE) inside ``region`` (inf when identical)."""
    r = region > 0
    mse = float(((a[r].astype(np.float64) - b[r]) ** 2).mean())
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def ssim_map(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Voxel-wise 3D SSIM (Gaussian window, sigma 1.5, scikit-image)."""
    from skimage.metrics import structural_similarity

    _, smap = structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=data_range,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False, full=True)
    return smap


def ssim(a: np.ndarray, b: np.ndarray, region: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM inside ``region``."""
    return float(ssim_map(a, b, data_range)[region > 0].mean())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1 when both are empty)."""
    a, b = a > 0, b > 0
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else float(2 * (a & b).sum() / denom)


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel k(a, b) = (a.b / d + 1)^3: the KID estimator."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 2 or len(y) < 2:
        return float("nan")  # the unbiased estimator needs two samples per set
    d = x.shape[1]
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


def gaussian_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Biased MMD^2 with a Gaussian kernel whose width is the median pairwise distance."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    z = np.concatenate([x, y])
    d2 = ((z[:, None] - z[None]) ** 2).sum(-1)
    sigma2 = float(np.median(d2[d2 > 0])) if np.any(d2 > 0) else 1.0
    k = np.exp(-d2 / sigma2)
    m = len(x)
    return float(k[:m, :m].mean() + k[m:, m:].mean() - 2 * k[:m, m:].mean())
