"""The catalog is the one list of models and datasets: the spec, the builders and the
loaders must all agree with it."""

from __future__ import annotations

import subprocess
import sys
import typing
from typing import Any

import pytest
import torch
from torch import nn

from ticketsearch import catalog, data, models, spec
from ticketsearch.catalog import DATASETS, MODELS, model_fits_data

# (model, dataset, synthetic_shape, input shape the builder then gets)
FITTING = [
    ("mlp", "digits", [64], (64,)),
    ("resnet20", "synthetic", [3, 32, 32], (3, 32, 32)),
    ("resnet50", "synthetic", [3, 64, 64], (3, 64, 64)),
    ("vgg16", "cifar10", [64], (3, 32, 32)),
]

MISFITS = [
    (
        "resnet20",
        "mnist",
        [64],
        "resnet20 expects 3-channel 32x32 images (cifar10, cifar100, or synthetic with "
        "synthetic_shape [3,32,32]); dataset mnist gives 1-channel 28x28 images",
    ),
    (
        "resnet50",
        "digits",
        [64],
        "resnet50 expects 3-channel images of at least 32x32 (imagenet, or synthetic with "
        "synthetic_shape [3,H,W]); dataset digits gives 64 features",
    ),
    (
        "vgg16",
        "synthetic",
        [3, 32, 33],
        "vgg16 expects 3-channel 32x32 images (cifar10, cifar100, or synthetic with "
        "synthetic_shape [3,32,32]); dataset synthetic gives synthetic_shape [3, 32, 33]",
    ),
    (
        "resnet50",
        "cifar10",
        [64],
        "resnet50 expects 3-channel images of at least 32x32 (imagenet, or synthetic with "
        "synthetic_shape [3,H,W]); dataset cifar10 gives 3-channel 32x32 images",
    ),
]


def test_catalog_imports_no_torch_or_pydantic() -> None:
    code = (
        "import sys, ticketsearch.catalog\n"
        "heavy = {'torch', 'pydantic', 'numpy', 'yaml', 'torchvision'} & set(sys.modules)\n"
        "print(sorted(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------- models


def test_model_names_in_schema_order_and_keyed_by_name() -> None:
    assert catalog.MODEL_NAMES == ("mlp", "resnet20", "vgg16", "resnet50")
    assert tuple(MODELS) == catalog.MODEL_NAMES
    assert all(entry.name == name for name, entry in MODELS.items())


def test_models_registry_is_the_catalog() -> None:
    assert models.model_names() == sorted(catalog.MODEL_NAMES)
    for name, entry in MODELS.items():
        info = models.model_info(name)
        assert info.build is catalog.resolve(entry.builder)
        assert info.masked_layers == entry.masked_layers
        assert info.description == entry.description


@pytest.mark.parametrize(("model", "dataset", "synthetic_shape", "input_shape"), FITTING)
def test_builder_builds_a_model_for_a_fitting_input(
    model: str, dataset: str, synthetic_shape: list[int], input_shape: tuple[int, ...]
) -> None:
    entry = MODELS[model]
    build = catalog.resolve(entry.builder)
    assert callable(build)
    network = build(3, input_shape).eval()
    assert isinstance(network, nn.Module)
    with torch.no_grad():
        assert network(torch.zeros(2, *input_shape)).shape == (2, 3)
    assert models.masked_layer_names(network, entry.masked_layers)


def test_every_model_is_covered_by_the_fitting_cases() -> None:
    assert {case[0] for case in FITTING} == set(catalog.MODEL_NAMES)


def test_model_inputs_name_known_fixed_shape_datasets() -> None:
    for entry in MODELS.values():
        for name in entry.datasets or ():
            assert name in DATASETS and not DATASETS[name].synthetic, (entry.name, name)
        assert (entry.datasets is None) == (entry.expects == ""), entry.name


# ---------------------------------------------------------------------------- datasets


def test_dataset_names_in_schema_order_and_keyed_by_name() -> None:
    assert catalog.DATASET_NAMES == (
        "digits", "synthetic", "cifar10", "cifar100", "mnist", "imagenet", "folder",
    )  # fmt: skip
    assert tuple(DATASETS) == catalog.DATASET_NAMES
    assert all(entry.name == name for name, entry in DATASETS.items())


def test_data_loaders_are_the_catalog() -> None:
    assert data.dataset_names() == sorted(catalog.DATASET_NAMES)
    for name, entry in DATASETS.items():
        loader = catalog.resolve(entry.loader)
        assert callable(loader)
        assert data._LOADERS[name] is loader


def test_dataset_inputs_and_images() -> None:
    assert catalog.dataset_inputs("digits", [3, 32, 32]) == "64 features"
    assert catalog.dataset_inputs("mnist", [64]) == "1-channel 28x28 images"
    assert catalog.dataset_inputs("synthetic", (3, 8, 8)) == "synthetic_shape [3, 8, 8]"
    images = {name for name in catalog.DATASET_NAMES if catalog.is_image_data(name, [64])}
    assert images == {"cifar10", "cifar100", "mnist", "imagenet", "folder"}
    assert catalog.is_image_data("synthetic", [3, 8, 8])
    assert not catalog.is_image_data("digits", [3, 8, 8])


def test_resolve_rejects_a_path_without_colon() -> None:
    with pytest.raises(ValueError, match="module:attribute"):
        catalog.resolve("ticketsearch.models.build_mlp")
    assert catalog.resolve("ticketsearch.catalog:MODELS.get") == MODELS.get


# ---------------------------------------------------------------------------- fit


@pytest.mark.parametrize(("model", "dataset", "synthetic_shape", "input_shape"), FITTING)
def test_fitting_pairs_give_none(
    model: str, dataset: str, synthetic_shape: list[int], input_shape: tuple[int, ...]
) -> None:
    assert model_fits_data(model, dataset, synthetic_shape) is None


@pytest.mark.parametrize(("model", "dataset", "synthetic_shape", "message"), MISFITS)
def test_misfits_give_the_message(
    model: str, dataset: str, synthetic_shape: list[int], message: str
) -> None:
    assert model_fits_data(model, dataset, synthetic_shape) == message


# ---------------------------------------------------------------------------- spec


def _schema_node(schema: dict[str, Any], *path: str) -> dict[str, Any]:
    """Follow ``properties`` along ``path``, resolving local ``$ref``s."""
    node = schema
    for key in path:
        node = node["properties"][key]
        if "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def test_spec_literals_are_the_catalog_names() -> None:
    assert typing.get_args(spec.DatasetName) == catalog.DATASET_NAMES
    assert typing.get_args(spec.ModelName) == catalog.MODEL_NAMES


def test_json_schema_enums_are_the_catalog_names() -> None:
    schema = spec.job_json_schema()
    name = _schema_node(schema, "model", "name")
    assert name["anyOf"][0]["enum"] == list(catalog.MODEL_NAMES)  # or torchvision:/timm:
    assert name["anyOf"][1]["pattern"].startswith("^(torchvision|timm):")
    assert _schema_node(schema, "data", "dataset")["enum"] == list(catalog.DATASET_NAMES)


def _job(model: str, dataset: str, shape: list[int], root: str | None = "/d") -> dict[str, Any]:
    data_spec: dict[str, Any] = {"dataset": dataset, "synthetic_shape": shape, "root": root}
    return {"name": "job", "methods": {"cs": {}}, "model": {"name": model}, "data": data_spec}


SHAPES = [[64], [3, 32, 32], [3, 64, 64], [1, 32, 32], [3, 16, 64]]


@pytest.mark.parametrize("model", catalog.MODEL_NAMES)
def test_spec_validation_agrees_with_model_fits_data(model: str) -> None:
    for dataset in catalog.DATASET_NAMES:
        for shape in SHAPES if DATASETS[dataset].synthetic else SHAPES[:1]:
            message = model_fits_data(model, dataset, shape)
            raw = _job(model, dataset, shape)
            if message is None:
                assert spec.parse_job(raw).model.name == model
            else:
                with pytest.raises(spec.SpecError) as info:
                    spec.parse_job(raw)
                assert info.value.problems == [f"model.name: {message}"]


@pytest.mark.parametrize("dataset", catalog.DATASET_NAMES)
def test_spec_root_and_download_rules_follow_the_catalog(dataset: str) -> None:
    entry = DATASETS[dataset]
    problems: list[str] = []
    try:
        spec.parse_job(_job("mlp", dataset, [64], root=None))
    except spec.SpecError as error:
        problems = error.problems
    assert any(line.startswith("data.root:") for line in problems) == entry.needs_root
    raw = _job("mlp", dataset, [64])
    raw["data"]["download"] = True
    problems = []
    try:
        spec.parse_job(raw)
    except spec.SpecError as error:
        problems = error.problems
    refused = any(line.startswith("data.download:") for line in problems)
    assert refused == (entry.needs_root and not entry.downloadable)
