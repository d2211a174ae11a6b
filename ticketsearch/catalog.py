"""The catalog of models and datasets: the one place their names and facts are written.

``MODELS`` and ``DATASETS`` map each name to a frozen entry saying how to build or load it
(a ``"module:function"`` path, resolved lazily with :func:`resolve`), its defaults, and what
inputs it accepts or gives. Spec validation (``spec.py``), the model builders
(``models.py``) and the dataset loaders (``data.py``) all read these tables.

Imports only the standard library, so validation can import it without torch or pydantic.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATASETS",
    "DATASET_NAMES",
    "MODELS",
    "MODEL_NAMES",
    "DatasetEntry",
    "ImageShape",
    "ModelEntry",
    "dataset_inputs",
    "is_image_data",
    "model_fits_data",
    "resolve",
]


@dataclass(frozen=True)
class ImageShape:
    """A set of ``(C, H, W)`` shapes: ``C == channels`` and ``min_side <= H, W <= max_side``
    (``max_side=None``: no upper bound)."""

    channels: int
    min_side: int
    max_side: int | None = None

    def admits(self, shape: Sequence[int]) -> bool:
        """True when ``shape`` is a 3-dim shape in this set."""
        if len(shape) != 3 or shape[0] != self.channels:
            return False
        sides = shape[1:]
        return min(sides) >= self.min_side and (
            self.max_side is None or max(sides) <= self.max_side
        )


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset ``data.dataset`` can name.

    ``loader`` is ``"module:function"``; the function takes ``(data_spec, torch.device)`` and
    returns a ``ticketsearch.data.Dataset``. ``needs_root``: read from files under
    ``data.root``. ``downloadable``: ``data.download: true`` can fetch those files.
    ``synthetic``: the example shape is ``data.synthetic_shape``. ``inputs``: what it feeds
    the model, for messages; a template with ``{shape}`` when ``synthetic``. ``images``:
    examples are ``(C, H, W)`` images (a synthetic dataset is one when its shape has 3 dims).
    ``known_inputs``: the input shape is known before loading (False for a folder of images
    of any size: the preflight's dry forward pass checks it instead). ``layout``: what
    ``data.root`` must hold, in words (for datasets that cannot be downloaded).
    """

    name: str
    loader: str
    needs_root: bool
    downloadable: bool
    inputs: str
    images: bool
    description: str
    synthetic: bool = False
    known_inputs: bool = True
    layout: str = ""


@dataclass(frozen=True)
class ModelEntry:
    """A model ``model.name`` can name.

    ``builder`` is ``"module:function"``, a model factory like any ``model.factory``: it takes
    ``(num_classes, input_shape, mlp_hidden=..., activation=...)`` and returns a fresh
    ``torch.nn.Module``.
    ``masked_layers``: default fnmatch patterns over module names of the masked layers.
    Accepted inputs: ``datasets`` names the non-synthetic datasets it takes (``None``: every
    dataset, synthetic of any shape included); ``synthetic`` the synthetic shapes it takes
    (``None``: none, unless ``datasets`` is ``None``); ``expects`` says both in words.
    """

    name: str
    builder: str
    masked_layers: tuple[str, ...]
    description: str
    datasets: tuple[str, ...] | None = None
    synthetic: ImageShape | None = None
    expects: str = ""

    def accepts(self, dataset: DatasetEntry, synthetic_shape: Sequence[int]) -> bool:
        """True when this model takes the inputs of ``dataset`` (with ``synthetic_shape``)."""
        if self.datasets is None:
            return True
        if dataset.synthetic:
            return self.synthetic is not None and self.synthetic.admits(synthetic_shape)
        return dataset.name in self.datasets


_CIFAR_EXPECTS = (
    "3-channel 32x32 images (cifar10, cifar100, or synthetic with synthetic_shape [3,32,32])"
)

MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="mlp",
            builder="ticketsearch.models:build_mlp",
            masked_layers=("fc*",),
            description="LeNet-300-100 MLP (fc1, fc2, fc3); any input shape, flattened",
        ),
        ModelEntry(
            name="resnet20",
            builder="ticketsearch.models:build_resnet20",
            masked_layers=("conv1", "layer*.conv1", "layer*.conv2"),
            description="CIFAR ResNet-20, 1x1 stride-2 conv shortcuts without BN; "
            "masks the 19 3x3 convs",
            datasets=("cifar10", "cifar100"),
            synthetic=ImageShape(3, 32, 32),
            expects=_CIFAR_EXPECTS,
        ),
        ModelEntry(
            name="vgg16",
            builder="ticketsearch.models:build_vgg16",
            masked_layers=("features.*",),
            description="CIFAR VGG-16 with BN; masks the 13 convs",
            datasets=("cifar10", "cifar100"),
            synthetic=ImageShape(3, 32, 32),
            expects=_CIFAR_EXPECTS,
        ),
        ModelEntry(
            name="resnet50",
            builder="ticketsearch.models:build_resnet50",
            masked_layers=("conv1", "layer*.conv1", "layer*.conv2", "layer*.conv3"),
            description="torchvision ResNet-50; masks the 49 convs except downsample shortcuts",
            datasets=("imagenet",),
            synthetic=ImageShape(3, 32),
            expects="3-channel images of at least 32x32 (imagenet, or synthetic with "
            "synthetic_shape [3,H,W])",
        ),
    )
}
"""Every model, in the order the spec schema lists them."""

DATASETS: dict[str, DatasetEntry] = {
    entry.name: entry
    for entry in (
        DatasetEntry(
            name="digits",
            loader="ticketsearch.data:load_digits_dataset",
            needs_root=False,
            downloadable=False,
            inputs="64 features",
            images=False,
            description="scikit-learn's bundled 8x8 digits, flattened; 10 classes",
        ),
        DatasetEntry(
            name="synthetic",
            loader="ticketsearch.data:load_synthetic_dataset",
            needs_root=False,
            downloadable=False,
            inputs="synthetic_shape {shape}",
            images=False,
            description="seeded learnable random data of data.synthetic_shape",
            synthetic=True,
        ),
        DatasetEntry(
            name="cifar10",
            loader="ticketsearch.data:load_cifar10_dataset",
            needs_root=True,
            downloadable=True,
            inputs="3-channel 32x32 images",
            images=True,
            description="CIFAR-10 from data.root/cifar-10-batches-py; 10 classes",
        ),
        DatasetEntry(
            name="cifar100",
            loader="ticketsearch.data:load_cifar100_dataset",
            needs_root=True,
            downloadable=True,
            inputs="3-channel 32x32 images",
            images=True,
            description="CIFAR-100 (fine labels) from data.root/cifar-100-python; 100 classes",
        ),
        DatasetEntry(
            name="mnist",
            loader="ticketsearch.data:load_mnist_dataset",
            needs_root=True,
            downloadable=True,
            inputs="1-channel 28x28 images",
            images=True,
            description="MNIST IDX files from data.root/MNIST/raw; 10 classes",
        ),
        DatasetEntry(
            name="imagenet",
            loader="ticketsearch.data:load_imagenet_dataset",
            needs_root=True,
            downloadable=False,
            inputs="3-channel 224x224 images",
            images=True,
            description="ImageNet class folders data.root/train and data.root/val",
            layout="the ImageNet train/ and val/ folders",
        ),
        DatasetEntry(
            name="folder",
            loader="ticketsearch.data:load_folder_dataset",
            needs_root=True,
            downloadable=False,
            inputs="images from class folders",
            images=True,
            description="any ImageFolder tree: data.root/<class>/*, or data.root/train "
            "(+ val, test) of class folders",
            known_inputs=False,
            layout="a folder of class subfolders (or train/, val/, test/ folders of them)",
        ),
    )
}
"""Every dataset, in the order the spec schema lists them."""

MODEL_NAMES: tuple[str, ...] = tuple(MODELS)
DATASET_NAMES: tuple[str, ...] = tuple(DATASETS)


def resolve(path: str) -> Any:
    """Import ``"package.module:attr"`` (``attr`` may be dotted) and return the attribute.

    Raises ValueError for a path without ``:``; ImportError/AttributeError propagate.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected 'module:attribute', got {path!r}")
    value: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        value = getattr(value, part)
    return value


def dataset_inputs(name: str, synthetic_shape: Sequence[int]) -> str:
    """What dataset ``name`` feeds the model, in words: "64 features", "synthetic_shape
    [3, 32, 32]". ``synthetic_shape`` is only read for the synthetic dataset. KeyError if
    ``name`` is unknown."""
    return DATASETS[name].inputs.format(shape=list(synthetic_shape))


def is_image_data(name: str, synthetic_shape: Sequence[int]) -> bool:
    """True when dataset ``name``'s examples are ``(C, H, W)`` images: an image dataset, or
    the synthetic one with a 3-dim ``synthetic_shape``. KeyError if ``name`` is unknown."""
    entry = DATASETS[name]
    return entry.images or (entry.synthetic and len(synthetic_shape) == 3)


def model_fits_data(
    model_name: str, dataset_name: str, synthetic_shape: Sequence[int]
) -> str | None:
    """None when model ``model_name`` takes dataset ``dataset_name``'s inputs, else the
    problem in words, e.g. "resnet20 expects 3-channel 32x32 images (...); dataset mnist
    gives 1-channel 28x28 images". None too when either side is only known once built (a
    ``torchvision:``/``timm:`` model, a folder of images): the preflight's dry forward pass
    checks those. KeyError if the dataset name is unknown."""
    dataset = DATASETS[dataset_name]
    model = MODELS.get(model_name)
    if model is None or not dataset.known_inputs or model.accepts(dataset, synthetic_shape):
        return None
    gives = dataset_inputs(dataset_name, synthetic_shape)
    return f"{model_name} expects {model.expects}; dataset {dataset_name} gives {gives}"
