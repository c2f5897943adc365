"""Atari end to end on ale-py's native vector env: frame-deduplicated replay, Nature CNN updates,
episodes logged from every vector env."""
from rlq.checkpoint import load_checkpoint
from rlq.logging import read_metrics


def test_pong_dqn_8_envs_end_to_end(cli, tmp_path):
    res = cli("rlq.train", "agent=dqn", "env=Pong", "env.num_envs=8", "total_steps=20000",
              "agent.learning_starts=16000", "agent.buffer_size=20000", "eval.episodes=2", "eval.num_envs=2",
              "eval.every=0", "log.progress=false", "run_dir=pong", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "pong"
    episodes = read_metrics(run, "episode")
    assert len(episodes) >= 8
    assert all(-21 <= e["episode_return"] <= 21 and e["episode_length"] > 100 for e in episodes)
    ck = load_checkpoint(run)
    assert ck["trainer"]["step"] == 20000 and ck["trainer"]["updates"] > 0
    assert ck["spaces"]["observation"]["shape"] == [4, 84, 84]
    assert ck["config"]["agent"]["lr"] == 1e-4  # the agent's Atari block applied
    assert len(read_metrics(run, "eval")) == 1
