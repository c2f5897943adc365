"""Prioritized replay tests against brute-force references (cumsum + searchsorted, sequential updates,
hand-computed probabilities and weights, the replay-buffer reference of test_replay)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rlq.replay import Batch, PrioritizedSampler, ReplayBuffer, Sampler, SumTree
from test_replay import STACK, FakeVecEnv, H, Reference, W, check_batch, run


class FakeSource:
    """A SampleSource with one env, every row in the window, and a given validity mask."""

    def __init__(self, capacity: int, valid: np.ndarray | None = None):
        self.capacity = self.rows = capacity
        self.num_envs = 1
        self.valid = np.ones(capacity, bool) if valid is None else valid

    def sample_window(self):
        return 0, self.rows

    def valid_mask(self, idx):
        return self.valid[np.asarray(idx)]


def brute_find(leaves: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(leaves), targets, side="right")


def chi2(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def chi2_bound(dof: int) -> float:
    """Generous critical value (~6 sigma of the chi-square's normal approximation)."""
    return dof + 6 * np.sqrt(2 * dof)


# ---------------------------------------------------------------------------------------------- sum tree
@pytest.mark.parametrize("capacity", [1, 2, 5, 50, 64, 1000])
def test_tree_total_and_layout(capacity):
    tree = SumTree(capacity)
    assert tree.size >= capacity and tree.size & (tree.size - 1) == 0 and tree.size < 2 * capacity + 1
    rng = np.random.default_rng(capacity)
    v = rng.random(capacity)
    tree.update(np.arange(capacity), v)
    assert tree.total == pytest.approx(v.sum(), rel=1e-12)
    np.testing.assert_array_equal(tree.leaves, v)
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), v)


def test_find_matches_bruteforce_exact_with_integer_priorities():
    """Integer leaves make every partial sum exact, so the descent must equal searchsorted bit for bit,
    including targets exactly on segment boundaries, 0, total - eps and zero-priority leaves."""
    rng = np.random.default_rng(0)
    cap = 77
    leaves = rng.integers(0, 20, cap).astype(np.float64)
    leaves[[0, 1, 10, 11, 12, cap - 1, cap - 2]] = 0.0  # zeros at the edges and in runs
    tree = SumTree(cap)
    tree.update(np.arange(cap), leaves)
    total = tree.total
    assert total == leaves.sum()
    cs = np.cumsum(leaves)
    targets = np.concatenate([rng.random(5000) * total, [0.0, np.nextafter(total, 0), total - 1e-9],
                              cs[cs < total]])  # every boundary
    got = tree.find(targets)
    np.testing.assert_array_equal(got, brute_find(leaves, targets))
    assert (leaves[got] > 0).all()
    assert got[targets.size - cs[cs < total].size - 3] == np.flatnonzero(leaves)[0]  # t = 0: first positive
    assert got[targets.size - cs[cs < total].size - 2] == np.flatnonzero(leaves)[-1]  # total - eps: last positive


def test_find_matches_bruteforce_float_priorities():
    rng = np.random.default_rng(1)
    cap = 1000
    leaves = rng.random(cap) ** 3
    leaves[rng.random(cap) < 0.1] = 0.0
    tree = SumTree(cap)
    tree.update(np.arange(cap), leaves)
    targets = np.concatenate([rng.random(20_000) * tree.total, [0.0, tree.total * (1 - 1e-12)]])
    got, ref = tree.find(targets), brute_find(leaves, targets)
    mismatch = got != ref
    # Different summation orders may only disagree on targets within rounding distance of a boundary.
    cs = np.cumsum(leaves)
    dist = np.abs(targets[mismatch][:, None] - cs[None, :]).min(axis=1) if mismatch.any() else np.zeros(0)
    assert (dist < 1e-9 * tree.total).all()
    assert mismatch.mean() < 1e-3
    assert (leaves[got] > 0).all()


def test_find_out_of_range_targets_land_on_positive_leaves():
    tree = SumTree(10)
    tree.update(np.array([2, 5]), np.array([1.0, 2.0]))
    assert tree.find(np.array([3.0, 3.5, 100.0])).tolist() == [5, 5, 5]
    assert tree.find(np.array([0.0, 0.99, 1.0])).tolist() == [2, 2, 5]


def test_batched_update_with_duplicates_equals_sequential():
    rng = np.random.default_rng(2)
    cap = 300
    batched, seq = SumTree(cap), SumTree(cap)
    for _ in range(50):
        n = int(rng.integers(1, 64))
        idx = rng.integers(0, cap, n)
        idx[rng.random(n) < 0.3] = idx[0]  # plenty of duplicates
        vals = rng.random(n) * rng.choice([1e-3, 1.0, 1e3])
        batched.update(idx, vals)
        for i, v in zip(idx, vals):
            seq.update(np.array([i]), np.array([v]))
        np.testing.assert_array_equal(batched.tree, seq.tree)  # bit-identical, internal nodes included
    # A batch large enough to take the full-rebuild path gives the same arrays as sequential updates.
    idx = rng.integers(0, cap, 500)
    vals = rng.random(500)
    batched.update(idx, vals)
    for i, v in zip(idx, vals):
        seq.update(np.array([i]), np.array([v]))
    np.testing.assert_array_equal(batched.tree, seq.tree)
    rebuilt = SumTree(cap)
    rebuilt.tree[rebuilt.size:] = batched.tree[batched.size:]
    rebuilt.rebuild()
    np.testing.assert_array_equal(rebuilt.tree, batched.tree)


# ---------------------------------------------------------------------------------------------- sampler
def test_is_a_sampler():
    assert isinstance(PrioritizedSampler(10), Sampler)


def test_sampling_is_proportional_chi_square():
    rng = np.random.default_rng(3)
    cap = 50
    s = PrioritizedSampler(cap, alpha=0.5, seed=4)
    src = FakeSource(cap)
    s.on_add(np.arange(cap))
    p = rng.exponential(size=cap) * rng.choice([0.01, 1, 10], size=cap)
    s.update_priorities(np.arange(cap), p)
    expected_p = (p + s.eps) ** 0.5
    expected_p /= expected_p.sum()
    idx = np.concatenate([s.sample(1000, src)[0] for _ in range(150)])
    counts = np.bincount(idx, minlength=cap)
    assert chi2(counts, expected_p * idx.size) < chi2_bound(cap - 1)
    # Sanity: the test has power (uniform sampling would be rejected by far).
    assert chi2(counts, np.full(cap, idx.size / cap)) > 10 * chi2_bound(cap - 1)


def test_sampling_with_invalid_slots_is_proportional_over_valid_ones():
    """Invalid draws are redrawn: invalid slots never come out, valid ones stay proportional."""
    rng = np.random.default_rng(5)
    cap = 60
    valid = rng.random(cap) < 0.6
    s = PrioritizedSampler(cap, seed=6)
    s.on_add(np.arange(cap))
    p = rng.random(cap) * 5
    p[~valid] *= 20  # invalid slots carry most of the mass: many redraws
    s.update_priorities(np.arange(cap), p)
    idx = np.concatenate([s.sample(500, FakeSource(cap, valid))[0] for _ in range(200)])
    assert valid[idx].all()
    leaf = (p + s.eps) ** s.alpha
    exp = leaf[valid] / leaf[valid].sum() * idx.size
    counts = np.bincount(idx, minlength=cap)[valid]
    assert chi2(counts, exp) < chi2_bound(valid.sum() - 1)


def test_fallback_when_nearly_everything_is_invalid():
    cap = 1000
    valid = np.zeros(cap, bool)
    valid[[3, 7]] = True
    s = PrioritizedSampler(cap, seed=0, max_rounds=2)
    s.on_add(np.arange(cap))
    s.update_priorities(np.array([3, 7]), np.array([1.0, 4.0]))  # leaves 1, 2 (alpha 0.5, ~)
    idx = np.concatenate([s.sample(100, FakeSource(cap, valid))[0] for _ in range(50)])
    assert set(idx.tolist()) == {3, 7}
    assert abs((idx == 7).mean() - 2 / 3) < 0.05


def test_importance_weights_by_hand():
    cap, alpha, beta, eps = 8, 0.6, 0.7, 1e-6
    s = PrioritizedSampler(cap, alpha=alpha, eps=eps, seed=1)
    s.on_add(np.arange(5))  # 5 stored slots, 3 never written (zero leaves)
    raw = np.array([0.5, 2.0, 0.0, 7.0, 1.5])
    s.update_priorities(np.arange(5), raw)
    s.set_beta(beta)
    idx, w = s.sample(6, FakeSource(cap, np.arange(cap) < 5))
    assert w.dtype == np.float32 and idx.dtype == np.int64 and idx.shape == w.shape == (6,)
    P = (raw + eps) ** alpha / ((raw + eps) ** alpha).sum()
    N = 5
    w_ref = (N * P[idx]) ** -beta
    w_ref /= w_ref.max()
    np.testing.assert_allclose(w, w_ref, rtol=1e-6)
    assert w.max() == 1.0
    np.testing.assert_allclose(s.priorities(np.arange(5)), (raw + eps) ** alpha, rtol=1e-12)


def test_beta_annealing_and_explicit_settings():
    s = PrioritizedSampler(16, beta0=0.4, beta_steps=10)
    src = FakeSource(16)
    s.on_add(np.arange(16))
    assert s.beta == pytest.approx(0.4)
    for k in range(1, 16):
        s.sample(4, src)
        assert s.beta == pytest.approx(0.4 + 0.6 * min(1.0, k / 10))
    s.set_progress(0.5)
    assert s.beta == pytest.approx(0.7)
    s.sample(4, src)
    assert s.beta == pytest.approx(0.7)  # explicit value no longer annealed by calls
    s.set_progress(3.0)
    assert s.beta == 1.0
    s.beta = 0.55
    assert s.beta == 0.55
    with pytest.raises(ValueError, match="beta must be in"):
        s.set_beta(1.5)


def test_beta_zero_gives_unit_weights():
    s = PrioritizedSampler(20, seed=0)
    s.on_add(np.arange(20))
    s.update_priorities(np.arange(20), np.arange(20.0))
    s.set_beta(0.0)
    np.testing.assert_array_equal(s.sample(16, FakeSource(20))[1], np.ones(16, np.float32))


def test_new_transitions_get_max_priority():
    s = PrioritizedSampler(10, alpha=0.5, eps=1e-6)
    s.on_add(np.array([0, 1, 2]))
    np.testing.assert_array_equal(s.priorities(np.array([0, 1, 2])), [1.0, 1.0, 1.0])
    assert s.num_stored == 3
    s.update_priorities(np.array([0, 1]), np.array([9.0, 0.25]))
    s.on_add(np.array([3, 4]))
    np.testing.assert_allclose(s.priorities(np.array([3, 4])), np.sqrt(9.0 + 1e-6), rtol=1e-12)
    s.update_priorities(np.array([3]), np.array([0.01]))  # the max never decreases
    s.on_add(np.array([5, 1]))  # overwriting a slot resets it to the max priority as well
    np.testing.assert_allclose(s.priorities(np.array([5, 1])), np.sqrt(9.0 + 1e-6), rtol=1e-12)
    assert s.max_priority == pytest.approx(9.0 + 1e-6) and s.num_stored == 6
    assert s.total == pytest.approx(s.priorities(np.arange(10)).sum())


def test_update_priorities_accepts_torch_and_rejects_bad_values():
    s = PrioritizedSampler(10)
    s.on_add(np.arange(10))
    s.update_priorities(torch.tensor([1, 2]), torch.tensor([4.0, 0.0], requires_grad=True))
    np.testing.assert_allclose(s.priorities(np.array([1, 2])), [np.sqrt(4 + 1e-6), np.sqrt(1e-6)])
    for bad in ([np.nan, 1.0], [np.inf, 1.0], [-1.0, 1.0]):
        with pytest.raises(ValueError, match="finite and >= 0") as e:
            s.update_priorities(np.array([1, 2]), np.array(bad))
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="2 indices but 3 priorities"):
        s.update_priorities(np.array([1, 2]), np.ones(3))
    with pytest.raises(ValueError, match=r"indices must be in \[0, 10\)"):
        s.update_priorities(np.array([10]), np.ones(1))
    np.testing.assert_allclose(s.priorities(np.array([1, 2])), [np.sqrt(4 + 1e-6), np.sqrt(1e-6)])  # untouched


def test_empty_sampler_raises():
    buf = ReplayBuffer(30, 3, (3,), np.float32, n_step=3, sampler=PrioritizedSampler(30))
    with pytest.raises(ValueError, match="no sampleable"):
        buf.sample(4)
    with pytest.raises(ValueError, match="smaller than the buffer"):
        PrioritizedSampler(10).sample(4, FakeSource(20))


# ---------------------------------------------------------------------------------------------- with the buffer
def make_per(kind: str, rows: int, num_envs: int, n_step: int, seed: int = 0, sampler_seed: int = 0,
             gamma: float = 0.9):
    sampler = PrioritizedSampler(rows * num_envs, seed=sampler_seed, beta_steps=100)
    if kind == "frames":
        buf = ReplayBuffer(rows * num_envs, num_envs, (STACK, H, W), np.uint8, n_step=n_step, gamma=gamma,
                           frame_stack=STACK, sampler=sampler)
        env, lookback = FakeVecEnv(num_envs, seed + 1, "frames"), STACK
    else:
        buf = ReplayBuffer(rows * num_envs, num_envs, (3,), np.float32, action_shape=(2,),
                           action_dtype=np.float32, n_step=n_step, gamma=gamma, sampler=sampler)
        env, lookback = FakeVecEnv(num_envs, seed + 1, "vector", act_shape=(2,)), 1
    return buf, env, Reference(rows, num_envs, n_step, gamma, lookback), sampler


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in Batch.__dataclass_fields__:
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("kind", ["frames", "vector"])
def test_buffer_samples_only_valid_transitions(kind):
    buf, env, ref, sampler = make_per(kind, rows=23, num_envs=3, n_step=3)
    rng = np.random.default_rng(7)
    obs = run(buf, env, ref, 4, env.reset())
    for _ in range(14):  # wraps the 23-row buffer several times
        obs = run(buf, env, ref, 6, obs)
        for _ in range(3):
            b = buf.sample(64)
            check_batch(b, ref)  # every idx sampleable (no reset/pseudo/incomplete slot), content matches
            assert_batches_equal(b, buf.gather(b.idx.numpy(), b.weights.numpy()))
            assert b.weights.max().item() == 1.0 and (b.weights > 0).all()
            # priorities with a heavy tail so invalid (max-priority) slots are hit often
            buf.update_priorities(b.idx, torch.from_numpy(rng.exponential(size=64).astype(np.float32) ** 3))
    resets = np.stack([s["reset"] for s in ref.steps])
    assert resets.sum() > 10


def test_heavily_prioritized_transitions_are_sampled_much_more():
    buf, env, ref, sampler = make_per("frames", rows=60, num_envs=4, n_step=3)
    run(buf, env, ref, 80, env.reset())
    valid = buf.valid_indices()
    buf.update_priorities(valid, np.full(valid.size, 0.01))
    hot = valid[[3, len(valid) // 2, -5]]
    buf.update_priorities(hot, np.full(3, 1e4))
    idx = np.concatenate([buf.sample(256).idx.numpy() for _ in range(40)])
    hot_frac = np.isin(idx, hot).mean()
    # leaves: hot ~100 each, others ~0.1 each -> 300 / (300 + 0.1 * (len(valid) - 3))
    leaf_other = (0.01 + 1e-6) ** 0.5
    exp = 3 * (1e4 + 1e-6) ** 0.5 / (3 * (1e4 + 1e-6) ** 0.5 + leaf_other * (valid.size - 3))
    assert hot_frac > 0.8 and abs(hot_frac - exp) < 0.03
    counts = np.bincount(idx, minlength=buf.capacity)
    cold = np.setdiff1d(valid, hot)
    assert counts[hot].min() > 100 * max(counts[cold].mean(), 1e-3)
    b = buf.sample(256)
    is_hot = np.isin(b.idx.numpy(), hot)
    assert is_hot.any() and (~is_hot).any()
    assert b.weights[torch.from_numpy(is_hot)].max() < b.weights[torch.from_numpy(~is_hot)].min()


def test_state_dict_roundtrip_gives_identical_samples():
    buf, env, ref, sampler = make_per("frames", rows=25, num_envs=3, n_step=3)
    obs = run(buf, env, ref, 60, env.reset())
    rng = np.random.default_rng(8)
    for _ in range(3):
        b = buf.sample(16)
        buf.update_priorities(b.idx, rng.random(16) * 3)
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    state = torch.load(f, weights_only=True)
    other_sampler = PrioritizedSampler(75, seed=999, beta_steps=100)
    other = ReplayBuffer(75, 3, (STACK, H, W), np.uint8, n_step=3, gamma=0.9, frame_stack=STACK,
                         sampler=other_sampler)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other_sampler.tree.tree, sampler.tree.tree)
    assert other_sampler.max_priority == sampler.max_priority and other_sampler.beta == sampler.beta
    assert other_sampler.num_stored == sampler.num_stored
    for k in range(4):
        a, b = buf.sample(32), other.sample(32)
        assert_batches_equal(a, b)
        p = rng.random(32) * 2
        buf.update_priorities(a.idx, p)
        other.update_priorities(b.idx, p)
        if k == 1:  # explicit beta survives a round trip too
            sampler.set_progress(0.25)
            s2 = PrioritizedSampler(75, seed=5)
            s2.load_state_dict(torch.load(_save(sampler.state_dict()), weights_only=True))
            assert s2.beta == sampler.beta == pytest.approx(0.55)
            other_sampler.set_progress(0.25)
    np.testing.assert_array_equal(other_sampler.tree.tree, sampler.tree.tree)
    # Resume: adds go on (pseudo-row at max priority) and every sample is still valid.
    ref.needs_pseudo = True
    run(other, env, ref, 10, env.reset())
    check_batch(other.sample(64), ref)


def test_state_dict_mismatch_raises():
    s = PrioritizedSampler(10, alpha=0.5).state_dict()
    with pytest.raises(ValueError, match="capacity is 10 in the checkpoint but 12"):
        PrioritizedSampler(12).load_state_dict(s)
    with pytest.raises(ValueError, match="alpha is 0.5 in the checkpoint but 0.6"):
        PrioritizedSampler(10, alpha=0.6).load_state_dict(s)


def _save(state) -> io.BytesIO:
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    return f
