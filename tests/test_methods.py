
import pytest
import torch
from conftest import Recorder, tiny_trial

from ticketsearch.hooks import Hooks
from ticketsearch.methods import TrialRun, retrain_ticket, run_trial
from ticketsearch.sparsity.masks import binary_masks, dense_weight, masked_modules


def test_cs_beta_schedule_and_ledger(digits):
    trial = tiny_trial("cs", {"rounds": 3, "beta_final": 50})
    hooks = Recorder()
    result = run_trial(trial, digits, hooks)
    search = [e for e in hooks.epochs if e.phase == "search"]
    assert [e.round for e in search] == [0] * 4 + [1] * 4 + [2] * 4
    for r in range(3):
        betas = [e.beta for e in search if e.round == r]
        assert betas[0] == 1.0 and betas[-1] == pytest.approx(50.0)
        assert betas == sorted(betas)
    assert [e.step for e in hooks.epochs] == list(range(16))
    assert result.ledger.epochs("search") == 12
    assert result.ledger.epochs("retrain") == 4
    assert [e.lr for e in search[:4]] == pytest.approx([0.1, 0.1, 0.1, 0.01])
    assert len(result.tickets) == 1 and hooks.tickets[0].meta["search_epochs"] == 12
    ticket = result.tickets[0]
    assert ticket.meta["retrain_epochs"] == 4 and ticket.meta["test_acc"] is not None


def test_cs_per_iteration_schedule_reaches_beta_final_at_the_last_step(digits):
    trial = tiny_trial("cs", {"rounds": 1, "beta_final": 20, "beta_schedule": "iteration"})
    hooks = Recorder()
    run_trial(trial, digits, hooks)
    search = [e for e in hooks.epochs if e.phase == "search"]
    assert search[-1].beta == pytest.approx(20.0)
    assert 1.0 < search[0].beta < 20.0 ** (1 / 3)  # rises within the first epoch already


def test_retrained_cs_ticket_keeps_exactly_its_mask(digits):
    trial = tiny_trial("cs", {"rounds": 2, "mask_init": 0.0})
    run = TrialRun(trial, digits, None)
    result = run.run()
    ticket = result.tickets[0]
    assert 0 < ticket.sparsity < 1
    final = binary_masks(run.model)
    for name, keep in ticket.masks.items():
        assert torch.equal(final[name].cpu(), keep)
        effective = masked_modules(run.model)[name].weight
        assert bool((effective[~keep] == 0).all())
        assert bool((dense_weight(masked_modules(run.model)[name])[keep] != 0).all())


def test_imp_chain_tickets_densities_and_accuracies(digits):
    trial = tiny_trial("imp", {"rounds": 3})
    hooks = Recorder()
    result = run_trial(trial, digits, hooks)
    names = [t.name for t in result.tickets]
    assert names == ["round-01", "round-02", "round-03"]
    masked_total = 64 * 32 + 32 * 16 + 16 * 10
    for k, ticket in enumerate(result.tickets, start=1):
        assert abs((1 - ticket.sparsity) * masked_total - masked_total * 0.8**k) <= k
    rounds = [r for r in hooks.rounds if r.phase == "search"]
    # round k+1 trains ticket k, so ticket k's accuracy is round k+1's
    assert result.tickets[0].meta["test_acc"] == rounds[1].test_acc
    assert result.tickets[1].meta["test_acc"] == rounds[2].test_acc
    assert result.tickets[2].meta["retrain_epochs"] == 4
    assert result.ledger.epochs("search") == 12 and result.ledger.epochs("retrain") == 4
    assert result.final["dense_test_acc"] == rounds[0].test_acc


def _round_start_states(hooks):
    return [c for c in hooks.checkpoints if c["stage"] == "search" and c["epoch"] == 0
            and c["round"] > 0]


@pytest.mark.parametrize("rewind", [True, False])
def test_imp_rewinds_between_rounds_and_imp_c_does_not(digits, rewind):
    trial = tiny_trial("imp", {"rounds": 3, "rewind_between_rounds": rewind})
    hooks = Recorder()
    result = run_trial(trial, digits, hooks)
    starts = _round_start_states(hooks)
    assert len(starts) == 2
    for state in starts:
        weights = state["model"]["fc1.parametrizations.weight.original"]
        snapshot = state["snapshot"]["fc1.weight"]
        assert torch.equal(weights, snapshot) is rewind
        bn_free = state["model"]["fc2.bias"]
        assert torch.equal(bn_free, state["snapshot"]["fc2.bias"]) is rewind
    retrained = [t.meta["retrain_epochs"] for t in result.tickets]
    assert retrained == ([0, 0, 4] if rewind else [4, 4, 4])


def test_retrain_ticket_from_a_ticket_object(digits, tmp_path):
    from ticketsearch.tickets import load_ticket

    trial = tiny_trial("imp", {"rounds": 2})
    ticket = run_trial(trial, digits).tickets[-1]
    path = ticket.save(tmp_path / "t")
    loaded = load_ticket(path)
    result = retrain_ticket(loaded, trial, digits)
    assert result.ledger.epochs("retrain") == 4
    assert result.tickets[0].meta["test_acc"] > 0.5
    assert torch.equal(result.tickets[0].masks["fc1"], ticket.masks["fc1"])


def test_imp_checkpoint_restores_into_a_fresh_run(digits):
    trial = tiny_trial("imp", {"rounds": 2})
    hooks = Recorder()
    reference = run_trial(trial, digits, hooks)
    mid = next(c for c in hooks.checkpoints if c["round"] == 1 and c["epoch"] == 2)

    class Resume(Hooks):
        def load_checkpoint(self):
            return mid

    resumed = TrialRun(trial, digits, Resume()).run()
    assert [t.name for t in resumed.tickets] == [t.name for t in reference.tickets]
    for a, b in zip(resumed.tickets, reference.tickets):
        assert a.meta["test_acc"] == b.meta["test_acc"]
        for name in a.masks:
            assert torch.equal(a.masks[name], b.masks[name])
    assert resumed.ledger.epochs() == reference.ledger.epochs()
