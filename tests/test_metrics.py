import numpy as np
import pytest

from workbench.metrics import brightness_statistics, fairness_discrepancy, frechet_distance, psnr


def test_frechet_distance_of_diagonal_gaussians_by_hand():
    # Two samples constructed so their empirical means and covariances are exactly known.
    base = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])  # mean 0, cov = 4/3 I
    a = base
    b = 2.0 * base + np.array([3.0, 0.0])  # mean (3, 0), cov = 16/3 I
    # |mu|^2 + tr(Sa + Sb - 2 sqrt(Sa Sb)) = 9 + 2 * (4/3 + 16/3 - 2 * 8/3) = 9 + 8/3
    assert frechet_distance(a, b) == pytest.approx(9 + 8 / 3, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_rejects_mismatched_features():
    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((4, 2)), np.zeros((4, 3)))


def test_fairness_discrepancy_by_hand():
    # batch histogram (0.75, 0.25) against (0.5, 0.5): sqrt(0.25^2 * 2)
    assert fairness_discrepancy([0.5, 0.5], [0, 0, 0, 1]) == pytest.approx(np.sqrt(0.125))
    assert fairness_discrepancy([0.2, 0.3, 0.5], [0, 0, 1, 1, 1, 2, 2, 2, 2, 2]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="sums to 1"):
        fairness_discrepancy([0.5, 0.6], [0, 1])
    with pytest.raises(ValueError, match="predicted_labels"):
        fairness_discrepancy([0.5, 0.5], [0, 2])


def test_psnr_by_hand():
    a = np.zeros((1, 3, 4, 4))
    b = np.full((1, 3, 4, 4), 0.1)  # MSE 0.01 -> 20 dB at range 1
    assert psnr(b, a) == pytest.approx(20.0)
    assert psnr(2 * b, 2 * a, data_range=2.0) == pytest.approx(20.0)
    assert psnr(a, a) == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        psnr(a, a[..., :2])


def test_brightness_statistics_by_hand():
    images = np.stack([np.zeros((3, 2, 2)), np.ones((3, 2, 2)), np.full((3, 2, 2), 0.5)])
    stats = brightness_statistics(images)
    np.testing.assert_allclose(stats["per_image"], [0.0, 1.0, 0.5])
    assert stats["min"] == 0.0 and stats["max"] == 1.0 and stats["mean"] == pytest.approx(0.5)
    assert stats["std"] == pytest.approx(np.std([0.0, 1.0, 0.5]))
