"""Tests for ticketsearch.models: registry, architectures and masked-layer resolution."""

from __future__ import annotations

import ast
import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from ticketsearch import models
from ticketsearch.models import (
    ModelError,
    ModelInfo,
    create_model,
    masked_layer_names,
    model_info,
    model_names,
)

CIFAR = (3, 32, 32)

RESNET20_3X3_CONVS = ["conv1"] + [
    f"layer{stage}.{block}.conv{conv}"
    for stage in (1, 2, 3)
    for block in (0, 1, 2)
    for conv in (1, 2)
]


@pytest.fixture(scope="module")
def resnet20() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet20", 10, CIFAR)


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet50", 7, (3, 64, 64))


def default_masked(model: nn.Module, name: str) -> list[str]:
    return masked_layer_names(model, model_info(name).masked_layers)


# ---------------------------------------------------------------------------------- registry


def test_model_names_sorted_and_complete() -> None:
    assert model_names() == ["mlp", "resnet20", "resnet50", "vgg16"]


def test_model_info_returns_registry_entry() -> None:
    info = model_info("resnet20")
    assert isinstance(info, ModelInfo)
    assert info.name == "resnet20"
    assert info.masked_layers == ("conv1", "layer*.conv1", "layer*.conv2")
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]


def test_unknown_model_lists_known_names() -> None:
    with pytest.raises(ModelError) as excinfo:
        create_model("resnet18", 10, CIFAR)
    message = str(excinfo.value)
    assert "'resnet18'" in message
    assert "mlp, resnet20, resnet50, vgg16" in message
    with pytest.raises(ModelError, match="known models: mlp, resnet20, resnet50, vgg16"):
        model_info("lenet")


def test_model_error_is_value_error() -> None:
    assert issubclass(ModelError, ValueError)


def _imported_roots(nodes: list[ast.stmt] | list[ast.AST]) -> set[str]:
    """Top-level package names imported by the given import statements."""
    roots: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_module_level_imports_exclude_torchvision_ray_mlflow() -> None:
    # torchvision is imported lazily inside the torchvision builders only (timm through
    # importlib); core never imports ray or mlflow. Checked on the source so that other
    # package modules cannot mask it.
    tree = ast.parse(Path(models.__file__).read_text())
    top_level = _imported_roots(tree.body)
    assert top_level - set(sys.stdlib_module_names) == {"torch", "usercode"}
    everywhere = _imported_roots(list(ast.walk(tree)))
    assert everywhere - top_level == {"torchvision"}


# ------------------------------------------------------------------------------ input checks


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_cifar_models_reject_other_input_shapes(name: str) -> None:
    with pytest.raises(ModelError) as excinfo:
        create_model(name, 10, (64,))
    assert str(excinfo.value) == f"model.name: {name} expects input shape (3, 32, 32), got (64,)"
    with pytest.raises(ModelError, match=r"got \(1, 28, 28\)"):
        create_model(name, 10, (1, 28, 28))


def test_resnet50_input_shape_checks() -> None:
    with pytest.raises(ModelError, match=r"resnet50 expects input shape \(3, H, W\)"):
        create_model("resnet50", 10, (1, 64, 64))
    with pytest.raises(ModelError, match=r"got \(3, 16, 64\)"):
        create_model("resnet50", 10, (3, 16, 64))


def test_bad_input_shape_and_num_classes() -> None:
    with pytest.raises(ModelError, match="input_shape"):
        create_model("mlp", 10, ())
    with pytest.raises(ModelError, match="input_shape"):
        create_model("mlp", 10, (3, 0, 32))
    with pytest.raises(ModelError, match="num_classes"):
        create_model("mlp", 0, (4,))


def test_unexpected_kwarg_rejected_but_mlp_hidden_accepted_everywhere() -> None:
    with pytest.raises(
        ModelError, match="unexpected keyword argument.*depth.*accepted: activation, mlp_hidden"
    ):
        create_model("resnet20", 10, CIFAR, depth=32)
    model = create_model("vgg16", 10, CIFAR, mlp_hidden=(8, 4))
    assert model.classifier.out_features == 10


def test_bad_mlp_hidden() -> None:
    with pytest.raises(ModelError, match="model.mlp_hidden"):
        create_model("mlp", 10, (4,), mlp_hidden=[])
    with pytest.raises(ModelError, match="model.mlp_hidden"):
        create_model("mlp", 10, (4,), mlp_hidden=[8, -1])
    with pytest.raises(ModelError, match="model.mlp_hidden"):
        create_model("mlp", 10, (4,), mlp_hidden=8)


# ------------------------------------------------------------------------------------ mlp


def test_mlp_structure_forward_and_masked_set() -> None:
    model = create_model("mlp", 10, (1, 28, 28))
    assert [name for name, _ in model.named_children()] == ["flatten", "fc1", "fc2", "fc3"]
    assert (model.fc1.in_features, model.fc1.out_features) == (784, 300)
    assert (model.fc2.in_features, model.fc2.out_features) == (300, 100)
    assert (model.fc3.in_features, model.fc3.out_features) == (100, 10)
    assert sum(p.numel() for p in model.parameters()) == 266_610
    assert model(torch.randn(5, 1, 28, 28)).shape == (5, 10)
    assert default_masked(model, "mlp") == ["fc1", "fc2", "fc3"]


def test_mlp_custom_hidden() -> None:
    model = create_model("mlp", 3, (6,), mlp_hidden=[8, 4])
    assert [(m.in_features, m.out_features) for m in (model.fc1, model.fc2, model.fc3)] == [
        (6, 8),
        (8, 4),
        (4, 3),
    ]
    model_one = create_model("mlp", 3, (6,), mlp_hidden=[5])
    assert default_masked(model_one, "mlp") == ["fc1", "fc2"]
    assert model_one(torch.randn(2, 6)).shape == (2, 3)


def test_mlp_forward_applies_relu_between_layers() -> None:
    model = create_model("mlp", 1, (1,), mlp_hidden=[1])
    with torch.no_grad():
        model.fc1.weight.fill_(1.0)
        model.fc1.bias.zero_()
        model.fc2.weight.fill_(1.0)
        model.fc2.bias.zero_()
    out = model(torch.tensor([[-2.0], [3.0]]))
    assert out.flatten().tolist() == [0.0, 3.0]


# ------------------------------------------------------------------------------- resnet20


def test_resnet20_forward(resnet20: nn.Module) -> None:
    assert resnet20(torch.randn(4, *CIFAR)).shape == (4, 10)


def test_resnet20_exact_parameter_count(resnet20: nn.Module) -> None:
    # conv1 432 + bn1 32 + stage1 14,016 + stage2 51,584 + stage3 205,568 + fc 650
    assert sum(p.numel() for p in resnet20.parameters()) == 272_282


def test_resnet20_stages_and_blocks(resnet20: nn.Module) -> None:
    for stage, width in zip(("layer1", "layer2", "layer3"), (16, 32, 64), strict=True):
        blocks = getattr(resnet20, stage)
        assert len(blocks) == 3
        for block in blocks:
            assert block.conv2.out_channels == width
            assert block.conv1.kernel_size == (3, 3) and block.conv1.bias is None
            assert isinstance(block.bn1, nn.BatchNorm2d) and isinstance(block.bn2, nn.BatchNorm2d)
    assert resnet20.conv1.in_channels == 3 and resnet20.conv1.out_channels == 16
    assert resnet20.conv1.stride == (1, 1) and resnet20.conv1.bias is None
    assert (resnet20.fc.in_features, resnet20.fc.out_features) == (64, 10)


def test_resnet20_shortcuts(resnet20: nn.Module) -> None:
    shortcut_convs = {
        name: module
        for name, module in resnet20.named_modules()
        if name.endswith("shortcut") and isinstance(module, nn.Conv2d)
    }
    assert sorted(shortcut_convs) == ["layer2.0.shortcut", "layer3.0.shortcut"]
    for module in shortcut_convs.values():
        assert module.kernel_size == (1, 1)
        assert module.stride == (2, 2)
        assert module.bias is None
    assert resnet20.layer2[0].conv1.stride == (2, 2)
    assert resnet20.layer3[0].conv1.stride == (2, 2)
    # No BN anywhere on the shortcut path: every BN in the model is conv1's or a block's bn1/bn2.
    bn_names = [n for n, m in resnet20.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn_names) == 19
    assert all(n == "bn1" or n.endswith((".bn1", ".bn2")) for n in bn_names)
    identity_blocks = [
        f"{stage}.{index}"
        for stage in ("layer1", "layer2", "layer3")
        for index, block in enumerate(getattr(resnet20, stage))
        if isinstance(block.shortcut, nn.Identity)
    ]
    assert identity_blocks == [
        "layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2",
    ]  # fmt: skip


def test_resnet20_default_masked_set(resnet20: nn.Module) -> None:
    names = default_masked(resnet20, "resnet20")
    assert names == RESNET20_3X3_CONVS
    assert len(names) == 19
    modules = dict(resnet20.named_modules())
    assert all(modules[n].kernel_size == (3, 3) for n in names)
    assert sum(modules[n].weight.numel() for n in names) == 267_696


def test_resnet20_override_pattern_includes_shortcut(resnet20: nn.Module) -> None:
    assert masked_layer_names(resnet20, ["layer3.*"]) == [
        "layer3.0.conv1",
        "layer3.0.conv2",
        "layer3.0.shortcut",
        "layer3.1.conv1",
        "layer3.1.conv2",
        "layer3.2.conv1",
        "layer3.2.conv2",
    ]
    assert masked_layer_names(resnet20, ["fc", "conv1"]) == ["conv1", "fc"]


# ---------------------------------------------------------------------------------- vgg16


def test_vgg16_forward_and_masked_convs() -> None:
    torch.manual_seed(0)
    model = create_model("vgg16", 10, CIFAR)
    assert model(torch.randn(2, *CIFAR)).shape == (2, 10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert default_masked(model, "vgg16") == convs
    assert convs[:3] == ["features.0", "features.3", "features.7"]
    widths = [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    assert (model.classifier.in_features, model.classifier.out_features) == (512, 10)
    assert sum(p.numel() for p in model.parameters()) == 14_728_266


# ------------------------------------------------------------------------------- resnet50


def test_resnet50_forward(resnet50: nn.Module) -> None:
    resnet50.eval()
    with torch.no_grad():
        assert resnet50(torch.randn(2, 3, 64, 64)).shape == (2, 7)


def test_resnet50_masked_set_excludes_downsample_and_fc(resnet50: nn.Module) -> None:
    names = default_masked(resnet50, "resnet50")
    all_convs = [n for n, m in resnet50.named_modules() if isinstance(m, nn.Conv2d)]
    downsample = [n for n in all_convs if ".downsample." in n]
    assert len(all_convs) == 53
    assert downsample == [f"layer{i}.0.downsample.0" for i in (1, 2, 3, 4)]
    assert len(names) == 49
    assert names == [n for n in all_convs if n not in downsample]
    assert "fc" not in names


# ------------------------------------------------------------------------ masked_layer_names


def test_pattern_matching_nothing_names_the_pattern(resnet20: nn.Module) -> None:
    with pytest.raises(ModelError) as excinfo:
        masked_layer_names(resnet20, ["conv1", "block*.conv"])
    message = str(excinfo.value)
    assert "'block*.conv'" in message
    assert "conv1, layer1.0.conv1" in message


def test_pattern_matching_only_non_weight_layers_is_an_error(resnet20: nn.Module) -> None:
    # "bn1" exists as a module but is a BatchNorm, not a Conv2d/Linear.
    with pytest.raises(ModelError, match="'bn1'"):
        masked_layer_names(resnet20, ["bn1"])


def test_empty_or_string_patterns_rejected(resnet20: nn.Module) -> None:
    with pytest.raises(ModelError, match="empty pattern list"):
        masked_layer_names(resnet20, [])
    with pytest.raises(ModelError, match="expected a list of patterns"):
        masked_layer_names(resnet20, "conv1")


def test_fnmatch_is_case_sensitive(resnet20: nn.Module) -> None:
    with pytest.raises(ModelError, match="'CONV1'"):
        masked_layer_names(resnet20, ["CONV1"])


# ------------------------------------------------------------------------------ copy/state


def test_deepcopy_and_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = create_model("resnet20", 10, CIFAR).eval()
    x = torch.randn(2, *CIFAR)
    with torch.no_grad():
        expected = model(x)
        clone = copy.deepcopy(model)
        assert torch.equal(clone(x), expected)
        torch.manual_seed(1)
        fresh = create_model("resnet20", 10, CIFAR).eval()
        assert not torch.equal(fresh(x), expected)
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(fresh(x), expected)
