"""Retraining recipes (Jaiswal et al., "Spending Your Winning Lottery Better After Drawing It").

A recipe (``spec.RecipeSpec``) is a named set of tweaks applied when a ticket is retrained:
label smoothing, mixup, CutMix, a linear LR warm-up and an activation swap (ReLU -> SiLU,
Mish or ELU; see ``models.ACTIVATIONS``). ``vanilla`` has none of them and is exactly the
plain retraining (hard-label cross-entropy, the round's LR schedule, ReLU).

This module holds the pure parts: soft targets and their cross-entropy, batch mixing on the
batch's device, the warm-up factor, and ``make_batch_loss``, which turns a recipe into the
per-batch loss that ``training.train_epoch`` calls. The random draws of one epoch (one mixing
coefficient per batch, and CutMix's box centres) are taken from the trial's CPU generator when
the epoch starts, so a resumed trial mixes exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

BatchLoss = Callable[[nn.Module, Tensor, Tensor, int], Tensor]
"""``loss(model, x, y, step)``: the training loss of batch ``step`` of an epoch."""


def warmup_factor(epoch: int, warmup_epochs: int) -> float:
    """LR multiplier of epoch ``epoch`` (0-based): ``(epoch + 1) / warmup_epochs`` during the
    warm-up, 1 after it (and always 1 when ``warmup_epochs`` is 0)."""
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return 1.0


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot rows of ``labels`` smoothed to ``(1 - smoothing) * onehot + smoothing / C``
    (the convention of ``F.cross_entropy(label_smoothing=...)``)."""
    onehot = F.one_hot(labels, num_classes).float()
    if smoothing == 0.0:
        return onehot
    return onehot * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean over the batch of ``-sum_c targets[c] * log_softmax(logits)[c]``."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def mixup(x: Tensor, targets: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Mixup of a batch with itself reversed: ``lam * a + (1 - lam) * a.flip(0)`` for both the
    inputs and the soft targets (so every target row is a convex combination of two)."""
    mixed_x = x * lam + x.flip(0) * (1.0 - lam)
    mixed_t = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed_x, mixed_t


def cutmix_box(height: int, width: int, lam: float, centre: tuple[float, float]
               ) -> tuple[int, int, int, int]:
    """The CutMix box ``(top, bottom, left, right)`` (end-exclusive) for mixing coefficient
    ``lam``: sides ``int(H * sqrt(1 - lam))`` by ``int(W * sqrt(1 - lam))`` centred at
    ``centre`` (fractions of H and W in [0, 1)), clipped to the image (Yun et al.)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(centre[0] * height), int(centre[1] * width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


def cutmix(x: Tensor, targets: Tensor, box: tuple[int, int, int, int]) -> tuple[Tensor, Tensor]:
    """Paste ``box`` of the reversed batch into each image; targets mix by the pasted area:
    ``lam = 1 - area / (H * W)``, ``lam * t + (1 - lam) * t.flip(0)``. ``x`` is (B, C, H, W)."""
    if x.dim() != 4:
        raise ValueError(f"CutMix needs image batches (B, C, H, W); got shape {tuple(x.shape)}")
    top, bottom, left, right = box
    height, width = x.shape[-2:]
    mixed_x = x.clone()
    mixed_x[:, :, top:bottom, left:right] = x.flip(0)[:, :, top:bottom, left:right]
    lam = 1.0 - (bottom - top) * (right - left) / (height * width)
    mixed_t = targets * lam + targets.flip(0) * (1.0 - lam)
    return mixed_x, mixed_t


def _epoch_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded by one draw from the trial's torch generator."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return np.random.default_rng(seed)


def make_batch_loss(recipe, num_classes: int, num_batches: int,
                    generator: torch.Generator) -> BatchLoss | None:
    """The per-batch training loss of ``recipe`` for one epoch of ``num_batches`` batches.

    None for a recipe without loss tweaks (vanilla, warm-up or activation only): the loop's
    plain cross-entropy then applies and ``generator`` is not touched. Label smoothing alone
    uses ``F.cross_entropy(label_smoothing=...)``; mixup and CutMix draw one
    ``Beta(alpha, alpha)`` coefficient per batch (CutMix also a box centre) now, from
    ``generator``, and use the soft-target cross-entropy.
    """
    smoothing = recipe.label_smoothing
    if recipe.mixup_alpha > 0:
        lams = _epoch_rng(generator).beta(recipe.mixup_alpha, recipe.mixup_alpha, num_batches)

        def mixup_loss(model: nn.Module, x: Tensor, y: Tensor, step: int) -> Tensor:
            mixed_x, mixed_t = mixup(x, soft_targets(y, num_classes, smoothing), float(lams[step]))
            return soft_cross_entropy(model(mixed_x), mixed_t)

        return mixup_loss
    if recipe.cutmix_alpha > 0:
        rng = _epoch_rng(generator)
        lams = rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha, num_batches)
        centres = rng.random((num_batches, 2))

        def cutmix_loss(model: nn.Module, x: Tensor, y: Tensor, step: int) -> Tensor:
            box = cutmix_box(x.shape[-2], x.shape[-1], float(lams[step]),
                             (float(centres[step, 0]), float(centres[step, 1])))
            mixed_x, mixed_t = cutmix(x, soft_targets(y, num_classes, smoothing), box)
            return soft_cross_entropy(model(mixed_x), mixed_t)

        return cutmix_loss
    if smoothing > 0:

        def smoothed_loss(model: nn.Module, x: Tensor, y: Tensor, step: int) -> Tensor:
            return F.cross_entropy(model(x), y, label_smoothing=smoothing)

        return smoothed_loss
    return None
