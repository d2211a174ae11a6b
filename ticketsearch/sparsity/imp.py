"""Iterative Magnitude Pruning: the pruning rules (pure tensor code).

Each rule takes the current dense weights and keep-masks of the prunable layers and returns new
keep-masks with ``ceil(fraction * remaining)`` more weights removed: those of smallest |w|
among the weights still kept. The threshold is the |w| at that rank; weights strictly above it
are kept (so ties at the threshold are pruned together).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def prune_count(fraction: float, remaining: int) -> int:
    """``ceil(fraction * remaining)``, robust to float noise (0.2 * 15 is 3, not 4)."""
    return min(remaining, math.ceil(round(fraction * remaining, 9)))


def _threshold(magnitudes: Tensor, fraction: float) -> Tensor | None:
    """|w| at rank ceil(fraction * n) among ``magnitudes`` (1-D); None if nothing to prune."""
    count = prune_count(fraction, magnitudes.numel())
    if count == 0:
        return None
    return torch.kthvalue(magnitudes.float().cpu(), count).values


@torch.no_grad()
def prune_global(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], fraction: float
) -> dict[str, Tensor]:
    """One threshold across all layers."""
    remaining = torch.cat([weights[n].detach().abs().flatten()[masks[n].flatten()]
                           for n in masks]).float()
    threshold = _threshold(remaining, fraction)
    if threshold is None:
        return {n: m.clone() for n, m in masks.items()}
    return {n: masks[n] & (weights[n].detach().abs().float() > threshold.to(masks[n].device))
            for n in masks}


@torch.no_grad()
def prune_layerwise(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], fraction: float
) -> dict[str, Tensor]:
    """The same fraction removed from each layer separately."""
    pruned = {}
    for name, mask in masks.items():
        magnitude = weights[name].detach().abs().float()
        threshold = _threshold(magnitude[mask], fraction)
        pruned[name] = mask.clone() if threshold is None else mask & (
            magnitude > threshold.to(mask.device))
    return pruned


def prune(weights, masks, fraction: float, scope: str) -> dict[str, Tensor]:
    """Dispatch on ``scope`` (``global`` or ``layerwise``)."""
    if scope == "global":
        return prune_global(weights, masks, fraction)
    if scope == "layerwise":
        return prune_layerwise(weights, masks, fraction)
    raise ValueError(f"IMP scope must be 'global' or 'layerwise', got {scope!r}")
