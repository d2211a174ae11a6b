"""Fused models: K copies of one network trained as one (HFTA, Wang et al., MLSys 2021).

``fuse_models(models)`` turns K models of one architecture into one ``nn.Module`` whose every
parameter and buffer has a leading member dimension: member ``k``'s weight of a layer is
``layer.weight[k]``. Inputs and activations are laid out member-major along the channel
(feature) dimension — ``(B, K * C, ...)`` — so the model's own ``forward`` runs unchanged:

- ``Linear`` becomes one batched matmul over the members (weight ``(K, out, in)``);
- ``Conv1d/2d/3d`` becomes one grouped convolution (``groups * K``);
- ``BatchNorm1d/2d/3d`` normalises ``K * C`` channels, so each member keeps its own batch
  statistics and running averages;
- modules without parameters or buffers (activations, pooling, flatten, dropout-free
  containers) pass the fused activations through as they are.

Why this rather than ``torch.func.vmap`` over stacked parameters: the fused model stays an
ordinary module, so the soft and binary masks stay parametrizations (one mask bank, see
``sparsity/masks.py``), one optimizer steps every member, autocast, channels-last and
``torch.compile`` apply as to any model, and BatchNorm running statistics stay buffers updated
in place (which ``vmap`` refuses). The price: a model whose ``forward`` mixes channels
(reshapes or reduces over them, pads them, attention across features) or holds another kind
of parametric module cannot be fused. ``fuse_models`` refuses the latter by name, and
``check_fused`` refuses the former by comparing the fused model's output with every member's
on a probe batch.

Everything here is plain PyTorch (no Ray, no MLflow).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["FusionError", "check_fused", "fuse_inputs", "fuse_models", "member_logits",
           "member_state", "stack_states"]

PER_MEMBER_CONV_ON_CPU = True
CONVS = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class FusionError(ValueError):
    """The model cannot be trained as a fused group (the message says why and what to do)."""


def _stacked(modules: Sequence[nn.Module], name: str) -> Tensor | None:
    tensors = [getattr(m, name) for m in modules]
    return None if tensors[0] is None else torch.stack([t.detach() for t in tensors]).clone()


class FusedLinear(nn.Module):
    """K ``nn.Linear`` layers as one batched matmul: input ``(..., K * in)``."""

    def __init__(self, layers: Sequence[nn.Linear]):
        super().__init__()
        self.members, self.out_features = len(layers), layers[0].out_features
        self.weight = nn.Parameter(_stacked(layers, "weight"))
        bias = _stacked(layers, "bias")
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.members, x.shape[-1] // self.members).transpose(0, 1)
        if self.bias is None:
            out = torch.bmm(x, self.weight.transpose(1, 2))
        else:
            out = torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(*lead, self.members * self.out_features)


class FusedConv(nn.Module):
    """K convolutions as one grouped convolution over ``K * C`` input channels."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        first = layers[0]
        if first.padding_mode != "zeros":
            raise FusionError(f"a {type(first).__name__} with padding_mode="
                              f"{first.padding_mode!r} cannot be fused (only 'zeros')")
        self.members, self.conv = len(layers), CONVS[type(first)]
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups = first.groups * self.members
        self.weight = nn.Parameter(_stacked(layers, "weight"))
        bias = _stacked(layers, "bias")
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and PER_MEMBER_CONV_ON_CPU:
            return torch.cat([self.conv(part, w, None if self.bias is None else self.bias[k],
                                        self.stride, self.padding, self.dilation,
                                        self.groups // self.members)
                              for k, (part, w) in enumerate(zip(x.chunk(self.members, 1),
                                                               self.weight))], 1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        return self.conv(x, self.weight.flatten(0, 1), bias, self.stride, self.padding,
                         self.dilation, self.groups)


class FusedBatchNorm(nn.Module):
    """K batch norms over ``K * C`` channels: each member's own statistics and averages."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        first = layers[0]
        if first.momentum is None:
            raise FusionError("a BatchNorm with momentum=None (a cumulative average) cannot "
                              "be fused; give it a momentum")
        self.members, self.eps, self.momentum = len(layers), first.eps, first.momentum
        self.track_running_stats = first.track_running_stats
        for name in ("weight", "bias"):
            value = _stacked(layers, name)
            setattr(self, name, None if value is None else nn.Parameter(value))
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, _stacked(layers, name))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch = self.training or self.running_mean is None

        def flat(t):
            return None if t is None else t.view(-1)

        return F.batch_norm(x, flat(self.running_mean), flat(self.running_var),
                            flat(self.weight), flat(self.bias), use_batch, self.momentum,
                            self.eps)


def _fused_layer(layers: Sequence[nn.Module]) -> nn.Module:
    kind = type(layers[0])
    if kind is nn.Linear:
        return FusedLinear(layers)
    if kind in CONVS:
        return FusedConv(layers)
    if kind in NORMS:
        return FusedBatchNorm(layers)
    raise FusionError(f"a {kind.__name__} holds parameters that cannot be fused (fusable: "
                      "Linear, Conv1d/2d/3d, BatchNorm1d/2d/3d and parameter-free modules); "
                      "set resources.fuse: off")


def fuse_models(models: Sequence[nn.Module]) -> nn.Module:
    """One model training the K ``models`` (one architecture, any weights) at once; member
    ``k``'s state is ``member_state(fused.state_dict(), k)``. Raises FusionError naming a
    module that cannot be fused. The models must carry no masks yet."""
    fused = copy.deepcopy(models[0])
    modules = [dict(m.named_modules()) for m in models]
    for name, module in list(fused.named_modules()):
        own = list(module.named_parameters(recurse=False)) + \
            list(module.named_buffers(recurse=False))
        if not own:
            continue
        try:
            layer = _fused_layer([m[name] for m in modules])
        except FusionError as err:
            raise FusionError(f"layer {name or '(the model itself)'!r}: {err}") from None
        if not name:  # the model is one layer
            fused = layer
            break
        _replace(fused, name, layer)
    device = next(iter(models[0].parameters())).device
    return fused.to(device)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def member_state(state: dict[str, Tensor], member: int) -> dict[str, Tensor]:
    """Member ``member``'s part of a fused model's state (same names as an unfused model's)."""
    return {name: value[member] for name, value in state.items()}


def stack_states(states: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The members' states (one per member, same names) as a fused model's state."""
    return {name: torch.stack([s[name] for s in states]) for name in states[0]}


def fuse_inputs(xs: Sequence[Tensor] | Tensor, members: int | None = None) -> Tensor:
    """The members' input batches (one each, or one shared batch repeated ``members``
    times) laid out member-major along the channel dimension: ``(B, K * C, ...)``."""
    if isinstance(xs, Tensor):
        x = xs.unsqueeze(1).expand(xs.shape[0], members, *xs.shape[1:])
    else:
        x = torch.stack(list(xs), dim=1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def member_logits(output: Tensor, members: int) -> Tensor:
    """A fused model's output ``(B, K * classes)`` as ``(K, B, classes)``."""
    return output.view(output.shape[0], members, -1).transpose(0, 1)


@torch.no_grad()
def check_fused(fused: nn.Module, models: Sequence[nn.Module], x: Tensor,
                tolerance: float = 1e-4) -> None:
    """Raise FusionError unless ``fused`` gives every member's output on the batch ``x``
    (in eval mode: nothing is updated): a forward pass that mixes channels does not."""
    modes = [m.training for m in (fused, *models)]
    try:
        for model in (fused, *models):
            model.eval()
        got = member_logits(fused(fuse_inputs(x, len(models))), len(models))
        for member, model in enumerate(models):
            want = model(x)
            if got[member].shape != want.shape or not torch.allclose(
                    got[member], want, rtol=tolerance, atol=tolerance):
                raise FusionError(
                    "the model's forward pass mixes the members' channels (it reshapes, "
                    "reduces or pads over the channel dimension), so its copies cannot be "
                    "trained as one fused network; set resources.fuse: off")
    finally:
        for model, mode in zip((fused, *models), modes):
            model.train(mode)
