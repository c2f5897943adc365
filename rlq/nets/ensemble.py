"""Vectorized ensembles: N networks with stacked weights evaluated in one batched call (no Python loop over
members), the building block of Q-ensembles (REDQ, SAC-N / LB-SAC, ensemble DQN).

``EnsembleLinear(n, in, out)`` holds a ``(n, out, in)`` weight and a ``(n, out)`` bias. An input ``(B, in)``
shared by every member is one ``addmm`` into ``n * out`` columns (the first layer of a Q-ensemble reads the
same observations for every member); an input ``(n, B, in)`` with one batch per member is one ``baddbmm``.
Both return ``(n, B, out)``. Each member is initialised like a separate ``nn.Linear`` (Kaiming-uniform
weights, uniform bias in ``±1/sqrt(in)``), so an ensemble of N starts as N independent networks;
:meth:`EnsembleLinear.from_linears` stacks existing layers instead (the SAC critics use it, so two critics
start from exactly the weights two separate ``nn.Linear`` critics would have).

``EnsembleConv2d`` does the same for convolutions: the first (shared-input) layer is one convolution with
``n * out`` output channels, the following layers are grouped convolutions (``groups = n``) over the
member-major channels ``(B, n * C, H, W)``. :class:`EnsembleNatureCNN` is the Nature-DQN torso built that way.

Every ``forward`` takes ``members``: an index tensor selecting a subset of the ensemble (REDQ evaluates only
the M target critics it samples); the same subset is threaded through every layer of a network.

The weight layout was chosen by measurement (``experiments/bench_ensemble.py``): at these sizes every
layout (``baddbmm`` on ``(n, out, in)`` or ``(n, in, out)``, ``einsum``, ``bmm``) runs at 80-95 GFLOP/s on one
core of the reference machine, within noise of one large matmul; the ensemble's cost is its arithmetic.
When gradients are recorded, ``EnsembleLinear`` uses its own backward (also under bf16 autocast, in bf16), with the same
products: the weight gradient of a batched layer is computed directly in the ``(n, out, in)`` layout (autograd
computes it transposed and then copies it into the parameter's layout, ~0.8 ms for a 10 x 256 x 256 weight on one
core), and the first layer's as ``(x^T g)^T`` (autograd's ``g^T x`` has a 4-column output and runs ~4x slower).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _subset(t: torch.Tensor, members: torch.Tensor | None) -> torch.Tensor:
    return t if members is None else t.index_select(0, members)


class _SharedInputLinear(torch.autograd.Function):
    """``x (B, in) @ w (m, in)^T + b`` with the weight gradient computed as ``(x^T g)^T`` (one ``(in, B) @ (B, m)``
    matmul, then a small transpose): autograd's ``g^T x`` is a ``(m, B) @ (B, in)`` matmul with a narrow output that
    runs 4-6x slower on CPU for the few inputs of a first layer (``experiments/results/bench_ensemble.md``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, w, b = _autocast(x, w, b)
        ctx.save_for_backward(x, w)
        return torch.addmm(b, x, w.t())

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g = g.to(w.dtype)
        gx = g.mm(w) if ctx.needs_input_grad[0] else None
        gw = x.t().mm(g).t().contiguous() if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _BatchedLinear(torch.autograd.Function):
    """``x (n, B, in) @ w (n, out, in)^T + b`` whose weight gradient ``g^T x`` is computed directly in the
    ``(n, out, in)`` layout: autograd computes it as ``(x^T g)^T`` in ``(n, in, out)`` and then copies it
    transposed into the parameter's layout, a strided copy that costs about 60% of the matmul itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, w, b = _autocast(x, w, b)
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        x, w = ctx.saved_tensors
        g = g.to(w.dtype)
        gx = torch.bmm(g, w) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g.transpose(1, 2), x) if ctx.needs_input_grad[1] else None
        gb = g.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _autocast(*ts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Under autocast (``agent.amp=bf16``) the products run in the autocast dtype, as autocast would run
    ``addmm`` / ``baddbmm``: inputs, weight and bias are cast (the saved copies for the backward are the cast
    ones) and the output is in that dtype. The backward's gradients come out in it too and autograd casts them
    to the fp32 parameters' dtype, the same rounding as autocast's own cast nodes."""
    dev = ts[0].device.type
    if not torch.is_autocast_enabled(dev):
        return ts
    dt = torch.get_autocast_dtype(dev)
    return tuple(t.to(dt) for t in ts)


def _plain_autograd(x: torch.Tensor) -> bool:
    """Use the composed ops (no custom backward) when no gradient is recorded."""
    return not torch.is_grad_enabled()


class EnsembleLinear(nn.Module):
    def __init__(self, n: int, in_features: int, out_features: int):
        super().__init__()
        if n < 1:
            raise ValueError(f"an ensemble needs n >= 1 members, got {n}")
        self.n, self.in_features, self.out_features = int(n), int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.n, self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.empty(self.n, self.out_features))
        self.reset_parameters()

    @classmethod
    def from_linears(cls, layers: Sequence[nn.Linear]) -> "EnsembleLinear":
        """The ensemble whose member ``i`` is a copy of ``layers[i]``."""
        ens = cls(len(layers), layers[0].in_features, layers[0].out_features)
        with torch.no_grad():
            ens.weight.copy_(torch.stack([lin.weight for lin in layers]))
            ens.bias.copy_(torch.stack([lin.bias for lin in layers]))
        return ens.to(layers[0].weight.device)

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features > 0 else 0.0
        for i in range(self.n):  # as nn.Linear: kaiming_uniform(a=sqrt(5)) weights, uniform bias
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    # the fake-quant subclass (rlq.quant.layers.QuantEnsembleLinear) overrides these two
    def ensemble_weight(self) -> torch.Tensor:
        return self.weight

    def ensemble_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        k = self.n if members is None else int(members.numel())
        if x.dim() == 3 and x.shape[0] != k or x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(f"EnsembleLinear({self.n}) takes (B, {self.in_features}) or ({k}, B, "
                             f"{self.in_features}) inputs, got {tuple(x.shape)}")
        x = self.ensemble_input(x)
        plain = _plain_autograd(x)
        w, b = self.ensemble_weight(), self.bias
        if plain and w is self.weight and not w.requires_grad and torch.is_autocast_enabled(x.device.type):
            w, b = self._autocast_params()
        w, b = _subset(w, members), _subset(b, members)
        if x.dim() == 2:  # one batch shared by every member: one matmul into k * out columns
            w2, b2 = w.reshape(k * self.out_features, self.in_features), b.reshape(-1)
            y = torch.addmm(b2, x, w2.t()) if plain else _SharedInputLinear.apply(x, w2, b2)
            return y.view(x.shape[0], k, self.out_features).transpose(0, 1)
        if plain:
            return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
        return _BatchedLinear.apply(x, w, b)

    def _autocast_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias in the autocast dtype for a frozen layer (``requires_grad`` off: a target network),
        cast once and reused until either changes: a target copy changes every ``target_update_period``
        updates, and casting a 10 x 256 x 256 weight costs ~0.1-0.2 ms on one core. Changes are seen through the
        tensors' version counters, which every in-place write of a frozen parameter bumps (``load_state_dict``,
        Polyak ``_foreach_lerp_``, ``copy_``; not writes through ``.data``, which rlq never makes); the cache
        holds the tensors it was made from, so a replaced parameter is a miss. Trained layers are not cached:
        the fused Adam step writes their weights without bumping the version counter."""
        dt = torch.get_autocast_dtype(self.weight.device.type)
        key = (self.weight, self.weight._version, self.bias, self.bias._version, dt)
        cache = self.__dict__.get("_amp_cache")
        if cache is None or len(cache[0]) != len(key) or any(a is not b if isinstance(a, torch.Tensor) else a != b
                                                              for a, b in zip(cache[0], key)):
            cache = (key, self.weight.detach().to(dt), self.bias.detach().to(dt))
            self.__dict__["_amp_cache"] = cache
        return cache[1], cache[2]

    def member(self, i: int) -> nn.Linear:
        """Member ``i`` as a plain ``nn.Linear`` (a copy of the float weights)."""
        lin = nn.Linear(self.in_features, self.out_features)
        with torch.no_grad():
            lin.weight.copy_(self.weight[i])
            lin.bias.copy_(self.bias[i])
        return lin

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}"


class EnsembleConv2d(nn.Module):
    """N convolutions with a ``(n, out, in, kh, kw)`` weight. ``shared_input=True``: the input ``(B, in, H, W)``
    is the same for every member (one convolution into ``n * out`` channels); otherwise the input holds the
    members' channels one after the other, ``(B, n * in, H, W)``, and it is one grouped convolution. The
    output is ``(B, n * out, H', W')``, member-major. Members are initialised like separate ``nn.Conv2d``."""

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 shared_input: bool = False):
        super().__init__()
        if n < 1:
            raise ValueError(f"an ensemble needs n >= 1 members, got {n}")
        self.n, self.in_channels, self.out_channels = int(n), int(in_channels), int(out_channels)
        self.kernel_size, self.stride, self.shared_input = int(kernel_size), int(stride), bool(shared_input)
        self.weight = nn.Parameter(torch.empty(self.n, out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(self.n, out_channels))
        fan_in = in_channels * kernel_size * kernel_size
        bound = 1.0 / math.sqrt(fan_in)
        for i in range(self.n):
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
        nn.init.uniform_(self.bias, -bound, bound)

    def ensemble_weight(self) -> torch.Tensor:
        return self.weight

    def ensemble_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        k = self.n if members is None else int(members.numel())
        want = self.in_channels if self.shared_input else k * self.in_channels
        if x.dim() != 4 or x.shape[1] != want:
            raise ValueError(f"EnsembleConv2d({self.n}) takes (B, {want}, H, W) inputs, got {tuple(x.shape)}")
        x = self.ensemble_input(x)
        w = _subset(self.ensemble_weight(), members)
        w = w.reshape(k * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        b = _subset(self.bias, members).reshape(-1)
        return F.conv2d(x, w, b, self.stride, groups=1 if self.shared_input else k)

    def member(self, i: int) -> nn.Conv2d:
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride)
        with torch.no_grad():
            conv.weight.copy_(self.weight[i])
            conv.bias.copy_(self.bias[i])
        return conv

    def extra_repr(self) -> str:
        return (f"n={self.n}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, shared_input={self.shared_input}")


ENSEMBLE_LAYERS = (EnsembleLinear, EnsembleConv2d)


def _run(layers: nn.ModuleList, x: torch.Tensor, members: torch.Tensor | None, relu_last: bool) -> torch.Tensor:
    for i, layer in enumerate(layers):
        x = layer(x, members)
        if relu_last or i < len(layers) - 1:
            x = F.relu(x)
    return x


class EnsembleMLP(nn.Module):
    """N ReLU MLPs ``in -> hidden... -> out`` with stacked weights: ``(B, in)`` or ``(n, B, in)`` -> ``(n, B, out)``."""

    def __init__(self, n: int, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        self.n = int(n)
        dims = [in_features, *hidden, out_features]
        self.layers = nn.ModuleList(EnsembleLinear(n, a, b) for a, b in zip(dims[:-1], dims[1:]))

    @classmethod
    def from_sequentials(cls, mlps: Sequence[nn.Sequential]) -> "EnsembleMLP":
        """Stack N ``Linear/ReLU`` MLPs of the same shape (member ``i`` = a copy of ``mlps[i]``)."""
        per_member = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in mlps]
        first = per_member[0]
        ens = cls(len(mlps), first[0].in_features, [lin.out_features for lin in first[:-1]], first[-1].out_features)
        ens.layers = nn.ModuleList(EnsembleLinear.from_linears([m[j] for m in per_member]) for j in range(len(first)))
        return ens

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.layers, x.float(), members, relu_last=False)


class EnsembleMLPEncoder(nn.Module):
    """N ReLU MLP encoders over flattened vector observations: ``(B, *obs)`` -> ``(n, B, hidden[-1])``."""

    def __init__(self, n: int, in_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.n = int(n)
        dims = [in_dim, *hidden]
        self.layers = nn.ModuleList(EnsembleLinear(n, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out_dim = dims[-1]

    def forward(self, obs: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        x = obs.flatten(1).float()
        if not len(self.layers):
            k = self.n if members is None else int(members.numel())
            return x.unsqueeze(0).expand(k, *x.shape)
        return _run(self.layers, x, members, relu_last=True)


class EnsembleNatureCNN(nn.Module):
    """N Nature-DQN torsos (``rlq.nets.encoders.NatureCNN``) in three convolutions, whatever N: the first
    reads the shared frames into ``n * 32`` channels, the next two are grouped (``groups = n``), then each
    member's 3136 features go through its own 512-unit layer (one ``baddbmm``). ``(B, C, 84, 84)`` ->
    ``(n, B, out_dim)`` (``out_dim = 0``: the flattened conv features)."""

    def __init__(self, n: int, in_channels: int = 4, out_dim: int = 512, input_hw: tuple[int, int] = (84, 84)):
        super().__init__()
        self.n = int(n)
        self.convs = nn.ModuleList([EnsembleConv2d(n, in_channels, 32, 8, 4, shared_input=True),
                                    EnsembleConv2d(n, 32, 64, 4, 2), EnsembleConv2d(n, 64, 64, 3, 1)])
        h, w = input_hw
        for k, s in ((8, 4), (4, 2), (3, 1)):
            h, w = (h - k) // s + 1, (w - k) // s + 1
        self.n_flat = 64 * h * w
        self.fc = EnsembleLinear(n, self.n_flat, out_dim) if out_dim else None
        self.out_dim = out_dim or self.n_flat

    def forward(self, obs: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        x = obs.float() / 255.0 if obs.dtype == torch.uint8 else obs.float()
        x = _run(self.convs, x, members, relu_last=True)
        k = self.n if members is None else int(members.numel())
        x = x.reshape(x.shape[0], k, self.n_flat).transpose(0, 1)  # (k, B, 3136), member-major channels
        return F.relu(self.fc(x, members)) if self.fc is not None else x


class EnsembleQNetwork(nn.Module):
    """N Q-networks (encoder -> optional hidden layer -> one Q-value per action) with stacked weights.

    ``forward(obs, members=None)`` -> ``(k, B, n_actions)`` for the k selected members (all by default);
    ``q_values(obs)`` -> ``(B, n_actions)``, the mean over members: what acting and export use."""

    def __init__(self, encoder: nn.Module, n_actions: int, head_hidden: int = 0):
        super().__init__()
        self.n = encoder.n
        self.encoder = encoder
        dims = [encoder.out_dim, *([head_hidden] if head_hidden else []), n_actions]
        self.head = nn.ModuleList(EnsembleLinear(self.n, a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.n_actions = int(n_actions)

    def forward(self, obs: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        return _run(self.head, self.encoder(obs, members), members, relu_last=False)

    def q_values(self, obs: torch.Tensor) -> torch.Tensor:
        return self(obs).mean(0)


def make_ensemble_encoder(n: int, kind: str, obs_shape: Sequence[int], hidden: Sequence[int] = (256, 256),
                          cnn_features: int = 512) -> nn.Module:
    """The ensemble counterpart of :func:`rlq.nets.encoders.make_encoder` (``auto``: CNN for images)."""
    image = len(obs_shape) == 3
    if kind == "auto":
        kind = "cnn" if image else "mlp"
    if kind == "cnn":
        if not image:
            raise ValueError(f"encoder 'cnn' needs image observations (C, H, W), got shape {tuple(obs_shape)}; "
                             "use encoder=mlp or auto")
        return EnsembleNatureCNN(n, obs_shape[0], cnn_features, (obs_shape[1], obs_shape[2]))
    if kind == "mlp":
        if image:
            raise ValueError(f"encoder 'mlp' got image observations of shape {tuple(obs_shape)}; "
                             "use encoder=cnn or auto")
        return EnsembleMLPEncoder(n, int(math.prod(obs_shape)), hidden)
    raise ValueError(f"unknown encoder {kind!r}: choose one of auto, cnn, mlp")


def per_member_clip_grad_norm_(params: Sequence[torch.Tensor], n: int, max_norm: float) -> torch.Tensor:
    """Clip each member's gradient to norm ``max_norm`` separately (an ensemble member is clipped as a single
    network would be, whatever N is). Stacked parameters have the member as their leading dimension
    (``(n, ...)``, or ``(n * c, ...)`` for per-channel quantizer steps); parameters shared by all members
    (a scalar activation-quantizer range) are scaled by the smallest member factor. Returns the ``(n,)``
    norms before clipping (non-finite if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    stacked = [g for g in grads if g.dim() >= 1 and g.shape[0] % n == 0 and g.numel() >= n]
    shared = [g for g in grads if not (g.dim() >= 1 and g.shape[0] % n == 0 and g.numel() >= n)]
    if not grads:
        return torch.zeros(n)
    # one pass per tensor (vector_norm makes no squared copy); a member's norm squared sums its parts
    sq = torch.stack([torch.linalg.vector_norm(g.reshape(n, -1), dim=1) for g in stacked]).square().sum(0) \
        if stacked else torch.zeros(n, device=grads[0].device)
    if shared:
        sq = sq + torch.stack([torch.linalg.vector_norm(g) for g in shared]).square().sum()
    norms = sq.sqrt()
    if math.isfinite(max_norm) and max_norm > 0:
        factor = (max_norm / (norms + 1e-6)).clamp(max=1.0)
        if bool((factor < 1.0).any()):  # (no pass over the gradients when no member needs clipping)
            for g in stacked:  # member-major rows: (n, ...) or (n * c, ...)
                g.mul_(factor.repeat_interleave(g.shape[0] // n).view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
            for g in shared:
                g.mul_(factor.min().to(g.dtype))
    return norms


def mean_q_network(net: EnsembleQNetwork) -> nn.Module:
    """A plain ``QNetwork`` (``MLPEncoder`` + ``QHead``) computing ``net.q_values``, the mean over members, with
    float weights: the first layer stacks the members' rows (``n * out`` units on the shared input), hidden
    layers are block-diagonal (member ``i`` reads only its own units) and the output layer averages, with the
    concatenated member weights divided by ``n`` and the mean bias. This is how a Q-ensemble's greedy policy
    is exported (``rlq.export``): hidden layers get ``n`` times the units and ``n^2`` times the weights (zeros
    off the diagonal blocks), so it is offered for MLP ensembles only."""
    from rlq.nets.encoders import MLPEncoder
    from rlq.nets.heads import QHead, QNetwork

    if not isinstance(net.encoder, EnsembleMLPEncoder):
        raise ValueError(f"only MLP Q-ensembles fold into one network for export; a {type(net.encoder).__name__} "
                         f"ensemble of {net.n} would need {net.n}^2 block-diagonal copies of its 3136x512 layer")
    n = net.n
    layers = [*net.encoder.layers, *net.head]
    enc_layers, head_layers = list(net.encoder.layers), list(net.head)
    in_dim = layers[0].in_features
    enc = MLPEncoder(in_dim, [n * lin.out_features for lin in enc_layers])
    head_hidden = n * head_layers[0].out_features if len(head_layers) == 2 else 0
    head = QHead(enc.out_dim if enc_layers else in_dim, net.n_actions, head_hidden)
    targets = [m for m in enc.net if isinstance(m, nn.Linear)]
    targets += [head.q] if isinstance(head.q, nn.Linear) else [m for m in head.q if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for j, (src, dst) in enumerate(zip(layers, targets)):
            w, b = src.weight.detach(), src.bias.detach()
            first, last = j == 0, j == len(layers) - 1
            if first and last:
                dst.weight.copy_(w.mean(0)), dst.bias.copy_(b.mean(0))
            elif first:
                dst.weight.copy_(w.reshape(n * src.out_features, src.in_features)), dst.bias.copy_(b.reshape(-1))
            elif last:
                dst.weight.copy_(w.permute(1, 0, 2).reshape(src.out_features, n * src.in_features) / n)
                dst.bias.copy_(b.mean(0))
            else:
                dst.weight.copy_(torch.block_diag(*w)), dst.bias.copy_(b.reshape(-1))
    return QNetwork(enc, head).to(layers[0].weight.device)
