"""Evaluation statistics for deep RL: "Deep Reinforcement Learning at the Edge of the Statistical
Precipice" (Agarwal et al., NeurIPS 2021; the ``rliable`` library), in pure numpy.

Conventions
-----------
* **Runs (seeds) are the replication unit**, not episodes: a score matrix is shaped
  ``(num_runs, num_tasks)`` and ``scores[n, m]`` is the score of run ``n`` on task ``m`` (typically the
  mean evaluation return of that run, already normalized, e.g. with :func:`human_normalized`).
  Several algorithms are given as ``dict[str, np.ndarray]`` mapping a name to its score matrix.
* A 1-D array is read as the runs of a **single task**, ``(num_runs,)`` -> ``(num_runs, 1)``, as in
  rliable (so :func:`median` of a 1-D array is its mean: the median over one task's mean).
* The aggregate statistics (:func:`iqm`, :func:`mean`, :func:`median`, :func:`optimality_gap`) also
  accept a batch ``(..., num_runs, num_tasks)`` and reduce the last two axes; that is how the bootstrap
  evaluates all replicates in one vectorized call (``statistic.vectorized is True``).
* Confidence intervals come from the **stratified bootstrap**: within each task the runs are resampled
  with replacement, independently across tasks, so every replicate keeps ``num_runs`` runs per task.
  Intervals are percentile-bootstrap intervals by default (``method="basic"`` reflects them about the
  point estimate). The point estimate is always the statistic on the original, un-resampled scores.
* Everything is reproducible from ``seed`` (``np.random.default_rng(seed)``); replicate ``r`` draws the
  same run indices in :func:`stratified_bootstrap`, :func:`interval_estimates` and
  :func:`performance_profile` for the same seed and matrix shape.

Example::

    from rlq import stats
    scores = {"dqn": dqn_hns, "rainbow": rainbow_hns}          # each (num_runs, num_tasks)
    est = stats.interval_estimates(scores, reps=2000)
    print(stats.format_interval(*est["dqn"]["IQM"]))          # "0.51 [0.45, 0.58]"
    poi = stats.probability_of_improvement(scores["rainbow"], scores["dqn"])
    curves = stats.curve_interval_estimates({"dqn": returns})  # (runs, tasks, points): IQM curve + band

On one task (a single environment, the common case of ``experiments/aggregate.py``), :func:`median`
is the mean over runs (it is a median *across tasks*); :func:`pooled_median` is the median of the runs.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np

__all__ = [
    "ATARI_GAMES",
    "ATARI_HUMAN",
    "ATARI_RANDOM",
    "DEFAULT_AGGREGATES",
    "curve_interval_estimates",
    "format_interval",
    "human_normalized",
    "interval_estimates",
    "iqm",
    "mean",
    "median",
    "optimality_gap",
    "performance_profile",
    "pooled_median",
    "probability_of_improvement",
    "stratified_bootstrap",
]

Statistic = Callable[[np.ndarray], "float | np.ndarray"]
Interval = tuple[float, float, float]

# Bootstrap work is done in chunks of replicates holding at most this many resampled entries
# (~32 MiB of float64), so memory stays bounded whatever `reps` is.
_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------------------
# Aggregate statistics (point estimates). Each reduces the last two axes of (..., num_runs, num_tasks).
# ----------------------------------------------------------------------------------------------------
def _as_matrix(scores: np.ndarray | Sequence[float]) -> np.ndarray:
    """float64 view of ``scores`` with at least 2 dims; 0-D/1-D inputs are one task's runs."""
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim == 0:
        x = x.reshape(1, 1)
    elif x.ndim == 1:
        x = x[:, None]
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"scores must have at least one run and one task, got shape {x.shape}")
    return x


def _scalar_or_array(x: np.ndarray) -> float | np.ndarray:
    return float(x) if np.ndim(x) == 0 else x


def _vectorized(fn: Callable) -> Callable:
    """Mark ``fn`` as reducing the last two axes, so the bootstrap may call it on a whole batch."""
    fn.vectorized = True  # type: ignore[attr-defined]
    return fn


@_vectorized
def iqm(scores: np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Interquartile mean over all runs x tasks: the mean of the middle 50% of the pooled scores.

    Same as ``scipy.stats.trim_mean(scores, 0.25, axis=None)``: with ``N`` pooled scores,
    ``floor(0.25 * N)`` of the lowest and of the highest are cut before averaging (so ``[1..8]`` gives
    ``mean(3, 4, 5, 6) = 4.5`` and ``[1..5]`` gives ``mean(2, 3, 4) = 3``). Robust to outlier runs and
    tasks, yet uses half of the data, unlike the median."""
    x = _as_matrix(scores)
    flat = np.sort(x.reshape(*x.shape[:-2], -1), axis=-1)
    n = flat.shape[-1]
    cut = int(np.floor(0.25 * n))
    return _scalar_or_array(flat[..., cut:n - cut].mean(axis=-1))


@_vectorized
def mean(scores: np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Mean over tasks of the per-task mean score (equal to the mean of all entries)."""
    x = _as_matrix(scores)
    return _scalar_or_array(x.mean(axis=-2).mean(axis=-1))


@_vectorized
def median(scores: np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Median over tasks of the per-task mean score (rliable's ``aggregate_median``).

    Runs are averaged first, then the median is taken across tasks; a 1-D input is one task, so its
    "median" is its mean. Use ``np.median`` for the plain median of a set of values."""
    x = _as_matrix(scores)
    return _scalar_or_array(np.median(x.mean(axis=-2), axis=-1))


@_vectorized
def pooled_median(scores: np.ndarray | Sequence[float]) -> float | np.ndarray:
    """Median of all runs x tasks pooled; on a single task, the median of the runs' scores.

    The single-task counterpart of :func:`median` (which takes the median across task means and so is
    the mean of the runs when there is one task)."""
    x = _as_matrix(scores)
    return _scalar_or_array(np.median(x.reshape(*x.shape[:-2], -1), axis=-1))


@_vectorized
def optimality_gap(scores: np.ndarray | Sequence[float], gamma: float = 1.0) -> float | np.ndarray:
    """Optimality gap: ``mean(max(gamma - score, 0))`` over all runs x tasks (lower is better).

    The amount by which the algorithm falls short of the target ``gamma`` (1.0 = human level for
    human-normalized scores); scores above ``gamma`` count as ``gamma``, so no task can compensate
    for another by exceeding it."""
    x = _as_matrix(scores)
    return _scalar_or_array(np.maximum(gamma - x, 0.0).mean(axis=(-2, -1)))


DEFAULT_AGGREGATES: dict[str, Statistic] = {
    "IQM": iqm,
    "Median": median,
    "Mean": mean,
    "Optimality Gap": optimality_gap,
}
"""The aggregate metrics recommended by Agarwal et al. (2021), used by :func:`interval_estimates`."""


# ----------------------------------------------------------------------------------------------------
# Stratified bootstrap
# ----------------------------------------------------------------------------------------------------
def _check_reps(reps: int, allow_zero: bool = False) -> int:
    if isinstance(reps, bool) or int(reps) != reps or reps < (0 if allow_zero else 1):
        raise ValueError(f"reps must be an integer >= {0 if allow_zero else 1}, got {reps!r}")
    return int(reps)


def _index_chunks(rng: np.random.Generator, num_runs: int, num_tasks: int, reps: int,
                  width: int | None = None) -> Iterator[np.ndarray]:
    """Yield run indices ``(b, num_runs, num_tasks)`` for successive chunks of ``reps`` replicates.

    ``idx[r, i, t]`` is the run drawn, uniformly with replacement among task ``t``'s runs, as the
    ``i``-th run of task ``t`` in replicate ``r`` (the stratified bootstrap)."""
    per_rep = num_runs * num_tasks * (width or 1)
    size = max(1, _CHUNK_ELEMENTS // max(per_rep, 1))
    for start in range(0, reps, size):
        b = min(size, reps - start)
        yield rng.integers(0, num_runs, size=(b, num_runs, num_tasks))


def _counts(idx: np.ndarray) -> np.ndarray:
    """Multiplicities ``(b, num_tasks, num_runs)``: how often each run of each task was drawn."""
    b, n, t = idx.shape
    key = (np.arange(b)[:, None, None] * t + np.arange(t)[None, None, :]) * n + idx
    return np.bincount(key.ravel(), minlength=b * t * n).reshape(b, t, n).astype(np.float64)


def _is_vectorized(statistic: Callable) -> bool:
    while isinstance(statistic, functools.partial):
        statistic = statistic.func
    return bool(getattr(statistic, "vectorized", False))


def stratified_bootstrap(scores: np.ndarray, statistic: Statistic, reps: int = 2000, seed: int | None = 0,
                         vectorized: bool | None = None) -> np.ndarray:
    """Bootstrap distribution of ``statistic`` under stratified resampling of runs.

    Each replicate resamples, independently for every task (column), ``num_runs`` runs with
    replacement from that task's runs, and applies ``statistic`` to the resampled
    ``(num_runs, num_tasks)`` matrix. Stratifying over tasks keeps every task equally represented,
    which is what makes the bootstrap usable with the few (3-10) runs typical of deep RL.

    Args:
        scores: ``(num_runs, num_tasks)`` score matrix (a 1-D array is one task's runs).
        statistic: maps a ``(num_runs, num_tasks)`` matrix to a float (or a fixed-shape array).
        reps: number of bootstrap replicates.
        seed: seed of ``np.random.default_rng``; the same seed gives the same replicates.
        vectorized: whether ``statistic`` accepts a batch ``(b, num_runs, num_tasks)`` and returns one
            value per batch entry; then all replicates are evaluated in a few calls instead of one call
            each. ``None`` (default): true for this module's aggregates (``statistic.vectorized``), also
            through ``functools.partial``.

    Returns:
        ``(reps,)`` array of replicate values (``(reps, *shape)`` for an array-valued statistic).
    """
    x = _as_matrix(scores)
    if x.ndim != 2:
        raise ValueError(f"scores must be (num_runs, num_tasks), got shape {x.shape}")
    reps = _check_reps(reps)
    if vectorized is None:
        vectorized = _is_vectorized(statistic)
    n, t = x.shape
    rng = np.random.default_rng(seed)
    cols = np.arange(t)
    out = []
    for idx in _index_chunks(rng, n, t, reps):
        batch = x[idx, cols]  # (b, n, t): batch[r, i, c] = x[idx[r, i, c], c]
        if vectorized:
            vals = np.asarray(statistic(batch), dtype=np.float64)
            if vals.shape[:1] != (len(batch),):
                raise ValueError(f"a vectorized statistic must return one value per replicate (leading "
                                 f"axis {len(batch)}), got shape {vals.shape}")
        else:
            vals = np.asarray([statistic(m) for m in batch], dtype=np.float64)
        out.append(vals)
    return np.concatenate(out, axis=0)


def _interval(point: float | np.ndarray, boot: np.ndarray, confidence: float, method: str):
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    alpha = 1.0 - confidence
    q_low, q_high = np.percentile(boot, [100.0 * alpha / 2, 100.0 * (1 - alpha / 2)], axis=0)
    if method == "percentile":
        return q_low, q_high
    if method == "basic":
        return 2 * np.asarray(point) - q_high, 2 * np.asarray(point) - q_low
    raise ValueError(f"method must be 'percentile' or 'basic', got {method!r}")


def interval_estimates(score_dict: Mapping[str, np.ndarray],
                       aggregate_fns: Mapping[str, Statistic] | None = None, reps: int = 2000,
                       confidence: float = 0.95, method: str = "percentile",
                       seed: int | None = 0) -> dict[str, dict[str, Interval]]:
    """Point estimates and stratified-bootstrap confidence intervals of aggregate metrics.

    Args:
        score_dict: algorithm name -> ``(num_runs, num_tasks)`` score matrix (algorithms may have
            different numbers of runs).
        aggregate_fns: metric name -> statistic on a score matrix; default :data:`DEFAULT_AGGREGATES`
            (IQM, Median, Mean, Optimality Gap).
        reps: bootstrap replicates per (algorithm, metric).
        confidence: coverage of the two-sided interval (0.95 -> 2.5th to 97.5th percentile).
        method: ``"percentile"`` (default, as in rliable): the ``alpha/2`` and ``1 - alpha/2``
            quantiles of the bootstrap distribution; ``"basic"``: those quantiles reflected about the
            point estimate, ``(2 * point - q_high, 2 * point - q_low)``.
        seed: every (algorithm, metric) pair is bootstrapped with this seed (common random numbers:
            all metrics of an algorithm see the same replicates; results do not depend on dict order).

    Returns:
        ``{alg: {metric: (point, low, high)}}`` with Python floats.
    """
    fns = dict(DEFAULT_AGGREGATES if aggregate_fns is None else aggregate_fns)
    result: dict[str, dict[str, Interval]] = {}
    for alg, scores in score_dict.items():
        x = _as_matrix(scores)
        result[alg] = {}
        for name, fn in fns.items():
            point = float(fn(x))
            boot = stratified_bootstrap(x, fn, reps=reps, seed=seed)
            low, high = _interval(point, boot, confidence, method)
            result[alg][name] = (point, float(low), float(high))
    return result


def curve_interval_estimates(score_dict: Mapping[str, np.ndarray], statistic: Statistic = iqm, reps: int = 2000,
                             confidence: float = 0.95, seed: int | None = 0,
                             ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Aggregate learning curves with pointwise stratified-bootstrap CIs (rliable's sample-efficiency
    curves): at every point (e.g. an env step), ``statistic`` over the runs x tasks scores there.

    Args:
        score_dict: algorithm name -> ``(num_runs, num_tasks, num_points)`` scores at common points
            (a 2-D ``(num_runs, num_points)`` array is one task). Curves are usually interpolated
            onto common steps first.
        statistic: an aggregate of a ``(num_runs, num_tasks)`` matrix (default :func:`iqm`); one of this
            module's (vectorized) aggregates is evaluated for all points and replicates at once.
        reps: bootstrap replicates (0: no CI, ``low == high == point``).
        confidence: coverage of the pointwise two-sided percentile intervals.
        seed: seed of the replicates. Each replicate draws one stratified resample of the runs and uses
            it at every point, so the replicate curves are whole curves of resampled runs.

    Returns:
        ``{alg: (point, low, high)}``, each of shape ``(num_points,)``.
    """
    reps = _check_reps(reps, allow_zero=True)
    vectorized = _is_vectorized(statistic)
    result: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for alg, scores in score_dict.items():
        x = np.asarray(scores, dtype=np.float64)
        if x.ndim == 2:
            x = x[:, None, :]
        if x.ndim != 3 or 0 in x.shape:
            raise ValueError(f"curves of {alg!r} must be (num_runs, num_tasks, num_points) or (num_runs, "
                             f"num_points) with no empty axis, got shape {np.shape(scores)}")
        n, t, k = x.shape

        def apply(batch: np.ndarray, n: int = n, t: int = t) -> np.ndarray:  # (..., n, t, k) -> (..., k)
            moved = np.moveaxis(batch, -1, -3)  # (..., k, n, t)
            if vectorized:
                return np.asarray(statistic(moved), dtype=np.float64)
            flat = moved.reshape(-1, n, t)
            return np.asarray([statistic(m) for m in flat], dtype=np.float64).reshape(moved.shape[:-2])

        point = apply(x)
        if reps == 0:
            result[alg] = (point, point.copy(), point.copy())
            continue
        rng = np.random.default_rng(seed)
        cols = np.arange(t)
        boot = np.concatenate([apply(x[idx, cols]) for idx in _index_chunks(rng, n, t, reps, width=k)])
        low, high = _interval(point, boot, confidence, "percentile")
        result[alg] = (point, low, high)
    return result


# ----------------------------------------------------------------------------------------------------
# Performance profiles and probability of improvement
# ----------------------------------------------------------------------------------------------------
def performance_profile(score_dict: Mapping[str, np.ndarray], taus: np.ndarray | Sequence[float] | float,
                        reps: int = 0, confidence: float = 0.95, seed: int | None = 0,
                        ) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """Run-score distributions: the fraction of all runs x tasks whose score exceeds each ``tau``.

    ``profile[k] = mean(scores > taus[k])`` over the pooled ``num_runs * num_tasks`` scores (strict
    inequality). With ``reps > 0`` the pointwise percentile CIs come from the stratified bootstrap
    (the same replicates :func:`stratified_bootstrap` draws for that seed); all ``taus`` are computed
    from the same replicates, without a Python loop over replicates.

    Returns:
        ``{alg: (profile, low, high)}``, each of shape ``(len(taus),)``; ``low`` and ``high`` are
        ``None`` when ``reps == 0``.
    """
    reps = _check_reps(reps, allow_zero=True)
    tau = np.atleast_1d(np.asarray(taus, dtype=np.float64))
    if tau.ndim != 1:
        raise ValueError(f"taus must be a scalar or 1-D, got shape {tau.shape}")
    result: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
    for alg, scores in score_dict.items():
        x = _as_matrix(scores)
        if x.ndim != 2:
            raise ValueError(f"scores of {alg!r} must be (num_runs, num_tasks), got shape {x.shape}")
        n, t = x.shape
        above = (x.T[:, :, None] > tau).astype(np.float64)  # (t, n, K): run i of task c beats tau k
        profile = above.mean(axis=(0, 1))
        if reps == 0:
            result[alg] = (profile, None, None)
            continue
        rng = np.random.default_rng(seed)
        boot = np.concatenate([
            np.einsum("btn,tnk->bk", _counts(idx), above) / (n * t)
            for idx in _index_chunks(rng, n, t, reps)
        ])
        low, high = _interval(profile, boot, confidence, "percentile")
        result[alg] = (profile, low, high)
    return result


def _pairwise_wins(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(num_tasks, n, m)``: 1 where ``x[i, c] > y[j, c]``, 1/2 on ties, 0 otherwise."""
    xt, yt = x.T[:, :, None], y.T[:, None, :]
    return (xt > yt) + 0.5 * (xt == yt)


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int = 2000, confidence: float = 0.95,
                               seed: int | None = 0) -> Interval:
    """Average probability of improvement ``P(X > Y)`` of algorithm ``x`` over ``y``, with a CI.

    For each task, ``P(X_m > Y_m)`` is the Mann-Whitney U statistic over ``n x m`` run pairs divided
    by ``n * m``: the fraction of pairs (run of ``x``, run of ``y``) where ``x`` scores higher, ties
    counting 1/2 (so ``P(X > X) = 0.5``). The result averages these over tasks. The percentile CI
    resamples, per task, the runs of ``x`` and of ``y`` independently (stratified bootstrap).

    Args:
        x: ``(n, num_tasks)`` scores of X.  y: ``(m, num_tasks)`` scores of Y (``m`` may differ).
        reps: bootstrap replicates (0: no CI, ``low == high == point``).

    Returns:
        ``(point, low, high)``; > 0.5 means X tends to beat Y on a random task.
    """
    xs, ys = _as_matrix(x), _as_matrix(y)
    if xs.ndim != 2 or ys.ndim != 2 or xs.shape[1] != ys.shape[1]:
        raise ValueError(f"x and y must be (runs, num_tasks) with the same tasks, got {xs.shape} and "
                         f"{ys.shape}")
    reps = _check_reps(reps, allow_zero=True)
    n, m, t = xs.shape[0], ys.shape[0], xs.shape[1]
    wins = _pairwise_wins(xs, ys)  # (t, n, m)
    point = float(wins.mean())
    if reps == 0:
        return point, point, point
    rng = np.random.default_rng(seed)
    boot = []
    for idx_x in _index_chunks(rng, n, t, reps, width=1 + m):
        idx_y = rng.integers(0, m, size=(len(idx_x), m, t))
        cx, cy = _counts(idx_x), _counts(idx_y)  # (b, t, n), (b, t, m)
        per_task = np.einsum("btn,tnm,btm->bt", cx, wins, cy, optimize=True) / (n * m)
        boot.append(per_task.mean(axis=1))
    low, high = _interval(point, np.concatenate(boot), confidence, "percentile")
    return point, float(low), float(high)


def format_interval(point: float, low: float, high: float, digits: int = 2) -> str:
    """``"0.51 [0.45, 0.58]"``: a point estimate and its interval with ``digits`` decimals."""
    return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


# ----------------------------------------------------------------------------------------------------
# Atari human-normalized scores
# ----------------------------------------------------------------------------------------------------
# Random-agent and average-human reference scores of the 57 Atari games, as tabulated in the MuZero /
# Agent57 papers and used by rliable's ALE-57 analysis. They match DeepMind's DQN Zoo table except for
# VideoPinball's random score (0.0 here, 16256.9 in DQN Zoo and the Nature DQN paper); the Nature DQN
# paper's own human scores differ for several games (e.g. Pong 9.3, Breakout 31.8) and are not used.

ATARI_RANDOM: dict[str, float] = {
    "Alien": 227.8,
    "Amidar": 5.8,
    "Assault": 222.4,
    "Asterix": 210.0,
    "Asteroids": 719.1,
    "Atlantis": 12850.0,
    "BankHeist": 14.2,
    "BattleZone": 2360.0,
    "BeamRider": 363.9,
    "Berzerk": 123.7,
    "Bowling": 23.1,
    "Boxing": 0.1,
    "Breakout": 1.7,
    "Centipede": 2090.9,
    "ChopperCommand": 811.0,
    "CrazyClimber": 10780.5,
    "Defender": 2874.5,
    "DemonAttack": 152.1,
    "DoubleDunk": -18.6,
    "Enduro": 0.0,
    "FishingDerby": -91.7,
    "Freeway": 0.0,
    "Frostbite": 65.2,
    "Gopher": 257.6,
    "Gravitar": 173.0,
    "Hero": 1027.0,
    "IceHockey": -11.2,
    "Jamesbond": 29.0,
    "Kangaroo": 52.0,
    "Krull": 1598.0,
    "KungFuMaster": 258.5,
    "MontezumaRevenge": 0.0,
    "MsPacman": 307.3,
    "NameThisGame": 2292.3,
    "Phoenix": 761.4,
    "Pitfall": -229.4,
    "Pong": -20.7,
    "PrivateEye": 24.9,
    "Qbert": 163.9,
    "Riverraid": 1338.5,
    "RoadRunner": 11.5,
    "Robotank": 2.2,
    "Seaquest": 68.4,
    "Skiing": -17098.1,
    "Solaris": 1236.3,
    "SpaceInvaders": 148.0,
    "StarGunner": 664.0,
    "Surround": -10.0,
    "Tennis": -23.8,
    "TimePilot": 3568.0,
    "Tutankham": 11.4,
    "UpNDown": 533.4,
    "Venture": 0.0,
    "VideoPinball": 0.0,
    "WizardOfWor": 563.5,
    "YarsRevenge": 3092.9,
    "Zaxxon": 32.5,
}
"""Score of a uniformly random policy per Atari game (CamelCase name -> raw score)."""

ATARI_HUMAN: dict[str, float] = {
    "Alien": 7127.7,
    "Amidar": 1719.5,
    "Assault": 742.0,
    "Asterix": 8503.3,
    "Asteroids": 47388.7,
    "Atlantis": 29028.1,
    "BankHeist": 753.1,
    "BattleZone": 37187.5,
    "BeamRider": 16926.5,
    "Berzerk": 2630.4,
    "Bowling": 160.7,
    "Boxing": 12.1,
    "Breakout": 30.5,
    "Centipede": 12017.0,
    "ChopperCommand": 7387.8,
    "CrazyClimber": 35829.4,
    "Defender": 18688.9,
    "DemonAttack": 1971.0,
    "DoubleDunk": -16.4,
    "Enduro": 860.5,
    "FishingDerby": -38.7,
    "Freeway": 29.6,
    "Frostbite": 4334.7,
    "Gopher": 2412.5,
    "Gravitar": 3351.4,
    "Hero": 30826.4,
    "IceHockey": 0.9,
    "Jamesbond": 302.8,
    "Kangaroo": 3035.0,
    "Krull": 2665.5,
    "KungFuMaster": 22736.3,
    "MontezumaRevenge": 4753.3,
    "MsPacman": 6951.6,
    "NameThisGame": 8049.0,
    "Phoenix": 7242.6,
    "Pitfall": 6463.7,
    "Pong": 14.6,
    "PrivateEye": 69571.3,
    "Qbert": 13455.0,
    "Riverraid": 17118.0,
    "RoadRunner": 7845.0,
    "Robotank": 11.9,
    "Seaquest": 42054.7,
    "Skiing": -4336.9,
    "Solaris": 12326.7,
    "SpaceInvaders": 1668.7,
    "StarGunner": 10250.0,
    "Surround": 6.5,
    "Tennis": -8.3,
    "TimePilot": 5229.2,
    "Tutankham": 167.6,
    "UpNDown": 11693.2,
    "Venture": 1187.5,
    "VideoPinball": 17667.9,
    "WizardOfWor": 4756.5,
    "YarsRevenge": 54576.9,
    "Zaxxon": 9173.3,
}
"""Average human tester score per Atari game (CamelCase name -> raw score)."""

ATARI_GAMES: tuple[str, ...] = tuple(sorted(ATARI_HUMAN))
"""The 57 game names accepted by :func:`human_normalized`, CamelCase as in ale-py ids."""

_GAME_ID_RE = re.compile(r"^(?:ALE/)?(?P<game>[A-Za-z0-9_]+?)(?:NoFrameskip|Deterministic)?(?:-v\d+)?$")
_GAME_KEYS = {g.lower(): g for g in ATARI_HUMAN}


def _game_key(game: str) -> str:
    if game in ATARI_HUMAN:
        return game
    match = _GAME_ID_RE.match(str(game).strip())
    key = _GAME_KEYS.get(match["game"].replace("_", "").lower()) if match else None
    if key is None:
        raise ValueError(f"unknown Atari game {game!r}: use one of the 57 CamelCase names in "
                         f"rlq.stats.ATARI_GAMES (e.g. 'Pong', 'MsPacman'; ids like 'ALE/Pong-v5' work too)")
    return key


def human_normalized(score: float | np.ndarray, game: str | Sequence[str]) -> float | np.ndarray:
    """Human-normalized score ``(score - random) / (human - random)``: 0 = random play, 1 = human.

    ``game`` is a CamelCase name (``"Pong"``, ``"MsPacman"``); snake_case (``"ms_pacman"``) and
    Gymnasium ids (``"ALE/Pong-v5"``, ``"PongNoFrameskip-v4"``) are also accepted. ``game`` may be a
    sequence of names, one per task, matched against the last axis of ``score`` (a
    ``(num_runs, num_tasks)`` matrix normalizes in one call). Raises ``ValueError`` for an unknown game.
    """
    if isinstance(game, str):
        key = _game_key(game)
        rnd, hum = ATARI_RANDOM[key], ATARI_HUMAN[key]
        out = (np.asarray(score, dtype=np.float64) - rnd) / (hum - rnd)
        return _scalar_or_array(out)
    keys = [_game_key(g) for g in game]
    rnd = np.array([ATARI_RANDOM[k] for k in keys])
    hum = np.array([ATARI_HUMAN[k] for k in keys])
    s = np.asarray(score, dtype=np.float64)
    if s.shape[-1:] != (len(keys),):
        raise ValueError(f"score's last axis ({s.shape}) must match the {len(keys)} games")
    return (s - rnd) / (hum - rnd)
