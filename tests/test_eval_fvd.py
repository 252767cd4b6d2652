"""Fréchet distance and the FVD metric: exactness, behaviour, distributed sync, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from eval.frechet import bootstrap_interval, frechet_distance, frechet_distance_features, mean_cov
from eval.fvd import FrechetVideoDistance
from tests.gloo import run_in_gloo_group


def scipy_fd(x: np.ndarray, y: np.ndarray, bias: bool) -> float:
    """Independent reference: numpy covariance + scipy eigvals of Σ1Σ2 (and sqrtm when well-conditioned)."""
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False, bias=bias), np.cov(y, rowvar=False, bias=bias)
    lam = scipy.linalg.eigvals(c1 @ c2).real.clip(min=0)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(lam).sum())


def scipy_fd_sqrtm(x, y, bias):
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False, bias=bias), np.cov(y, rowvar=False, bias=bias)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


def features(n, d, seed, shift=0.0, mix=True):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, d))
    if mix:  # correlated dimensions with a spread of variances
        x = x @ (g.normal(size=(d, d)) / np.sqrt(d)) * np.linspace(0.2, 3, d)
    return x + shift


@pytest.mark.parametrize("bias", [True, False])
def test_matches_scipy_well_conditioned(bias):
    x, y = features(3000, 64, 0), features(2500, 64, 1, shift=0.3)
    ours = float(frechet_distance_features(torch.from_numpy(x), torch.from_numpy(y), unbiased=not bias))
    assert ours == pytest.approx(scipy_fd(x, y, bias), rel=1e-6)
    assert ours == pytest.approx(scipy_fd_sqrtm(x, y, bias), rel=1e-6)


@pytest.mark.parametrize("n", [40, 401])  # N < D: rank-deficient; N = D + 1: barely full rank
def test_matches_scipy_near_singular(n):
    d = 400
    x, y = features(n, d, 2), features(n, d, 3, shift=0.05)
    c1 = np.cov(x, rowvar=False, bias=True)
    assert np.linalg.cond(c1) > 1e8  # really near-singular
    ours = float(frechet_distance_features(torch.from_numpy(x), torch.from_numpy(y)))
    assert ours == pytest.approx(scipy_fd(x, y, True), rel=1e-6)


def test_self_distance_zero_and_monotone():
    x = torch.from_numpy(features(500, 400, 4))
    noise = torch.from_numpy(features(500, 400, 5, mix=False))
    m = FrechetVideoDistance(feature_dim=400)
    m.update(features=x, real=True)
    m.update(features=x, real=False)
    assert float(m.compute()) <= 1e-6

    values = []
    for eps in [0.05, 0.1, 0.2, 0.4, 0.8]:
        m = FrechetVideoDistance(feature_dim=400, keep_features=False)
        m.update(features=x, real=True)
        m.update(features=x + eps * (noise + 0.5), real=False)
        values.append(float(m.compute()))
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[0] > 1e-3


def test_sums_equal_two_pass_and_bootstrap_brackets_value():
    x = torch.from_numpy(features(300, 32, 6))
    y = torch.from_numpy(features(300, 32, 7, shift=0.2))
    m = FrechetVideoDistance(feature_dim=32, unbiased=True)
    for chunk in x.split(70):
        m.update(features=chunk, real=True)
    m.update(features=y, real=False)
    ref = frechet_distance(*mean_cov(x, True), *mean_cov(y, True))
    assert float(m.compute()) == pytest.approx(float(ref), rel=1e-9)
    r = m.result(num_resamples=50)
    assert r.low < r.value < r.high
    assert (r.num_real, r.num_fake, r.unbiased, r.smoke) == (300, 300, True, True)
    assert "(smoke)" in str(r) and "[" in str(r)
    # the interval is reproducible for a given seed and depends on the data
    assert bootstrap_interval(x, y, True, 50, seed=0) == bootstrap_interval(x, y, True, 50, seed=0)


# -- distributed --------------------------------------------------------------
def _worker(rank, world, x, y, out, real_on_rank0_only=False):
    m = FrechetVideoDistance(feature_dim=x.shape[1])
    # uneven shards on purpose: the cat states must gather different sizes
    xs, ys = x.tensor_split(world)[rank], y.tensor_split(world)[rank]
    if real_on_rank0_only:  # a process with no real videos at all (its list state stays empty)
        xs = x if rank == 0 else x[:0]
    if len(xs):
        m.update(features=xs, real=True)
    m.update(features=ys, real=False)
    value = float(m.compute())
    r = m.result(num_resamples=20)
    out[rank] = torch.tensor([value, r.low, r.high, r.num_real, r.num_fake], dtype=torch.float64)


@pytest.mark.parametrize("real_on_rank0_only", [False, True])
def test_two_process_gloo_matches_single_process(real_on_rank0_only):
    x = torch.from_numpy(features(101, 16, 8))
    y = torch.from_numpy(features(77, 16, 9, shift=0.4))
    single = FrechetVideoDistance(feature_dim=16)
    single.update(features=x, real=True)
    single.update(features=y, real=False)
    r = single.result(num_resamples=20)

    out = torch.zeros(2, 5, dtype=torch.float64).share_memory_()
    run_in_gloo_group(_worker, 2, x, y, out, real_on_rank0_only)
    for rank in range(2):
        value, low, high, n_real, n_fake = out[rank].tolist()
        assert value == pytest.approx(r.value, rel=1e-9)
        assert (n_real, n_fake) == (101, 77)
        # gathered features are the same rows (rank order), so the same bootstrap
        assert low == pytest.approx(r.low, rel=1e-9) and high == pytest.approx(r.high, rel=1e-9)


# -- bad input ----------------------------------------------------------------
def test_too_few_videos():
    m = FrechetVideoDistance(feature_dim=8)
    m.update(features=torch.randn(5, 8), real=True)
    m.update(features=torch.randn(1, 8), real=False)
    with pytest.raises(ValueError, match="at least 2 fake videos.*got 1"):
        m.compute()


def test_nan_features_name_the_video():
    m = FrechetVideoDistance(feature_dim=4)
    f = torch.randn(3, 4)
    f[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN.*b.mp4"):
        m.update(features=f, real=False, names=["a.mp4", "b.mp4", "c.mp4"])


@pytest.fixture(scope="module")
def i3d():
    from eval.i3d import load_i3d

    return load_i3d(None)  # the real network, random weights (smoke): no weights can be downloaded here


def test_clip_length_is_cleared_by_reset_and_checked_across_merged_metrics(i3d):
    videos = {t: torch.zeros(1, t, 16, 16, 3, dtype=torch.uint8) for t in (9, 12)}
    m = FrechetVideoDistance(i3d)
    m.update(videos[9], real=True)
    m.reset()
    m.update(videos[12], real=True)  # a new run at another length
    assert m.clip_length == 12
    other = FrechetVideoDistance(i3d)
    other.update(videos[9], real=True)
    other.update(videos[9], real=False)
    m.update(videos[12], real=False)
    m.merge_state(other)
    with pytest.raises(ValueError, match="clips of 9 to 12 frames"):
        m.result(num_resamples=0)


def test_short_clip_mixed_sizes_and_lengths_are_named(i3d):
    m = FrechetVideoDistance(i3d)
    with pytest.raises(ValueError, match="short.mp4: 8 frames.*at least 9"):
        m.update(torch.zeros(1, 8, 16, 16, 3, dtype=torch.uint8), real=True, names=["short.mp4"])
    vids = [torch.zeros(9, 16, 16, 3, dtype=torch.uint8), torch.zeros(9, 20, 16, 3, dtype=torch.uint8)]
    with pytest.raises(ValueError, match=r"mixed shapes.*b.mp4 \(9, 20, 16, 3\)"):
        m.update(vids, real=True, names=["a.mp4", "b.mp4"])
    m.update(torch.zeros(1, 9, 16, 16, 3, dtype=torch.uint8), real=True)
    with pytest.raises(ValueError, match="12 frames.*earlier clips had 9"):
        m.update(torch.zeros(2, 12, 16, 16, 3, dtype=torch.uint8), real=False, names=["x", "y"])
    with pytest.raises(TypeError, match="uint8"):
        m.update(torch.zeros(2, 9, 16, 16, 3), real=False)
