"""Replay buffers: storage (plain or frame-deduplicated) x sampler (uniform, later prioritized), with
n-step returns computed at sample time. See :mod:`rlq.replay.buffer` for the exact semantics."""
from rlq.replay.base import Batch
from rlq.replay.buffer import ReplayBuffer
from rlq.replay.prioritized import PrioritizedSampler, SumTree
from rlq.replay.samplers import SampleSource, Sampler, UniformSampler
from rlq.replay.storage import ArrayStorage, FrameStorage, ObsStorage

__all__ = ["Batch", "ReplayBuffer", "Sampler", "SampleSource", "UniformSampler", "ArrayStorage", "FrameStorage",
           "ObsStorage", "PrioritizedSampler", "SumTree"]
