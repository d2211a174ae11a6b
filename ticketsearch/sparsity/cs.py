"""Continuous Sparsification (Savarese, Silva, Maire, NeurIPS 2020): the pure tensor parts.

The soft masks themselves are ``SoftMask`` parametrizations (see ``masks.py``); this module
holds the temperature schedule, the L0 penalty, the soft reset between rounds, and the
read-out of the binary ticket mask and its sparsity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .masks import mask_bank, soft_masks


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


def set_beta(model: nn.Module, beta: float | list[float]) -> None:
    """Set the temperature of every soft mask of ``model`` (a fused group's: one per member)."""
    bank = mask_bank(model)
    if bank is not None:
        bank.beta.copy_(torch.tensor(beta, dtype=bank.beta.dtype).view_as(bank.beta))


def current_beta(model: nn.Module, member: int = 0) -> float:
    """The temperature of the model's soft masks (of ``member``'s, in a fused group)."""
    bank = mask_bank(model)
    return 1.0 if bank is None else float(bank.beta.view(-1)[member])


def l0_penalty(model: nn.Module, weights: Tensor | None = None) -> Tensor:
    """``sum(m)`` over every entry of every soft mask: the relaxed L0 norm (a sum, not a mean);
    in a fused group with ``weights`` (one per member), the members' sums so weighted.

    Reuses the masks of the model's last forward pass and releases them (computed afresh
    when there are none).
    """
    bank = mask_bank(model)
    if bank is None:
        raise ValueError("model has no soft masks; call add_soft_masks first")
    mask = bank.soft_mask()
    total = mask.sum() if weights is None else bank.rows(mask).sum(1) @ weights
    bank.forget()
    return total


def _row(model: nn.Module, member: int) -> Tensor:
    """``member``'s mask logits (a view; all of them when unfused)."""
    bank = mask_bank(model)
    return bank.rows(bank.logits)[member]


@torch.no_grad()
def threshold_step(model: nn.Module, multiplier: Tensor, density: float, rate: float,
                   member: int = 0) -> None:
    """One step of the sparsity multiplier of targeted CS (in place, no host sync).

    The multiplier ``tau >= 0`` is a threshold subtracted from every logit: this step moves
    the logits down by ``rate`` times the gap between 0 and the logit quantile at which
    ``s > 0`` keeps exactly ``density`` of the entries (or back up, never past ``tau = 0``).
    So the kept fraction tracks the target whatever the logits' scale, a logit pushed below
    the threshold comes back if the data gradient lifts it above the others, and a target
    already met leaves ``tau`` at 0. In a fused group it moves ``member``'s logits.
    """
    logits = _row(model, member)
    pruned = min(max(round((1.0 - density) * logits.numel()), 1), logits.numel())
    gap = torch.kthvalue(logits, pruned).values
    shift = torch.maximum(rate * gap, -multiplier)
    logits.sub_(shift)
    multiplier.add_(shift)


@torch.no_grad()
def round_to_density(model: nn.Module, density: float, member: int = 0) -> dict[str, Tensor]:
    """Binary masks keeping exactly ``round(density * n)`` of the ``n`` masked entries, those
    with the largest logits (ties broken by position): a ticket at the target to one weight."""
    logits = _row(model, member)
    keep = torch.zeros(logits.numel(), dtype=torch.bool, device=logits.device)
    keep[torch.topk(logits, round(density * logits.numel()), sorted=False).indices] = True
    return per_layer(model, keep.cpu())


def per_layer(model: nn.Module, row: Tensor) -> dict[str, Tensor]:
    """One member's flat tensor (laid out as an unfused model's mask bank), split into its
    layers' shapes."""
    return {name: mask.bank.member_part(row, mask.index)
            for name, mask in soft_masks(model).items()}


@torch.no_grad()
def soft_reset(model: nn.Module, rule: str, beta_end: float | list[float]) -> None:
    """Reset mask logits between search rounds.

    ``scaled`` (the paper's rule): ``s <- min(beta_end * s, s0)``; ``clip`` (the reference
    code's behaviour): ``s <- min(s, s0)``. Also resets the temperature to 1. A fused group
    takes one ``beta_end`` per member.
    """
    if rule not in ("scaled", "clip"):
        raise ValueError(f"soft_reset must be 'scaled' or 'clip', got {rule!r}")
    bank = mask_bank(model)
    scale = torch.tensor(beta_end, dtype=bank.beta.dtype).to(bank.beta.device)
    scale = scale.view_as(bank.beta) if rule == "scaled" else torch.ones_like(bank.beta)
    rows = bank.rows(bank.logits)
    rows.copy_(torch.minimum(scale * rows, bank.s0))
    bank.beta.fill_(1.0)


@torch.no_grad()
def ticket_masks(model: nn.Module, member: int = 0) -> dict[str, Tensor]:
    """The binary ticket mask of each soft-masked layer: ``s > 0`` (strict)."""
    return per_layer(model, (_row(model, member) > 0).cpu())


@torch.no_grad()
def cs_sparsity(model: nn.Module, member: int = 0) -> float:
    """Fraction of masked entries with ``s <= 0`` (what the ticket would prune)."""
    bank = mask_bank(model)
    if bank is None or bank.logits.numel() == 0:
        return 0.0
    logits = _row(model, member)
    return int((logits <= 0).sum()) / logits.numel()
