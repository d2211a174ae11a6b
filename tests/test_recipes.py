"""Retraining recipes: soft targets, mixup, CutMix, warm-up and the activation swap as pure
functions; the recipe spec; tickets retrained under several recipes on digits; the presets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import Recorder, tiny_job_dict, tiny_trial
from torch import nn

from ticketsearch.hooks import Hooks
from ticketsearch.local import run_job_locally
from ticketsearch.methods import TrialRun, planned_epochs, run_trial
from ticketsearch.models import create_model, masked_layer_names, model_info, replace_relu_modules
from ticketsearch.recipes import (
    cutmix,
    cutmix_box,
    make_batch_loss,
    mixup,
    soft_cross_entropy,
    soft_targets,
    warmup_factor,
)
from ticketsearch.sparsity.masks import binary_masks, dense_weight, masked_modules
from ticketsearch.spec import RECIPE_PRESETS, RecipeSpec, SpecError, dump_job, load_job, parse_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- pure functions


def test_soft_targets_with_smoothing_match_torch_label_smoothing():
    y = torch.tensor([0, 2, 1])
    assert soft_targets(y, 3).tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    smoothed = soft_targets(y, 4, 0.2)
    assert smoothed[0].tolist() == pytest.approx([0.85, 0.05, 0.05, 0.05])
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert soft_cross_entropy(logits, smoothed) == pytest.approx(
        float(F.cross_entropy(logits, y, label_smoothing=0.2)), rel=1e-6)
    assert soft_cross_entropy(logits, soft_targets(y, 4)) == pytest.approx(
        float(F.cross_entropy(logits, y)), rel=1e-6)


def test_mixup_targets_are_convex_combinations_of_two_examples():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    targets = soft_targets(torch.tensor([0, 1, 2]), 3)
    mixed_x, mixed_t = mixup(x, targets, 0.7)
    assert torch.allclose(mixed_x, torch.tensor([[1.3, 0.6], [0.0, 1.0], [1.7, 1.4]]))
    assert torch.allclose(mixed_t, torch.tensor([[0.7, 0, 0.3], [0, 1, 0], [0.3, 0, 0.7]]))
    assert mixed_t.sum(1).tolist() == pytest.approx([1, 1, 1])
    assert (mixed_t >= 0).all()


def test_cutmix_box_and_the_area_weighted_targets():
    assert cutmix_box(8, 8, 0.75, (0.5, 0.5)) == (2, 6, 2, 6)  # sides 8 * sqrt(0.25) = 4
    assert cutmix_box(8, 8, 0.75, (0.0, 0.9)) == (0, 2, 5, 8)  # clipped to the image
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    targets = soft_targets(torch.tensor([0, 1]), 2)
    mixed_x, mixed_t = cutmix(x, targets, (1, 3, 0, 2))  # a 2x2 box: a quarter of the image
    assert torch.equal(mixed_x[0, :, 1:3, 0:2], x[1, :, 1:3, 0:2])
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[1:3, 0:2] = False
    assert torch.equal(mixed_x[0, 0][outside], x[0, 0][outside])
    assert torch.allclose(mixed_t, torch.tensor([[0.75, 0.25], [0.25, 0.75]]))
    with pytest.raises(ValueError, match="CutMix needs image batches"):
        cutmix(torch.zeros(2, 16), targets, (0, 1, 0, 1))


def test_warmup_factor_is_linear_then_one():
    assert [warmup_factor(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [warmup_factor(e, 0) for e in range(2)] == [1.0, 1.0]


def test_batch_losses_of_each_recipe():
    model = nn.Linear(6, 3)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 1])
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    for name in ("vanilla", "warmup", "silu"):
        assert make_batch_loss(RecipeSpec(name=name), 3, 2, generator) is None
    assert torch.equal(generator.get_state(), state)  # plain recipes draw nothing
    smooth = make_batch_loss(RecipeSpec(name="s", label_smoothing=0.1), 3, 2, generator)
    assert float(smooth(model, x, y, 0).detach()) == pytest.approx(
        float(F.cross_entropy(model(x), y, label_smoothing=0.1).detach()))
    mix = RecipeSpec(name="mixup")
    first = make_batch_loss(mix, 3, 2, torch.Generator().manual_seed(1))(model, x, y, 1)
    again = make_batch_loss(mix, 3, 2, torch.Generator().manual_seed(1))(model, x, y, 1)
    plain = F.cross_entropy(model(x), y)
    assert float(first.detach()) == float(again.detach())
    assert float(first.detach()) != pytest.approx(float(plain.detach()))
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.LazyLinear(3))
    images = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loss = make_batch_loss(RecipeSpec(name="cutmix"), 3, 1, generator)(conv, images, y, 0)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------- activation swap


@pytest.mark.parametrize("name, shape", [("mlp", (64,)), ("resnet20", (3, 32, 32)),
                                         ("vgg16", (3, 32, 32))])
def test_activation_swap_keeps_parameters_and_masked_layers(name, shape):
    torch.manual_seed(0)
    relu = create_model(name, 10, shape)
    torch.manual_seed(0)
    silu = create_model(name, 10, shape, activation="silu")
    assert sum(p.numel() for p in relu.parameters()) == sum(p.numel() for p in silu.parameters())
    state = relu.state_dict()
    assert list(silu.state_dict()) == list(state)
    assert all(torch.equal(v, state[k]) for k, v in silu.state_dict().items())
    patterns = model_info(name).masked_layers
    assert masked_layer_names(silu, patterns) == masked_layer_names(relu, patterns)
    x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1))
    relu.eval(), silu.eval()
    assert not torch.allclose(relu(x), silu(x))


def test_mlp_applies_the_chosen_activation_between_layers():
    torch.manual_seed(0)
    model = create_model("mlp", 3, (4,), mlp_hidden=(5,), activation="elu")
    x = torch.randn(2, 4)
    expected = model.fc2(F.elu(model.fc1(x)))
    assert torch.allclose(model(x), expected)
    with pytest.raises(Exception, match="unknown activation 'tanh'"):
        create_model("mlp", 3, (4,), activation="tanh")


def test_relu_modules_are_replaced_in_torchvision_style_models():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(inplace=True),
                          nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    assert replace_relu_modules(model, "mish") == 2
    assert isinstance(model[1], nn.Mish) and isinstance(model[2][1], nn.Mish)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())


# --------------------------------------------------------------------------- the spec


def test_recipes_from_presets_and_mappings():
    job = parse_job(tiny_job_dict(cs={}) | {"retrain": {"recipes": [
        "vanilla", "mixup", {"name": "mixup2", "mixup_alpha": 0.2},
        {"name": "elu", "warmup_epochs": 2}]}})
    recipes = job.retrain.recipes
    assert [r.name for r in recipes] == ["vanilla", "mixup", "mixup2", "elu"]
    assert recipes[0].tweaks() == {}
    assert recipes[1].tweaks() == {"mixup_alpha": 1.0}
    assert recipes[2].tweaks() == {"mixup_alpha": 0.2}
    assert recipes[3].tweaks() == {"warmup_epochs": 2, "activation": "elu"}  # preset + override
    assert parse_job(tiny_job_dict()).retrain.recipes == [RecipeSpec(name="vanilla")]
    reloaded = parse_job(json.loads(json.dumps(job.model_dump(mode="json", by_alias=True))))
    assert reloaded == job
    assert set(RECIPE_PRESETS) == {"vanilla", "label_smoothing", "mixup", "cutmix", "warmup",
                                   "silu", "mish", "elu"}


def test_default_recipes_and_no_rigl_leave_the_spec_hash_alone():
    plain = parse_job(tiny_job_dict())
    spelled = parse_job(tiny_job_dict() | {"retrain": {"recipes": ["vanilla"]}})
    assert plain.spec_hash() == spelled.spec_hash()
    assert "recipes" in dump_job(plain)  # still written out in full
    mixed = parse_job(tiny_job_dict() | {"retrain": {"recipes": ["vanilla", "mixup"]}})
    assert mixed.spec_hash() != plain.spec_hash()


@pytest.mark.parametrize("recipes, problem", [
    (["mixupp"], "retrain.recipes[0]: unknown recipe preset 'mixupp' (did you mean 'mixup'?)"),
    ([{"name": "vanilla", "label_smoothing": 0.1}],
     "retrain.recipes[0].name: the vanilla recipe is plain retraining and takes no tweaks"),
    (["silu", "silu"], "retrain.recipes[1].name: two recipes are named 'silu'"),
    ([{"name": "both", "mixup_alpha": 1, "cutmix_alpha": 1}],
     "retrain.recipes[0].cutmix_alpha: mixup and CutMix cannot be combined in one recipe"),
    (["vanilla", "cutmix"], "retrain.recipes[1].cutmix_alpha: CutMix pastes boxes between "
                            "images, but dataset digits gives 64 features"),
    ([{"name": "x", "activation": "tanh"}],
     "retrain.recipes[0].activation: must be one of 'relu', 'silu', 'mish', 'elu'"),
    ([{"name": "x", "label_smoothing": 1.0}],
     "retrain.recipes[0].label_smoothing: must be less than 1"),
    ([], "retrain.recipes: must list at least one recipe, e.g. [vanilla]"),
])
def test_recipe_mistakes_name_the_field(recipes, problem):
    with pytest.raises(SpecError) as error:
        parse_job(tiny_job_dict() | {"retrain": {"recipes": recipes}})
    assert len(error.value.problems) == 1 and error.value.problems[0].startswith(problem)


def test_recipes_without_retraining_are_an_error():
    with pytest.raises(SpecError, match=r"retrain.recipes: retraining is off"):
        parse_job(tiny_job_dict() | {"retrain": {"enabled": False, "recipes": ["mixup"]}})


# --------------------------------------------------------------------------- retraining

TWEAKED = {"name": "tweaked", "mixup_alpha": 0.4, "label_smoothing": 0.1, "warmup_epochs": 2,
           "activation": "silu"}




@pytest.fixture(scope="module")
def retrained(digits):
    """One CS ticket retrained under vanilla and a tweaked recipe, plus the default run."""
    trial = tiny_trial("cs", {"rounds": 1}, retrain={"recipes": ["vanilla", TWEAKED]})
    hooks = Recorder()
    run = TrialRun(trial, digits, hooks)
    result = run.run()
    plain = run_trial(tiny_trial("cs", {"rounds": 1}), digits)
    return trial, run, result, hooks, plain


def test_each_ticket_is_retrained_under_every_recipe(retrained):
    trial, _, result, hooks, plain = retrained
    (ticket,) = result.tickets
    assert hooks.tickets == [ticket]  # emitted once, after its last recipe
    recipes = ticket.meta["recipes"]
    assert list(recipes) == ["vanilla", "tweaked"]
    assert recipes["tweaked"]["settings"] == {k: v for k, v in TWEAKED.items() if k != "name"}
    assert recipes["vanilla"]["settings"] == {}
    assert all(r["retrain_epochs"] == 4 for r in recipes.values())
    assert ticket.meta["recipe"] == "vanilla"
    assert ticket.meta["test_acc"] == recipes["vanilla"]["test_acc"]
    assert ticket.meta["val_acc"] == recipes["vanilla"]["val_acc"]
    assert ticket.meta["retrain_epochs"] == 4
    # the vanilla recipe is exactly the default retraining
    assert ticket.meta["test_acc"] == plain.tickets[0].meta["test_acc"]
    assert result.ledger.epochs("retrain") == 8 and plain.ledger.epochs("retrain") == 4
    retrain_rounds = [r for r in hooks.rounds if r.phase == "retrain"]
    assert [(r.round, r.recipe) for r in retrain_rounds] == [(0, "vanilla"), (1, "tweaked")]
    assert retrain_rounds[1].test_acc == recipes["tweaked"]["test_acc"]
    assert [r.get("recipe") for r in result.rounds] == [None, "vanilla", "tweaked"]
    lrs = [e.lr for e in hooks.epochs if e.recipe == "tweaked"]
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.01])  # warm-up over 2 epochs, then milestone 3
    assert [e.lr for e in hooks.epochs if e.recipe == "vanilla"] == pytest.approx(
        [0.1, 0.1, 0.1, 0.01])
    summary = json.loads(json.dumps(result.summary()))
    assert summary["tickets"][0]["recipes"]["tweaked"]["retrain_epochs"] == 4
    assert planned_epochs(trial) == 4 + 2 * 4


def test_a_ticket_retrained_with_a_recipe_keeps_exactly_its_mask(retrained):
    _, run, result, _, _ = retrained
    (ticket,) = result.tickets
    model = run.model  # the last run: the tweaked recipe, with SiLU
    assert model.activation == "silu"
    masks = binary_masks(model)
    assert set(masks) == set(ticket.masks)
    for name, keep in ticket.masks.items():
        assert torch.equal(masks[name].cpu(), keep)
        layer = masked_modules(model)[name]
        assert bool((layer.weight[~keep] == 0).all())
        assert bool((dense_weight(layer)[keep] != 0).all())


def test_retraining_resumes_inside_the_second_recipe(retrained, digits):
    trial, _, reference, hooks, _ = retrained
    mid = next(c for c in hooks.checkpoints
               if c["stage"] == "retrain" and c["round"] == 1 and c["epoch"] == 2)

    class Resume(Hooks):
        def load_checkpoint(self):
            return mid

    resumed = TrialRun(trial, digits, Resume()).run()
    assert resumed.tickets[0].meta["recipes"] == reference.tickets[0].meta["recipes"]
    assert resumed.ledger.epochs("retrain") == 8


def test_retraining_a_saved_ticket_under_new_recipes_replaces_its_recipe_results(
        retrained, digits, tmp_path):
    from ticketsearch.methods import retrain_ticket
    from ticketsearch.tickets import load_ticket

    _, _, result, _, _ = retrained
    loaded = load_ticket(result.tickets[0].save(tmp_path / "t"))
    assert set(loaded.meta["recipes"]) == {"vanilla", "tweaked"}  # JSON on disk: sorted keys
    trial = tiny_trial("cs", {"rounds": 1}, retrain={"epochs": 1, "recipes": ["silu"]})
    (again,) = retrain_ticket(loaded, trial, digits).tickets
    assert list(again.meta["recipes"]) == ["silu"] and again.meta["recipe"] == "silu"
    assert again.meta["retrain_epochs"] == 1
    assert all(torch.equal(again.masks[n], loaded.masks[n]) for n in loaded.masks)


# --------------------------------------------------------------------------- presets

SMALL = ["data.dataset=synthetic", "data.synthetic_shape=[3,32,32]", "data.synthetic_size=32",
         "train.epochs_per_round=1", "train.batch_size=16", "train.device=cpu",
         "resources.gpus=0", "resources.cpus=1"]


def test_recipes_ablation_preset_runs_every_recipe_cut_down(tmp_path):
    full = load_job(JOBS / "recipes-ablation.yaml")
    names = [r.name for r in full.retrain.recipes]
    assert names[0] == "vanilla" and {"label_smoothing", "mixup", "cutmix", "warmup", "silu",
                                      "mish", "elu"} <= set(names)
    assert full.model.name == "resnet20" and full.data.dataset == "cifar10"
    job = load_job(JOBS / "recipes-ablation.yaml",
                   [*SMALL, "methods.cs.rounds=1", "methods.cs.sweep.mask_init=[0.0]"])
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None, track=False)
    (trial,) = summary["trials"]
    (ticket,) = trial["tickets"]
    assert sorted(ticket["recipes"]) == sorted(names) and ticket["recipe"] == "vanilla"
    assert all(r["retrain_epochs"] == 1 and r["test_acc"] is not None
               for r in ticket["recipes"].values())
    assert trial["ledger"]["epochs"] == {"search": 1, "retrain": len(names), "total":
                                         1 + len(names)}


def test_rigl_preset_targets_the_ticket_sparsities_and_runs_cut_down(tmp_path):
    full = load_job(JOBS / "rigl-resnet20-cifar10.yaml")
    sparsities = sorted({t.settings.sparsity for t in full.trials() if t.method == "rigl"})
    imp_rounds = [1, 3, 5, 7, 10, 13, 20]
    assert sparsities == pytest.approx([1 - 0.8**k for k in imp_rounds], abs=5e-4)
    assert {t.settings.distribution for t in full.trials() if t.method == "rigl"} == {"uniform", "erk"}
    job = load_job(JOBS / "rigl-resnet20-cifar10.yaml",
                   [*SMALL, "methods.dense=null", "methods.rigl.sweep.sparsity=[0.9]",
                    "methods.rigl.update_interval=1"])
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None, track=False)
    assert [t["trial_id"] for t in summary["trials"]] == ["rigl-uniform-s=0.9-seed=0",
                                                          "rigl-erk-s=0.9-seed=0"]
    uniform, erk = (t["tickets"][0] for t in summary["trials"])
    assert erk["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert 0.85 < uniform["sparsity"] < 0.9  # the first conv stays dense
