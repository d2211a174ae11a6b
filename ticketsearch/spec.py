"""The job spec: every knob of a ticketsearch job, its default and its one-line description.

A job is written in YAML, validated into a frozen :class:`JobSpec`, and expanded into one
:class:`TrialSpec` per trial. The shared sections (data, model, train, retrain, resources,
tracking, storage) live here; each method's section is the :class:`MethodSpec` its module
declares (``methods/``), found through the method registry. Defaults live only in these
classes; the CLI and the JSON schema reuse the field descriptions.

User mistakes surface as :class:`SpecError`, one line per problem, each naming the
field path (``train.lr``, ``methods.cs.sweep.lambda[1]``) and what to do about it.

Imports only the standard library, pydantic and PyYAML at import time; validating a job
imports the method registry (and with it torch).
"""

from __future__ import annotations

import copy
import difflib
import functools
import hashlib
import itertools
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from . import catalog

__all__ = [
    "CodeSpec",
    "DataSpec",
    "JobSpec",
    "MethodSpec",
    "ModelSpec",
    "RECIPE_PRESETS",
    "RecipeSpec",
    "ResourcesSpec",
    "RetrainSpec",
    "Seed",
    "SpecError",
    "StorageSpec",
    "TrackingSpec",
    "TrainSpec",
    "TRIAL_ID_MAX_LENGTH",
    "TrialSpec",
    "apply_overrides",
    "dump_job",
    "format_number",
    "job_json_schema",
    "load_job",
    "parse_job",
    "rescale_milestones",
    "spec_error_from",
]

DatasetName = Literal[catalog.DATASET_NAMES]  # type: ignore[valid-type]
ModelName = Literal[catalog.MODEL_NAMES]  # type: ignore[valid-type]
ActivationName = Literal["relu", "silu", "mish", "elu"]

JOB_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
RECIPE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
JOB_NAME_MAX_LENGTH = 64
TRIAL_ID_PATTERN = r"^[A-Za-z0-9_.=-]+$"


SEED_BITS = 63
"""Trial seeds are in 0..2**63 - 1: torch generators take at most 2**64 - 1, numpy's
default_rng no negative seed."""
SPLIT_SEED_BITS = 32
"""data.split_seed is in 0..2**32 - 1: scikit-learn's random_state takes no more."""


def _seed_type(bits: int) -> Any:
    """An int seed type in 0..2**bits - 1 whose error message gives the range."""
    top = 2**bits - 1

    def check(value: int) -> int:
        if not 0 <= value <= top:
            raise ValueError(f"must be an integer from 0 to 2**{bits} - 1 = {top} (got {value})")
        return value

    schema = {"type": "integer", "minimum": 0, "maximum": top}
    return Annotated[int, AfterValidator(check), WithJsonSchema(schema)]


Seed = _seed_type(SEED_BITS)
"""The type of every trial seed field (a method's ``seed``, ``TrialSpec.seed``)."""
SplitSeed = _seed_type(SPLIT_SEED_BITS)


class SpecError(ValueError):
    """A job spec a user wrote (or the command-line overrides) cannot be used.

    ``str(error)`` is human-readable, one line per problem, each ``<field.path>: <message>``;
    ``problems`` holds the same lines as a list.
    """

    def __init__(self, problems: str | Sequence[str]):
        lines = [problems] if isinstance(problems, str) else list(problems)
        self.problems: list[str] = lines
        super().__init__("\n".join(lines))


_BOOLEAN_MESSAGE = ("must be a number, not the boolean {value} (YAML reads true/false, yes/no, "
                    "on/off as booleans); write a number")


def _unannotated(annotation: Any) -> Any:
    """``Annotated[int, ...]`` -> ``int``."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _union_members(annotation: Any) -> list[Any]:
    """The members of a union (``float | Literal['imp'] | None``), else ``[annotation]``."""
    annotation = _unannotated(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [_unannotated(arg) for arg in typing.get_args(annotation)]
    return [annotation]


def _takes_numbers(annotation: Any) -> bool:
    """Whether a field of this type takes ints or floats but not booleans."""
    members = _union_members(annotation)
    return bool({int, float} & set(members)) and not {bool, Any} & set(members)


def _list_item(annotation: Any) -> Any:
    """The item type of ``list[X]`` (or ``list[X] | None``); None if it is not a list."""
    for member in _union_members(annotation):
        if typing.get_origin(member) is list:
            return typing.get_args(member)[0]
    return None


def _refuse_booleans(annotation: Any, value: Any) -> None:
    """Raise if ``value`` is a boolean (or a list holding one) given for a number field:
    pydantic would read true as 1."""
    if isinstance(value, bool) and _takes_numbers(annotation):
        raise ValueError(_BOOLEAN_MESSAGE.format(value=str(value).lower()))
    item = _list_item(annotation)
    if isinstance(value, list) and item is not None and _takes_numbers(item):
        bad = [(index, v) for index, v in enumerate(value) if isinstance(v, bool)]
        if bad:
            _raise_problems("list", [((index,), _BOOLEAN_MESSAGE.format(value=str(v).lower()),
                                      v) for index, v in bad])


class _NoBooleans(BaseModel):
    """Refuses booleans for every number field (and number-list field) of a subclass."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        _refuse_booleans(cls.model_fields[info.field_name].annotation, value)
        return value


class _Spec(_NoBooleans):
    """Base of every spec model: unknown keys are errors, booleans are not numbers, instances
    are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _raise_problems(title: str, problems: Sequence[tuple[tuple[str | int, ...], str, Any]]) -> None:
    """Raise a pydantic ValidationError carrying ``(loc, message, input)`` problems.

    Used by cross-field validators so that each problem keeps its own field path when the
    error propagates through the enclosing models.
    """
    raise ValidationError.from_exception_data(
        title,
        [
            {
                "type": PydanticCustomError("spec_error", "{message}", {"message": message}),
                "loc": loc,
                "input": value,
            }
            for loc, message, value in problems
        ],
    )


# --------------------------------------------------------------------------------------
# Data, model, training
# --------------------------------------------------------------------------------------


FACTORY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
MODEL_LIBRARIES: tuple[str, ...] = ("torchvision", "timm")
"""Libraries whose classifiers ``model.name`` names as ``"<library>:<architecture>"``."""
_LIBRARY_MODEL_PATTERN = rf"^({'|'.join(MODEL_LIBRARIES)}):[A-Za-z0-9_.]+$"


def _check_factory_path(value: str | None) -> str | None:
    """A factory is written ``"package.module:callable"``."""
    if value is not None and not re.match(FACTORY_PATTERN, value):
        raise ValueError(
            f"must be 'module:callable' such as 'my_pkg.nets:build_net' (got {value!r})"
        )
    return value


def _check_patterns(value: list[str] | None) -> list[str] | None:
    """An explicit pattern list names at least one non-empty pattern."""
    if value is None:
        return value
    if not value:
        raise ValueError(
            "must list at least one module-name pattern (got []); "
            "omit it to use the model's default masked layers"
        )
    for pattern in value:
        if not pattern.strip():
            raise ValueError(f"patterns must be non-empty (got {value!r})")
    return value


class DataSpec(_Spec):
    """Which dataset to train on and how to split and augment it."""

    dataset: DatasetName = Field(
        "digits",
        description="Dataset: digits and synthetic are built in memory; cifar10, cifar100, "
        "mnist, imagenet and folder (any ImageFolder tree) are read from data.root.",
    )
    factory: str | None = Field(
        None,
        description="Your own data instead of data.dataset: 'module:callable' returning "
        "{train: (x, y), val: ..., test: ...} (numpy arrays or tensors; val and test "
        "optional) or the same with torch Datasets; called with data.kwargs.",
        json_schema_extra={"pattern": FACTORY_PATTERN},
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments data.factory is called with."
    )
    root: str | None = Field(
        None,
        description="Directory holding the dataset files; required for cifar10, cifar100, "
        "mnist, imagenet and folder (with download: true the files are fetched into it).",
    )
    download: bool = Field(
        False,
        description="Download the dataset into data.root if it is missing "
        "(cifar10, cifar100, mnist; imagenet and folder cannot be downloaded).",
    )
    val_size: Annotated[int, Field(ge=0)] | None = Field(
        None,
        description="Examples held out of the training split for validation; "
        "null = the dataset's default (5000 for cifar10, 10% for your own data).",
    )
    augment: bool | None = Field(
        None,
        description="Training-set augmentation (random crop and flip for images); "
        "null = the dataset's default.",
    )
    split_seed: SplitSeed = Field(0, description="Seed of the train/validation split.")
    synthetic_shape: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64],
        min_length=1,
        description="Input shape of the synthetic dataset, e.g. [64] or [3, 32, 32].",
    )
    synthetic_classes: int = Field(
        10, ge=2, description="Number of classes of the synthetic dataset."
    )
    synthetic_size: int = Field(
        512, ge=16, description="Number of training examples of the synthetic dataset."
    )
    image_size: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="folder: resize (shorter side) and centre-crop images to this size; "
        "null = keep their size (they must all be the same size).",
    )
    num_workers: int = Field(
        4, ge=0, description="DataLoader worker processes (imagenet, folder, torch Datasets)."
    )

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str | None) -> str | None:
        return _check_factory_path(value)

    @model_validator(mode="after")
    def _check_root(self) -> DataSpec:
        """File-backed datasets need a root directory; only some can be downloaded; a
        factory replaces the dataset."""
        if self.factory is not None:
            named = [name for name, given in (("dataset", self.dataset != "digits"),
                                              ("root", self.root is not None),
                                              ("download", self.download)) if given]
            if named:
                _raise_problems("DataSpec", [((name,), "give either data.dataset (with its "
                                "root) or data.factory, not both", getattr(self, name))
                                for name in named])
            return self
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        entry = catalog.DATASETS[self.dataset]
        if entry.needs_root and not self.root:
            how = (
                "set data.download: true to fetch it there"
                if entry.downloadable
                else f"place {entry.layout} there"
            )
            problems.append(
                (
                    ("root",),
                    f"{self.dataset} needs a root directory holding the dataset files; "
                    f"set data.root to it ({how})",
                    self.root,
                )
            )
        if entry.needs_root and not entry.downloadable and self.download:
            problems.append(
                (
                    ("download",),
                    f"{self.dataset} cannot be downloaded automatically; set data.download: "
                    f"false and place {entry.layout} under data.root",
                    self.download,
                )
            )
        if problems:
            _raise_problems("DataSpec", problems)
        return self

    def label(self) -> str:
        """What the data is, in a word: the factory path or the dataset name."""
        return self.factory or self.dataset


class ModelSpec(_Spec):
    """Which network to train and which of its layers carry masks."""

    name: str = Field(
        "mlp",
        description="Network: mlp (any dataset), resnet20 and vgg16 (3x32x32 images), "
        "resnet50 (imagenet), or a library classifier 'torchvision:<name>' / 'timm:<name>' "
        "(random init, num_classes set; timm needs the ticketsearch[timm] extra).",
        json_schema_extra={"anyOf": [{"enum": list(catalog.MODEL_NAMES)},
                                     {"pattern": _LIBRARY_MODEL_PATTERN}]},
    )
    factory: str | None = Field(
        None,
        description="Your own network instead of model.name: 'module:callable' returning an "
        "nn.Module, called with num_classes and input_shape (from the data) when its "
        "signature takes them, plus model.kwargs.",
        json_schema_extra={"pattern": FACTORY_PATTERN},
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments for model.factory or a torchvision:/timm: model.",
    )
    masked_layers: list[str] | None = Field(
        None,
        description="fnmatch patterns over module names (e.g. 'layer*.conv1') selecting the "
        "Conv/Linear layers to mask, or exact names of other layers holding a weight; "
        "replaces the model's default set (every Conv/Linear layer but the final "
        "classifier, or a built-in model's own set); null = the default.",
    )
    unmasked_layers: list[str] | None = Field(
        None,
        description="fnmatch patterns (or exact names) of layers taken out of the masked set.",
    )
    mlp_hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [300, 100],
        description="Hidden-layer widths of the mlp model.",
    )
    init: Literal["default", "xavier"] = Field(
        "default",
        description="Weight initialisation: default = the model's own (Kaiming fan-out for the "
        "built-in convs, PyTorch's for linear layers); xavier = every conv and linear weight "
        "Xavier-normal with zero biases, as the reference CS code does.",
    )

    @field_validator("masked_layers", "unmasked_layers")
    @classmethod
    def _check_masked_layers(cls, value: list[str] | None) -> list[str] | None:
        return _check_patterns(value)

    @field_validator("factory")
    @classmethod
    def _check_factory(cls, value: str | None) -> str | None:
        return _check_factory_path(value)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        """A built-in model, or ``<library>:<architecture>``."""
        if value in catalog.MODEL_NAMES or re.match(_LIBRARY_MODEL_PATTERN, value):
            return value
        names = ", ".join(repr(name) for name in catalog.MODEL_NAMES)
        raise ValueError(
            f"must be one of {names}, or 'torchvision:<name>' / 'timm:<name>' (got "
            f"{value!r}); for your own network set model.factory: 'module:callable'"
        )

    @model_validator(mode="after")
    def _check_source(self) -> ModelSpec:
        """A factory replaces the name; kwargs go to a factory or a library model."""
        if self.factory is not None and self.name != "mlp":
            _raise_problems("ModelSpec", [(("name",), "give either model.name or "
                            "model.factory, not both", self.name)])
        if self.kwargs and self.builtin:
            _raise_problems("ModelSpec", [(("kwargs",), f"the built-in model {self.name} "
                            "takes no kwargs (mlp's widths are model.mlp_hidden); kwargs are "
                            "for model.factory and torchvision:/timm: models", self.kwargs)])
        return self

    @property
    def builtin(self) -> bool:
        """A catalog model (mlp, resnet20, ...), not a factory or a library model."""
        return self.factory is None and ":" not in self.name

    def label(self) -> str:
        """What the network is, in a word: the factory path or the model name."""
        return self.factory or self.name


class CodeSpec(_Spec):
    """The job's own code and what it needs, shipped to a cluster by ``ticketsearch submit``."""

    py_modules: list[str] = Field(
        default_factory=list,
        description="Extra local packages or .py files to ship (paths relative to the spec's "
        "folder; the Python modules of the spec's folder and the current directory are "
        "shipped anyway); their folders are also put on the import path of a local run.",
    )
    pip: list[str] = Field(
        default_factory=list,
        description="pip requirements the cluster installs for this job (Ray runtime_env "
        "pip), e.g. ['timm>=1.0'].",
    )


def rescale_milestones(milestones: Sequence[int], old_epochs: int, new_epochs: int) -> list[int]:
    """Scale LR milestones defined for ``old_epochs`` per round to ``new_epochs`` per round.

    Each milestone m becomes ``max(1, round(m * new_epochs / old_epochs))``; duplicates are
    merged and milestones that no longer fall inside the round (>= new_epochs) are dropped,
    so the result may be empty (constant LR). Unchanged when the epoch counts are equal.
    """
    if old_epochs < 1 or new_epochs < 1:
        raise ValueError(f"epoch counts must be >= 1 (got {old_epochs}, {new_epochs})")
    if new_epochs == old_epochs:
        return list(milestones)
    scaled = {max(1, round(m * new_epochs / old_epochs)) for m in milestones}
    return sorted(m for m in scaled if m < new_epochs)


class TrainSpec(_Spec):
    """The per-round training recipe shared by every method (SGD, step LR schedule)."""

    epochs_per_round: int = Field(
        85,
        ge=1,
        description="Epochs per round (E). Overriding it with --set rescales lr_milestones "
        "proportionally and clamps rewind_epoch unless those are also set.",
    )
    batch_size: int = Field(128, ge=1, description="Mini-batch size.")
    lr: float = Field(0.1, gt=0, description="Initial learning rate of every round.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    nesterov: bool = Field(True, description="Use Nesterov momentum.")
    weight_decay: float = Field(
        1e-4,
        ge=0,
        description="Weight decay on weights and other dense parameters (never on CS mask logits).",
    )
    lr_milestones: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [56, 71],
        description="Epochs within a round at which the LR is multiplied by lr_gamma; "
        "strictly increasing, each below epochs_per_round; [] = constant LR. Rescaled "
        "proportionally when epochs_per_round is overridden on the command line.",
    )
    lr_gamma: float = Field(
        0.1, gt=0, le=1, description="Factor applied to the LR at each milestone."
    )
    rewind_epoch: int = Field(
        2,
        ge=0,
        description="Epochs of the first round after which the rewind snapshot is taken; "
        "below epochs_per_round (clamped to epochs_per_round - 1 when that is overridden).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Training device; auto = cuda when available, else cpu."
    )
    eval_every: int = Field(
        1,
        ge=1,
        description="Epochs between validation/test evaluations; the last epoch of each "
        "round is always evaluated.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training precision: bf16/fp16 run the matmuls and convolutions under "
        "autocast (fp16 with a gradient scaler); masks, mask logits, the CS penalty, the "
        "optimizer and evaluation stay fp32. auto = bf16 on a GPU that supports it (else "
        "fp16), fp32 on CPU.",
    )
    channels_last: bool | Literal["auto"] = Field(
        "auto",
        description="Train in channels-last memory format; auto = on for models with 2-d "
        "convolutions on a GPU, off otherwise.",
    )
    compile: Literal["off", "default", "max-autotune"] = Field(
        "off",
        description="torch.compile the model for training (its first epoch pays the "
        "compilation); off until measured worth it for your model and device.",
    )
    checkpoint_every_s: float = Field(
        60.0,
        gt=0,
        description="Seconds of training between trial checkpoints (taken at the next epoch "
        "end); the end of each round is always checkpointed.",
    )
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="Also checkpoint every this many epochs inside a round (null = by time "
        "only, checkpoint_every_s).",
    )

    @field_validator("compile", mode="before")
    @classmethod
    def _compile_off(cls, value: Any) -> Any:
        """YAML reads a bare ``off`` as false."""
        return "off" if value is False else value

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainSpec:
        """rewind_epoch and every milestone must fall inside one round; milestones increase."""
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        epochs = self.epochs_per_round
        if self.rewind_epoch >= epochs:
            problems.append(
                (
                    ("rewind_epoch",),
                    f"must be below train.epochs_per_round ({epochs}) (got {self.rewind_epoch}); "
                    "the rewind snapshot is taken inside the first round",
                    self.rewind_epoch,
                )
            )
        milestones = self.lr_milestones
        if any(b <= a for a, b in itertools.pairwise(milestones)):
            problems.append(
                (
                    ("lr_milestones",),
                    f"must be strictly increasing (got {milestones})",
                    milestones,
                )
            )
        too_late = [m for m in milestones if m >= epochs]
        if too_late:
            problems.append(
                (
                    ("lr_milestones",),
                    f"milestones {too_late} are not below train.epochs_per_round ({epochs}); "
                    f"each milestone must be in 1..{epochs - 1} (or use [] for a constant LR)",
                    milestones,
                )
            )
        if problems:
            _raise_problems("TrainSpec", problems)
        return self

    def milestones_for(self, epochs: int) -> list[int]:
        """LR milestones for a run of ``epochs`` epochs (e.g. ticket retraining).

        Returns ``lr_milestones`` unchanged when ``epochs == epochs_per_round``; otherwise
        scales them proportionally with :func:`rescale_milestones`.
        """
        return rescale_milestones(self.lr_milestones, self.epochs_per_round, epochs)


# --------------------------------------------------------------------------------------
# Methods and their sweeps
# --------------------------------------------------------------------------------------


def _distinct_values(values: list[Any]) -> list[Any]:
    """A sweep axis lists at least one value and no value twice."""
    if not values:
        raise ValueError("a sweep axis needs at least one value (got an empty list)")
    seen: list[Any] = []
    for value in values:
        if value in seen:
            raise ValueError(
                f"duplicate value {value!r} in {values!r}; each value of a sweep axis must be "
                "distinct, or two trials would be identical"
            )
        seen.append(value)
    return values


def _sweep_axes_schema(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    """JSON-schema hook: describe a method's ``sweep`` mapping axis by axis."""
    axes_schema = _sweep_axes_model(cls).model_json_schema(by_alias=True)
    sweep_schema = schema.get("properties", {}).get("sweep")
    if sweep_schema is not None:
        sweep_schema["properties"] = axes_schema["properties"]
        sweep_schema["additionalProperties"] = False


class MethodSpec(_Spec):
    """Base of the method specs: a ``sweep`` mapping of axis -> list of knob values.

    Each listed value is validated with the same type and constraints as the scalar knob
    of that name; a swept axis replaces the scalar knob. :meth:`expand` yields one
    resolved spec (sweep applied, ``sweep`` empty) per point of the grid.

    A method module subclasses it (``methods/cs.py``'s ``CSSpec``) and registers it: it is
    the ``methods.<name>`` section of a job spec.
    """

    model_config = ConfigDict(json_schema_extra=_sweep_axes_schema)
    sweep_axes: ClassVar[tuple[str, ...]] = ()

    @field_validator("sweep", mode="before", check_fields=False)
    @classmethod
    def _check_sweep(cls, value: Any) -> Any:
        """Validate the sweep axes and values; return them coerced, in axis order."""
        if value is None:
            return {}
        validated = _sweep_axes_model(cls).model_validate(value)
        dumped = validated.model_dump(by_alias=True, exclude_none=True)
        return {axis: dumped[axis] for axis in cls.sweep_axes if axis in dumped}

    @classmethod
    def axis_field(cls, axis: str) -> str:
        """The attribute name of the knob that sweep axis ``axis`` sets (lambda -> lambda_)."""
        for name, info in cls.model_fields.items():
            if (info.alias or name) == axis:
                return name
        raise KeyError(axis)

    def expand(self) -> list[typing.Self]:
        """One resolved spec per grid point: the cartesian product of the sweep axes in
        ``sweep_axes`` order (first axis outermost); axes not swept keep the scalar value."""
        sweep: dict[str, list[Any]] = self.sweep  # type: ignore[attr-defined]
        axes = [axis for axis in self.sweep_axes if axis in sweep]
        points = itertools.product(*(sweep[axis] for axis in axes))
        return [
            self.model_copy(
                update={
                    **{self.axis_field(a): v for a, v in zip(axes, point, strict=True)},
                    "sweep": {},
                }
            )
            for point in points
        ]


@functools.cache
def _sweep_axes_model(cls: type[MethodSpec]) -> type[BaseModel]:
    """A validation model with one optional list field per sweep axis of ``cls``.

    Each list item carries the scalar knob's annotation and constraints, so a swept value
    is checked exactly like the scalar one.
    """
    fields: dict[str, Any] = {}
    for axis in cls.sweep_axes:
        name = cls.axis_field(axis)
        info = cls.model_fields[name]
        item_type = (
            Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        )
        list_type = Annotated[list[item_type], AfterValidator(_distinct_values)]  # type: ignore[valid-type]
        fields[name] = (
            list_type,
            Field(None, alias=axis, description=f"Values of {axis} to sweep over."),
        )
    return create_model(  # type: ignore[call-overload]
        f"{cls.__name__}Sweep", __base__=_SweepAxes, **fields)


class _SweepAxes(_NoBooleans):
    """Base of the sweep validation models (see :func:`_sweep_axes_model`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


# --------------------------------------------------------------------------------------
# Retraining, resources, tracking, storage
# --------------------------------------------------------------------------------------


RECIPE_PRESETS: dict[str, dict[str, Any]] = {
    "vanilla": {},
    "label_smoothing": {"label_smoothing": 0.1},
    "mixup": {"mixup_alpha": 1.0},
    "cutmix": {"cutmix_alpha": 1.0},
    "warmup": {"warmup_epochs": 5},
    "silu": {"activation": "silu"},
    "mish": {"activation": "mish"},
    "elu": {"activation": "elu"},
}
"""Named retraining recipes: ``retrain.recipes: [vanilla, mixup]`` uses them as they are; a
mapping whose name is a preset starts from the preset (``{name: mixup, mixup_alpha: 0.2}``)."""

_RECIPE_TWEAKS: tuple[str, ...] = (
    "label_smoothing", "mixup_alpha", "cutmix_alpha", "warmup_epochs", "activation",
)


class RecipeSpec(_Spec):
    """A retraining recipe: a name and the tweaks it applies (all off = vanilla retraining).

    Written either as a preset name (see ``RECIPE_PRESETS``) or as a mapping; a mapping whose
    name is a preset starts from that preset's values.
    """

    name: str = Field(
        description="Recipe name, unique within the job (letters, digits, '_', '.', '-'); "
        f"the presets are {', '.join(RECIPE_PRESETS)}.",
        json_schema_extra={"pattern": RECIPE_NAME_PATTERN, "maxLength": 40},
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=1, description="Label smoothing ε of the cross-entropy; 0 = off."
    )
    mixup_alpha: float = Field(
        0.0,
        ge=0,
        description="Mixup: each batch is mixed with itself reversed, coefficient drawn from "
        "Beta(α, α) per batch; 0 = off.",
    )
    cutmix_alpha: float = Field(
        0.0,
        ge=0,
        description="CutMix (image datasets only): a box of the reversed batch is pasted in, "
        "area from Beta(α, α) per batch; 0 = off.",
    )
    warmup_epochs: int = Field(
        0,
        ge=0,
        description="Linear LR warm-up: epoch e < W trains at lr·(e+1)/W, then the usual "
        "schedule; 0 = off.",
    )
    activation: ActivationName = Field(
        "relu", description="Activation replacing ReLU in the retrained network."
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, value: Any) -> Any:
        """A preset name becomes its mapping; a mapping named after a preset starts from it."""
        if isinstance(value, str):
            if value not in RECIPE_PRESETS:
                hint = difflib.get_close_matches(value, list(RECIPE_PRESETS), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise ValueError(
                    f"unknown recipe preset {value!r}{suffix}; the presets are "
                    f"{', '.join(RECIPE_PRESETS)}, or write a mapping such as "
                    "{name: smooth, label_smoothing: 0.1}"
                )
            return {"name": value, **RECIPE_PRESETS[value]}
        if isinstance(value, Mapping) and value.get("name") in RECIPE_PRESETS:
            return {**RECIPE_PRESETS[value["name"]], **value}
        return value

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        """Recipe names label results, metrics and report columns."""
        if len(value) > 40 or not re.match(RECIPE_NAME_PATTERN, value):
            raise ValueError(
                "must be at most 40 characters, start with a letter or digit and contain only "
                f"letters, digits, '_', '.', '-' (got {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _check_tweaks(self) -> RecipeSpec:
        """Mixup and CutMix exclude each other; "vanilla" means no tweak at all."""
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            problems.append(
                (
                    ("cutmix_alpha",),
                    "mixup and CutMix cannot be combined in one recipe; set one of mixup_alpha "
                    "and cutmix_alpha to 0 (or list them as two recipes)",
                    self.cutmix_alpha,
                )
            )
        if self.name == "vanilla" and self.tweaks():
            problems.append(
                (
                    ("name",),
                    f"the vanilla recipe is plain retraining and takes no tweaks (got "
                    f"{', '.join(self.tweaks())}); give this recipe another name",
                    self.name,
                )
            )
        if problems:
            _raise_problems("RecipeSpec", problems)
        return self

    def tweaks(self) -> dict[str, Any]:
        """The tweaks this recipe turns on (those not at their off value)."""
        values = {key: getattr(self, key) for key in _RECIPE_TWEAKS}
        return {key: value for key, value in values.items()
                if value != RecipeSpec.model_fields[key].default}


def _default_recipes() -> list[RecipeSpec]:
    return [RecipeSpec(name="vanilla")]


class RetrainSpec(_Spec):
    """Retraining of the tickets found, from the rewind snapshot with the mask frozen."""

    enabled: bool = Field(
        True,
        description="Retrain each ticket found by CS and IMP's final ticket (a RigL run's "
        "network is trained once and not retrained).",
    )
    epochs: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Retraining epochs; null = train.epochs_per_round (LR milestones scale "
        "proportionally, see TrainSpec.milestones_for).",
    )
    recipes: list[RecipeSpec] = Field(
        default_factory=_default_recipes,
        description="Recipes each ticket is retrained under, in order: preset names "
        f"({', '.join(RECIPE_PRESETS)}) or mappings {{name, label_smoothing, mixup_alpha, "
        "cutmix_alpha, warmup_epochs, activation}}. The first recipe's accuracy is the "
        "ticket's; every recipe's is kept per ticket.",
    )

    @field_validator("recipes")
    @classmethod
    def _check_recipe_names(cls, value: list[RecipeSpec]) -> list[RecipeSpec]:
        """At least one recipe; names identify the per-recipe results, so they are distinct."""
        if not value:
            raise ValueError("must list at least one recipe, e.g. [vanilla]")
        seen: set[str] = set()
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        for index, recipe in enumerate(value):
            if recipe.name in seen:
                problems.append(
                    (
                        (index, "name"),
                        f"two recipes are named {recipe.name!r}; give each recipe its own name",
                        recipe.name,
                    )
                )
            seen.add(recipe.name)
        if problems:
            _raise_problems("RetrainSpec", problems)
        return value


class ResourcesSpec(_Spec):
    """What each trial asks the Ray cluster for."""

    cpus: float = Field(1.0, gt=0, description="CPUs per trial.")
    gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs per trial; a fraction <= 1 shares a GPU between trials, "
        "values above 1 must be whole numbers.",
    )
    max_failures: int = Field(
        2, ge=0, description="Times a failed trial is restarted from its last checkpoint."
    )
    workers: int = Field(
        1,
        ge=1,
        description="Data-parallel workers per trial (DistributedDataParallel through Ray "
        "Train, the global batch split between them); each takes resources.cpus CPUs and, "
        "with GPUs, one GPU. gpus: N (whole, > 1) alone means N workers of one GPU each.",
    )

    fuse: Literal["auto", "off"] | Annotated[int, Field(ge=1)] = Field(
        "auto",
        description="Fused groups: CS trials that differ only in s0, lambda, beta_final, "
        "target sparsity and seed train as one network of K members on one device (one "
        "forward/backward pass for all; each member keeps its own trial, runs, tickets and "
        "report row). off = every trial alone; K = groups of at most K; auto = on a GPU as "
        "many as fit in half its memory (at most 16); on CPUs 4 for linear nets given 2 or "
        "more CPUs, else none (measured slower). A group asks for one trial's resources.",
    )

    @model_validator(mode="before")
    @classmethod
    def _fuse_words(cls, data: Any) -> Any:
        """YAML reads ``fuse: off`` as false: it means off."""
        if isinstance(data, dict) and data.get("fuse") is False:
            data = {**data, "fuse": "off"}
        return data

    @property
    def world(self) -> int:
        """How many data-parallel workers the trial runs as."""
        return self.workers if self.workers > 1 else max(1, int(self.gpus))

    @model_validator(mode="after")
    def _gpus_per_worker(self) -> ResourcesSpec:
        if self.workers > 1 and self.gpus not in (0, self.workers):
            raise ValueError(f"resources.gpus must be 0 or equal resources.workers "
                             f"({self.workers}: one GPU per worker), got {self.gpus:g}")
        return self

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: float) -> float:
        """Fractional GPU requests must be at most one GPU."""
        if value > 1 and not value.is_integer():
            raise ValueError(
                f"fractional GPUs must be ≤ 1 (got {value:g}); use a whole number to take several"
            )
        return value


_URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_BUCKET_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_TRACKING_URIS = ("http(s)://HOST:PORT of an `mlflow server`, sqlite:///PATH, postgresql://..., "
                  "mysql://... or databricks; null = a local SQLite store under storage.path")


class TrackingSpec(_Spec):
    """Where runs, metrics and tickets are recorded (MLflow)."""

    uri: str | None = Field(
        None,
        description=f"MLflow tracking URI: {_TRACKING_URIS}.",
    )
    experiment: str | None = Field(None, description="MLflow experiment name; null = the job name.")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value: str | None) -> str | None:
        """A URI with a scheme MLflow serves here: not a bare path, not the file store."""
        if value is None or value == "databricks":
            return value
        match = _URI_SCHEME.match(value)
        scheme = match.group(1).lower() if match else ""
        if not scheme:
            problem = "is not a URI (it has no scheme such as http:// or sqlite:///)"
        elif scheme == "file":
            problem = "MLflow's plain file store is not supported (file: URIs)"
        elif scheme in ("http", "https") and not urlsplit(value).netloc:
            problem = "needs a host, as in http://127.0.0.1:5000"
        else:
            return value
        raise ValueError(f"{problem} (got {value!r}); use {_TRACKING_URIS}")


class StorageSpec(_Spec):
    """Where trial checkpoints and results are written."""

    path: str = Field(
        "./ticketsearch-runs",
        min_length=1,
        description="Directory for trial checkpoints and results, '~' expanded: a filesystem "
        "path every node sees (a shared filesystem on a cluster); not a bucket URI.",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, value: str) -> str:
        """A filesystem path with ``~`` expanded; bucket URIs (``s3://``, ...) are refused."""
        if _BUCKET_URI.match(value):
            raise ValueError(
                "must be a filesystem path every node sees (a shared filesystem such as NFS "
                f"on a cluster); bucket storage is not supported yet (got {value!r})"
            )
        return os.path.expanduser(value)


# --------------------------------------------------------------------------------------
# Trials and the job
# --------------------------------------------------------------------------------------


def format_number(value: float | int) -> str:
    """Shortest exact text of a number, safe in a trial id: 200.0 -> '200', 1e-08 -> '1e-08',
    -0.1 -> '-0.1', 1e308 -> '1e308' (whole floats are written out below 1e16, as repr
    writes them)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value).replace("e+", "e")


TRIAL_ID_MAX_LENGTH = 120


def _short_trial_id(trial_id: str) -> str:
    """``trial_id`` if at most TRIAL_ID_MAX_LENGTH characters, else its head plus 12 hex
    digits of its sha256: as long as that, deterministic, and distinct for distinct ids."""
    if len(trial_id) <= TRIAL_ID_MAX_LENGTH:
        return trial_id
    digest = hashlib.sha256(trial_id.encode("utf-8")).hexdigest()[:12]
    return f"{trial_id[:TRIAL_ID_MAX_LENGTH - 13]}-{digest}"


class TrialSpec(_Spec):
    """One trial of a job: a single method setting, everything resolved to scalars."""

    trial_id: str = Field(
        description="Filesystem- and URL-safe id, unique within the job "
        "(e.g. cs-s0=-0.1-lam=1e-08-beta=200-seed=0).",
        pattern=TRIAL_ID_PATTERN,
    )
    name: str = Field(description="Human-readable name (e.g. 'cs s0=-0.1 λ=1e-08 β=200 seed=0').")
    method: str = Field(description="Method this trial runs (a registered method's name).")
    seed: Seed = Field(description="Seed of weight initialisation and data order.")
    job_name: str = Field(description="Name of the job the trial belongs to.")
    data: DataSpec = Field(description="Dataset settings.")
    model: ModelSpec = Field(description="Model settings.")
    train: TrainSpec = Field(description="Training recipe.")
    settings: Any = Field(description="The method's resolved settings (its MethodSpec, "
                          "sweep applied).")
    retrain: RetrainSpec = Field(description="Ticket retraining settings.")
    resources: ResourcesSpec = Field(description="Resources the trial asks for.")

    @field_validator("method")
    @classmethod
    def _check_method(cls, value: str) -> str:
        from .methods import get_method

        get_method(value)
        return value

    @field_validator("settings", mode="before")
    @classmethod
    def _parse_settings(cls, value: Any, info) -> Any:
        """Settings given as a mapping (a trial read back from JSON) become the method's
        MethodSpec."""
        from .methods import get_method

        method = info.data.get("method")
        if method is None or isinstance(value, MethodSpec):
            return value
        return get_method(method).spec.model_validate(value)

    @property
    def group(self) -> str:
        """The readable name of its setting without the seed: trials that differ only in their
        seed form one group, aggregated over seeds in the report."""
        return re.sub(r"[ -]?seed=-?\d+", "", self.name).strip()

    def to_json(self) -> str:
        """The trial as JSON (``TrialSpec.model_validate_json`` reads it back)."""
        return self.model_dump_json(by_alias=True)


@functools.cache
def methods_model() -> type[BaseModel]:
    """The ``methods`` section of a job spec: one optional field per registered method,
    typed by its MethodSpec (rebuilt when a method is registered)."""
    from .methods import methods

    fields = {m.name: (m.spec | None, Field(
        None, description=f"{m.description}; {{}} = defaults, null = off."))
        for m in methods()}
    return create_model(  # type: ignore[call-overload]
        "MethodsSpec", __config__=ConfigDict(extra="forbid", frozen=True), **fields)


def forget_methods_model() -> None:
    """Drop the cached ``methods_model()`` (the registry changed)."""
    methods_model.cache_clear()
    _schema_job_model.cache_clear()


class JobSpec(_Spec):
    """A whole job: data, model, recipe, the methods to run, and where to run and record it."""

    name: str = Field(
        description="Job name: letters, digits, '_', '.', '-', starting with a letter or digit, "
        f"at most {JOB_NAME_MAX_LENGTH} characters.",
        json_schema_extra={"pattern": JOB_NAME_PATTERN, "maxLength": JOB_NAME_MAX_LENGTH},
    )
    description: str = Field("", description="Free-text description of the job.")
    data: DataSpec = Field(default_factory=DataSpec, description="Dataset settings.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Model settings.")
    train: TrainSpec = Field(
        default_factory=TrainSpec, description="Training recipe shared by every method."
    )
    methods: dict[str, Any] = Field(
        description="Methods to run, by registered name (dense, cs, imp, rigl, ...): a section "
        "given (even {}) enables the method, an absent or null one disables it."
    )
    retrain: RetrainSpec = Field(
        default_factory=RetrainSpec, description="Ticket retraining settings."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Resources each trial asks for."
    )
    tracking: TrackingSpec = Field(
        default_factory=TrackingSpec, description="MLflow tracking settings."
    )
    storage: StorageSpec = Field(
        default_factory=StorageSpec, description="Checkpoint and result storage."
    )
    code: CodeSpec = Field(
        default_factory=CodeSpec,
        description="The job's own code and its pip requirements (shipped by submit).",
    )
    _trials: list[TrialSpec] | None = PrivateAttr(None)

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        """Job names become directory names, MLflow names and URL parts."""
        if len(value) > JOB_NAME_MAX_LENGTH:
            raise ValueError(f"must be at most {JOB_NAME_MAX_LENGTH} characters (got {len(value)})")
        if not re.match(JOB_NAME_PATTERN, value):
            raise ValueError(
                "must start with a letter or digit and contain only letters, digits, "
                f"'_', '.', '-' (got {value!r})"
            )
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _parse_methods(cls, value: Any) -> dict[str, Any]:
        """Validate each section with its method's MethodSpec; keep the enabled ones, in
        registry order. At least one method must be enabled."""
        parsed = methods_model().model_validate(value)
        enabled = {name: getattr(parsed, name) for name in type(parsed).model_fields
                   if getattr(parsed, name) is not None}
        if not enabled:
            names = ", ".join(type(parsed).model_fields)
            raise ValueError(f"enable at least one of {names} (e.g. 'cs: {{}}')")
        return enabled

    @model_validator(mode="after")
    def _check_model_fits_data(self) -> JobSpec:
        """The model must accept the dataset's inputs (your own model or data: checked by
        the preflight's dry forward pass instead)."""
        if not self.model.builtin or self.data.factory is not None:
            return self
        message = catalog.model_fits_data(
            self.model.name, self.data.dataset, self.data.synthetic_shape
        )
        if message is not None:
            _raise_problems("JobSpec", [(("model", "name"), message, self.model.name)])
        return self

    @model_validator(mode="after")
    def _check_recipes_fit(self) -> JobSpec:
        """Recipes need retraining to be on; CutMix needs image inputs."""
        problems: list[tuple[tuple[str | int, ...], str, Any]] = []
        recipes = self.retrain.recipes
        if not self.retrain.enabled and recipes != _default_recipes():
            problems.append(
                (
                    ("retrain", "recipes"),
                    "retraining is off (retrain.enabled: false), so these recipes would never "
                    "run; set retrain.enabled: true or remove retrain.recipes",
                    [recipe.name for recipe in recipes],
                )
            )
        data = self.data
        if data.factory is None and not catalog.is_image_data(data.dataset,
                                                              data.synthetic_shape):
            gives = catalog.dataset_inputs(data.dataset, data.synthetic_shape)
            for index, recipe in enumerate(recipes):
                if recipe.cutmix_alpha > 0:
                    problems.append(
                        (
                            ("retrain", "recipes", index, "cutmix_alpha"),
                            f"CutMix pastes boxes between images, but dataset {data.dataset} "
                            f"gives {gives}; use mixup_alpha instead or drop this recipe",
                            recipe.cutmix_alpha,
                        )
                    )
        if problems:
            _raise_problems("JobSpec", problems)
        return self

    def trials(self) -> list[TrialSpec]:
        """The job's trials, expanded once (cached): each enabled method in registry order
        (dense, CS, IMP, RigL, ...), its sweep expanded as a cartesian product in the method's
        axis order. Trial ids are unique within the job."""
        if self._trials is None:
            trials = [trial for name, section in self.methods.items()
                      for trial in self._expand(name, section)]
            _check_unique_ids(trials)
            self._trials = trials
        return list(self._trials)

    def _expand(self, name: str, section: MethodSpec) -> list[TrialSpec]:
        from .methods import get_method

        method = get_method(name)
        if method.prepare is not None:
            section = method.prepare(section, self.methods)
        swept = frozenset(section.sweep)
        common = {"job_name": self.name, "data": self.data, "model": self.model,
                  "train": self.train, "retrain": self.retrain, "resources": self.resources}
        trials = []
        for settings in section.expand():
            trial_id, title = method.identity(settings, swept)
            try:
                trials.append(TrialSpec(trial_id=_short_trial_id(trial_id), name=title,
                                        method=name, seed=settings.seed, settings=settings,
                                        **common))
            except ValidationError as exc:  # a registered method's own spec let it through
                lines = spec_error_from(exc, TrialSpec).problems
                raise SpecError([f"methods.{name}.{line}" for line in lines]) from None
        return trials

    def spec_hash(self) -> str:
        """First 12 hex chars of the sha256 of the canonical JSON of the fields that differ
        from their defaults (open_lth's rule): the same job written differently (key order,
        defaults spelled out or not) has one hash, and a knob added later with a default
        leaves every existing job's hash (and job directory) as it was."""
        data = self.model_dump(mode="json", by_alias=True, exclude_defaults=True)
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def _check_unique_ids(trials: Sequence[TrialSpec]) -> None:
    """Two trials with one id would overwrite each other's results."""
    seen: set[str] = set()
    for trial in trials:
        if trial.trial_id in seen:
            raise SpecError(
                f"methods.{trial.method}.sweep: two trials share the id {trial.trial_id!r}; "
                "remove the repeated setting from the sweep"
            )
        seen.add(trial.trial_id)


# --------------------------------------------------------------------------------------
# Errors: pydantic ValidationError -> SpecError
# --------------------------------------------------------------------------------------


def _dotted(loc: Sequence[str | int]) -> str:
    """('methods', 'cs', 'sweep', 'lambda', 1) -> 'methods.cs.sweep.lambda[1]'."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "job"


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation such as ``CSSpec | None``, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _allowed_keys(
    root: type[BaseModel], loc: Sequence[str | int]
) -> tuple[str, str, list[str]] | None:
    """(noun, plural noun, allowed keys) of the mapping at ``loc`` under ``root`` (through
    list items, e.g. ``retrain.recipes[0]``); None if the mapping is not a spec model or a
    sweep."""
    annotation: Any = root
    for index, part in enumerate(loc):
        if isinstance(part, int):
            annotation = _list_item(annotation)
            continue
        current = _model_in(annotation)
        name = None if current is None else _field_named(current, part)
        if current is None or name is None:
            return None
        if name == "sweep" and issubclass(current, MethodSpec) and index == len(loc) - 1:
            return "sweep axis", "sweep axes", sorted(current.sweep_axes)
        annotation = current.model_fields[name].annotation
    current = _model_in(annotation)
    if current is None:
        return None
    keys = sorted(info.alias or name for name, info in current.model_fields.items())
    return "key", "keys", keys


def _field_named(model: type[BaseModel], key: str) -> str | None:
    """The field of ``model`` whose alias or name is ``key``."""
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return name
    return None


def _short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _literal_choices(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" -> "'a', 'b', 'c'"."""
    head, sep, last = expected.rpartition(" or ")
    return f"{head}, {last}" if sep else expected


def _problem_line(error: Mapping[str, Any], root: type[BaseModel]) -> str:
    """One ``<field.path>: <message>`` line for one pydantic error."""
    loc = tuple(error["loc"])
    kind = error["type"]
    message = str(error["msg"])
    got = f" (got {_short_repr(error.get('input'))})"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        if allowed is None:
            return f"{_dotted(loc)}: unknown key"
        noun, plural, keys = allowed
        hint = difflib.get_close_matches(str(loc[-1]), keys, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{_dotted(loc)}: unknown {noun}; allowed {plural} are: {', '.join(keys)}{suffix}"
    if kind == "missing":
        return f"{_dotted(loc)}: required key is missing"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{_dotted(loc)}: must be a mapping of keys to values{got}"
    if kind == "literal_error":
        choices = _literal_choices(str(error.get("ctx", {}).get("expected", "")))
        return f"{_dotted(loc)}: must be one of {choices}{got}"
    if kind == "spec_error":
        return f"{_dotted(loc)}: {message}"
    if kind == "value_error":
        return f"{_dotted(loc)}: {message.removeprefix('Value error, ')}"
    message = re.sub(r"^Input should", "must", message)
    return f"{_dotted(loc)}: {message}{got}"


def spec_error_from(error: ValidationError, root: type[BaseModel] | None = None) -> SpecError:
    """Convert a pydantic ValidationError raised validating ``root`` (default JobSpec)."""
    model = _schema_job_model() if root in (None, JobSpec) else root
    return SpecError([_problem_line(item, model) for item in error.errors()])


# --------------------------------------------------------------------------------------
# Loading, overrides, dumping
# --------------------------------------------------------------------------------------


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping of the YAML text names one key twice."""

    def __init__(self, key: Any, first: int, second: int):
        where = f"line {first}" if first == second else f"lines {first} and {second}"
        super().__init__(f"duplicate key {key!r} at {where}; keep one of them (YAML would "
                         "silently use the last)")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that raises _DuplicateKeyError for a key given twice in one
    mapping, at any depth (keys a ``<<`` merge brings in may still be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it
                continue
            if first is not None:
                raise _DuplicateKeyError(key, first, line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.05' -> (['train', 'lr'], 0.05); the value is parsed as YAML."""
    key, sep, raw_value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(part.strip() for part in parts):
        raise SpecError(
            f"override {text!r}: expected dotted.key=value (e.g. train.epochs_per_round=1)"
        )
    try:
        value = yaml.load(raw_value, Loader=_UniqueKeyLoader) if raw_value.strip() else None
    except yaml.YAMLError as exc:
        raise SpecError(f"override {text!r}: the value is not valid YAML ({exc})") from None
    return [part.strip() for part in parts], value


def _set_path(raw: dict[str, Any], parts: Sequence[str], value: Any, text: str) -> None:
    """Set ``raw[p0][p1]...[pn] = value``, creating missing (or null) intermediate mappings."""
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise SpecError(
                f"override {text!r}: {where} is {_short_repr(child)}, not a mapping, "
                "so it has no sub-keys"
            )
        node = child
    node[parts[-1]] = value


def _is_count(value: Any) -> bool:
    """A plain int >= 1 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _train_default(field: str) -> Any:
    """The TrainSpec default of ``field``."""
    return TrainSpec.model_fields[field].get_default(call_default_factory=True)


def _rescale_for_epochs(before: Mapping[str, Any], after: dict[str, Any], keys: set[str]) -> None:
    """After ``train.epochs_per_round`` was overridden, keep the schedule inside the round.

    Unless also overridden: lr_milestones are rescaled proportionally (see
    :func:`rescale_milestones`) and rewind_epoch is clamped to ``epochs_per_round - 1``.
    Values of the wrong type are left for validation to report.
    """
    old_train = before.get("train") if isinstance(before.get("train"), dict) else {}
    train = after.get("train")
    if not isinstance(train, dict):
        return
    old_epochs = old_train.get("epochs_per_round", _train_default("epochs_per_round"))
    new_epochs = train.get("epochs_per_round")
    if not (_is_count(old_epochs) and _is_count(new_epochs)):
        return
    if "train.lr_milestones" not in keys:
        milestones = old_train.get("lr_milestones", _train_default("lr_milestones"))
        if isinstance(milestones, list) and all(_is_count(m) for m in milestones):
            train["lr_milestones"] = rescale_milestones(milestones, old_epochs, new_epochs)
    if "train.rewind_epoch" not in keys:
        rewind = train.get("rewind_epoch", _train_default("rewind_epoch"))
        if isinstance(rewind, int) and not isinstance(rewind, bool) and rewind >= new_epochs:
            train["rewind_epoch"] = min(rewind, new_epochs - 1)


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the raw spec mapping with ``dotted.key=value`` overrides applied in order.

    Values are parsed with ``yaml.safe_load`` (``train.epochs_per_round=1``,
    ``methods.cs.sweep.mask_init=[-0.1,0]``). When ``train.epochs_per_round`` is overridden
    and ``train.lr_milestones`` is not, the milestones are rescaled proportionally and
    ``train.rewind_epoch`` is clamped into the new round. Raises SpecError for a malformed
    override.
    """
    result = copy.deepcopy(dict(raw))
    keys: set[str] = set()
    for text in overrides:
        parts, value = _parse_override(text)
        _set_path(result, parts, value, text)
        keys.add(".".join(parts))
    if "train.epochs_per_round" in keys:
        _rescale_for_epochs(raw, result, keys)
    return result


def parse_job(data: Mapping[str, Any]) -> JobSpec:
    """Validate a raw spec mapping into a JobSpec; raises SpecError listing every problem."""
    if not isinstance(data, Mapping):
        raise SpecError(
            f"job: the job spec must be a mapping of keys (name, methods, ...), "
            f"got {type(data).__name__}"
        )
    try:
        return JobSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise spec_error_from(exc) from None


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; SpecError naming the file for unreadable files, syntax errors and
    a key given twice in one mapping (with both lines)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: job spec file not found; check the path") from None
    except IsADirectoryError:
        raise SpecError(f"{path}: is a directory, not a job spec file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the job spec ({exc.strerror})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as exc:
        raise SpecError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{path}: YAML syntax error{where}: {problem}") from None


def load_job(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply ``dotted.key=value`` overrides, and validate it.

    Raises SpecError for a missing file, a YAML syntax error (with its line), a duplicate
    key (with its lines), a top level that is not a mapping, a malformed override, or an
    invalid spec.
    """
    path = Path(path)
    raw = _read_yaml(path)
    if raw is None:
        raise SpecError(f"{path}: the file is empty; a job spec needs at least name and methods")
    if not isinstance(raw, dict):
        raise SpecError(
            f"{path}: the top level must be a mapping of keys (name, methods, ...), "
            f"got a {type(raw).__name__}"
        )
    return parse_job(apply_overrides(raw, overrides))


@functools.cache
def _schema_job_model() -> type[BaseModel]:
    """JobSpec with its ``methods`` typed by the registered methods: the model the JSON
    schema and the error messages' allowed-key lists are made from."""
    info = JobSpec.model_fields["methods"]
    return create_model(  # type: ignore[call-overload]
        "JobSpec", __base__=JobSpec,
        methods=(methods_model(), Field(description=info.description)))


def job_json_schema() -> dict[str, Any]:
    """The JSON schema of a job spec (keys by alias, e.g. 'lambda')."""
    return _schema_job_model().model_json_schema(by_alias=True)


def dump_job(spec: JobSpec) -> str:
    """The spec as normalised YAML (every key spelled out, by alias); load_job reads it back
    to an equal spec."""
    return yaml.safe_dump(
        spec.model_dump(mode="json", by_alias=True), sort_keys=False, allow_unicode=True
    )
