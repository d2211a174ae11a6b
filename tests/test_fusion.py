"""Fused models and fused groups: a fused step is each member's own step; what cannot be
fused is refused by name; which trials share a group."""

import pytest
import torch
from conftest import tiny_job_dict
from torch import nn

from ticketsearch.data import load_dataset
from ticketsearch.fusion import FusionError, check_fused, fuse_models
from ticketsearch.hooks import Hooks
from ticketsearch.methods.base import TrialRun
from ticketsearch.methods.cs import epoch_temperature, penalty, target_step
from ticketsearch.methods.group import GroupRun
from ticketsearch.methods.units import auto_size, member_bytes, plan_units
from ticketsearch.sparsity.masks import add_soft_masks, mask_bank
from ticketsearch.spec import parse_job

pytestmark = pytest.mark.usefixtures("one_thread")

MEMBERS = {"mask_init": [0.0, 0.05, -0.02], "lambda": [1e-3, 1e-4, 0.0],
           "beta_final": [200.0, 50.0, 100.0], "seed": [0, 1, 2]}


class NoStore:
    path = "(none)"

    def load(self):
        return None

    def save(self, state):
        pass


def member_trials(model: dict, data: dict, targeted: bool = False):
    """Three CS trials differing in every fusible knob (s0, lambda, beta, seed)."""
    job = tiny_job_dict(cs={"rounds": 1})
    job["model"], job["data"] = model, data
    job["train"].update(epochs_per_round=2, lr_milestones=[1], rewind_epoch=0, batch_size=8,
                        weight_decay=5e-4)
    trials = []
    for index in range(3):
        settings = {key: values[index] for key, values in MEMBERS.items()}
        if targeted:
            settings = {"target_sparsity": [0.5, 0.8, 0.6][index], "seed": index,
                        "beta_final": settings["beta_final"]}
        job["methods"] = {"cs": {"rounds": 1, **settings}}
        trials.append(parse_job(job).trials()[0])
    return trials


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.detach().abs().max().clamp(min=1e-12)
    return float((got.detach() - want.detach()).abs().max() / scale)


def one_round(run, model, specs, runs):
    """Soft masks, an optimizer and one round of CS training (2 epochs, 2 steps each)."""
    add_soft_masks(model, run.layer_names, [s.mask_init for s in specs]
                   if len(specs) > 1 else specs[0].mask_init)
    optimizer = run.new_optimizer(model)
    targeted = specs[0].target_sparsity is not None
    run.fit(model, optimizer, 2, before_epoch=epoch_temperature(model, specs, 2),
            after_step=target_step(runs, model, 0),
            extra_loss=None if targeted else penalty(model, specs))
    return model


def small_data(trial):
    """The trial's data in float64, two training batches of 8."""
    data = load_dataset(trial.data, "cpu")
    data._splits = {split: (x.double(), y) for split, (x, y) in data._splits.items()}
    data._splits["train"] = tuple(t[:16] for t in data._splits["train"])
    data.sizes["train"] = 16
    return data


@pytest.fixture
def float64():
    """In float32, BatchNorm's backward pass over a batch of 8 cancels enough digits that
    two orders of summation (one grouped convolution vs three) differ by up to ~1e-2 in a
    ResNet's first-layer gradients after one step; in float64 the fused and the unfused
    step agree to ~1e-12, which is what shows they compute the same thing."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("model,data", [
    ({"name": "mlp", "mlp_hidden": [32, 16]}, {"dataset": "digits"}),
    ({"name": "resnet20"}, {"dataset": "synthetic", "synthetic_shape": [3, 32, 32],
                            "synthetic_size": 64}),
], ids=["mlp", "resnet20"])
@pytest.mark.parametrize("targeted", [False, True], ids=["plain", "targeted"])
def test_a_fused_group_of_three_trains_as_three_unfused_trials(model, data, targeted,
                                                                float64):
    trials = member_trials(model, data, targeted)
    dataset = small_data(trials[0])
    group = GroupRun(trials, dataset, [Hooks() for _ in trials], NoStore())
    group.begin()
    group.enter("search")
    fused = one_round(group, group.new_model(), [t.settings for t in trials], group.members)
    fused_state = dict(fused.named_parameters()) | dict(fused.named_buffers())
    bank = mask_bank(fused)
    for member, trial in enumerate(trials):
        run = TrialRun(trial, dataset, Hooks())
        run.begin()
        run.enter("search")
        alone = one_round(run, run.new_model(), [trial.settings], [run])
        compared = 0
        for name, want in (dict(alone.named_parameters()) | dict(alone.named_buffers())).items():
            if ".bank." in name:
                continue
            got = fused_state[name][member]
            assert relative_error(got.float(), want.float()) < 1e-5, name
            if isinstance(want, nn.Parameter):
                assert relative_error(fused_state[name].grad[member], want.grad) < 1e-5, name
            compared += 1
        assert any("running_var" in n for n in fused_state) == (model["name"] == "resnet20")
        logits, alone_bank = bank.rows(bank.logits)[member], mask_bank(alone)
        assert relative_error(logits, alone_bank.logits) < 1e-5
        assert relative_error(bank.rows(bank.logits.grad)[member], alone_bank.logits.grad) < 1e-5
        assert float(bank.beta.view(-1)[member]) == float(alone_bank.beta)
        assert compared >= 6
        if targeted:
            assert float(group.members[member].extra["multiplier"]) == pytest.approx(
                float(run.extra["multiplier"]), rel=1e-5, abs=1e-7)


class WithLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.fc(x))


class MixesChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(x)
        return out - out.mean(dim=1, keepdim=True)  # a reduction over the features


def test_a_module_that_cannot_be_fused_is_named():
    with pytest.raises(FusionError, match=r"layer 'norm': a LayerNorm .*resources.fuse: off"):
        fuse_models([WithLayerNorm(), WithLayerNorm()])


def test_a_forward_pass_that_mixes_channels_is_caught_on_a_probe_batch():
    models = [MixesChannels(), MixesChannels()]
    with pytest.raises(FusionError, match="mixes the members' channels"):
        check_fused(fuse_models(models), models, torch.randn(5, 4))


def test_a_user_conv_net_fuses_exactly():
    def net():
        return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, groups=1), nn.BatchNorm2d(4),
                             nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 3, bias=False))

    models = [net(), net(), net()]
    check_fused(fuse_models(models), models, torch.randn(2, 1, 6, 6), tolerance=1e-6)


def jobs(cs: dict, **top):
    data = tiny_job_dict(cs=cs, imp={"rounds": 2}, dense={})
    data["resources"] = {"cpus": 2}
    data.update(top)
    return parse_job(data)


def test_units_group_cs_trials_that_differ_only_in_fusible_knobs():
    job = jobs({"rounds": 1, "sweep": {"mask_init": [0.0, -0.01, 0.01], "lambda": [1e-8, 1e-7],
                                       "seed": [0]}})
    trials = job.trials()
    sizes = sorted(len(u) for u in plan_units(trials, "auto"))
    assert sizes == [1, 1, 3, 3]  # dense, imp, six CS trials as two groups (auto: 4 on CPU)
    assert sorted(len(u) for u in plan_units(trials, 2)) == [1, 1, 2, 2, 2]
    assert sorted(len(u) for u in plan_units(trials, "off")) == [1] * 8
    grouped = [t.trial_id for u in plan_units(trials, "auto") for t in u]
    assert sorted(grouped) == sorted(t.trial_id for t in trials)


def test_cs_trials_with_other_knobs_or_mixing_recipes_stay_apart():
    job = jobs({"rounds": 1, "beta_schedule": "iteration", "sweep": {"seed": [0]}})
    other = jobs({"rounds": 1, "sweep": {"seed": [1]}})
    assert [len(u) for u in plan_units(job.trials() + other.trials()[1:2], "auto")] == [1] * 4
    mixup = jobs({"rounds": 1, "sweep": {"seed": [0, 1]}},
                 retrain={"recipes": [{"name": "m", "mixup_alpha": 0.2}]})
    assert [len(u) for u in plan_units(mixup.trials(), "auto")] == [1, 1, 1, 1]
    targets = jobs({"rounds": 1, "target_sparsity": 0.5, "sweep": {"seed": [0, 1]}})
    assert sorted(len(u) for u in plan_units(targets.trials(), "auto")) == [1, 1, 2]


def test_fuse_off_reads_the_yaml_boolean_and_a_number_is_a_group_size():
    assert jobs({"rounds": 1}, resources={"fuse": False}).resources.fuse == "off"
    assert jobs({"rounds": 1}, resources={"fuse": 3}).resources.fuse == 3
    with pytest.raises(Exception, match="fuse"):
        jobs({"rounds": 1}, resources={"fuse": 0})


def test_auto_fuses_linear_nets_on_cpus_conv_nets_only_on_gpus_as_memory_allows():
    mlp = jobs({"rounds": 1}).trials()[1]
    assert auto_size(mlp) == 4
    assert auto_size(jobs({"rounds": 1}, resources={"cpus": 1}).trials()[1]) == 1
    conv = parse_job(tiny_job_dict(cs={"rounds": 1}) | {
        "model": {"name": "resnet20"},
        "data": {"dataset": "synthetic", "synthetic_shape": [3, 32, 32]}}).trials()[0]
    assert auto_size(conv) == 1  # measured slower fused on a CPU (bench throughput)
    on_gpu = conv.model_copy(update={"resources": conv.resources.model_copy(
        update={"gpus": 0.5})})
    each = member_bytes(on_gpu)
    assert 1e6 < each < 4e9
    assert auto_size(on_gpu, gpu_bytes=20 * each) == 5  # half of half the GPU: 5 members
    assert auto_size(on_gpu, gpu_bytes=each) == 1
    assert auto_size(on_gpu, gpu_bytes=1000 * each) == 16  # the cap


@pytest.mark.parametrize("groups", [1, 2])
def test_a_fused_convolution_grouped_or_per_member_is_each_members_own(monkeypatch, float64,
                                                                      groups):
    import ticketsearch.fusion as fusion

    convs = [nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=groups) for _ in range(3)]
    x = [torch.randn(5, 4, 9, 9) for _ in range(3)]
    want = torch.cat([conv(part) for conv, part in zip(convs, x)], 1)
    for per_member in (True, False):
        monkeypatch.setattr(fusion, "PER_MEMBER_CONV_ON_CPU", per_member)
        fused = fuse_models(convs)
        got = fused(fusion.fuse_inputs(x))
        assert relative_error(got, want) < 1e-12
        got.square().sum().backward()
        want_grad = torch.autograd.grad(want.square().sum(), convs[1].weight,
                                        retain_graph=True)[0]
        assert relative_error(fused.weight.grad[1], want_grad) < 1e-12


def test_fused_retraining_under_several_recipes_is_each_members_own(float64):
    from ticketsearch.methods.retrain import retrain_group, retrain_pending
    from ticketsearch.sparsity.masks import dense_state_dict

    recipes = [{"name": "smooth", "label_smoothing": 0.1, "warmup_epochs": 2,
                "activation": "silu"}, {"name": "vanilla"}]  # the first one's model is kept
    trials = [t.model_copy(update={"retrain": t.retrain.model_copy(update={
        "recipes": parse_job(tiny_job_dict() | {"retrain": {"recipes": recipes}}).retrain.recipes,
        "epochs": 2})}) for t in member_trials({"name": "mlp", "mlp_hidden": [32, 16]},
                                              {"dataset": "digits"})]
    data = small_data(trials[0])

    def pending(run, member: int):
        """The same ticket for the fused and the unfused run of a member: random masks,
        the member's initial weights as the rewind point."""
        run.snapshot = dense_state_dict(run.new_model())
        generator = torch.Generator().manual_seed(member)
        masks = {name: torch.rand(run.snapshot[f"{name}.weight"].shape, generator=generator)
                 > 0.4 for name in run.layer_names}
        run.pending = [run.make_ticket("final", masks)]

    group = GroupRun(trials, data, [Hooks() for _ in trials], NoStore())
    group.begin()
    group.enter("search")
    for member, run in enumerate(group.members):
        pending(run, member)
    retrain_group(group)
    for member, trial in enumerate(trials):
        run = TrialRun(trial, data, Hooks())
        run.begin()
        run.enter("search")
        pending(run, member)
        retrain_pending(run)
        (fused,), (alone,) = group.members[member].tickets, run.tickets
        assert torch.equal(fused.masks["fc1"], alone.masks["fc1"])
        for name in ("vanilla", "smooth"):
            got, want = fused.meta["recipes"][name], alone.meta["recipes"][name]
            assert got["test_acc"] == want["test_acc"] and got["retrain_epochs"] == 2
        assert fused.meta["trained_activation"] == alone.meta["trained_activation"] == "silu"
        for key, want in alone.trained.items():
            assert relative_error(fused.trained[key], want) < 1e-5, key
