"""Your own model: factories, torchvision and timm by name, the masked-layer rules, the
preflight's checks, ``ticketsearch inspect``, tickets on a factory's model, and every bad
input's message (exit 2, nothing written)."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from userpkg import job_dict, write_package

from ticketsearch import load_ticket
from ticketsearch.cli import main
from ticketsearch.layers import final_classifier, layer_plan, select_masked_layers
from ticketsearch.methods import run_trial
from ticketsearch.models import ModelError, build_model
from ticketsearch.preflight import inspect_job, needs_preflight
from ticketsearch.spec import ModelSpec, parse_job
from ticketsearch.tickets import TicketMismatchError
from ticketsearch.usercode import UserCodeError, call_factory, import_factory

pytestmark = pytest.mark.usefixtures("one_thread", "own_imports")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def own_imports(monkeypatch):
    """sys.path changes and modules imported by a test are undone after it."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("own_"):
            del sys.modules[name]


def write_module(folder: Path, name: str, source: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(source))
    return path


def write_job(folder: Path, data: dict, name: str = "job.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data))
    return path


def spec(**fields) -> ModelSpec:
    return ModelSpec(**fields)


# --------------------------------------------------------------------------- factories


def test_a_factory_gets_num_classes_and_input_shape_when_it_names_them(tmp_path):
    write_module(tmp_path, "own_sig", """
        from torch import nn
        calls = []
        def both(num_classes, input_shape, width=4):
            calls.append(("both", num_classes, input_shape, width))
            return nn.Linear(input_shape[0], num_classes)
        def classes_only(num_classes):
            calls.append(("classes_only", num_classes))
            return nn.Linear(5, num_classes)
        def anything(**kwargs):
            calls.append(("anything", sorted(kwargs)))
            return nn.Linear(5, kwargs["num_classes"])
        def nothing():
            calls.append(("nothing",))
            return nn.Linear(5, 3)
    """)
    sys.path.insert(0, str(tmp_path))
    for name in ("both", "classes_only", "anything", "nothing"):
        kwargs = {"width": 9} if name == "both" else {}
        model = build_model(spec(factory=f"own_sig:{name}", kwargs=kwargs), 3, (5,))
        assert isinstance(model, nn.Linear) and model.out_features == 3
    calls = sys.modules["own_sig"].calls
    assert calls == [("both", 3, (5,), 9), ("classes_only", 3),
                     ("anything", ["input_shape", "num_classes"]), ("nothing",)]
    with pytest.raises(UserCodeError, match=r"model.kwargs: num_classes is passed by "
                                            r"ticketsearch \(from the data\)"):
        call_factory(sys.modules["own_sig"].both, "model.factory", "own_sig:both",
                     {"num_classes": 4}, {"num_classes": 3, "input_shape": (5,)})


def test_torchvision_resnet18_masks_every_conv_and_linear_but_fc():
    torch.manual_seed(0)
    model = build_model(spec(name="torchvision:resnet18"), 10, (3, 32, 32))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 20 and final_classifier(model, 10) == "fc"
    assert select_masked_layers(model, spec(name="torchvision:resnet18"), 10) == convs
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    kept = select_masked_layers(model, spec(name="torchvision:resnet18",
                                            unmasked_layers=["*downsample*", "conv1"]), 10)
    assert kept == [n for n in convs if "downsample" not in n and n != "conv1"]


def test_inspect_output_for_torchvision_resnet18_is_pinned(tmp_path, capsys):
    job = write_job(tmp_path, {
        "name": "r18", "model": {"name": "torchvision:resnet18"}, "train": {"batch_size": 16},
        "data": {"dataset": "synthetic", "synthetic_shape": [3, 32, 32], "synthetic_size": 64},
        "methods": {"cs": {}}})
    assert main(["inspect", str(job)]) == 0
    assert capsys.readouterr().out == RESNET18_INSPECT


def test_inspect_output_for_the_example_is_pinned(capsys):
    assert main(["inspect", str(EXAMPLES / "my_cnn.yaml")]) == 0
    assert capsys.readouterr().out == EXAMPLE_INSPECT


def test_the_readme_shows_the_example_as_it_is():
    readme = (EXAMPLES.parent / "README.md").read_text()
    section = readme[readme.index("## Use your own model"):]
    blocks = section.split("```")
    assert blocks[1] == "python\n" + (EXAMPLES / "my_cnn.py").read_text()
    assert blocks[3] == "yaml\n" + (EXAMPLES / "my_cnn.yaml").read_text()
    assert blocks[7] == "text\n" + EXAMPLE_INSPECT


def test_the_example_runs_in_process(tmp_path, capsys):
    argv = ["run", str(EXAMPLES / "my_cnn.yaml"), "--in-process", "--no-tracking",
            "--storage", str(tmp_path), "--set", "train.epochs_per_round=2",
            "--set", "train.lr_milestones=[]", "--set", "methods.imp.rounds=2",
            "--set", "methods.cs.rounds=1", "--set", "methods.cs.sweep.mask_init=[0.0]"]
    assert main(argv) == 0, capsys.readouterr().err
    (ticket_dir,) = tmp_path.glob("my-cnn-*/trials/cs-*/tickets/final")
    ticket = load_ticket(ticket_dir)
    assert ticket.meta["model_factory"] == "my_cnn:build_cnn"
    assert ticket.meta["model_kwargs"] == {"width": 16}
    assert set(ticket.masks) == {"conv1", "conv2"}


def test_timm_models_by_name_through_a_stand_in_timm(monkeypatch):
    made = []

    def create_model(arch, pretrained, num_classes, **kwargs):
        made.append((arch, pretrained, num_classes, kwargs))
        return nn.Sequential(nn.Conv2d(kwargs["in_chans"], 4, 3), nn.Flatten(),
                             nn.LazyLinear(num_classes))

    fake = types.SimpleNamespace(list_models=lambda: ["resnet18", "vit_tiny"],
                                 create_model=create_model)
    monkeypatch.setitem(sys.modules, "timm", fake)
    model = build_model(spec(name="timm:resnet18", kwargs={"drop_rate": 0.1}), 7, (1, 8, 8))
    assert made == [("resnet18", False, 7, {"in_chans": 1, "drop_rate": 0.1})]
    assert select_masked_layers(model, spec(name="timm:resnet18"), 7) == ["0"]
    with pytest.raises(ModelError, match=r"model.name: timm has no classifier 'resnet81'; "
                                         r"did you mean resnet18"):
        build_model(spec(name="timm:resnet81"), 7, (1, 8, 8))


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed")
def test_timm_missing_names_the_extra(tmp_path, capsys):
    job = write_job(tmp_path, {"name": "t", "model": {"name": "timm:resnet18"},
                               "methods": {"cs": {}}})
    assert main(["validate", str(job)]) == 2
    assert capsys.readouterr().err == (
        "error: model.name: timm:resnet18 needs timm, which is not installed here; install "
        "the optional extra: pip install 'ticketsearch[timm]'\n")


# --------------------------------------------------------------------------- masked layers


class Mixed(nn.Module):
    """An embedding, a norm, a custom weight module, a conv and two linears."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.norm = nn.LayerNorm(4)
        self.scale = Scale(4)
        self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.conv(self.embed(x.long()).transpose(1, 2)).mean(dim=2)
        return self.out(self.body(self.scale(self.norm(h))))


class Scale(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x):
        return x * self.weight


def plan(model, **fields):
    return {row.name: (row.masked, row.why)
            for row in layer_plan(model, spec(factory="m:f", **fields), 3)}


def test_default_rule_masks_conv_and_linear_but_the_classifier():
    assert plan(Mixed()) == {
        "embed": (False, "not conv/linear"), "conv": (True, "conv/linear (default)"),
        "norm": (False, "not conv/linear"), "scale": (False, "not conv/linear"),
        "body.0": (True, "conv/linear (default)"), "out": (False, "final classifier")}


def test_other_weight_layers_are_masked_when_named_exactly():
    rows = plan(Mixed(), masked_layers=["embed", "scale", "body.*"], unmasked_layers=["body.0"])
    masked = [name for name, (on, _) in rows.items() if on]
    assert masked == ["embed", "scale"]
    assert rows["body.0"] == (False, "unmasked_layers 'body.0'")
    assert rows["embed"] == (True, "masked_layers 'embed'")


def test_the_final_classifier_is_the_last_layer_with_num_classes_outputs():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 8))
    assert final_classifier(model, 3) == "0" and final_classifier(model, 5) == "2"
    assert final_classifier(nn.ReLU(), 3) is None


@pytest.mark.parametrize(("fields", "message"), [
    ({"masked_layers": ["body"]}, "model.masked_layers: 'body' is a Sequential, which holds no "
     "`weight` parameter of its own, so it cannot be masked"),
    ({"masked_layers": ["nope"]}, "model.masked_layers: the model has no layer 'nope'; its "
     "conv/linear layers are named like: conv, body.0, out"),
    ({"masked_layers": ["em*"]}, "model.masked_layers: pattern 'em*' matches no Conv/Linear "
     "layer; it matches embed, which are not conv/linear: name such layers exactly"),
    ({"unmasked_layers": ["head*"]}, "model.unmasked_layers: pattern 'head*' matches no masked "
     "layer; the masked layers are: conv, body.0"),
    ({"unmasked_layers": ["*"]}, "model.unmasked_layers: takes out every masked layer"),
])
def test_layer_pattern_mistakes_name_the_field(fields, message):
    with pytest.raises(ModelError) as error:
        plan(Mixed(), **fields)
    assert str(error.value).startswith(message)


def test_a_model_with_no_maskable_layer_is_refused():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ModelError, match=r"^model: m:f has no layer to mask: no Conv1d/2d/3d or "
                                         r"Linear layer other than its final classifier '1'"):
        plan(model)


# --------------------------------------------------------------------------- bad input


BAD = '''
from torch import nn
import numpy as np

def raises(num_classes):
    raise RuntimeError("width must be even")

def not_a_module(num_classes):
    return {"layers": 3}

def no_maskable(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), num_classes))

def wrong_input(num_classes):
    return nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, num_classes))

def ignores_classes(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 8), nn.ReLU(),
                         nn.Linear(8, 5))

def good(num_classes, input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(input_shape)), 8), nn.ReLU(),
                         nn.Linear(8, num_classes))
'''

BAD_MODELS = {
    "module not importable": (
        {"factory": "own_missing.nets:build"},
        r"model\.factory: cannot import module 'own_missing\.nets' \(ModuleNotFoundError: No "
        r"module named 'own_missing'\); searched: {folder}, .*; put the module in the job "
        r"spec's folder or the current directory, or install it"),
    "module raising on import": (
        {"factory": "own_broken:build"},
        r"model\.factory: importing module 'own_broken' failed: ModuleNotFoundError: No module "
        r"named 'own_dependency' \(at {folder}/own_broken\.py:1\)"),
    "attribute missing": (
        {"factory": "own_bad:raise_"},
        r"model\.factory: own_bad \({folder}/own_bad\.py\) has no attribute 'raise_' \(did you "
        r"mean 'raises'\?\); it defines: good, ignores_classes, .*"),
    "factory raising": (
        {"factory": "own_bad:raises"},
        r"model\.factory: own_bad:raises\(num_classes=10\) raised RuntimeError: width must be "
        r"even \(at {folder}/own_bad\.py:6\)"),
    "not an nn.Module": (
        {"factory": "own_bad:not_a_module"},
        r"model\.factory: own_bad:not_a_module returned a dict, not a torch\.nn\.Module"),
    "no maskable layer": (
        {"factory": "own_bad:no_maskable"},
        r"model: own_bad:no_maskable has no layer to mask: no Conv1d/2d/3d or Linear layer "
        r"other than its final classifier '1'"),
    "pattern matching nothing": (
        {"factory": "own_bad:good", "masked_layers": ["conv*"]},
        r"model\.masked_layers: pattern 'conv\*' matches no Conv/Linear layer; the conv/linear "
        r"layers are named like: 1, 3"),
    "shape mismatch": (
        {"factory": "own_bad:wrong_input"},
        r"model\.factory: the data does not fit the model: own_bad:wrong_input failed on a "
        r"batch of shape \(128, 64\) from digits \(examples of shape \(64,\), 10 classes\): "
        r"RuntimeError: mat1 and mat2 shapes cannot be multiplied .*; make the model take "
        r"these inputs"),
    "output size": (
        {"factory": "own_bad:ignores_classes"},
        r"model\.factory: the data does not fit the model: on a batch of shape \(128, 64\) "
        r"own_bad:ignores_classes returns shape \(128, 5\), but digits has 10 classes, so it "
        r"must be \(128, 10\)"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_bad_models_exit_2_naming_the_field_and_write_nothing(case, tmp_path, capsys):
    import re

    write_module(tmp_path, "own_bad", BAD)
    write_module(tmp_path, "own_broken", "import own_dependency\n")
    model, pattern = BAD_MODELS[case]
    job = write_job(tmp_path, {"name": "bad", "model": model, "methods": {"cs": {}}})
    storage = tmp_path / "runs"
    assert main(["run", str(job), "--in-process", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert re.match(pattern.format(folder=re.escape(str(tmp_path))), err[7:]), err
    assert not storage.exists()


def test_an_activation_recipe_needs_relu_modules_in_an_own_model(tmp_path, capsys):
    write_package(tmp_path, "own_recipes")  # its Net calls torch.relu
    data = job_dict("own", "own_recipes", retrain={"recipes": ["vanilla", "silu"]})
    job = write_job(tmp_path, data)
    assert main(["validate", str(job)]) == 2
    assert capsys.readouterr().err.startswith(
        "error: retrain.recipes: the activation silu replaces nn.ReLU modules, but "
        "own_recipes.nets:build_net has none (it may call torch.relu in forward)")
    data["model"] = {"name": "torchvision:resnet18"}
    data["data"] = {"dataset": "synthetic", "synthetic_shape": [3, 16, 16],
                    "synthetic_size": 16}
    assert main(["validate", str(write_job(tmp_path, data))]) == 0
    assert "preflight: torchvision:resnet18 on synthetic: 20 of 41" in capsys.readouterr().out


def test_import_factory_rejects_a_non_callable(tmp_path):
    write_module(tmp_path, "own_value", "WIDTH = 3\n")
    sys.path.insert(0, str(tmp_path))
    with pytest.raises(UserCodeError, match=r"^model.factory: own_value:WIDTH is a int, not a "
                                            r"callable"):
        import_factory("own_value:WIDTH", "model.factory")


# --------------------------------------------------------------------------- tickets


def test_tickets_of_a_factory_model_apply_to_a_fresh_model_from_it(tmp_path):
    write_package(tmp_path, "own_tickets")
    sys.path.insert(0, str(tmp_path))
    data = job_dict("own", "own_tickets")
    data["methods"] = {"imp": {"rounds": 2}}
    data["retrain"] = {"enabled": False}
    job = parse_job(data)
    assert needs_preflight(job) and inspect_job(job).num_classes == 3
    from ticketsearch.data import load_dataset

    (trial,) = job.trials()
    result = run_trial(trial, load_dataset(job.data))
    result.tickets[-1].save(tmp_path / "ticket")
    ticket = load_ticket(tmp_path / "ticket")
    assert ticket.meta["model"] == "own_tickets.nets:build_net"
    assert ticket.meta["model_factory"] == "own_tickets.nets:build_net"
    assert ticket.meta["model_kwargs"] == {"width": 8}
    assert set(ticket.masks) == {"conv1", "conv2"}

    from own_tickets.nets import build_net

    model = ticket.apply(build_net(num_classes=3, input_shape=(1, 8, 8), width=8))
    kept = model.conv2.weight != 0
    assert torch.equal(kept, ticket.masks["conv2"])
    rebuilt = ticket.apply()
    assert torch.equal(rebuilt.conv1.weight, model.conv1.weight)

    with pytest.raises(TicketMismatchError) as error:
        ticket.apply(build_net(num_classes=3, input_shape=(1, 8, 8), width=4))
    message = str(error.value)
    assert message.startswith("ticket 'round-02' does not fit this model: layer 'conv1' has "
                              "shape (4, 1, 3, 3) in the model but (8, 1, 3, 3) in the ticket")
    assert ("The ticket was made for model.factory own_tickets.nets:build_net with kwargs "
            "{'width': 8}, 3 classes and input shape [1, 8, 8]; build the model the same "
            "way") in message
    with pytest.raises(TicketMismatchError, match=r"layer 'conv1' is not in the model"):
        ticket.apply(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(TicketMismatchError, match=r"already carries masks"):
        ticket.apply(model)


RESNET18_INSPECT = """\
model: torchvision:resnet18 (11,181,642 parameters)
data: synthetic: 10 classes, examples 3x32x32; train 64, val 16, test 16

layer                  type         shape           params  masked  why
conv1                  Conv2d       64x3x7x7         9,408  yes     conv/linear (default)
bn1                    BatchNorm2d  64                  64  no      not conv/linear
layer1.0.conv1         Conv2d       64x64x3x3       36,864  yes     conv/linear (default)
layer1.0.bn1           BatchNorm2d  64                  64  no      not conv/linear
layer1.0.conv2         Conv2d       64x64x3x3       36,864  yes     conv/linear (default)
layer1.0.bn2           BatchNorm2d  64                  64  no      not conv/linear
layer1.1.conv1         Conv2d       64x64x3x3       36,864  yes     conv/linear (default)
layer1.1.bn1           BatchNorm2d  64                  64  no      not conv/linear
layer1.1.conv2         Conv2d       64x64x3x3       36,864  yes     conv/linear (default)
layer1.1.bn2           BatchNorm2d  64                  64  no      not conv/linear
layer2.0.conv1         Conv2d       128x64x3x3      73,728  yes     conv/linear (default)
layer2.0.bn1           BatchNorm2d  128                128  no      not conv/linear
layer2.0.conv2         Conv2d       128x128x3x3    147,456  yes     conv/linear (default)
layer2.0.bn2           BatchNorm2d  128                128  no      not conv/linear
layer2.0.downsample.0  Conv2d       128x64x1x1       8,192  yes     conv/linear (default)
layer2.0.downsample.1  BatchNorm2d  128                128  no      not conv/linear
layer2.1.conv1         Conv2d       128x128x3x3    147,456  yes     conv/linear (default)
layer2.1.bn1           BatchNorm2d  128                128  no      not conv/linear
layer2.1.conv2         Conv2d       128x128x3x3    147,456  yes     conv/linear (default)
layer2.1.bn2           BatchNorm2d  128                128  no      not conv/linear
layer3.0.conv1         Conv2d       256x128x3x3    294,912  yes     conv/linear (default)
layer3.0.bn1           BatchNorm2d  256                256  no      not conv/linear
layer3.0.conv2         Conv2d       256x256x3x3    589,824  yes     conv/linear (default)
layer3.0.bn2           BatchNorm2d  256                256  no      not conv/linear
layer3.0.downsample.0  Conv2d       256x128x1x1     32,768  yes     conv/linear (default)
layer3.0.downsample.1  BatchNorm2d  256                256  no      not conv/linear
layer3.1.conv1         Conv2d       256x256x3x3    589,824  yes     conv/linear (default)
layer3.1.bn1           BatchNorm2d  256                256  no      not conv/linear
layer3.1.conv2         Conv2d       256x256x3x3    589,824  yes     conv/linear (default)
layer3.1.bn2           BatchNorm2d  256                256  no      not conv/linear
layer4.0.conv1         Conv2d       512x256x3x3  1,179,648  yes     conv/linear (default)
layer4.0.bn1           BatchNorm2d  512                512  no      not conv/linear
layer4.0.conv2         Conv2d       512x512x3x3  2,359,296  yes     conv/linear (default)
layer4.0.bn2           BatchNorm2d  512                512  no      not conv/linear
layer4.0.downsample.0  Conv2d       512x256x1x1    131,072  yes     conv/linear (default)
layer4.0.downsample.1  BatchNorm2d  512                512  no      not conv/linear
layer4.1.conv1         Conv2d       512x512x3x3  2,359,296  yes     conv/linear (default)
layer4.1.bn1           BatchNorm2d  512                512  no      not conv/linear
layer4.1.conv2         Conv2d       512x512x3x3  2,359,296  yes     conv/linear (default)
layer4.1.bn2           BatchNorm2d  512                512  no      not conv/linear
fc                     Linear       10x512           5,120  no      final classifier

weight layers: 41, masked: 20; parameters: 11,181,642, masked: 11,166,912 (99.9%)
forward: batch 16x3x32x32 -> output 16x10
"""

EXAMPLE_INSPECT = """\
model: my_cnn:build_cnn (5,178 parameters)
data: my_cnn:load_digit_images: 10 classes, examples 1x8x8; train 1,293, val 144, test 360

layer  type         shape      params  masked  why
conv1  Conv2d       16x1x3x3      144  yes     conv/linear (default)
bn1    BatchNorm2d  16             16  no      not conv/linear
conv2  Conv2d       32x16x3x3   4,608  yes     conv/linear (default)
bn2    BatchNorm2d  32             32  no      not conv/linear
fc     Linear       10x32         320  no      final classifier

weight layers: 5, masked: 2; parameters: 5,178, masked: 4,752 (91.8%)
forward: batch 64x1x8x8 -> output 64x10
"""
