"""Replay buffer tests against brute-force references.

A fake vector env follows Gymnasium's NEXT_STEP autoreset and (for frames) ALE's zero-padded stack
convention; the reference keeps, per absolute row time, the true per-env transitions as the env produced
them, and computes n-step returns by walking plain Python lists. Every sampleable transition of the
buffer is compared with the reference.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from rlq.replay import ArrayStorage, Batch, FrameStorage, ReplayBuffer, Sampler, UniformSampler

H = W = 7
STACK = 4


class FakeVecEnv:
    """A vector env under NEXT_STEP autoreset with random episode lengths (length-1 episodes included),
    terminations, truncations and life losses (``terminated`` without ``episode_end``).

    ``mode="frames"``: (STACK, H, W) uint8 stacks, reset obs ``[0, 0, 0, f0]``, one frame shifted in per
    step (also across life losses). ``mode="vector"``: random float32 vectors of shape (3,).
    Actions: ints in [0, 6) when ``act_shape == ()``, float32 vectors otherwise.
    """

    def __init__(self, num_envs: int, seed: int, mode: str = "frames", act_shape: tuple[int, ...] = (),
                 p_term: float = 0.12, p_trunc: float = 0.08, p_life: float = 0.06):
        self.n, self.mode, self.act_shape = num_envs, mode, act_shape
        self.rng = np.random.default_rng(seed)
        self.p = (p_term, p_trunc, p_life)
        self.obs = np.stack([self._reset_obs() for _ in range(num_envs)])
        self.needs_reset = np.zeros(num_envs, dtype=bool)

    def _reset_obs(self) -> np.ndarray:
        if self.mode == "frames":
            o = np.zeros((STACK, H, W), np.uint8)
            o[-1] = self.rng.integers(0, 256, (H, W), dtype=np.uint8)
            return o
        return self.rng.normal(size=3).astype(np.float32)

    def reset(self) -> np.ndarray:
        self.obs = np.stack([self._reset_obs() for _ in range(self.n)])
        self.needs_reset[:] = False
        return self.obs.copy()

    def step(self):
        """Returns action, reward, terminated, truncated, episode_end, next_obs, is_reset_step."""
        n = self.n
        if self.act_shape == ():
            action = self.rng.integers(0, 6, n)
        else:
            action = self.rng.normal(size=(n, *self.act_shape)).astype(np.float32)
        reward = np.zeros(n, np.float32)
        term, trunc, end = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
        is_reset = self.needs_reset.copy()
        nxt = np.empty_like(self.obs)
        for e in range(n):
            if self.needs_reset[e]:  # NEXT_STEP autoreset: this step only resets
                nxt[e] = self._reset_obs()
                self.needs_reset[e] = False
                continue
            reward[e] = self.rng.integers(-3, 4)
            if self.mode == "frames":
                nxt[e, :-1] = self.obs[e, 1:]
                nxt[e, -1] = self.rng.integers(0, 256, (H, W), dtype=np.uint8)
            else:
                nxt[e] = self.rng.normal(size=3).astype(np.float32)
            u = self.rng.random()
            if u < self.p[0]:
                term[e] = end[e] = True
            elif u < self.p[0] + self.p[1]:
                trunc[e] = end[e] = True
            elif u < sum(self.p):
                term[e] = True  # life loss: no bootstrap, episode continues
            self.needs_reset[e] = end[e]
        self.obs = nxt.copy()
        return action, reward, term, trunc, end, nxt, is_reset


class Reference:
    """Brute force: ``steps[T]`` = what the trainer saw at absolute row time T (T=0 and resumes: pseudo-rows)."""

    def __init__(self, rows: int, num_envs: int, n_step: int, gamma: float, lookback: int):
        self.rows, self.E, self.n, self.gamma, self.lookback = rows, num_envs, n_step, gamma, lookback
        self.steps: list[dict] = []
        self.needs_pseudo = True

    def add(self, obs, action, reward, term, end, nxt, is_reset):
        if self.needs_pseudo:
            if self.steps:  # resume cut: the last row ends its episode (truncation)
                self.steps[-1]["end"] = np.ones(self.E, bool)
            self.steps.append(dict(obs=None, action=None, reward=np.zeros(self.E), term=np.zeros(self.E, bool),
                                   end=np.zeros(self.E, bool), next_obs=obs.copy(), reset=np.ones(self.E, bool)))
            self.needs_pseudo = False
        self.steps.append(dict(obs=obs.copy(), action=action.copy(), reward=reward.copy(), term=term.copy(),
                               end=end.copy(), next_obs=nxt.copy(), reset=is_reset.copy()))

    def abs_time(self, idx: np.ndarray) -> np.ndarray:
        t = len(self.steps)
        row = idx // self.E
        return (t - 1) - ((t - 1 - row) % self.rows)

    def valid(self) -> set[int]:
        t = len(self.steps)
        lo = 1 if t <= self.rows else t - self.rows + self.lookback
        out = set()
        for T in range(lo, t - self.n + 1):
            for e in range(self.E):
                if not self.steps[T]["reset"][e]:
                    out.add((T % self.rows) * self.E + e)
        return out

    def transition(self, T: int, e: int):
        s = self.steps[T]
        ret, k = 0.0, 0
        for i in range(self.n):
            st = self.steps[T + i]
            ret += self.gamma ** i * float(st["reward"][e])
            k = i + 1
            if st["term"][e] or st["end"][e]:
                break
        disc = 0.0 if st["term"][e] else self.gamma ** k
        return s["obs"][e], s["action"][e], ret, disc, st["next_obs"][e]


def run(buf: ReplayBuffer, env: FakeVecEnv, ref: Reference, steps: int, obs: np.ndarray,
        pass_episode_end: bool = True) -> np.ndarray:
    for _ in range(steps):
        a, r, term, trunc, end, nxt, is_reset = env.step()
        buf.add(obs, a, r, term, trunc, nxt, episode_end=end if pass_episode_end else None)
        ref.add(obs, a, r, term, end, nxt, is_reset)
        obs = nxt
    return obs


def check_batch(batch: Batch, ref: Reference) -> None:
    idx = batch.idx.numpy()
    assert set(idx.tolist()) <= ref.valid(), "sampled a non-sampleable transition"
    T = ref.abs_time(idx)
    exp = [ref.transition(int(t), int(i % ref.E)) for t, i in zip(T, idx)]
    np.testing.assert_array_equal(batch.obs.numpy(), np.stack([x[0] for x in exp]))
    np.testing.assert_array_equal(batch.action.numpy(), np.stack([x[1] for x in exp]))
    np.testing.assert_allclose(batch.reward.numpy(), [x[2] for x in exp], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch.discount.numpy(), [x[3] for x in exp], rtol=1e-6, atol=0)
    np.testing.assert_array_equal(batch.next_obs.numpy(), np.stack([x[4] for x in exp]))
    assert batch.reward.dtype == batch.discount.dtype == batch.weights.dtype == torch.float32
    assert batch.idx.dtype == torch.int64


def check_all(buf: ReplayBuffer, ref: Reference) -> None:
    """Exhaustive: the sampleable set equals the reference's, and every transition matches."""
    valid = buf.valid_indices()
    assert set(valid.tolist()) == ref.valid()
    assert len(valid) == len(set(valid.tolist()))
    if len(valid):
        check_batch(buf.gather(valid), ref)


def make(kind: str, rows: int, num_envs: int, n_step: int, gamma: float = 0.9, seed: int = 0, **env_kw):
    if kind == "frames":
        buf = ReplayBuffer(rows * num_envs, num_envs, (STACK, H, W), np.uint8, n_step=n_step, gamma=gamma,
                           frame_stack=STACK, seed=seed)
        env = FakeVecEnv(num_envs, seed + 1, "frames", **env_kw)
        lookback = STACK
    else:
        buf = ReplayBuffer(rows * num_envs, num_envs, (3,), np.float32, action_shape=(2,), action_dtype=np.float32,
                           n_step=n_step, gamma=gamma, seed=seed)
        env = FakeVecEnv(num_envs, seed + 1, "vector", act_shape=(2,), **env_kw)
        lookback = 1
    return buf, env, Reference(rows, num_envs, n_step, gamma, lookback)


@pytest.mark.parametrize("n_step", [1, 3])
@pytest.mark.parametrize("kind", ["frames", "vector"])
def test_matches_reference_before_and_after_wraparound(kind, n_step):
    buf, env, ref = make(kind, rows=23, num_envs=3, n_step=n_step)
    obs = env.reset()
    obs = run(buf, env, ref, 1, obs)
    check_all(buf, ref)  # nothing sampleable yet for n>1: windows incomplete
    for _ in range(12):  # 1 + 12*7 = 85 rows: wraps the 23-row buffer several times
        obs = run(buf, env, ref, 7, obs)
        check_all(buf, ref)
        if len(buf.valid_indices()):
            check_batch(buf.sample(64), ref)
    assert isinstance(buf.storage, FrameStorage if kind == "frames" else ArrayStorage)
    # The stream did exercise every case: reset steps, length-1 episodes, truncations, life losses.
    real = ref.steps[1:]
    reset = np.stack([s["reset"] for s in real])
    term, end = np.stack([s["term"] for s in real]), np.stack([s["end"] for s in real])
    assert reset.sum() >= 10
    assert (reset[:-1] & end[1:]).sum() >= 2  # an episode whose first step ends it
    assert (end & ~term).sum() >= 3 and (end & term).sum() >= 3 and (term & ~end).sum() >= 2


def test_default_episode_end_and_discrete_actions():
    buf, env, ref = make("frames", rows=30, num_envs=4, n_step=2, p_life=0.0)
    obs = run(buf, env, ref, 70, env.reset(), pass_episode_end=False)
    check_all(buf, ref)
    b = buf.sample(32)
    assert b.action.dtype == torch.int64 and b.obs.dtype == torch.uint8 and b.obs.shape == (32, STACK, H, W)


def test_continuous_actions_dtype():
    buf, env, ref = make("vector", rows=30, num_envs=2, n_step=1)
    run(buf, env, ref, 40, env.reset())
    b = buf.sample(16)
    assert b.action.dtype == torch.float32 and b.action.shape == (16, 2)
    assert b.obs.dtype == torch.float32 and b.obs.shape == (16, 3)


def test_episode_start_stacks_with_several_envs():
    """Explicit check of the zero padding at episode starts and after a reset step."""
    buf = ReplayBuffer(40, 2, (STACK, H, W), np.uint8, frame_stack=STACK)
    f = [np.full((H, W), i + 1, np.uint8) for i in range(10)]

    def stack(*frames):
        s = np.zeros((STACK, H, W), np.uint8)
        if frames:
            s[-len(frames):] = np.stack(frames)
        return s

    obs = np.stack([stack(f[0]), stack(f[5])])
    nxt = np.stack([stack(f[0], f[1]), stack(f[5], f[6])])
    buf.add(obs, np.array([1, 2]), np.array([1.0, 2.0]), np.array([False, True]), np.zeros(2, bool), nxt)
    obs, nxt = nxt, np.stack([stack(f[0], f[1], f[2]), stack(f[7])])  # env 1: reset step
    buf.add(obs, np.array([3, 4]), np.array([3.0, 0.0]), np.zeros(2, bool), np.zeros(2, bool), nxt)
    obs, nxt = nxt, np.stack([stack(f[0], f[1], f[2], f[3]), stack(f[7], f[8])])
    buf.add(obs, np.array([5, 6]), np.array([5.0, 6.0]), np.zeros(2, bool), np.zeros(2, bool), nxt)
    obs, nxt = nxt, np.stack([stack(f[1], f[2], f[3], f[4]), stack(f[7], f[8], f[9])])
    buf.add(obs, np.array([7, 8]), np.array([7.0, 8.0]), np.zeros(2, bool), np.zeros(2, bool), nxt)
    # rows: 0 pseudo, 1..4 real; env 1 row 2 is a reset step (after its termination at row 1).
    assert sorted(buf.valid_indices().tolist()) == [2, 3, 4, 6, 7, 8, 9]
    b = buf.gather(np.array([2, 3, 8, 9, 7]))
    np.testing.assert_array_equal(b.obs[0].numpy(), stack(f[0]))              # env 0 row 1
    np.testing.assert_array_equal(b.next_obs[0].numpy(), stack(f[0], f[1]))
    np.testing.assert_array_equal(b.obs[1].numpy(), stack(f[5]))              # env 1 row 1: terminal
    assert b.discount[1].item() == 0.0 and b.reward[1].item() == 2.0
    np.testing.assert_array_equal(b.obs[2].numpy(), stack(f[0], f[1], f[2], f[3]))  # env 0 row 4
    np.testing.assert_array_equal(b.next_obs[2].numpy(), stack(f[1], f[2], f[3], f[4]))
    np.testing.assert_array_equal(b.obs[3].numpy(), stack(f[7], f[8]))        # env 1 row 4
    np.testing.assert_array_equal(b.next_obs[3].numpy(), stack(f[7], f[8], f[9]))
    np.testing.assert_array_equal(b.obs[4].numpy(), stack(f[7]))              # env 1 row 3, after reset
    assert b.action.tolist() == [1, 2, 7, 8, 6]


@pytest.mark.parametrize("terminated", [True, False])
def test_nstep_termination_vs_truncation(terminated):
    """rewards 1, 2 then the episode ends at the 2nd step: return 1 + 0.5*2; termination -> discount 0,
    truncation -> bootstrap with gamma^2 from the final obs; the reset step after it is never sampled."""
    gamma = 0.5
    buf = ReplayBuffer(20, 1, (1,), np.float32, n_step=3, gamma=gamma)
    z = np.zeros(1, bool)
    o = [np.array([[float(i)]], np.float32) for i in range(10)]
    buf.add(o[0], np.array([0]), np.array([1.0]), z, z, o[1])
    buf.add(o[1], np.array([0]), np.array([2.0]), np.array([terminated]), np.array([not terminated]), o[2])
    buf.add(o[2], np.array([0]), np.array([0.0]), z, z, o[3])  # reset step: o[3] is the new reset obs
    buf.add(o[3], np.array([0]), np.array([4.0]), z, z, o[4])
    buf.add(o[4], np.array([0]), np.array([8.0]), z, z, o[5])
    buf.add(o[5], np.array([0]), np.array([16.0]), z, z, o[6])
    # rows: 0 pseudo, 1, 2 (end), 3 reset, 4, 5, 6 -> complete 3-step windows start at rows <= 4
    assert sorted(buf.valid_indices().tolist()) == [1, 2, 4]
    b = buf.gather(np.array([1, 2, 4]))
    assert b.reward.tolist() == [1 + gamma * 2, 2.0, 4 + gamma * 8 + gamma ** 2 * 16]
    expected = [0.0, 0.0] if terminated else [gamma ** 2, gamma]
    assert b.discount.tolist() == expected + [gamma ** 3]
    assert b.obs[:, 0].tolist() == [0.0, 1.0, 3.0]
    assert b.next_obs[:, 0].tolist() == [2.0, 2.0, 6.0]


def test_life_loss_stops_nstep_but_not_frames():
    buf = ReplayBuffer(40, 1, (STACK, H, W), np.uint8, n_step=3, gamma=0.5, frame_stack=STACK)
    f = [np.full((1, STACK, H, W), 0, np.uint8) for _ in range(6)]
    for i in range(6):
        f[i][0, -1] = i + 1
        if i:
            f[i][0, :-1] = f[i - 1][0, 1:]
    z = np.zeros(1, bool)
    buf.add(f[0], np.array([0]), np.array([1.0]), np.array([True]), z, f[1], episode_end=z)  # life loss
    for i in range(1, 5):
        buf.add(f[i], np.array([0]), np.array([1.0]), z, z, f[i + 1])
    b = buf.gather(np.array([1, 2]))
    assert b.reward.tolist() == [1.0, 1.75] and b.discount.tolist() == [0.0, 0.125]
    np.testing.assert_array_equal(b.next_obs[0].numpy(), f[1][0])
    np.testing.assert_array_equal(b.next_obs[1].numpy(), f[4][0])  # frames continue across the life loss
    assert sorted(buf.valid_indices().tolist()) == [1, 2, 3]


def test_frame_storage_bytes_per_transition():
    buf = ReplayBuffer(10_000, 8, (4, 84, 84), np.uint8, frame_stack=4)
    assert buf.capacity == 10_000
    assert buf.bytes_per_transition <= 7200
    assert buf.nbytes >= 10_000 * 84 * 84


def test_len_counts_slots():
    buf, env, ref = make("vector", rows=10, num_envs=3, n_step=1)
    assert len(buf) == 0
    obs = run(buf, env, ref, 1, env.reset())
    assert len(buf) == 6  # pseudo-row + one row
    run(buf, env, ref, 20, obs)
    assert len(buf) == buf.capacity == 30


def test_state_dict_roundtrip_identical_samples_and_resume():
    buf, env, ref = make("frames", rows=25, num_envs=3, n_step=3)
    obs = run(buf, env, ref, 60, env.reset())
    buf.sample(8)  # advance the sampler RNG
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    state = torch.load(f, weights_only=True)
    other = ReplayBuffer(75, 3, (STACK, H, W), np.uint8, n_step=3, gamma=0.9, frame_stack=STACK, seed=123)
    other.load_state_dict(state)
    assert len(other) == len(buf)
    np.testing.assert_array_equal(other.valid_indices(), buf.valid_indices())
    for _ in range(3):
        a, b = buf.sample(32), other.sample(32)
        for name in Batch.__dataclass_fields__:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    # Resume: the trainer resets its envs; the next add writes a pseudo-row and the cut ends the episodes.
    ref.needs_pseudo = True
    obs = env.reset()
    run(other, env, ref, 10, obs)
    check_all(other, ref)
    check_batch(other.sample(64), ref)


def test_state_dict_partial_buffer_roundtrip():
    buf, env, ref = make("vector", rows=50, num_envs=2, n_step=2)
    run(buf, env, ref, 12, env.reset())
    f = io.BytesIO()
    torch.save(buf.state_dict(), f)
    f.seek(0)
    other = ReplayBuffer(100, 2, (3,), np.float32, action_shape=(2,), action_dtype=np.float32, n_step=2, gamma=0.9)
    other.load_state_dict(torch.load(f, weights_only=True))
    check_all(other, ref)


def test_load_mismatch_raises():
    buf = ReplayBuffer(100, 2, (3,), np.float32)
    with pytest.raises(ValueError, match="capacity is 100 in the checkpoint but 200"):
        ReplayBuffer(200, 2, (3,), np.float32).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match="num_envs is 2 in the checkpoint but 4"):
        ReplayBuffer(100, 4, (3,), np.float32).load_state_dict(buf.state_dict())
    with pytest.raises(ValueError, match=r"obs_shape is \[3\] in the checkpoint but \[4\]"):
        ReplayBuffer(100, 2, (4,), np.float32).load_state_dict(buf.state_dict())


def test_frame_storage_rejects_unpadded_reset_stacks():
    buf = ReplayBuffer(40, 2, (STACK, H, W), np.uint8, frame_stack=STACK)
    bad = np.ones((2, STACK, H, W), np.uint8)
    z = np.zeros(2, bool)
    with pytest.raises(ValueError, match="not zero-padded"):
        buf.add(bad, np.zeros(2), np.zeros(2), z, z, bad)  # first add: pseudo-row holds obs
    assert len(buf) == 0  # nothing written
    good = np.zeros((2, STACK, H, W), np.uint8)
    good[:, -1] = 5
    buf.add(good, np.zeros(2), np.zeros(2), np.array([True, False]), z, bad)  # non-reset rows: not checked
    with pytest.raises(ValueError, match=r"env\(s\) \[0\] is not zero-padded"):
        buf.add(bad, np.zeros(2), np.zeros(2), z, z, bad)  # env 0's reset step returns an unpadded stack


def test_uniform_sampler_frequencies():
    buf, env, ref = make("vector", rows=30, num_envs=4, n_step=2)
    run(buf, env, ref, 80, env.reset())
    valid = buf.valid_indices()
    n_draws = 200 * len(valid)
    idx = np.concatenate([buf.sampler.sample(1000, buf)[0] for _ in range(n_draws // 1000)])
    assert set(idx.tolist()) == set(valid.tolist())
    counts = np.bincount(idx, minlength=buf.capacity)[valid]
    expected = idx.size / len(valid)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = len(valid) - 1
    assert chi2 < dof + 6 * np.sqrt(2 * dof), (chi2, dof)


class RecordingSampler(UniformSampler):
    def __init__(self):
        super().__init__(0)
        self.added: list[np.ndarray] = []
        self.priorities: list[tuple[np.ndarray, np.ndarray]] = []

    def on_add(self, idx):
        self.added.append(idx)

    def update_priorities(self, idx, priorities):
        self.priorities.append((idx, priorities))


def test_sampler_plugs_in():
    sampler = RecordingSampler()
    assert isinstance(sampler, Sampler)
    buf = ReplayBuffer(30, 3, (3,), np.float32, sampler=sampler)
    env = FakeVecEnv(3, 0, "vector")
    obs = env.reset()
    for _ in range(4):
        a, r, term, trunc, end, nxt, _ = env.step()
        buf.add(obs, a, r, term, trunc, nxt)
        obs = nxt
    assert [x.tolist() for x in sampler.added] == [[0, 1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11], [12, 13, 14]]
    b = buf.sample(5)
    buf.update_priorities(b.idx, np.arange(5, dtype=np.float32))
    (i, p), = sampler.priorities
    assert i.dtype == np.int64 and np.array_equal(i, b.idx.numpy()) and p.tolist() == [0, 1, 2, 3, 4]


def test_sample_on_empty_buffer_raises():
    buf = ReplayBuffer(30, 3, (3,), np.float32, n_step=3)
    with pytest.raises(ValueError, match="no sampleable"):
        buf.sample(4)
