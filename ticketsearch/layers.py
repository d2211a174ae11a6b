"""Which layers of a model carry masks: the default rule, ``model.masked_layers`` and
``model.unmasked_layers``, with the reason for every weight layer.

A *weight layer* is a module holding a ``weight`` parameter (Conv, Linear, norms,
embeddings, custom modules). The masked set is

- ``model.masked_layers`` when given: each fnmatch pattern (``*`` also matches dots) selects
  Conv1d/2d/3d and Linear layers; an exact name (no ``*?[``) may also name any other weight
  layer (an embedding, a norm, a custom module);
- else a built-in model's own default patterns (ResNet-20: its 3x3 convs; catalog.MODELS);
- else every Conv1d/2d/3d and Linear layer except the final classifier: the last such layer
  whose output size is the number of classes (the last one of all if none is);

minus the layers matched by ``model.unmasked_layers``. Mistakes raise ``ModelError`` naming the
field: a pattern matching nothing, a name that holds no ``weight`` parameter (an unsupported
module type), or an empty masked set.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from . import catalog
from .models import CONV_LINEAR, ModelError, masked_layer_names

__all__ = ["LayerRow", "final_classifier", "layer_plan", "select_masked_layers",
           "weight_layers"]

WILDCARDS = "*?["


@dataclass(frozen=True)
class LayerRow:
    """One weight layer: module name, type name, weight shape, weight entries, whether its
    weight is masked and why (in words)."""

    name: str
    kind: str
    shape: tuple[int, ...]
    params: int
    masked: bool
    why: str


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every module holding a ``weight`` parameter, by name, in ``named_modules()`` order."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module._parameters.get("weight"), nn.Parameter)}


def final_classifier(model: nn.Module, num_classes: int) -> str | None:
    """The final classifier's name: the last Conv/Linear layer with ``num_classes`` outputs,
    else the last Conv/Linear layer; None when the model has none."""
    layers = [(name, module) for name, module in weight_layers(model).items()
              if isinstance(module, CONV_LINEAR)]
    sized = [name for name, module in layers if _outputs(module) == num_classes]
    if sized:
        return sized[-1]
    return layers[-1][0] if layers else None


def _outputs(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def select_masked_layers(model: nn.Module, spec, num_classes: int) -> list[str]:
    """Names of the layers whose weight is masked, in module order (see the module doc);
    ``spec`` is a ``ModelSpec``."""
    return [row.name for row in layer_plan(model, spec, num_classes) if row.masked]


def layer_plan(model: nn.Module, spec, num_classes: int) -> list[LayerRow]:
    """One row per weight layer of ``model``, saying whether ``spec`` (a ``ModelSpec``) masks
    it and why. Raises ModelError for a pattern that matches nothing, a named module with no
    ``weight`` parameter, or an empty masked set."""
    layers = weight_layers(model)
    reasons = _base_set(model, spec, num_classes, layers)
    removed = _unmasked(spec.unmasked_layers or [], reasons)
    if not set(reasons) - set(removed):
        raise ModelError(_nothing_masked(spec, model, num_classes))
    classifier = final_classifier(model, num_classes)
    rows = []
    for name, module in layers.items():
        weight = module._parameters["weight"]
        masked = name in reasons and name not in removed
        why = removed.get(name) or reasons.get(name) or _left_out(spec, module, name, classifier)
        rows.append(LayerRow(name, type(module).__name__, tuple(weight.shape), weight.numel(),
                             masked, why))
    return rows


def _base_set(model: nn.Module, spec, num_classes: int,
              layers: dict[str, nn.Module]) -> dict[str, str]:
    """Masked layer name -> reason, before ``unmasked_layers``."""
    if spec.masked_layers:
        return _named(model, spec.masked_layers, layers, "model.masked_layers")
    if spec.builtin:
        patterns = catalog.MODELS[spec.name].masked_layers
        return {name: f"{spec.name} default" for name in masked_layer_names(model, patterns)}
    classifier = final_classifier(model, num_classes)
    return {name: "conv/linear (default)" for name, module in layers.items()
            if isinstance(module, CONV_LINEAR) and name != classifier}


def _named(model: nn.Module, patterns: Sequence[str], layers: dict[str, nn.Module],
           field: str) -> dict[str, str]:
    """Layers selected by ``patterns`` (wildcards over Conv/Linear, exact names of any weight
    layer) -> the pattern that selected them."""
    convlin = [name for name, module in layers.items() if isinstance(module, CONV_LINEAR)]
    modules = dict(model.named_modules())
    chosen: dict[str, str] = {}
    for pattern in patterns:
        if any(char in pattern for char in WILDCARDS):
            hits = [name for name in convlin if fnmatch.fnmatchcase(name, pattern)]
            if not hits:
                raise ModelError(_no_match(field, pattern, convlin, layers))
        else:
            _check_named(field, pattern, modules, convlin)
            hits = [pattern]
        for name in hits:
            chosen.setdefault(name, f"{field.split('.')[-1]} {pattern!r}")
    return {name: chosen[name] for name in layers if name in chosen}


def _check_named(field: str, name: str, modules: dict[str, nn.Module],
                 convlin: list[str]) -> None:
    if name not in modules:
        raise ModelError(f"{field}: the model has no layer {name!r}; its conv/linear layers "
                         f"are named like: {_examples(convlin)}")
    module = modules[name]
    if not isinstance(module._parameters.get("weight"), nn.Parameter):
        raise ModelError(
            f"{field}: {name!r} is a {type(module).__name__}, which holds no `weight` "
            "parameter of its own, so it cannot be masked (ticketsearch masks a layer's "
            "weight: Conv, Linear, Embedding, norms, or a custom module with self.weight); "
            "name the layers inside it instead")


def _unmasked(patterns: Sequence[str], reasons: dict[str, str]) -> dict[str, str]:
    """Masked layers taken out by ``unmasked_layers`` -> the pattern that took them out."""
    removed: dict[str, str] = {}
    for pattern in patterns:
        hits = [name for name in reasons if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ModelError(f"model.unmasked_layers: pattern {pattern!r} matches no masked "
                             f"layer; the masked layers are: {_examples(list(reasons))}")
        for name in hits:
            removed.setdefault(name, f"unmasked_layers {pattern!r}")
    return removed


def _left_out(spec, module: nn.Module, name: str, classifier: str | None) -> str:
    if spec.masked_layers:
        return "not in masked_layers"
    if not isinstance(module, CONV_LINEAR):
        return "not conv/linear"
    if spec.builtin:
        return f"not in {spec.name} default"
    return "final classifier" if name == classifier else "not in the default set"


def _nothing_masked(spec, model: nn.Module, num_classes: int) -> str:
    if spec.masked_layers or spec.unmasked_layers:
        return ("model.unmasked_layers: takes out every masked layer; nothing would be "
                "masked; keep at least one")
    classifier = final_classifier(model, num_classes)
    has = f" other than its final classifier {classifier!r}" if classifier else ""
    return (f"model: {spec.label()} has no layer to mask: no Conv1d/2d/3d or Linear "
            f"layer{has}; name the layers to mask in model.masked_layers (exact names of "
            "layers holding a weight)")


def _no_match(field: str, pattern: str, convlin: list[str],
              layers: dict[str, nn.Module]) -> str:
    others = [name for name, module in layers.items()
              if not isinstance(module, CONV_LINEAR) and fnmatch.fnmatchcase(name, pattern)]
    hint = (f"; it matches {', '.join(others[:3])}, which are not conv/linear: name such "
            "layers exactly to mask them" if others else "")
    return (f"{field}: pattern {pattern!r} matches no Conv/Linear layer{hint}; the conv/"
            f"linear layers are named like: {_examples(convlin)} (fnmatch, '*' also "
            "matches dots)")


def _examples(names: list[str], shown: int = 6) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return (", ".join(names[:shown]) or "(none)") + more
