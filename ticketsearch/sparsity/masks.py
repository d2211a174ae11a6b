"""Masks on weight tensors, applied as torch parametrizations.

A masked layer keeps its dense weight as ``layer.parametrizations.weight.original`` and
``layer.weight`` is computed as ``original * mask`` on every access. Parametrizations are
ordinary submodules, so masked models survive ``copy.deepcopy``, ``state_dict`` round trips
and ``.to(device)`` with no special care.

Two kinds of mask:
- ``SoftMask`` (Continuous Sparsification): ``sigmoid(beta * s) / sigmoid(s0)`` with learned
  logits ``s``.
- ``BinaryMask`` (IMP, tickets, RigL): a fixed 0/1 buffer.

``dense_state_dict`` / ``load_dense_state`` read and write a model's state under the plain
(unmasked) parameter names, so rewind snapshots and tickets are independent of masking.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

_ORIGINAL = ".parametrizations.weight.original"
LOGIT_FLOOR = 50.0
_MASK_PREFIX = ".parametrizations.weight.0."


class BinaryMask(nn.Module):
    """``w -> w * mask`` with a fixed 0/1 mask stored as a buffer of the weight's dtype."""

    def __init__(self, mask: Tensor):
        super().__init__()
        self.register_buffer("mask", mask.detach().clone())

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.mask

    def keep(self) -> Tensor:
        """The mask as a bool tensor (True = weight kept)."""
        return self.mask != 0


class SoftMaskBank(nn.Module):
    """Every CS mask logit of a model in one flat parameter, so a training step computes all
    soft masks (``sigmoid(beta * s) / sigmoid(s0)``) and the L0 penalty in a handful of
    kernels, whatever the number of masked layers.

    The first masked layer's ``SoftMask`` holds it (so it is saved once, with the mask
    entries of the state dict); every layer's ``SoftMask`` is a view of its part. The flat
    mask is computed once per forward pass of the model (a forward pre-hook forgets the
    previous one), split into the layers' parts in one go (so the backward pass joins their
    gradients in one go too) and reused by every layer and by the penalty.
    ``beta * s`` is clamped at ``-LOGIT_FLOOR`` before the sigmoid: below that the mask is
    ~1e-22 either way, and the clamp keeps float32 subnormals (which slow CPU arithmetic
    ~100x) out of the forward and backward passes.

    A fused group's bank (``s0`` a list, one per member: see ``fusion.py``) is member-major:
    member ``k``'s logits are row ``k`` of ``rows(logits)``, laid out as an unfused model's,
    with its own ``beta``, ``s0`` and scale (shape ``(K, 1)``); a layer's part is
    ``(K, *shape)``, as the fused layer's weight.
    """

    def __init__(self, size: int, s0: float | list[float], device=None, dtype=torch.float32):
        super().__init__()
        self.members = len(s0) if isinstance(s0, list | tuple) else 0  # 0: not fused
        start = torch.tensor(s0, device=device, dtype=dtype)
        start = start.view(-1, 1) if self.members else start
        logits = start.expand(self.members, size // self.members) if self.members \
            else start.expand(size)
        self.logits = nn.Parameter(logits.reshape(-1).clone())
        self.register_buffer("beta", torch.ones_like(start))
        self.register_buffer("s0", start.clone())
        self.register_buffer("scale", 1.0 / torch.sigmoid(self.s0))
        self.shapes: list[tuple[int, ...]] = []  # the layers' (member) parts, in order
        self.starts: list[int] = []  # where each part begins in a member's row
        self.cached: tuple | None = None  # (what it was computed from, mask, its parts)

    def add_layer(self, shape: torch.Size) -> int:
        """Lay out the next ``shape``-d part of the logits (a member's shape in a fused
        bank); returns its index."""
        self.starts.append(self.starts[-1] + math.prod(self.shapes[-1]) if self.shapes else 0)
        self.shapes.append(tuple(shape))
        return len(self.shapes) - 1

    def rows(self, flat: Tensor) -> Tensor:
        """A tensor laid out as the logits, as one row per member (one row when unfused)."""
        return flat.view(max(self.members, 1), -1)

    def part(self, flat: Tensor, index: int) -> Tensor:
        """Part ``index`` of a tensor laid out as the logits, shaped as its layer's weight."""
        start, shape = self.starts[index], self.shapes[index]
        if not self.members:
            return flat[start:start + math.prod(shape)].view(shape)
        rows = self.rows(flat)[:, start:start + math.prod(shape)]
        return rows.view(self.members, *shape)

    def member_part(self, row: Tensor, index: int) -> Tensor:
        """Part ``index`` of one member's row, shaped as an unfused layer's weight."""
        start, shape = self.starts[index], self.shapes[index]
        return row[start:start + math.prod(shape)].view(shape)

    def soft_mask(self) -> Tensor:
        """The flat soft mask of this forward pass (computed on first use, and again once
        the logits or beta change in place or grad mode flips)."""
        return self._compute()[1]

    def layer_mask(self, index: int) -> Tensor:
        """Part ``index`` of ``soft_mask()``, shaped as its layer's weight."""
        return self._compute()[2][index]

    def _compute(self) -> tuple:
        key = (self.logits._version, self.beta._version, torch.is_grad_enabled())
        if self.cached is None or self.cached[0] != key:
            logits = self.rows(self.logits) if self.members else self.logits
            z = (self.beta * logits).clamp(min=-LOGIT_FLOOR)
            mask = torch.sigmoid(z) * self.scale
            lead = (self.members,) if self.members else ()
            parts = mask.split([math.prod(shape) for shape in self.shapes], dim=-1)
            self.cached = (key, mask.view(-1),
                           [p.view(*lead, *s) for p, s in zip(parts, self.shapes)])
        return self.cached

    def forget(self, *_) -> None:
        """Drop the cached mask (a forward pre-hook of the model: every pass computes anew)."""
        self.cached = None

    def __getstate__(self):
        return dict(super().__getstate__()) | {"cached": None}


class SoftMask(nn.Module):
    """Continuous Sparsification mask ``sigmoid(beta * s) / sigmoid(s0)`` of one layer: part
    ``index`` of its model's ``SoftMaskBank``, shaped as the weight.

    ``s`` (``logits``, a view of the bank's parameter) starts at ``s0`` and ``beta`` at 1, so
    the mask is exactly 1 at the start of a round.
    """

    def __init__(self, bank: SoftMaskBank, shape: torch.Size):
        super().__init__()
        self.index = bank.add_layer(shape)
        if self.index == 0:
            self.bank = bank  # a submodule of the first layer's mask only: saved once
        else:
            object.__setattr__(self, "bank", bank)

    @property
    def logits(self) -> Tensor:
        return self.bank.part(self.bank.logits, self.index)

    @property
    def beta(self) -> Tensor:
        return self.bank.beta

    @property
    def s0(self) -> Tensor:
        return self.bank.s0

    def soft_mask(self) -> Tensor:
        return self.bank.layer_mask(self.index)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.soft_mask()


def masked_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Layers of ``model`` whose weight carries a mask, by module name, in module order."""
    return {
        name: module
        for name, module in model.named_modules()
        if parametrize.is_parametrized(module, "weight")
    }


def mask_of(module: nn.Module) -> nn.Module:
    """The mask parametrization of a masked layer."""
    return module.parametrizations.weight[0]


def dense_weight(module: nn.Module) -> Tensor:
    """The unmasked weight parameter of a masked layer."""
    return module.parametrizations.weight.original


def _modules_by_name(model: nn.Module, names) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"model has no layer named {missing[0]!r}")
    return {n: modules[n] for n in names}


def add_soft_masks(model: nn.Module, layer_names,
                   s0: float | list[float]) -> dict[str, SoftMask]:
    """Mask the weight of each named layer with a ``SoftMask`` at ``s0``, all of them views
    of one ``SoftMaskBank`` (once: a model has one set of soft masks). A fused group's model
    (weights ``(K, *shape)``) takes one ``s0`` per member."""
    if soft_masks(model):
        raise ValueError("the model has soft masks already")
    layers = _modules_by_name(model, layer_names)
    if not layers:
        return {}
    first = next(iter(layers.values())).weight
    bank = SoftMaskBank(sum(m.weight.numel() for m in layers.values()), s0,
                        device=first.device, dtype=first.dtype)
    model.register_forward_pre_hook(bank.forget)
    added = {}
    for name, module in layers.items():
        shape = module.weight.shape[1:] if bank.members else module.weight.shape
        added[name] = SoftMask(bank, shape)
        parametrize.register_parametrization(module, "weight", added[name], unsafe=True)
    return added


def mask_bank(model: nn.Module) -> SoftMaskBank | None:
    """The model's soft-mask bank (None without soft masks)."""
    for mask in soft_masks(model).values():
        return mask.bank
    return None


def add_binary_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> dict[str, BinaryMask]:
    """Mask the weight of each named layer with the given 0/1 (or bool) mask."""
    added = {}
    for name, module in _modules_by_name(model, masks).items():
        weight = module.weight
        keep = masks[name]
        if tuple(keep.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask for {name!r} has shape {tuple(keep.shape)}, weight has {tuple(weight.shape)}"
            )
        mask = BinaryMask(keep.to(device=weight.device, dtype=weight.dtype))
        parametrize.register_parametrization(module, "weight", mask, unsafe=True)
        added[name] = mask
    return added


def set_binary_masks(model: nn.Module, masks: Mapping[str, Tensor]) -> None:
    """Overwrite the masks of already binary-masked layers in place."""
    layers = masked_modules(model)
    for name, keep in masks.items():
        buffer = mask_of(layers[name]).mask
        buffer.copy_(keep.to(device=buffer.device, dtype=buffer.dtype))


def binary_masks(model: nn.Module) -> dict[str, Tensor]:
    """Current keep-masks (bool) of all binary-masked layers."""
    return {
        name: mask_of(m).keep()
        for name, m in masked_modules(model).items()
        if isinstance(mask_of(m), BinaryMask)
    }


def soft_masks(model: nn.Module) -> dict[str, SoftMask]:
    """All CS soft masks of ``model`` by layer name."""
    return {
        name: mask_of(m)
        for name, m in masked_modules(model).items()
        if isinstance(mask_of(m), SoftMask)
    }


def dense_weights(model: nn.Module) -> dict[str, Tensor]:
    """The unmasked weight tensor of every masked layer."""
    return {name: dense_weight(m) for name, m in masked_modules(model).items()}


def mask_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable mask parameters (the CS logits: one flat parameter)."""
    bank = mask_bank(model)
    return [] if bank is None else [bank.logits]


def _dense_key(key: str) -> str | None:
    """Map a state_dict key to its unmasked name; None for mask-owned entries."""
    if _MASK_PREFIX in key:
        return None
    return key.replace(_ORIGINAL, ".weight")


def dense_state_dict(model: nn.Module, *, clone: bool = True) -> dict[str, Tensor]:
    """All model state (weights, biases, BN params and running stats) under plain names,
    without mask tensors. ``clone=True`` returns detached copies (a snapshot)."""
    state = {}
    for key, value in model.state_dict(keep_vars=True).items():
        name = _dense_key(key)
        if name is not None:
            value = value.detach()
            state[name] = value.clone() if clone else value
    return state


def sparse_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The state of a binary-masked ``model`` as a plain (unmasked) model holds it: plain
    names, every masked weight multiplied by its mask (as the masked forward pass does), no
    mask tensors; detached CPU copies. A soft-masked (CS search) model has no such state."""
    if soft_masks(model):
        raise ValueError("a soft-masked model has no sparse state; binarise its masks first")
    with torch.no_grad():
        masked = {f"{name}.weight": m.weight for name, m in masked_modules(model).items()}
        return {key: masked.get(key, value).detach().cpu().clone()
                for key, value in dense_state_dict(model, clone=False).items()}


def load_dense_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Copy ``state`` (plain names, as from ``dense_state_dict``) into ``model`` in place,
    bit-exactly. The key sets must match exactly; masks are left untouched."""
    targets = dense_state_dict(model, clone=False)
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, target in targets.items():
            source = state[name]
            if source.shape != target.shape:
                raise ValueError(
                    f"state entry {name!r} has shape {tuple(source.shape)}, "
                    f"model has {tuple(target.shape)}"
                )
            target.copy_(source.to(device=target.device, dtype=target.dtype))


def mask_density(masks: Mapping[str, Tensor]) -> float:
    """Fraction of kept entries over all masks."""
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    return kept / total if total else 1.0


def layer_densities(masks: Mapping[str, Tensor]) -> dict[str, float]:
    """Fraction of kept entries per mask."""
    return {name: int(m.sum()) / m.numel() for name, m in masks.items()}


def full_masks(model: nn.Module, layer_names) -> dict[str, Tensor]:
    """All-keep bool masks for the named layers' weights."""
    layers = _modules_by_name(model, layer_names)
    return {
        name: torch.ones_like(m.weight, dtype=torch.bool, device=m.weight.device)
        for name, m in layers.items()
    }
