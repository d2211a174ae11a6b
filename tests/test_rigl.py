"""RigL: layer densities, the update schedule, drop/grow on hand-made tensors, the dense
gradient, and RigL runs on digits (nonzeros, grown weights, resume, a job with three methods)."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import tiny_job_dict, tiny_trial
from torch import nn

from ticketsearch.hooks import Hooks
from ticketsearch.local import run_job_locally
from ticketsearch.methods import TrialRun, planned_epochs, run_trial
from ticketsearch.sparsity import rigl
from ticketsearch.sparsity.masks import (
    add_binary_masks,
    binary_masks,
    dense_state_dict,
    dense_weight,
    masked_modules,
)
from ticketsearch.spec import SpecError, parse_job
from ticketsearch.tickets import load_ticket
from ticketsearch.training import make_optimizer

LAYERS = {"fc1": (32, 64), "fc2": (16, 32), "fc3": (10, 16)}  # tiny mlp's masked weights
MASKED = sum(math.prod(shape) for shape in LAYERS.values())  # 2720
STEPS_PER_EPOCH = 10  # 1257 digits training examples at batch 128


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------- densities


def test_erk_densities_follow_the_formula_and_total_the_target():
    shapes = {"a": (10, 10), "b": (40, 10)}
    densities = rigl.erk_densities(shapes, 0.5)
    # eps * (sum / prod): ratios 0.2 and 0.125, eps = 250 / (0.2 * 100 + 0.125 * 400)
    assert densities["a"] == pytest.approx(0.2 * 250 / 70)
    assert densities["b"] == pytest.approx(0.125 * 250 / 70)
    assert 100 * densities["a"] + 400 * densities["b"] == pytest.approx(250)


def test_erk_makes_layers_that_would_exceed_one_dense_and_resolves_the_rest():
    shapes = {"first": (4, 2), "big": (100, 100)}
    densities = rigl.erk_densities(shapes, 0.5)
    assert densities == {"first": 1.0, "big": pytest.approx(4996 / 10000)}
    conv_shapes = {"conv1": (16, 3, 3, 3), "conv2": (16, 16, 3, 3), "fc": (10, 16)}
    for sparsity in (0.1, 0.5, 0.8, 0.95):
        densities = rigl.erk_densities(conv_shapes, sparsity)
        total = sum(math.prod(s) for s in conv_shapes.values())
        nonzeros = sum(d * math.prod(conv_shapes[n]) for n, d in densities.items())
        assert nonzeros == pytest.approx((1 - sparsity) * total)
        assert all(0 < d <= 1 for d in densities.values())
        eps = {round(densities[n] * math.prod(s) / sum(s), 9)
               for n, s in conv_shapes.items() if densities[n] < 1}
        assert len(eps) == 1  # one common factor for every layer that is not dense


def test_uniform_keeps_the_first_layer_dense():
    assert rigl.uniform_densities(LAYERS, 0.9) == {
        "fc1": 1.0, "fc2": pytest.approx(0.1), "fc3": pytest.approx(0.1)}
    with pytest.raises(ValueError, match="distribution must be one of uniform, erk"):
        rigl.layer_densities("random", LAYERS, 0.9)
    with pytest.raises(ValueError, match=r"sparsity must be in \(0, 1\)"):
        rigl.erk_densities(LAYERS, 1.0)


def test_random_masks_have_exactly_the_layer_counts_and_are_seeded():
    densities = rigl.erk_densities(LAYERS, 0.8)
    masks = rigl.random_masks(LAYERS, densities, torch.Generator().manual_seed(3))
    again = rigl.random_masks(LAYERS, densities, torch.Generator().manual_seed(3))
    for name, shape in LAYERS.items():
        assert masks[name].shape == shape and masks[name].dtype == torch.bool
        assert int(masks[name].sum()) == rigl.active_count(densities[name], math.prod(shape))
        assert torch.equal(masks[name], again[name])
    assert sum(int(m.sum()) for m in masks.values()) == pytest.approx(0.2 * MASKED, abs=2)


# --------------------------------------------------------------------------- schedule


def test_drop_fraction_follows_the_cosine_and_stops_at_the_end():
    assert rigl.drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert rigl.drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert rigl.drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.sqrt(0.5)))
    assert rigl.drop_fraction(100, 0.3, 100) == 0.0
    assert rigl.drop_fraction(140, 0.3, 100) == 0.0


def test_updates_every_interval_until_the_end_fraction():
    assert rigl.update_steps(1000, 100, 0.75) == [100, 200, 300, 400, 500, 600, 700]
    assert rigl.end_step(10, 0.7) == 7 and rigl.end_step(1000, 0.75) == 750
    assert rigl.is_update_step(700, 100, 750) and not rigl.is_update_step(800, 100, 750)
    assert not rigl.is_update_step(0, 100, 750)  # never before the first step trained
    assert rigl.update_steps(40, 100, 0.75) == []
    assert rigl.drop_count(0.29, 100) == 29 and rigl.drop_count(0.3, 7) == 2


# --------------------------------------------------------------------------- drop and grow

WEIGHT = torch.tensor([[0.5, -0.1, 0.0, 0.3], [0.05, 0.0, -0.9, 0.0]])
MASK = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 0]], dtype=torch.bool)


def test_drop_smallest_active_magnitudes_and_grow_largest_inactive_gradients():
    grad = torch.tensor([[0.1, 0.2, 0.7, 0.2], [0.3, 0.6, 0.05, 0.4]])
    new, fresh = rigl.drop_and_grow(WEIGHT, MASK, grad, 2)
    # dropped: |0.05| at (1,0) and |-0.1| at (0,1); grown: 0.7 at (0,2) and 0.6 at (1,1)
    assert new.tolist() == [[True, False, True, True], [False, True, True, False]]
    assert fresh.tolist() == [[False, False, True, False], [False, True, False, False]]
    assert int(new.sum()) == int(MASK.sum()) == 5


def test_a_weight_just_dropped_can_be_grown_again_and_is_not_fresh():
    grad = torch.tensor([[0.1, 5.0, 0.7, 0.2], [0.3, 0.6, 0.05, 0.9]])
    new, fresh = rigl.drop_and_grow(WEIGHT, MASK, grad, 2)
    # (0,1) is dropped (|w| 0.1) but has the largest gradient: it comes straight back
    assert new.tolist() == [[True, True, False, True], [False, False, True, True]]
    assert fresh.tolist() == [[False, False, False, False], [False, False, False, True]]


def test_no_update_when_nothing_to_drop():
    new, fresh = rigl.drop_and_grow(WEIGHT, MASK, torch.ones(2, 4), 0)
    assert torch.equal(new, MASK) and not fresh.any()


def _masked_linear():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(WEIGHT)
    add_binary_masks(layer, {"0": MASK})
    return layer


def test_dense_gradients_are_the_gradients_of_the_effective_weight():
    model = _masked_linear()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    capture = rigl.DenseGradients(model)
    capture.arm()
    (model(x) ** 2).sum().backward()
    grads = capture.take()
    assert not capture.armed
    # the same loss on an unmasked layer holding the effective weight
    plain = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        plain.weight.copy_(model[0].weight)
    (plain(x) ** 2).sum().backward()
    assert torch.allclose(grads["0"], plain.weight.grad)
    keep = binary_masks(model)["0"]
    assert (grads["0"][~keep] != 0).all()  # what RigL needs where the weight is pruned ...
    assert (dense_weight(model[0]).grad[~keep] == 0).all()  # ... the stored weight never sees


def test_apply_update_zeroes_grown_weights_and_their_momentum():
    model = _masked_linear()
    train = parse_job(tiny_job_dict()).train
    optimizer = make_optimizer(model, train)
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # creates the momentum buffers
    weight = dense_weight(model[0])
    momentum = optimizer.state[weight]["momentum_buffer"]
    momentum.fill_(1.0)
    with torch.no_grad():
        weight.copy_(WEIGHT)
        weight.masked_fill_(~MASK, 7.0)  # stale values where pruned
    grad = torch.tensor([[0.1, 0.2, 0.7, 0.2], [0.3, 0.6, 0.05, 0.4]])
    counts = rigl.apply_update(model, optimizer, {"0": grad}, 0.4)  # floor(0.4 * 5) = 2
    expected, fresh = rigl.drop_and_grow(WEIGHT, MASK, grad, 2)
    assert counts == {"0": 2}
    assert torch.equal(binary_masks(model)["0"], expected)
    assert (weight[fresh] == 0).all() and (momentum[fresh] == 0).all()
    assert (momentum[~fresh] == 1).all()
    assert (weight[~fresh & expected] != 0).all()


# --------------------------------------------------------------------------- RigL runs

RIGL = {"sparsity": 0.8, "distribution": "erk", "update_interval": 5}


class Recorder(Hooks):
    def __init__(self):
        self.epochs, self.tickets, self.checkpoints = [], [], []

    def epoch_end(self, event):
        self.epochs.append(event)

    def ticket_found(self, ticket):
        self.tickets.append(ticket)

    def save_checkpoint(self, state):
        self.checkpoints.append(copy.deepcopy(state))


@pytest.fixture(scope="module")
def rigl_run(digits):
    """A 4-epoch RigL run (40 steps, updates at steps 5..25) with every update recorded."""
    updates = []
    original = rigl.apply_update

    def recording(model, optimizer, grads, fraction):
        before = {k: v.clone() for k, v in binary_masks(model).items()}
        counts = original(model, optimizer, grads, fraction)
        after = binary_masks(model)
        weights = {k: dense_weight(m).detach().clone() for k, m in masked_modules(model).items()}
        updates.append({"fraction": fraction, "before": before, "after": after,
                        "weights": weights, "counts": counts})
        return counts

    trial = tiny_trial("rigl", RIGL)
    hooks = Recorder()
    mp = pytest.MonkeyPatch()
    mp.setattr(rigl, "apply_update", recording)
    try:
        run = TrialRun(trial, digits, hooks)
        result = run.run()
    finally:
        mp.undo()
    return trial, run, result, hooks, updates


def test_rigl_updates_on_schedule_keeping_nonzeros_and_growing_zeros(rigl_run):
    trial, _, result, _, updates = rigl_run
    end = rigl.end_step(4 * STEPS_PER_EPOCH, 0.75)
    steps = rigl.update_steps(4 * STEPS_PER_EPOCH, 5, 0.75)
    assert steps == [5, 10, 15, 20, 25]
    assert [u["fraction"] for u in updates] == pytest.approx(
        [rigl.drop_fraction(t, 0.3, end) for t in steps])
    assert result.final["mask_updates"] == 5
    densities = rigl.erk_densities(LAYERS, 0.8)
    for update in updates:
        assert set(update["after"]) == set(LAYERS)
        for name, shape in LAYERS.items():
            expected = rigl.active_count(densities[name], math.prod(shape))
            assert int(update["before"][name].sum()) == expected
            assert int(update["after"][name].sum()) == expected
            fresh = update["after"][name] & ~update["before"][name]
            assert int(fresh.sum()) == update["counts"][name]
            assert (update["weights"][name][fresh] == 0).all()
    changed = sum(update["counts"]["fc1"] for update in updates)
    assert changed > 0  # the masks really moved


def test_rigl_yields_one_ticket_at_its_sparsity_with_the_initial_weights(rigl_run, digits,
                                                                         tmp_path):
    trial, run, result, hooks, _ = rigl_run
    (ticket,) = result.tickets
    assert hooks.tickets == [ticket]
    assert ticket.name == "final" and ticket.meta["method"] == "rigl"
    assert ticket.sparsity == pytest.approx(0.8, abs=2 / MASKED)
    assert ticket.meta["rewind_epoch"] == 0 and ticket.meta["retrain_epochs"] == 0
    assert ticket.meta["search_epochs"] == 4 and ticket.meta["target_sparsity"] == 0.8
    assert ticket.meta["settings"]["distribution"] == "erk"
    assert ticket.meta["test_acc"] == result.rounds[-1]["test_acc"] is not None
    initial = dense_state_dict(run.new_model())
    assert set(ticket.rewind_state) == set(initial)
    for key, value in initial.items():
        assert torch.equal(ticket.rewind_state[key], value)
    for name, keep in ticket.masks.items():
        assert torch.equal(keep, binary_masks(run.model)[name].cpu())
    assert result.ledger.epochs("train") == 4 and result.ledger.epochs() == 4
    assert [e.phase for e in hooks.epochs] == ["train"] * 4
    assert planned_epochs(trial) == 4
    summary = json.loads(json.dumps(result.summary()))
    assert summary["method"] == "rigl" and summary["tickets"][0]["test_acc"] is not None
    loaded = load_ticket(ticket.save(tmp_path / "rigl"))
    assert loaded.meta["method"] == "rigl"
    assert all(torch.equal(loaded.masks[n], ticket.masks[n]) for n in ticket.masks)


def test_rigl_resumes_from_a_checkpoint_exactly(rigl_run, digits):
    trial, _, reference, hooks, _ = rigl_run
    mid = next(c for c in hooks.checkpoints if c["stage"] == "train" and c["epoch"] == 2)

    class Resume(Hooks):
        def load_checkpoint(self):
            return mid

    resumed = TrialRun(trial, digits, Resume()).run()
    (a,), (b,) = resumed.tickets, reference.tickets
    assert a.meta["test_acc"] == b.meta["test_acc"]
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert resumed.ledger.epochs("train") == 4


def test_rigl_epochs_override_the_round_length(digits):
    trial = tiny_trial("rigl", {"sparsity": 0.5, "distribution": "uniform", "epochs": 1})
    result = run_trial(trial, digits)
    (ticket,) = result.tickets
    assert result.ledger.epochs("train") == 1
    densities = ticket.layer_densities()
    assert densities["fc1"] == 1.0  # uniform: the first layer stays dense
    assert densities["fc2"] == pytest.approx(0.5) and densities["fc3"] == pytest.approx(0.5)


def test_rigl_spec_sweep_and_trial_ids():
    job = parse_job(tiny_job_dict(rigl={"sweep": {"sparsity": [0.5, 0.9],
                                                  "distribution": ["uniform", "erk"]}}))
    assert [t.trial_id for t in job.trials()] == [
        "rigl-uniform-s=0.5-seed=0", "rigl-erk-s=0.5-seed=0",
        "rigl-uniform-s=0.9-seed=0", "rigl-erk-s=0.9-seed=0"]
    trial = job.trials()[0]
    assert trial.method == "rigl" and trial.settings.update_interval == 100
    assert trial.settings.end_fraction == 0.75 and trial.settings.drop_fraction == 0.3
    with pytest.raises(SpecError) as error:
        parse_job(tiny_job_dict(rigl={"sweep": {"sparsity": [0.5, 1.0]},
                                      "end_fraction": 0, "update_interval": 0}))
    assert error.value.problems == [
        "methods.rigl.update_interval: must be greater than or equal to 1 (got 0)",
        "methods.rigl.end_fraction: must be greater than 0 (got 0)",
        "methods.rigl.sweep.sparsity[1]: must be less than 1 (got 1.0)",
    ]


def test_a_job_with_cs_imp_and_rigl_at_two_sparsities_and_its_report(tmp_path):
    data = tiny_job_dict(cs={"rounds": 1}, imp={"rounds": 2},
                         rigl={"update_interval": 5, "sweep": {"sparsity": [0.5, 0.9]}})
    data["train"] = {"epochs_per_round": 2, "lr_milestones": [], "rewind_epoch": 1,
                     "device": "cpu"}
    summary = run_job_locally(parse_job(data), storage=tmp_path, echo=lambda line: None,
                              track=False)
    trials = {t["trial_id"]: t for t in summary["trials"]}
    assert sorted({t["method"] for t in trials.values()}) == ["cs", "imp", "rigl"]
    for target in (0.5, 0.9):
        result = trials[f"rigl-erk-s={target}-seed=0"]
        (ticket,) = result["tickets"]
        assert ticket["sparsity"] == pytest.approx(target, abs=2 / MASKED)
        assert ticket["method"] == "rigl" and ticket["test_acc"] is not None
        assert result["ledger"]["epochs"] == {"train": 2, "total": 2}
        assert load_ticket(ticket["path"]).meta["method"] == "rigl"
    for trial_id in ("cs-s0=0-lam=1e-08-beta=200-seed=0", "imp-global-p=0.2-seed=0"):
        assert all(t["test_acc"] is not None for t in trials[trial_id]["tickets"])
    report = summary["report"]
    assert list(report["methods"]) == ["cs", "imp", "rigl"]
    rigl_report = report["methods"]["rigl"]
    assert [t["trial_id"] for t in rigl_report["tickets"]] == ["rigl-erk-s=0.5-seed=0",
                                                               "rigl-erk-s=0.9-seed=0"]
    assert rigl_report["search_epochs"] == {"critical_path": 2, "total": 4}
    assert rigl_report["retrain_epochs"] == {"critical_path": 0, "total": 0}
