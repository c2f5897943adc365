"""Noisy linear layers for exploration (NoisyNets).

Paper
    Fortunato et al. 2018, "Noisy Networks for Exploration" (factorized Gaussian noise, section 3.2);
    used by Hessel et al. 2018, "Rainbow: Combining Improvements in Deep Reinforcement Learning".

``NoisyLinear`` computes ``y = (mu_w + sigma_w * eps_w) x + (mu_b + sigma_b * eps_b)`` with factorized
noise ``eps_w = f(eps_out) f(eps_in)^T``, ``eps_b = f(eps_out)``, ``f(x) = sign(x) sqrt(|x|)``,
``eps_in ~ N(0, I_p)``, ``eps_out ~ N(0, I_q)`` (p = in_features, q = out_features).

When the noise is used
    The noise is applied only while the module is in training mode (``module.train()``, torch's default)
    **and** its ``noise_enabled`` flag is True (the default). In eval mode (``module.eval()``) or with
    ``noise_enabled = False`` (see :func:`set_noise` / :func:`noise_disabled`) the layer uses the mean
    weights only: ``F.linear(x, weight_mu, bias_mu)``.

    The noise is held fixed between calls to :meth:`NoisyLinear.reset_noise` (it is *not* resampled on
    every forward). The intended agent protocol: call :func:`reset_noise` on the online network before
    each acting step and on the online and target networks before each update; evaluation acts with
    the mean weights (eval mode or ``noise_disabled``). Note that Hessel et al. act with noise during
    training (NoisyNets replace epsilon-greedy exploration), and the noise then comes only from here.

Reproducibility and checkpoints
    Noise is drawn with ``torch.randn`` from torch's global generator of the buffer's device (CPU, or
    the CUDA generator, both seeded by ``torch.manual_seed``), unless a ``generator`` is passed to
    ``reset_noise``. The current noise lives in the buffers ``epsilon_in`` / ``epsilon_out`` (already
    passed through ``f``), so ``state_dict()`` saves and restores it. ``load_state_dict`` from an
    online network into a target network therefore copies the noise too; resample the target's noise
    afterwards if independent noise is wanted. The ``noise_enabled`` flag is a plain attribute and is
    not part of the state dict.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


def _scale_noise(x: torch.Tensor) -> torch.Tensor:
    """f(x) = sign(x) * sqrt(|x|)."""
    return x.sign() * x.abs().sqrt()


class NoisyLinear(nn.Module):
    """A linear layer with learnable factorized Gaussian noise (Fortunato et al. 2018, section 3.2).

    Parameters: ``weight_mu`` (out, in), ``weight_sigma`` (out, in), ``bias_mu`` (out,),
    ``bias_sigma`` (out,). Buffers: ``epsilon_in`` (in,), ``epsilon_out`` (out,) = f(noise).
    Initialisation (factorized case): mu ~ U(-1/sqrt(p), 1/sqrt(p)), sigma = sigma0 / sqrt(p), with
    p = in_features and sigma0 = 0.5 by default. Noise is sampled once at construction.
    """

    def __init__(self, in_features: int, out_features: int, sigma0: float = 0.5, bias: bool = True):
        super().__init__()
        if not bias:
            raise ValueError("NoisyLinear always has a (noisy) bias")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.sigma0 = float(sigma0)
        self.noise_enabled = True
        self.weight_mu = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.weight_sigma = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias_mu = nn.Parameter(torch.empty(self.out_features))
        self.bias_sigma = nn.Parameter(torch.empty(self.out_features))
        self.register_buffer("epsilon_in", torch.zeros(self.in_features))
        self.register_buffer("epsilon_out", torch.zeros(self.out_features))
        self.reset_parameters()
        self.reset_noise()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.weight_mu.uniform_(-bound, bound)
            self.bias_mu.uniform_(-bound, bound)
            self.weight_sigma.fill_(self.sigma0 * bound)
            self.bias_sigma.fill_(self.sigma0 * bound)

    @torch.no_grad()
    def reset_noise(self, generator: torch.Generator | None = None) -> None:
        """Resample eps_in, eps_out (from torch's global RNG unless ``generator`` is given)."""
        for buf in (self.epsilon_in, self.epsilon_out):
            noise = torch.randn(buf.shape, generator=generator, device=buf.device, dtype=buf.dtype)
            buf.copy_(_scale_noise(noise))

    @property
    def noisy(self) -> bool:
        """Whether ``forward`` currently adds noise (training mode and ``noise_enabled``)."""
        return self.training and self.noise_enabled

    def noisy_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The perturbed (weight, bias) under the current noise, regardless of mode."""
        weight = self.weight_mu + self.weight_sigma * torch.outer(self.epsilon_out, self.epsilon_in)
        bias = self.bias_mu + self.bias_sigma * self.epsilon_out
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.noisy:
            # (sigma * eps_out eps_in^T) x == eps_out * (sigma (eps_in * x)): never materializes the
            # (out, in) noisy weight (for a 3136x512 layer at batch 1 this is several times faster)
            bias = self.bias_mu + self.bias_sigma * self.epsilon_out
            return F.linear(x, self.weight_mu, bias) + F.linear(x * self.epsilon_in, self.weight_sigma) * self.epsilon_out
        return F.linear(x, self.weight_mu, self.bias_mu)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, sigma0={self.sigma0}"


def noisy_layers(module: nn.Module) -> Iterator[NoisyLinear]:
    """Every NoisyLinear in ``module`` (itself included)."""
    return (m for m in module.modules() if isinstance(m, NoisyLinear))


def reset_noise(module: nn.Module, generator: torch.Generator | None = None) -> int:
    """Call ``reset_noise`` on every NoisyLinear in ``module``; returns how many there were."""
    n = 0
    for m in noisy_layers(module):
        m.reset_noise(generator)
        n += 1
    return n


def has_noisy(module: nn.Module) -> bool:
    """Whether ``module`` contains at least one NoisyLinear."""
    return any(True for _ in noisy_layers(module))


def set_noise(module: nn.Module, enabled: bool) -> None:
    """Set ``noise_enabled`` on every NoisyLinear in ``module`` (False: mean weights even in train mode)."""
    for m in noisy_layers(module):
        m.noise_enabled = bool(enabled)


@contextmanager
def noise_disabled(module: nn.Module):
    """Context manager: mean weights inside the block (train/eval mode untouched), flags restored after."""
    layers = list(noisy_layers(module))
    saved = [m.noise_enabled for m in layers]
    try:
        for m in layers:
            m.noise_enabled = False
        yield module
    finally:
        for m, s in zip(layers, saved):
            m.noise_enabled = s


def make_linear(in_features: int, out_features: int, noisy: bool = False, sigma0: float = 0.5) -> nn.Module:
    """``NoisyLinear(in, out, sigma0)`` when ``noisy`` else ``nn.Linear(in, out)``."""
    if noisy:
        return NoisyLinear(in_features, out_features, sigma0=sigma0)
    return nn.Linear(in_features, out_features)


def linear_factory(noisy: bool = False, sigma0: float = 0.5) -> Callable[[int, int], nn.Module]:
    """A ``(in, out) -> layer`` factory: ``nn.Linear``, or ``NoisyLinear`` with ``sigma0`` bound.

    Pass it as the ``linear=`` argument of the Q heads (``QHead`` / ``DuelingHead``) to build noisy
    plain or dueling heads, e.g. ``DuelingHead(d, n_actions, linear=linear_factory(True, 0.5))``.
    """
    if noisy:
        return functools.partial(NoisyLinear, sigma0=float(sigma0))
    return nn.Linear
