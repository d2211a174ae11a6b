"""Continuous Sparsification (Savarese, Silva, Maire, NeurIPS 2020): the pure tensor parts.

The soft masks themselves are ``SoftMask`` parametrizations (see ``masks.py``); this module
holds the temperature schedule, the L0 penalty, the soft reset between rounds, and the
read-out of the binary ticket mask and its sparsity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import soft_masks


def beta_for_epoch(epoch: int, epochs: int, beta_final: float) -> float:
    """Temperature for epoch ``epoch`` (0-based) of a round of ``epochs`` epochs.

    1 in the first epoch, multiplied by ``beta_final ** (1 / (epochs - 1))`` at the start of
    each later epoch, so it is exactly ``beta_final`` in the last. A one-epoch round stays at 1.
    """
    if epochs <= 1:
        return 1.0
    if epoch >= epochs - 1:
        return float(beta_final)
    return float(beta_final) ** (epoch / (epochs - 1))


def beta_for_iteration(iteration: int, iterations: int, beta_final: float) -> float:
    """Per-iteration variant: 1 at the round's first step, ``beta_final`` at its last."""
    return beta_for_epoch(iteration, iterations, beta_final)


def set_beta(model: nn.Module, beta: float) -> None:
    """Set the temperature of every soft mask of ``model``."""
    for mask in soft_masks(model).values():
        mask.beta.fill_(beta)


def current_beta(model: nn.Module) -> float:
    """The temperature of the model's soft masks (they share one)."""
    for mask in soft_masks(model).values():
        return float(mask.beta)
    return 1.0


def l0_penalty(model: nn.Module) -> Tensor:
    """``sum(m)`` over every entry of every soft mask: the relaxed L0 norm (a sum, not a mean).

    Reuses the masks computed by the last forward pass (and releases them); masks not used
    in a forward pass since the last call are computed afresh.
    """
    total = None
    for mask in soft_masks(model).values():
        m = mask.last if mask.last is not None else mask.soft_mask()
        mask.last = None
        total = m.sum() if total is None else total + m.sum()
    if total is None:
        raise ValueError("model has no soft masks; call add_soft_masks first")
    return total


@torch.no_grad()
def threshold_step(model: nn.Module, multiplier: Tensor, density: float, rate: float) -> None:
    """One step of the sparsity multiplier of targeted CS (in place, no host sync).

    The multiplier ``tau >= 0`` is a threshold subtracted from every logit: this step moves
    the logits down by ``rate`` times the gap between 0 and the logit quantile at which
    ``s > 0`` keeps exactly ``density`` of the entries (or back up, never past ``tau = 0``).
    So the kept fraction tracks the target whatever the logits' scale, a logit pushed below
    the threshold comes back if the data gradient lifts it above the others, and a target
    already met leaves ``tau`` at 0.
    """
    masks = list(soft_masks(model).values())
    logits = torch.cat([mask.logits.flatten() for mask in masks])
    pruned = min(max(round((1.0 - density) * logits.numel()), 1), logits.numel())
    gap = torch.kthvalue(logits, pruned).values
    shift = torch.maximum(rate * gap, -multiplier)
    for mask in masks:
        mask.logits.sub_(shift)
    multiplier.add_(shift)


@torch.no_grad()
def round_to_density(model: nn.Module, density: float) -> dict[str, Tensor]:
    """Binary masks keeping exactly ``round(density * n)`` of the ``n`` masked entries, those
    with the largest logits (ties broken by position): a ticket at the target to one weight."""
    masks = soft_masks(model)
    logits = torch.cat([mask.logits.flatten() for mask in masks.values()])
    keep = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
    keep[torch.topk(logits, round(density * logits.numel()), sorted=False).indices] = True
    out, start = {}, 0
    for name, mask in masks.items():
        n = mask.logits.numel()
        out[name] = keep[start:start + n].view_as(mask.logits).cpu()
        start += n
    return out


@torch.no_grad()
def soft_reset(model: nn.Module, rule: str, beta_end: float) -> None:
    """Reset mask logits between search rounds.

    ``scaled`` (the paper's rule): ``s <- min(beta_end * s, s0)``; ``clip`` (the reference
    code's behaviour): ``s <- min(s, s0)``. Also resets the temperature to 1.
    """
    if rule not in ("scaled", "clip"):
        raise ValueError(f"soft_reset must be 'scaled' or 'clip', got {rule!r}")
    scale = float(beta_end) if rule == "scaled" else 1.0
    for mask in soft_masks(model).values():
        mask.logits.copy_(torch.minimum(scale * mask.logits, mask.s0))
        mask.beta.fill_(1.0)


@torch.no_grad()
def ticket_masks(model: nn.Module) -> dict[str, Tensor]:
    """The binary ticket mask of each soft-masked layer: ``s > 0`` (strict)."""
    return {name: (mask.logits > 0).cpu() for name, mask in soft_masks(model).items()}


@torch.no_grad()
def cs_sparsity(model: nn.Module) -> float:
    """Fraction of masked entries with ``s <= 0`` (what the ticket would prune)."""
    pruned = 0
    total = 0
    for mask in soft_masks(model).values():
        pruned += int((mask.logits <= 0).sum())
        total += mask.logits.numel()
    return pruned / total if total else 0.0
