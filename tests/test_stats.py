"""rlq.stats against hand-computed values (rliable semantics, pure numpy)."""
from __future__ import annotations

import functools

import numpy as np
import pytest

from rlq import stats


# ------------------------------------------------------------------------------------------ aggregates
@pytest.mark.parametrize("values, expected", [
    (np.arange(1, 9), 4.5),            # n=8: cut 2 each side -> mean(3, 4, 5, 6)
    (np.arange(1, 6), 3.0),            # n=5: cut 1 -> mean(2, 3, 4)
    (np.arange(1, 8), 4.0),            # n=7: cut 1 -> mean(2..6)
    (np.array([5.0, 1.0, 3.0]), 3.0),  # n=3: cut 0 -> plain mean
    (np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 1000]), 5.5),  # n=10: cut 2 -> mean(3..8), outlier ignored
])
def test_iqm_small_arrays(values, expected):
    assert stats.iqm(values) == pytest.approx(expected)


def test_iqm_pools_runs_and_tasks():
    scores = np.array([[1.0, 100.0], [2.0, 3.0], [4.0, 5.0]])  # pooled sorted: 1 2 3 4 5 100, cut 1
    assert stats.iqm(scores) == pytest.approx(3.5)


def test_aggregates_batched_match_per_matrix():
    rng = np.random.default_rng(1)
    batch = rng.normal(size=(4, 5, 3))
    for fn in (stats.iqm, stats.mean, stats.median, stats.optimality_gap):
        np.testing.assert_allclose(fn(batch), [fn(m) for m in batch])


def test_mean_median_of_task_means():
    scores = np.array([[1.0, 2.0, 10.0], [3.0, 4.0, 20.0]])  # task means 2, 3, 15
    assert stats.median(scores) == pytest.approx(3.0)
    assert stats.mean(scores) == pytest.approx(20.0 / 3)


def test_optimality_gap():
    scores = np.array([[0.5, 1.5], [1.0, 0.0]])
    assert stats.optimality_gap(scores) == pytest.approx((0.5 + 0 + 0 + 1.0) / 4)
    assert stats.optimality_gap(scores, gamma=0.5) == pytest.approx(0.5 / 4)
    assert stats.optimality_gap(np.full((3, 2), 2.0)) == 0.0


# ------------------------------------------------------------------------------- stratified bootstrap
def test_identical_runs_collapse_interval():
    scores = np.tile([[0.3, 1.2, 5.0, -0.4]], (5, 1))
    est = stats.interval_estimates({"a": scores}, reps=200)
    assert set(est["a"]) == {"IQM", "Median", "Mean", "Optimality Gap"}
    for point, low, high in est["a"].values():
        assert low == pytest.approx(point) and high == pytest.approx(point)
    assert est["a"]["Mean"][0] == pytest.approx(np.mean([0.3, 1.2, 5.0, -0.4]))


def test_bootstrap_std_of_mean_matches_standard_error():
    n = 50
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(n, 1))
    boot = stats.stratified_bootstrap(x, stats.mean, reps=4000, seed=3)
    assert boot.shape == (4000,)
    se = x.std() / np.sqrt(n)  # the bootstrap estimates the plug-in (ddof=0) standard error
    assert boot.std() == pytest.approx(se, rel=0.08)
    assert boot.mean() == pytest.approx(x.mean(), abs=0.2 * se)


def test_stratification_keeps_runs_within_tasks():
    n, t = 4, 3
    # value = 100 * task + run: the task and run of every resampled entry can be read back
    scores = 100.0 * np.arange(t)[None, :] + np.arange(n)[:, None]

    def check(m: np.ndarray) -> float:
        assert m.shape == (n, t)  # num_runs rows for every task
        assert np.array_equal(m // 100, np.broadcast_to(np.arange(t), (n, t)))  # never crosses tasks
        runs = m % 100
        return float(np.any(runs != runs[:, :1]))  # 1 if a row mixes different runs across tasks

    mixed = stats.stratified_bootstrap(scores, check, reps=200, seed=0)
    assert mixed.mean() > 0.9  # tasks are resampled independently, not whole rows

    # vectorized path: per-task counts are preserved in every replicate
    def per_task_rows(b: np.ndarray) -> np.ndarray:
        return np.stack([(b // 100 == c).sum(axis=-2)[..., c] for c in range(t)], axis=-1)

    counts = stats.stratified_bootstrap(scores, per_task_rows, reps=100, vectorized=True)
    assert counts.shape == (100, t) and np.all(counts == n)


def test_bootstrap_reproducible_and_paths_agree():
    x = np.random.default_rng(5).normal(size=(6, 4))
    a = stats.stratified_bootstrap(x, stats.iqm, reps=300, seed=11)
    b = stats.stratified_bootstrap(x, stats.iqm, reps=300, seed=11)
    c = stats.stratified_bootstrap(x, stats.iqm, reps=300, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    loop = stats.stratified_bootstrap(x, lambda m: stats.iqm(m), reps=300, seed=11)  # per-replicate calls
    np.testing.assert_allclose(a, loop)
    og = functools.partial(stats.optimality_gap, gamma=0.5)
    np.testing.assert_allclose(stats.stratified_bootstrap(x, og, reps=50, seed=1),
                               stats.stratified_bootstrap(x, lambda m: og(m), reps=50, seed=1))


def test_bootstrap_chunking(monkeypatch):
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 50)  # several chunks of replicates
    x = np.random.default_rng(2).normal(size=(5, 3))
    boot = stats.stratified_bootstrap(x, stats.mean, reps=37, seed=0)
    assert boot.shape == (37,) and np.isfinite(boot).all()


def test_interval_methods_and_validation():
    x = np.random.default_rng(4).exponential(size=(10, 3))
    p = stats.interval_estimates({"a": x}, {"Mean": stats.mean}, reps=500, seed=2)["a"]["Mean"]
    b = stats.interval_estimates({"a": x}, {"Mean": stats.mean}, reps=500, seed=2, method="basic")["a"]["Mean"]
    assert p[0] == b[0] == pytest.approx(x.mean())
    assert p[1] < p[0] < p[2]
    assert b[1] == pytest.approx(2 * p[0] - p[2]) and b[2] == pytest.approx(2 * p[0] - p[1])
    wide = stats.interval_estimates({"a": x}, {"Mean": stats.mean}, reps=500, seed=2, confidence=0.99)
    assert wide["a"]["Mean"][1] <= p[1] and wide["a"]["Mean"][2] >= p[2]
    with pytest.raises(ValueError):
        stats.interval_estimates({"a": x}, reps=10, method="bca")
    with pytest.raises(ValueError):
        stats.interval_estimates({"a": x}, reps=10, confidence=95)
    with pytest.raises(ValueError):
        stats.stratified_bootstrap(x, stats.mean, reps=0)


# ------------------------------------------------------------------------------- performance profile
def test_performance_profile_tiny_matrix():
    scores = np.array([[0.1, 0.5], [0.9, 2.0]])
    taus = np.array([0.0, 0.5, 1.0, 3.0])
    profile, low, high = stats.performance_profile({"a": scores}, taus)["a"]
    np.testing.assert_allclose(profile, [1.0, 0.5, 0.25, 0.0])  # strict ">": 0.5 does not exceed 0.5
    assert low is None and high is None


def test_performance_profile_ci_matches_bootstrap():
    x = np.random.default_rng(7).normal(1.0, 1.0, size=(5, 4))
    taus = np.linspace(-1, 3, 9)
    profile, low, high = stats.performance_profile({"a": x, "b": x + 1}, taus, reps=400, seed=3)["a"]
    assert profile.shape == low.shape == high.shape == (9,)
    assert np.all(low <= profile + 1e-12) and np.all(profile <= high + 1e-12)
    for k, tau in enumerate(taus):  # same replicates as stratified_bootstrap with the same seed
        boot = stats.stratified_bootstrap(x, lambda m, tau=tau: float((m > tau).mean()), reps=400, seed=3)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        assert low[k] == pytest.approx(lo) and high[k] == pytest.approx(hi)
    constant = stats.performance_profile({"c": np.ones((3, 2))}, [0.5, 1.0], reps=50)["c"]
    np.testing.assert_allclose(constant[1], [1.0, 0.0])
    np.testing.assert_allclose(constant[2], [1.0, 0.0])


# -------------------------------------------------------------------------- probability of improvement
def _poi_bruteforce(x: np.ndarray, y: np.ndarray) -> float:
    per_task = []
    for c in range(x.shape[1]):
        u = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in x[:, c] for b in y[:, c])
        per_task.append(u / (len(x) * len(y)))
    return float(np.mean(per_task))


def test_probability_of_improvement_hand_computed():
    # task 0: x=[1,3,4] vs y=[2,3]: 1 loses twice; 3 beats 2, ties 3 (1/2); 4 wins twice -> 3.5/6
    # task 1: x all 0 vs y all 1 -> 0
    x = np.array([[1.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    y = np.array([[2.0, 1.0], [3.0, 1.0]])
    point, low, high = stats.probability_of_improvement(x, y, reps=0)
    assert point == pytest.approx((3.5 / 6 + 0.0) / 2)
    assert low == high == point
    assert stats.probability_of_improvement(y, x, reps=0)[0] == pytest.approx(1 - point)


def test_probability_of_improvement_self_and_random():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(5, 4)).astype(float)  # many ties
    assert stats.probability_of_improvement(x, x, reps=0)[0] == pytest.approx(0.5)
    y = rng.normal(size=(7, 4))
    assert stats.probability_of_improvement(x, y, reps=0)[0] == pytest.approx(_poi_bruteforce(x, y))


@pytest.mark.parametrize("chunk", [None, 200])
def test_probability_of_improvement_bootstrap_matches_loop(monkeypatch, chunk):
    if chunk is not None:
        monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", chunk)
    rng = np.random.default_rng(1)
    x, y = rng.normal(0.3, 1, size=(4, 3)), rng.normal(size=(3, 3))
    n, m, t = 4, 3, 3
    reps, seed = 150, 9
    point, low, high = stats.probability_of_improvement(x, y, reps=reps, seed=seed)
    # reference: replay the same draws, one replicate at a time
    ref_rng = np.random.default_rng(seed)
    size = max(1, stats._CHUNK_ELEMENTS // (n * t * (1 + m)))
    boot = []
    for start in range(0, reps, size):
        b = min(size, reps - start)
        ix = ref_rng.integers(0, n, size=(b, n, t))
        iy = ref_rng.integers(0, m, size=(b, m, t))
        for r in range(b):
            boot.append(_poi_bruteforce(x[ix[r], np.arange(t)], y[iy[r], np.arange(t)]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert point == pytest.approx(_poi_bruteforce(x, y))
    assert low == pytest.approx(lo) and high == pytest.approx(hi)
    assert stats.probability_of_improvement(x, y, reps=reps, seed=seed) == (point, low, high)


def test_probability_of_improvement_identical_constant_runs():
    x = np.tile([[1.0, 2.0]], (4, 1))
    assert stats.probability_of_improvement(x, x + 1, reps=100) == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError):
        stats.probability_of_improvement(np.ones((3, 2)), np.ones((3, 3)))


# ---------------------------------------------------------------------------------------- formatting
def test_format_interval():
    assert stats.format_interval(0.5123, 0.449, 0.5849) == "0.51 [0.45, 0.58]"
    assert stats.format_interval(1, 0, 2, digits=1) == "1.0 [0.0, 2.0]"


# ------------------------------------------------------------------------------ Atari normalization
def test_atari_tables():
    assert len(stats.ATARI_HUMAN) == len(stats.ATARI_RANDOM) == len(stats.ATARI_GAMES) == 57
    assert set(stats.ATARI_HUMAN) == set(stats.ATARI_RANDOM)
    for game in ("Pong", "Breakout", "MsPacman", "SpaceInvaders", "Seaquest", "MontezumaRevenge"):
        assert game in stats.ATARI_HUMAN
    assert all(stats.ATARI_HUMAN[g] > stats.ATARI_RANDOM[g] for g in stats.ATARI_GAMES)


def test_human_normalized_pong_breakout():
    assert stats.ATARI_RANDOM["Pong"] == -20.7 and stats.ATARI_HUMAN["Pong"] == 14.6
    assert stats.ATARI_RANDOM["Breakout"] == 1.7 and stats.ATARI_HUMAN["Breakout"] == 30.5
    assert stats.human_normalized(14.6, "Pong") == pytest.approx(1.0)
    assert stats.human_normalized(-20.7, "Pong") == pytest.approx(0.0)
    assert stats.human_normalized(21.0, "Pong") == pytest.approx(41.7 / 35.3)
    assert stats.human_normalized(16.1, "Breakout") == pytest.approx(0.5)
    assert stats.human_normalized(400.0, "Breakout") == pytest.approx(398.3 / 28.8)
    np.testing.assert_allclose(stats.human_normalized(np.array([1.7, 30.5]), "Breakout"), [0.0, 1.0])
    # gymnasium ids and snake_case resolve to the same game
    for name in ("ALE/Pong-v5", "PongNoFrameskip-v4", "pong"):
        assert stats.human_normalized(14.6, name) == pytest.approx(1.0)
    assert stats.human_normalized(307.3, "ms_pacman") == pytest.approx(0.0)
    # one game per column of a (runs, tasks) matrix
    raw = np.array([[14.6, 1.7], [-20.7, 30.5]])
    np.testing.assert_allclose(stats.human_normalized(raw, ["Pong", "Breakout"]), [[1.0, 0.0], [0.0, 1.0]])


def test_human_normalized_unknown_game():
    with pytest.raises(ValueError, match="ATARI_GAMES") as err:
        stats.human_normalized(1.0, "Pongg")
    assert "\n" not in str(err.value) and "'Pongg'" in str(err.value)
    with pytest.raises(ValueError):
        stats.human_normalized(1.0, "CartPole-v1")


# ------------------------------------------------------------- known bootstrap behaviour (additions)
def test_bootstrap_two_runs_exact_distribution():
    # runs [0, 1] of one task: a resample of 2 draws has mean 0 (1/4), 0.5 (1/2) or 1 (1/4)
    boot = stats.stratified_bootstrap(np.array([0.0, 1.0]), stats.mean, reps=20000, seed=0)
    values, counts = np.unique(boot, return_counts=True)
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0])
    np.testing.assert_allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.015)
    est = stats.interval_estimates({"a": np.array([0.0, 1.0])}, {"Mean": stats.mean}, reps=20000)["a"]["Mean"]
    assert est == (0.5, 0.0, 1.0)  # the 2.5th / 97.5th percentiles of that distribution


def test_bootstrap_single_run_per_task_has_no_spread():
    scores = np.array([[3.0, -1.0, 7.0]])  # one run of each of 3 tasks: every resample is the data
    for name, (point, low, high) in stats.interval_estimates({"a": scores}, reps=100)["a"].items():
        assert low == point == high, name


def test_percentile_interval_coverage_of_the_mean():
    # 95% percentile intervals of the mean of 30 normal runs cover the true mean ~93-95% of the time
    # (the percentile bootstrap under-covers slightly at small n); 400 data sets in one vectorized call
    rng = np.random.default_rng(123)
    n, sets, reps = 30, 400, 1000
    data = rng.normal(2.0, 1.0, size=(sets, n))
    idx = rng.integers(0, n, size=(reps, sets, n))
    boot = np.take_along_axis(data[None], idx, axis=2).mean(axis=2)  # (reps, sets)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    coverage = np.mean((low <= 2.0) & (2.0 <= high))
    assert 0.90 <= coverage <= 0.98
    # the library's interval for one of those data sets matches the same construction
    one = stats.interval_estimates({"a": data[0]}, {"Mean": stats.mean}, reps=4000, seed=1)["a"]["Mean"]
    se = data[0].std() / np.sqrt(n)
    assert one[1] == pytest.approx(data[0].mean() - 1.96 * se, abs=0.35 * se)
    assert one[2] == pytest.approx(data[0].mean() + 1.96 * se, abs=0.35 * se)


def test_iqm_matches_scipy_trim_mean():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(9)
    for shape in [(3, 1), (5, 4), (10, 3), (7, 1), (12, 5)]:
        x = rng.normal(size=shape)
        assert stats.iqm(x) == pytest.approx(scipy_stats.trim_mean(x, 0.25, axis=None))


def test_pooled_median():
    assert stats.pooled_median([4.0, 1.0, 100.0]) == 4.0
    assert stats.pooled_median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert stats.median([4.0, 1.0, 100.0]) == pytest.approx(35.0)  # across-task median: one task -> mean
    scores = np.array([[1.0, 9.0], [2.0, 8.0], [3.0, 7.0]])
    assert stats.pooled_median(scores) == 5.0
    np.testing.assert_allclose(stats.pooled_median(np.stack([scores, scores + 1])), [5.0, 6.0])
    boot = stats.stratified_bootstrap(np.array([1.0, 2.0, 3.0]), stats.pooled_median, reps=200)
    assert set(np.unique(boot)) <= {1.0, 2.0, 3.0}


# ------------------------------------------------------------------------------- learning curves
def test_curve_interval_estimates_hand_computed_and_bootstrap():
    # 4 runs, 3 points; at each point the IQM of 4 values cuts one each side
    curves = np.array([[0.0, 10.0, 20.0], [1.0, 11.0, 50.0], [2.0, 12.0, 30.0], [3.0, 100.0, 40.0]])
    point, low, high = stats.curve_interval_estimates({"a": curves}, reps=0)["a"]
    np.testing.assert_allclose(point, [1.5, 11.5, 35.0])
    np.testing.assert_array_equal(low, point)
    np.testing.assert_array_equal(high, point)
    # with a CI: each point's band is the percentile interval of the same replicates (same seed)
    point, low, high = stats.curve_interval_estimates({"a": curves}, stats.mean, reps=500, seed=4)["a"]
    np.testing.assert_allclose(point, curves.mean(axis=0))
    for k in range(3):
        boot = stats.stratified_bootstrap(curves[:, k], stats.mean, reps=500, seed=4)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        assert low[k] == pytest.approx(lo) and high[k] == pytest.approx(hi)
    assert np.all(low <= point) and np.all(point <= high)


def test_curve_interval_estimates_shapes_and_loop_path():
    x = np.random.default_rng(3).normal(size=(5, 2, 6))  # runs, tasks, points
    vec = stats.curve_interval_estimates({"a": x}, stats.iqm, reps=200, seed=2)["a"]
    loop = stats.curve_interval_estimates({"a": x}, lambda m: stats.iqm(m), reps=200, seed=2)["a"]
    for v, w in zip(vec, loop):
        assert v.shape == (6,)
        np.testing.assert_allclose(v, w)
    with pytest.raises(ValueError, match="num_points"):
        stats.curve_interval_estimates({"a": np.ones(4)})
