"""RigL — dynamic sparse training (Evci et al., ICML 2020): the rules, as tensor code.

- Per-layer densities: ``uniform`` (every layer at the target sparsity except the first,
  which is dense — so the overall sparsity is a little below the target) or ``erk``
  (Erdős–Rényi-Kernel: density proportional to ``sum(shape) / prod(shape)``, scaled by one
  factor so that the total number of nonzeros matches the target; layers that would exceed
  density 1 are made dense and the factor re-solved).
- Random initial masks with exactly ``active_count`` nonzeros per layer.
- The update schedule: every ``interval`` steps (never at step 0) while the step is below
  ``end_step = floor(end_fraction * total_steps)``, with the cosine-decayed drop fraction
  ``alpha / 2 * (1 + cos(pi * t / end_step))``.
- One update of a layer: drop the ``k`` active weights of smallest ``|w|``, then grow the
  ``k`` inactive ones (after the drop, as in the reference code, so a weight just dropped may
  come straight back) of largest ``|dense gradient|``. Nonzeros per layer stay constant.
  Weights that were inactive before the update start at zero, with zero momentum.
- ``DenseGradients`` captures the gradient with respect to the *effective* (masked) weight:
  with ``w_eff = w * mask`` the gradient of the stored weight is ``g * mask``, zero exactly
  where RigL needs to look, so it is read off the mask parametrization's output instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .masks import dense_weight, mask_of, masked_modules

DISTRIBUTIONS: tuple[str, ...] = ("uniform", "erk")


# --------------------------------------------------------------------------------------
# Layer densities and initial masks
# --------------------------------------------------------------------------------------


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 < sparsity < 1.0:
        raise ValueError(f"RigL sparsity must be in (0, 1) (got {sparsity})")


def uniform_densities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """The first layer (in mapping order) dense, every other layer at ``1 - sparsity``."""
    _check_sparsity(sparsity)
    names = list(shapes)
    return {name: 1.0 if index == 0 else 1.0 - sparsity for index, name in enumerate(names)}


def erk_densities(shapes: Mapping[str, Sequence[int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel densities whose nonzeros sum to ``(1 - sparsity) * total``.

    Layer ``l`` gets ``eps * sum(shape_l) / prod(shape_l)``. While the largest of those
    exceeds 1, the layer(s) with the largest ratio are made dense and ``eps`` is re-solved
    over the rest (Evci et al.'s reference code), so no density exceeds 1.
    """
    _check_sparsity(sparsity)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    ratios = {name: sum(shape) / sizes[name] for name, shape in shapes.items()}
    budget = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        rest = [name for name in shapes if name not in dense]
        remaining = budget - sum(sizes[name] for name in dense)
        eps = remaining / sum(ratios[name] * sizes[name] for name in rest)
        largest = max(ratios[name] for name in rest)
        if eps * largest <= 1.0:
            break
        dense.update(name for name in rest if ratios[name] == largest)
    return {name: 1.0 if name in dense else eps * ratios[name] for name in shapes}


def layer_densities(
    distribution: str, shapes: Mapping[str, Sequence[int]], sparsity: float
) -> dict[str, float]:
    """Dispatch on ``distribution`` (``uniform`` or ``erk``)."""
    if distribution == "uniform":
        return uniform_densities(shapes, sparsity)
    if distribution == "erk":
        return erk_densities(shapes, sparsity)
    raise ValueError(f"RigL distribution must be one of {', '.join(DISTRIBUTIONS)} "
                     f"(got {distribution!r})")


def active_count(density: float, size: int) -> int:
    """Nonzeros of a layer of ``size`` weights at ``density``: rounded, at least 1."""
    return min(size, max(1, round(density * size)))


def random_masks(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Bool masks with exactly ``active_count(density, size)`` True entries per layer, placed
    uniformly at random (draws from ``generator``, layer by layer in mapping order)."""
    masks = {}
    for name, shape in shapes.items():
        size = math.prod(shape)
        chosen = torch.randperm(size, generator=generator)[: active_count(densities[name], size)]
        flat = torch.zeros(size, dtype=torch.bool)
        flat[chosen] = True
        masks[name] = flat.view(tuple(shape)).to(device)
    return masks


# --------------------------------------------------------------------------------------
# The update schedule
# --------------------------------------------------------------------------------------


def end_step(total_steps: int, end_fraction: float) -> int:
    """``floor(end_fraction * total_steps)``, robust to float noise (0.7 * 10 is 7)."""
    return math.floor(round(end_fraction * total_steps, 9))


def is_update_step(step: int, interval: int, end: int) -> bool:
    """Whether the masks are updated at global step ``step`` (0-based): a positive multiple
    of ``interval`` below ``end``."""
    return step > 0 and step % interval == 0 and step < end


def update_steps(total_steps: int, interval: int, end_fraction: float) -> list[int]:
    """Every step of a run of ``total_steps`` steps at which the masks are updated."""
    return list(range(interval, end_step(total_steps, end_fraction), interval))


def drop_fraction(step: int, alpha: float, end: int) -> float:
    """Cosine-decayed drop fraction ``alpha / 2 * (1 + cos(pi * step / end))``; 0 from
    ``end`` on."""
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * step / end))


def drop_count(fraction: float, active: int) -> int:
    """``floor(fraction * active)``, robust to float noise (0.29 * 100 is 29)."""
    return min(active, math.floor(round(fraction * active, 9)))


# --------------------------------------------------------------------------------------
# Drop and grow
# --------------------------------------------------------------------------------------


@torch.no_grad()
def drop_and_grow(weight: Tensor, mask: Tensor, grad: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """One RigL update of one layer.

    Drops the ``count`` active entries (``mask`` True) of smallest ``|weight|``, then grows the
    ``count`` entries of largest ``|grad|`` among those inactive after the drop. Returns
    ``(new_mask, fresh)``: the new bool mask (same number of True entries as ``mask``) and the
    grown entries that were inactive before the update (the ones to start at zero).
    """
    keep = mask.flatten().bool()
    if count <= 0:
        return keep.view_as(mask).clone(), torch.zeros_like(keep).view_as(mask)
    active = int(keep.sum())
    if count > active:
        raise ValueError(f"cannot drop {count} of {active} active weights")
    magnitude = weight.detach().flatten().abs().float()
    drop_scores = torch.where(keep, magnitude, torch.full_like(magnitude, math.inf))
    dropped = torch.topk(drop_scores, count, largest=False).indices
    kept = keep.clone()
    kept[dropped] = False
    gradient = grad.detach().flatten().abs().float()
    grow_scores = torch.where(kept, torch.full_like(gradient, -math.inf), gradient)
    grown = torch.topk(grow_scores, count).indices
    new = kept.clone()
    new[grown] = True
    fresh = new & ~keep
    return new.view_as(mask), fresh.view_as(mask)


class DenseGradients:
    """Captures ``dL/d(w * mask)`` — the dense gradient — of every masked layer of ``model``.

    ``arm()`` before a forward pass; after its backward pass ``take()`` returns the gradients
    by layer name and disarms. While disarmed nothing is hooked (no cost per step).
    """

    def __init__(self, model: nn.Module):
        self.layers = masked_modules(model)
        self.grads: dict[str, Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def armed(self) -> bool:
        return bool(self.handles)

    def arm(self) -> None:
        """Hook every mask so the next backward pass records the gradient of its output."""
        if self.armed:
            return
        for name, layer in self.layers.items():
            self.handles.append(mask_of(layer).register_forward_hook(self._forward_hook(name)))

    def _forward_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if output.requires_grad:
                output.register_hook(lambda grad: self._store(name, grad))

        return hook

    def _store(self, name: str, grad: Tensor) -> None:
        previous = self.grads.get(name)
        self.grads[name] = grad.detach() if previous is None else previous + grad.detach()

    def take(self) -> dict[str, Tensor]:
        """The gradients recorded since ``arm()`` (layers used in the forward pass); disarms."""
        for handle in self.handles:
            handle.remove()
        self.handles = []
        grads, self.grads = self.grads, {}
        return grads


@torch.no_grad()
def apply_update(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    grads: Mapping[str, Tensor],
    fraction: float,
) -> dict[str, int]:
    """Drop and grow ``drop_count(fraction, active)`` weights in each layer of ``grads``.

    Writes the new masks into the layers' ``BinaryMask`` buffers, sets the stored weight and
    the optimizer's momentum buffer to zero at the fresh entries, and returns the number of
    fresh entries per layer.
    """
    layers = masked_modules(model)
    fresh_counts = {}
    for name, grad in grads.items():
        layer = layers[name]
        buffer = mask_of(layer).mask
        weight = dense_weight(layer)
        keep = buffer != 0
        count = drop_count(fraction, int(keep.sum()))
        new, fresh = drop_and_grow(weight, keep, grad, count)
        buffer.copy_(new.to(buffer.dtype))
        weight[fresh] = 0
        state = optimizer.state.get(weight, {}) if optimizer is not None else {}
        momentum = state.get("momentum_buffer")
        if momentum is not None:
            momentum[fresh] = 0
        fresh_counts[name] = int(fresh.sum())
    return fresh_counts
