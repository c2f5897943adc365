"""Magnitude-pruning masks for any network (EauDeQN, sparse-training baselines).

What is pruned
    The ``weight`` of every ``nn.Linear`` and ``nn.Conv2d`` (their fake-quant subclasses included): the
    layers the deployment format stores as matrices. Biases, NoisyNet parameters and anything else stay
    dense. A mask is a bool tensor of the weight's shape (``True`` = kept), keyed by the weight's name in
    ``net.named_parameters()`` (e.g. ``encoder.net.0.weight``); a network's masks are a plain
    ``{name: tensor}`` dict, so they go into checkpoints as they are (``torch.load(weights_only=True)``).

How masks are enforced
    By multiplying the weights in place (:func:`apply_masks_`), after each optimizer step. There is no
    parametrization and no hook, so a masked network is still the plain module it was (export,
    quantization and ``load_state_dict`` see ordinary weights that happen to be zero). Adam moves a pruned
    weight away from zero in every step it gets a gradient; re-applying the mask after the step puts it
    back (tested in ``tests/test_eaudeqn.py``).

Magnitude pruning (:func:`magnitude_masks`)
    ``scope="layer"``: each layer independently loses its ``k = round(sparsity * n)`` smallest weights by
    ``|w|`` (``n`` = the layer's weights; uniform per-layer sparsity, as the gradual-magnitude-pruning
    baselines of Zhu & Gupta 2017 / Graesser et al. 2022 use). ``scope="global"``: one magnitude threshold
    over all prunable weights together (``k = round(sparsity * N)``), so layers with larger weights (small
    fan-in, e.g. the first layer of an MLP) keep more. Weights already masked out count as the smallest,
    so the new masks are subsets of the old ones (pruning never regrows a weight, even when asked for a
    lower sparsity than the masks already have); ties in ``|w|`` are
    broken by position (lower flat index pruned first), so the masks are deterministic. Every layer keeps
    at least one weight (``k <= n - 1``; under ``global`` a layer left empty gets its largest weight back),
    so a network stays a function of its input at any sparsity.

Ensembles (``rlq.nets.ensemble``: stacked ``(n, out, in)`` weights) are pruned member by member:
:func:`ensemble_weights` lists the stacked weights, :func:`prune_tensors` prunes any ``{name: tensor}`` (e.g.
the weight matrices of a few members, each a "layer"), and a stacked ``(n, ...)`` bool mask is applied the same
way (``weight *= mask``).

:func:`sparsity_report` measures a network's sparsity from its weights (exact zeros), so it works on any
network, masked or not.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

Masks = dict[str, torch.Tensor]
SCOPES = ("layer", "global")


def prunable_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The weights magnitude pruning applies to: ``{name: weight}`` of every Linear/Conv2d, in module order."""
    out: dict[str, nn.Parameter] = {}
    for mname, m in net.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            out[f"{mname}.weight" if mname else "weight"] = m.weight
    return out


def dense_masks(net: nn.Module) -> Masks:
    """All-``True`` masks (nothing pruned) for ``net``'s prunable weights."""
    return {name: torch.ones_like(w, dtype=torch.bool) for name, w in prunable_weights(net).items()}


def n_pruned(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a layer at ``sparsity`` loses: ``round(sparsity * n)`` (halves round up),
    at most ``n - 1``."""
    return min(int(math.floor(sparsity * n + 0.5)), n - 1)


def _scores(w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Pruning scores (flat): ``|w|``, and -1 where ``mask`` already removed the weight (pruned first)."""
    s = w.detach().abs().flatten().float()
    if mask is not None:
        s = torch.where(mask.flatten(), s, torch.full_like(s, -1.0))
    return s


def magnitude_masks(net: nn.Module, sparsity: float, scope: str = "layer", masks: Masks | None = None) -> Masks:
    """Masks removing the smallest-magnitude weights of ``net`` to reach ``sparsity`` (module docstring);
    ``masks``: the network's current masks (their removed weights stay removed)."""
    return prune_tensors(prunable_weights(net), sparsity, scope, masks)


def prune_tensors(weights: dict[str, torch.Tensor], sparsity: float, scope: str = "layer",
                  masks: Masks | None = None) -> Masks:
    """:func:`magnitude_masks` on ``{name: weight}`` tensors: each tensor is a "layer" (``scope="layer"``), or
    all of them share one threshold (``"global"``)."""
    if scope not in SCOPES:
        raise ValueError(f"unknown prune scope {scope!r}: choose one of {', '.join(SCOPES)}")
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1]")
    scores = {name: _scores(w, None if masks is None else masks.get(name)) for name, w in weights.items()}
    out: Masks = {}
    if scope == "layer":
        for name, w in weights.items():
            s = scores[name]
            keep = torch.ones_like(s, dtype=torch.bool)
            k = max(n_pruned(s.numel(), sparsity), int((s < 0).sum()))
            keep[torch.argsort(s, stable=True)[:k]] = False
            out[name] = keep.view_as(w)
        return out
    flat = torch.cat(list(scores.values()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    k = max(n_pruned(flat.numel(), sparsity), int((flat < 0).sum()))
    keep[torch.argsort(flat, stable=True)[:k]] = False
    start = 0
    for name, w in weights.items():
        k = keep[start:start + w.numel()].clone()
        if not k.any():  # every layer keeps its largest weight
            k[torch.argmax(scores[name])] = True
        out[name] = k.view_as(w)
        start += w.numel()
    return out


def ensemble_weights(net: nn.Module) -> dict[str, nn.Parameter]:
    """The stacked ``(n, ...)`` weights of every ensemble layer (``rlq.nets.ensemble``: EnsembleLinear /
    EnsembleConv2d, their fake-quant subclasses included), ``{name: weight}`` in module order; member ``i``'s
    weight matrix of a layer is ``weight[i]``."""
    from rlq.nets.ensemble import ENSEMBLE_LAYERS

    return {f"{mname}.weight" if mname else "weight": m.weight for mname, m in net.named_modules()
            if isinstance(m, ENSEMBLE_LAYERS)}


@torch.no_grad()
def apply_masks_(net: nn.Module, masks: Masks) -> None:
    """Zero ``net``'s pruned weights in place (``weight *= mask`` for every masked layer)."""
    for name, w in prunable_weights(net).items():
        m = masks.get(name)
        if m is not None:
            w.mul_(m)


def masks_sparsity(masks: Masks) -> float:
    """Fraction of removed weights over all masks."""
    total = sum(m.numel() for m in masks.values())
    return sum(int((~m).sum()) for m in masks.values()) / max(total, 1)


@torch.no_grad()
def sparsity_report(net: nn.Module) -> dict[str, Any]:
    """A network's sparsity, measured from its weights: ``{"overall": zero weights / prunable weights,
    "layers": {weight name: its zero fraction}, "params": prunable weights, "nonzero": their nonzeros}``.
    Biases are not counted (they are never pruned)."""
    layers, zeros, total = {}, 0, 0
    for name, w in prunable_weights(net).items():
        z = int((w == 0).sum())
        layers[name] = z / w.numel()
        zeros += z
        total += w.numel()
    return {"overall": zeros / max(total, 1), "layers": layers, "params": total, "nonzero": total - zeros}
