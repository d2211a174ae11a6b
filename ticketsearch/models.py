"""Model factories: the built-in models (the registry derived from ``catalog.MODELS``),
torchvision's and timm's classifiers, and the user's own ``"module:callable"``.

A model factory is a callable returning a fresh ``nn.Module``; it is given ``num_classes`` and
``input_shape`` (per example, e.g. ``(3, 32, 32)``) when its signature takes those keywords,
plus its kwargs. ``build_model(model_spec, ...)`` builds any model a spec names through one
such factory; ``create_model`` builds a built-in model by name. ``catalog.MODELS`` holds each
built-in model's name, builder path (a factory), default masked layers (fnmatch patterns over
``model.named_modules()`` names) and description; ``masked_layer_names`` resolves patterns to
the concrete Conv/Linear modules whose ``.weight`` is masked or pruned (``layers.py`` adds the
default rule for any model and the explicit naming of other layers).

Builders here: LeNet-300-100 MLP, CIFAR ResNet-20 (1x1 conv shortcuts, no BN on the shortcut),
CIFAR VGG-16 with BN, and torchvision's ResNet-50 (imported lazily).

Every model takes ``activation`` (``relu`` by default, or ``silu``, ``mish``, ``elu``): the
retraining recipes' activation swap. Activations carry no parameters, so the swap changes
neither the parameter names and count nor the masked-layer set.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import catalog
from .usercode import UserCodeError, call_factory, import_factory

__all__ = [
    "ACTIVATIONS",
    "CONV_LINEAR",
    "ModelError",
    "ModelInfo",
    "build_model",
    "create_model",
    "masked_layer_names",
    "model_from_meta",
    "model_info",
    "model_names",
]

CONV_LINEAR: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""The layer types masked by default (their ``weight``)."""
FACTORY_KEYWORDS: tuple[str, ...] = ("num_classes", "input_shape")
"""What a model factory is given (when its signature takes them): the data's number of
classes (int) and the shape of one example (tuple of ints, e.g. ``(3, 32, 32)``)."""
TIMM_EXTRA = "pip install 'ticketsearch[timm]'"

CIFAR_SHAPE: tuple[int, int, int] = (3, 32, 32)
DEFAULT_MLP_HIDDEN: tuple[int, ...] = (300, 100)
ACCEPTED_KWARGS: frozenset[str] = frozenset({"mlp_hidden", "activation"})
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "silu": F.silu,
    "mish": F.mish,
    "elu": F.elu,
}
"""Activation functions by name; ``relu`` is every model's default."""
ACTIVATION_MODULES: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "elu": nn.ELU,
}
VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip


class ModelError(ValueError):
    """A model name, input shape, keyword argument or masked-layer pattern is invalid."""


@dataclass(frozen=True)
class ModelInfo:
    """A registered model.

    ``build(num_classes, input_shape, mlp_hidden=...)`` returns a fresh, randomly initialised
    model. ``masked_layers`` are the default fnmatch patterns over module names selecting the
    layers whose ``.weight`` is masked/pruned (resolve them with ``masked_layer_names``).
    """

    name: str
    build: Callable[..., nn.Module]
    masked_layers: tuple[str, ...]
    description: str


# --------------------------------------------------------------------------------------------
# MLP (LeNet-300-100)
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Flatten -> fc1 -> ReLU -> fc2 -> ReLU -> ... -> fcN (logits).

    With ``hidden=(300, 100)`` this is LeNet-300-100: layers ``fc1``, ``fc2``, ``fc3``.
    ``activation`` names the function between layers (a key of ``ACTIVATIONS``).
    """

    def __init__(
        self, in_features: int, hidden: Sequence[int], num_classes: int, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.activation = activation
        self.flatten = nn.Flatten()
        widths = [in_features, *hidden, num_classes]
        self.num_layers = len(widths) - 1
        for index in range(self.num_layers):
            self.add_module(f"fc{index + 1}", nn.Linear(widths[index], widths[index + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        x = self.flatten(x)
        for index in range(1, self.num_layers + 1):
            x = getattr(self, f"fc{index}")(x)
            if index < self.num_layers:
                x = act(x)
        return x


def _check_mlp_hidden(mlp_hidden: Sequence[int]) -> tuple[int, ...]:
    """Return ``mlp_hidden`` as a tuple of positive ints or raise ModelError."""
    if isinstance(mlp_hidden, str | bytes) or not isinstance(mlp_hidden, Sequence):
        raise ModelError(
            f"model.mlp_hidden: expected a list of hidden-layer widths such as [300, 100], "
            f"got {mlp_hidden!r}"
        )
    widths = tuple(mlp_hidden)
    if not widths or not all(_is_positive_int(width) for width in widths):
        raise ModelError(
            f"model.mlp_hidden: expected a non-empty list of positive integers such as "
            f"[300, 100], got {list(widths)!r}"
        )
    return widths


def build_mlp(
    num_classes: int,
    input_shape: tuple[int, ...],
    mlp_hidden: Sequence[int] = DEFAULT_MLP_HIDDEN,
    activation: str = "relu",
) -> nn.Module:
    """LeNet-300-100 style MLP over the flattened input; takes any input shape."""
    hidden = _check_mlp_hidden(mlp_hidden)
    return MLP(math.prod(input_shape), hidden, num_classes, activation)


# --------------------------------------------------------------------------------------------
# ResNet-20 (CIFAR)
# --------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """conv1 3x3 (stride s) -> bn1 -> ReLU -> conv2 3x3 -> bn2, plus shortcut, then ReLU.

    ``shortcut`` is ``nn.Identity`` when the shape is unchanged, otherwise a 1x1 conv with the
    block's stride, no bias and no BN. ``activation`` replaces ReLU (a key of ``ACTIVATIONS``).
    """

    def __init__(self, in_planes: int, planes: int, stride: int, activation: str = "relu") -> None:
        super().__init__()
        self.activation = activation
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        out = act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return act(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: conv1+bn1, 3 stages x 3 BasicBlocks (16/32/64), avg pool, fc."""

    def __init__(self, num_classes: int, activation: str = "relu") -> None:
        super().__init__()
        self.activation = activation
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = _make_stage(16, 16, 1, activation)
        self.layer2 = _make_stage(16, 32, 2, activation)
        self.layer3 = _make_stage(32, 64, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = ACTIVATIONS[self.activation](self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def _make_stage(
    in_planes: int, planes: int, stride: int, activation: str = "relu", blocks: int = 3
) -> nn.Sequential:
    """A stage of ``blocks`` BasicBlocks; only the first one changes stride/width."""
    layers = [BasicBlock(in_planes, planes, stride, activation)]
    layers += [BasicBlock(planes, planes, 1, activation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def _init_convs(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) init for every Conv2d; BN weight 1, bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def build_resnet20(
    num_classes: int,
    input_shape: tuple[int, ...],
    mlp_hidden: Sequence[int] = DEFAULT_MLP_HIDDEN,
    activation: str = "relu",
) -> nn.Module:
    """CIFAR ResNet-20; needs input shape (3, 32, 32). ``mlp_hidden`` is ignored."""
    _require_shape("resnet20", input_shape, CIFAR_SHAPE)
    return ResNet20(num_classes, activation)


# --------------------------------------------------------------------------------------------
# VGG-16 (CIFAR, with BN)
# --------------------------------------------------------------------------------------------


class VGG16(nn.Module):
    """CIFAR VGG-16 with BN: ``features`` (conv3x3+BN+ReLU, max-pools) -> ``classifier``."""

    def __init__(self, num_classes: int, activation: str = "relu") -> None:
        super().__init__()
        self.features = _make_vgg_features(VGG16_CFG, activation)
        self.classifier = nn.Linear(512, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _make_vgg_features(cfg: Sequence[int | str], activation: str = "relu") -> nn.Sequential:
    """Conv2d(3x3, pad 1)+BN+activation for each width in ``cfg``, MaxPool2d(2) for each "M"."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = int(item)
        layers += [
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            ACTIVATION_MODULES[activation](),
        ]
        in_channels = out_channels
    return nn.Sequential(*layers)


def build_vgg16(
    num_classes: int,
    input_shape: tuple[int, ...],
    mlp_hidden: Sequence[int] = DEFAULT_MLP_HIDDEN,
    activation: str = "relu",
) -> nn.Module:
    """CIFAR VGG-16 with BN; needs input shape (3, 32, 32). ``mlp_hidden`` is ignored."""
    _require_shape("vgg16", input_shape, CIFAR_SHAPE)
    return VGG16(num_classes, activation)


# --------------------------------------------------------------------------------------------
# ResNet-50 (torchvision)
# --------------------------------------------------------------------------------------------


def build_resnet50(
    num_classes: int,
    input_shape: tuple[int, ...],
    mlp_hidden: Sequence[int] = DEFAULT_MLP_HIDDEN,
    activation: str = "relu",
) -> nn.Module:
    """torchvision ResNet-50 (random init); needs (3, H, W) with H, W >= 32."""
    if len(input_shape) != 3 or input_shape[0] != 3 or min(input_shape[1:]) < 32:
        raise ModelError(
            f"model.name: resnet50 expects input shape (3, H, W) with H, W >= 32, got {input_shape}"
        )
    from torchvision.models import resnet50

    model = resnet50(weights=None, num_classes=num_classes)
    if activation != "relu":
        replace_relu_modules(model, activation)
    return model


def replace_relu_modules(model: nn.Module, activation: str) -> int:
    """Replace every ``nn.ReLU`` submodule of ``model`` by a fresh ``activation`` module in
    place; return how many were replaced."""
    targets = [
        (parent, child_name)
        for parent in model.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, nn.ReLU)
    ]
    for parent, child_name in targets:
        setattr(parent, child_name, ACTIVATION_MODULES[activation]())
    return len(targets)


# --------------------------------------------------------------------------------------------
# Library classifiers and the user's factories
# --------------------------------------------------------------------------------------------


def build_torchvision(
    num_classes: int, input_shape: tuple[int, ...], arch: str, **kwargs: Any
) -> nn.Module:
    """torchvision classifier ``arch`` with random weights and ``num_classes`` outputs."""
    import torchvision.models as tvm

    return tvm.get_model(arch, weights=None, num_classes=num_classes, **kwargs)


def build_timm(
    num_classes: int, input_shape: tuple[int, ...], arch: str, **kwargs: Any
) -> nn.Module:
    """timm model ``arch`` with random weights, ``num_classes`` outputs and, for images,
    ``input_shape[0]`` input channels."""
    timm = _import_timm(f"timm:{arch}")
    if len(input_shape) == 3:
        kwargs = {"in_chans": input_shape[0], **kwargs}
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


def _import_timm(name: str) -> Any:
    try:
        return importlib.import_module("timm")
    except ImportError:
        raise ModelError(
            f"model.name: {name} needs timm, which is not installed here; install the "
            f"optional extra: {TIMM_EXTRA}"
        ) from None


def library_factory(name: str) -> Callable[..., nn.Module]:
    """The factory of ``"torchvision:<arch>"`` or ``"timm:<arch>"``; ModelError for another
    library, an unknown architecture or a missing timm."""
    library, _, arch = name.partition(":")
    if library == "torchvision":
        import torchvision.models as tvm

        known = tvm.list_models(module=tvm)
        build: Callable[..., nn.Module] = build_torchvision
    elif library == "timm":
        known = _import_timm(name).list_models()
        build = build_timm
    else:
        raise ModelError(f"model.name: {name!r}: the library must be torchvision or timm")
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ModelError(f"model.name: {library} has no classifier {arch!r}{hint}")
    return functools.partial(build, arch=arch)


def init_weights(model: nn.Module, init: str) -> nn.Module:
    """``xavier``: every Conv1d/2d/3d and Linear weight Xavier-normal, biases zero (the
    reference CS code's initialisation); ``default`` leaves the model as built."""
    if init == "xavier":
        for module in model.modules():
            if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear):
                nn.init.xavier_normal_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    elif init != "default":
        raise ModelError(f"model.init: unknown initialisation {init!r}; use default or xavier")
    return model


def build_model(
    spec: Any, num_classes: int, input_shape: Sequence[int], activation: str = "relu"
) -> nn.Module:
    """A fresh, randomly initialised model as ``spec`` (a ``ModelSpec``: ``name``,
    ``factory``, ``kwargs``, ``mlp_hidden``) names it, for ``num_classes`` classes and
    examples of ``input_shape``.

    A built-in name goes through ``create_model``. A library name or ``spec.factory`` is
    called with ``num_classes`` and ``input_shape`` (the keywords its signature takes) plus
    ``spec.kwargs``; an ``activation`` other than relu then replaces every ``nn.ReLU``
    module. Raises ModelError, naming model.name or model.factory, when the factory cannot be
    imported, raises, or returns something that is not an ``nn.Module``.
    """
    if spec.factory is None and ":" not in spec.name:
        model = create_model(spec.name, num_classes, tuple(input_shape),
                             mlp_hidden=tuple(spec.mlp_hidden), activation=activation)
        return init_weights(model, getattr(spec, "init", "default"))
    field, path = ("model.factory", spec.factory) if spec.factory else ("model.name", spec.name)
    shapes = {"num_classes": num_classes, "input_shape": tuple(input_shape)}
    try:
        factory = import_factory(path, field) if spec.factory else library_factory(path)
        model = call_factory(factory, field, path, spec.kwargs, shapes)
    except UserCodeError as err:
        raise ModelError(str(err)) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{field}: {path} returned a {type(model).__name__}, not a "
                         "torch.nn.Module; return the network itself")
    _materialize(model, tuple(input_shape), field, path)
    init_weights(model, getattr(spec, "init", "default"))
    if activation != "relu" and replace_relu_modules(model, activation) == 0:
        raise ModelError(f"retrain.recipes: the activation {activation} replaces nn.ReLU "
                         f"modules, but {path} has none (it may call torch.relu in forward); "
                         "drop the activation recipe or use nn.ReLU modules")
    return model


def _materialize(model: nn.Module, input_shape: tuple[int, ...], field: str, path: str) -> None:
    """Give lazy modules (``nn.LazyLinear``, ...) their shapes: one forward pass of a zero
    example, in eval mode, without gradients."""
    lazy = nn.parameter.UninitializedParameter
    if not any(isinstance(p, lazy) for p in model.parameters()):
        return
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape))
    except Exception as err:
        raise ModelError(f"{field}: {path} has lazy layers, and a forward pass of one example "
                         f"of shape {input_shape} to size them failed: "
                         f"{type(err).__name__}: {err}") from None
    finally:
        model.train(training)


def model_from_meta(meta: Mapping[str, Any], activation: str = "relu") -> nn.Module:
    """A fresh model as a ticket's metadata describes it: ``model`` (name or factory path),
    ``model_factory`` (None for a named model), ``model_kwargs``, ``num_classes`` and
    ``input_shape``; ``activation`` as in ``build_model``."""
    factory = meta.get("model_factory")
    kwargs = dict(meta.get("model_kwargs") or {})
    shape = tuple(meta["input_shape"])
    if factory is None and ":" not in meta["model"]:
        return create_model(meta["model"], meta["num_classes"], shape,
                            **(kwargs | {"activation": activation}))
    source = SimpleNamespace(name="mlp" if factory else meta["model"], factory=factory,
                             kwargs=kwargs, mlp_hidden=())
    return build_model(source, meta["num_classes"], shape, activation)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, ModelInfo] = {
    entry.name: ModelInfo(
        name=entry.name,
        build=catalog.resolve(entry.builder),
        masked_layers=entry.masked_layers,
        description=entry.description,
    )
    for entry in catalog.MODELS.values()
}
"""One ModelInfo per ``catalog.MODELS`` entry (the builders live in this module)."""


def model_names() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for ``name``; ModelError listing the known names if unknown."""
    info = _REGISTRY.get(name)
    if info is None:
        raise ModelError(
            f"model.name: unknown model {name!r}; known models: {', '.join(model_names())}"
        )
    return info


def create_model(
    name: str, num_classes: int, input_shape: tuple[int, ...], **kwargs: object
) -> nn.Module:
    """Build a fresh model ``name`` for ``num_classes`` classes and inputs of ``input_shape``.

    ``input_shape`` excludes the batch dimension, e.g. (3, 32, 32). The keyword arguments are
    ``mlp_hidden`` (hidden widths of the mlp; accepted and ignored by the other models) and
    ``activation`` (a key of ``ACTIVATIONS``, default ``relu``). Raises ModelError for an
    unknown name or activation, an unexpected keyword argument, a bad ``num_classes`` or an
    input shape the model cannot take.
    """
    info = model_info(name)
    unexpected = sorted(set(kwargs) - ACCEPTED_KWARGS)
    if unexpected:
        raise ModelError(
            f"create_model: unexpected keyword argument(s) {', '.join(unexpected)} for model "
            f"{name!r}; accepted: {', '.join(sorted(ACCEPTED_KWARGS))}"
        )
    if not _is_positive_int(num_classes):
        raise ModelError(f"num_classes: expected a positive integer, got {num_classes!r}")
    activation = kwargs.get("activation", "relu")
    if activation not in ACTIVATIONS:
        raise ModelError(
            f"activation: unknown activation {activation!r}; known: {', '.join(ACTIVATIONS)}"
        )
    shape = _check_input_shape(input_shape)
    return info.build(num_classes, shape, **kwargs)


def masked_layer_names(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the Conv1d/2d/3d and Linear modules (with a weight) matching any of
    ``patterns``.

    Matching is ``fnmatch.fnmatchcase`` on ``model.named_modules()`` names (``*`` also matches
    dots); the result keeps ``named_modules()`` order. Raises ModelError if ``patterns`` is
    empty or a plain string, or if a pattern matches no Conv/Linear layer.
    """
    if isinstance(patterns, str | bytes):
        raise ModelError(
            f"masked_layers: expected a list of patterns such as [{patterns!r}], got the "
            f"string {patterns!r}"
        )
    pattern_list = list(patterns)
    if not pattern_list:
        raise ModelError("masked_layers: empty pattern list; give at least one pattern")
    candidates = _weight_layer_names(model)
    for pattern in pattern_list:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            raise ModelError(_no_match_message(pattern, candidates))
    return [
        name
        for name in candidates
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in pattern_list)
    ]


def _weight_layer_names(model: nn.Module) -> list[str]:
    """Names of Conv/Linear modules that have a weight, in named_modules() order."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, CONV_LINEAR)
        and isinstance(getattr(module, "weight", None), torch.Tensor)
    ]


def _no_match_message(pattern: str, candidates: list[str], shown: int = 6) -> str:
    examples = ", ".join(candidates[:shown])
    more = f", ... ({len(candidates)} in all)" if len(candidates) > shown else ""
    return (
        f"masked_layers: pattern {pattern!r} matches no Conv/Linear layer of this model; "
        f"its conv/linear layers are named like: {examples}{more}. "
        f"Fix the pattern (fnmatch syntax, '*' also matches dots)."
    )


def _check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Return ``input_shape`` as a non-empty tuple of positive ints or raise ModelError."""
    if isinstance(input_shape, str | bytes) or not isinstance(input_shape, Sequence):
        raise ModelError(f"input_shape: expected a tuple such as (3, 32, 32), got {input_shape!r}")
    shape = tuple(input_shape)
    if not shape or not all(_is_positive_int(size) for size in shape):
        raise ModelError(
            f"input_shape: expected a non-empty tuple of positive integers such as "
            f"(3, 32, 32), got {shape!r}"
        )
    return shape


def _require_shape(name: str, input_shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(input_shape) != expected:
        raise ModelError(
            f"model.name: {name} expects input shape {expected}, got {tuple(input_shape)}"
        )


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
