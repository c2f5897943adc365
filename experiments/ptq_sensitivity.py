"""PTQ sensitivity on CartPole: train an fp32 DQN (seed 0, 30k steps), post-training quantize it to W8A8 with each
calibration method, and switch single quantizers off to see which one costs greedy-action agreement; prints
the Q scale, the action-gap distribution and the Q errors.

    python experiments/ptq_sensitivity.py
"""
import copy

import numpy as np
import torch

from rlq.quant import QuantConfig, calibrate, quant_layers, quantize_
from rlq.train import _compose, build_config
from rlq.trainer import Trainer

torch.set_num_threads(1)
ov = ["agent=dqn", "seed=0", "total_steps=30000", "eval.every=5000", "eval.episodes=5", "checkpoint.every=0",
      "log.progress=false", "log.tensorboard=false", "threads=1"]
cfg = build_config(_compose(ov), ov)
tr = Trainer(cfg, "runs/ptq_sensitivity"); tr.train(); tr.close()
agent = tr.agent
obs = tr.buffer.sample(5000).obs.numpy()
held = tr.buffer.sample(5000).obs.numpy()
with torch.no_grad():
    q32 = agent.online(torch.as_tensor(held)).numpy()
gap = np.sort(q32, 1)[:, -1] - np.sort(q32, 1)[:, -2]
print("Q mean", q32.mean(), "median action gap", np.median(gap))
for method in ("minmax", "percentile", "mse"):
    net = copy.deepcopy(agent.online)
    quantize_(net, QuantConfig(name="w8a8", weight_bits=8), torch.as_tensor(obs[:2]))
    calibrate(net, obs, method=method)
    layers = list(quant_layers(net))
    def agree():
        with torch.no_grad():
            return float((net(torch.as_tensor(held)).numpy().argmax(1) == q32.argmax(1)).mean())
    base = agree()
    res = {}
    for i, m in enumerate(layers):
        m.act.enabled = False; res[f"a{i} off"] = agree(); m.act.enabled = True
        m.wq.enabled = False; res[f"w{i} off"] = agree(); m.wq.enabled = True
    print(method, "all on", base, {k: round(v, 3) for k, v in res.items()})
print("obs ranges per feature", obs.min(0).round(2), obs.max(0).round(2))
print("gap quantiles 1/5/10/25%", np.quantile(gap, [0.01, 0.05, 0.1, 0.25]).round(4))
for m in layers: m.act.enabled = False; m.wq.enabled = False
print("all off", agree())
for m in layers: m.act.enabled = True; m.wq.enabled = True
with torch.no_grad():
    qq = net(torch.as_tensor(held)).numpy()
err = np.abs(qq - q32).max(1)
print("Q abs error median/90%", np.median(err).round(4), np.quantile(err, 0.9).round(4))
dis = qq.argmax(1) != q32.argmax(1)
print("gap of disagreeing states: median", np.median(gap[dis]).round(4), "max", gap[dis].max().round(4))
