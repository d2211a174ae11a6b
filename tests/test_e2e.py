"""End-to-end CPU runs on the embedded digits data with the default LeNet-300-100-shaped MLP."""

import pytest

from ticketsearch.methods import run_trial
from ticketsearch.spec import parse_job

pytestmark = pytest.mark.slow


def digits_job(**methods):
    return parse_job({
        "name": "e2e",
        "data": {"dataset": "digits"},
        "model": {"name": "mlp"},
        "train": {"epochs_per_round": 12, "lr_milestones": [8, 10], "rewind_epoch": 2},
        "methods": methods,
    })


def test_cs_finds_a_sparse_ticket_as_accurate_as_the_dense_model(digits):
    job = digits_job(dense={}, cs={"rounds": 3, "mask_init": 0.0})
    dense_trial, cs_trial = job.trials()
    dense = run_trial(dense_trial, digits)
    result = run_trial(cs_trial, digits)
    (ticket,) = result.tickets
    dense_acc = dense.final["test_acc"]
    assert ticket.sparsity > 0.5
    assert ticket.meta["test_acc"] >= dense_acc - 0.02, (ticket.meta["test_acc"], dense_acc)
    assert result.ledger.epochs("search") == 36 and result.ledger.epochs("retrain") == 12


def test_imp_chain_of_five_rounds_yields_five_tickets_at_point_eight_powers(digits):
    (trial,) = digits_job(imp={"rounds": 5}).trials()
    result = run_trial(trial, digits)
    assert [t.name for t in result.tickets] == [f"round-{k:02d}" for k in range(1, 6)]
    total = 64 * 300 + 300 * 100 + 100 * 10
    for k, ticket in enumerate(result.tickets, start=1):
        kept = round((1 - ticket.sparsity) * total)
        assert abs(kept - total * 0.8**k) <= k, (k, kept)
        assert ticket.meta["test_acc"] > 0.9
    assert result.ledger.epochs("search") == 60 and result.ledger.epochs("retrain") == 12
