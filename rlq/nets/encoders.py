"""Observation encoders.

Both take the raw observation tensor as the replay buffer and the env give it (uint8 frames for Atari,
float32 vectors otherwise) and do the dtype conversion inside the network, so the uint8 -> float work
happens once, on the batch, next to the first layer.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module_globals  # (the global hook registries)


class NatureCNN(nn.Module):
    """The convolutional torso of Mnih et al. 2015 (Nature DQN): 84x84 frames -> ``out_dim`` features.

    conv 32x8x8/4 -> conv 64x4x4/2 -> conv 64x3x3/1 -> flatten (3136) -> linear 512, ReLU after each.
    uint8 input is scaled by 1/255 inside ``forward``. ``out_dim=0`` drops the linear layer (the
    features are the 3136 flattened conv outputs; heads with their own hidden layers use this, e.g.
    Rainbow's noisy dueling streams).
    """

    def __init__(self, in_channels: int = 4, out_dim: int = 512, input_hw: tuple[int, int] = (84, 84)):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 32, 8, stride=4), nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2), nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(),
            nn.Flatten(),
        )
        with torch.no_grad():
            n_flat = self.convs(torch.zeros(1, in_channels, *input_hw)).shape[1]
        self.fc = nn.Sequential(nn.Linear(n_flat, out_dim), nn.ReLU()) if out_dim else nn.Identity()
        self.out_dim = out_dim or n_flat

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
        return self.fc(self.convs(x))


def has_hooks(*modules: nn.Module) -> bool:
    """Whether a hook (forward or backward, on one of ``modules`` or global) needs these modules to run
    through ``Module.__call__``: fused or shortcut forwards (``rlq.quant``'s fused QAT chain) check this
    first."""
    g = _module_globals
    if (g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
            or g._global_backward_pre_hooks):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)


class MLPEncoder(nn.Module):
    """A ReLU MLP over flattened vector observations (``hidden`` sizes, e.g. (256, 256))."""

    def __init__(self, in_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        self.net = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs.flatten(1).float())

    def fused_forward(self, obs: torch.Tensor, tail: nn.Module) -> torch.Tensor | None:
        """``tail(self(obs))`` as one fused QAT training node when the network is quantized
        (:class:`rlq.quant.layers.QuantSequential`), else None (nothing has run)."""
        fused = getattr(self.net, "fused_forward", None)
        if fused is None or has_hooks(self):
            return None
        return fused(obs.flatten(1).float(), tail)


ENCODERS = ("auto", "cnn", "mlp")


def make_encoder(kind: str, obs_shape: Sequence[int], obs_dtype, hidden: Sequence[int] = (256, 256),
                 cnn_features: int = 512) -> nn.Module:
    """Build the encoder for an observation space. ``kind="auto"`` picks the Nature CNN for image
    observations (uint8 with shape (C, H, W)) and the MLP otherwise."""
    image = len(obs_shape) == 3
    if kind == "auto":
        kind = "cnn" if image else "mlp"
    if kind == "cnn":
        if not image:
            raise ValueError(f"encoder 'cnn' needs image observations (C, H, W), got shape {tuple(obs_shape)}; "
                             "use encoder=mlp or auto")
        return NatureCNN(obs_shape[0], cnn_features, (obs_shape[1], obs_shape[2]))
    if kind == "mlp":
        if image:
            raise ValueError(f"encoder 'mlp' got image observations of shape {tuple(obs_shape)}; "
                             "use encoder=cnn or auto")
        n = 1
        for s in obs_shape:
            n *= int(s)
        return MLPEncoder(n, hidden)
    raise ValueError(f"unknown encoder {kind!r}: choose one of {', '.join(ENCODERS)}")
