"""The local executor and the job directory: costs from ledgers, skipping finished trials,
and exact crash/resume of CS and IMP trials from their checkpoints."""

from __future__ import annotations

import copy
import itertools
import json
import shutil

import pytest
import torch
from conftest import read_events

from ticketsearch.data import load_dataset
from ticketsearch.jobdir import TrialDirHooks
from ticketsearch.local import run_job_locally
from ticketsearch.methods import run_trial
from ticketsearch.spec import DataSpec, parse_job
from ticketsearch.tickets import load_ticket

E = 4  # epochs per round
CHECKPOINT_EVERY = 2
LAYER_SIZES = [64, 32, 16, 10]  # digits features -> mlp_hidden [32, 16] -> 10 classes
MASKED_WEIGHTS = sum(a * b for a, b in itertools.pairwise(LAYER_SIZES))  # 2720

TRAIN = {
    "epochs_per_round": E,
    "batch_size": 128,
    "lr_milestones": [2],
    "rewind_epoch": 1,
    "device": "cpu",
    "checkpoint_every": CHECKPOINT_EVERY,
}
CS_SETTINGS = [-0.05, 0.0]


def job_spec(methods: dict, name: str = "tiny-local"):
    """A tiny digits + mlp job running ``methods``."""
    return parse_job({
        "name": name,
        "data": {"dataset": "digits"},
        "model": {"name": "mlp", "mlp_hidden": LAYER_SIZES[1:-1]},
        "train": TRAIN,
        "methods": methods,
    })


FULL_METHODS = {
    "dense": {},
    "cs": {"rounds": 2, "sweep": {"mask_init": CS_SETTINGS}},
    "imp": {"rounds": 3, "prune_fraction": 0.2},
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DataSpec(dataset="digits"), "cpu")


@pytest.fixture(scope="module")
def job_run(tmp_path_factory):
    """The full tiny job run once: (job, summary, echoed lines, storage folder)."""
    storage = tmp_path_factory.mktemp("local") / "runs"
    job = job_spec(FULL_METHODS)
    lines: list[str] = []
    summary = run_job_locally(job, storage=storage, echo=lines.append)
    return job, summary, lines, storage


# --------------------------------------------------------------------------- run_job_locally


def test_summary_costs_are_the_epochs_the_ledgers_recorded(job_run):
    _, summary, _, _ = job_run
    methods = summary["report"]["methods"]
    assert list(methods) == ["cs", "imp"]

    dense = summary["report"]["dense"]
    assert dense["trials"] == 1
    assert dense["epochs"] == {"critical_path": E, "total": E}
    assert dense["source"] == "dense trials"

    cs = methods["cs"]
    assert cs["trials"] == len(CS_SETTINGS)
    assert cs["search_epochs"] == {"critical_path": 2 * E, "total": len(CS_SETTINGS) * 2 * E}
    assert cs["retrain_epochs"] == {"critical_path": E, "total": len(CS_SETTINGS) * E}

    imp = methods["imp"]
    assert imp["trials"] == 1
    assert imp["search_epochs"] == {"critical_path": 3 * E, "total": 3 * E}
    assert imp["retrain_epochs"] == {"critical_path": E, "total": E}

    for trial in summary["trials"]:
        assert trial["ledger"]["recomputed_epochs"] == 0
        assert trial["ledger"]["attempts"] == 1
        assert trial["ledger"]["device"] == "cpu"


def test_cs_tickets_record_their_search_and_retraining(job_run):
    _, summary, _, _ = job_run
    tickets = summary["report"]["methods"]["cs"]["tickets"]
    assert sorted(t["trial_id"] for t in tickets) == [
        "cs-s0=-0.05-lam=1e-08-beta=200-seed=0", "cs-s0=0-lam=1e-08-beta=200-seed=0"]
    for ticket in tickets:
        assert ticket["name"] == "final"
        assert ticket["round"] == 2
        assert ticket["search_epochs"] == 2 * E
        assert ticket["retrain_epochs"] == E
        assert 0.0 < ticket["sparsity"] < 1.0
        assert 0.0 <= ticket["test_acc"] <= 1.0
        on_disk = load_ticket(ticket["path"])
        assert on_disk.sparsity == pytest.approx(ticket["sparsity"], abs=1e-12)
        assert on_disk.meta["test_acc"] == ticket["test_acc"]


def test_imp_ticket_sparsities_follow_the_pruning_schedule(job_run):
    _, summary, _, _ = job_run
    tickets = sorted(summary["report"]["methods"]["imp"]["tickets"], key=lambda t: t["round"])
    assert [t["name"] for t in tickets] == ["round-01", "round-02", "round-03"]
    for k, ticket in enumerate(tickets, start=1):
        expected = 1 - 0.8**k
        # pruning ceil(0.2 * remaining) each round is off by less than one weight per round
        assert abs(ticket["sparsity"] - expected) <= k / MASKED_WEIGHTS, (k, ticket["sparsity"])
        assert ticket["search_epochs"] == k * E
        masks = load_ticket(ticket["path"]).masks
        assert sum(m.numel() for m in masks.values()) == MASKED_WEIGHTS
        kept = sum(int(m.sum()) for m in masks.values())
        assert 1 - kept / MASKED_WEIGHTS == pytest.approx(ticket["sparsity"], abs=1e-12)
    # the final ticket is evaluated by retraining; the others by the next IMP round
    assert [t["retrain_epochs"] for t in tickets] == [0, 0, E]


def test_each_trial_logs_contiguous_epoch_steps(job_run):
    job, summary, _, storage = job_run
    root = storage / f"{job.name}-{job.spec_hash()}"
    expected_rounds = {"dense": 1, "cs": 2 + 1, "imp": 3 + 1}
    for trial in summary["trials"]:
        trial_dir = root / "trials" / trial["trial_id"]
        epochs = read_events(trial_dir, "epoch")
        total = trial["ledger"]["epochs"]["total"]
        assert [e["step"] for e in epochs] == list(range(total))
        assert len(read_events(trial_dir, "round")) == expected_rounds[trial["method"]]
        ticket_events = read_events(trial_dir, "ticket")
        assert [e["name"] for e in ticket_events] == [t["name"] for t in trial["tickets"]]


def test_job_directory_holds_spec_summary_and_results(job_run):
    job, summary, _, storage = job_run
    root = storage / f"{job.name}-{job.spec_hash()}"
    assert summary["job_dir"] == str(root)
    assert (root / "spec.yaml").is_file()
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk == {k: v for k, v in summary.items() if k not in ("report", "unsent")}
    assert summary["unsent"] == []
    for trial in job.trials():
        trial_dir = root / "trials" / trial.trial_id
        assert (trial_dir / "result.json").is_file()
        assert not (trial_dir / "checkpoint.pt").exists()


def test_rerunning_the_job_skips_every_finished_trial(job_run):
    job, summary, _, storage = job_run
    root = storage / f"{job.name}-{job.spec_hash()}"
    events_before = {p: p.read_bytes() for p in root.glob("trials/*/events.jsonl")}
    lines: list[str] = []
    again = run_job_locally(job_spec(FULL_METHODS), storage=storage, echo=lines.append)
    skipped = [line for line in lines if line.endswith(": already finished, skipped")]
    assert len(skipped) == len(job.trials())
    assert not any(line.endswith(": started") for line in lines)
    assert again["job_dir"] == summary["job_dir"]
    assert again["trials"] == summary["trials"]
    for method in summary["report"]["methods"]:
        assert again["report"]["methods"][method]["tickets"] == summary["report"]["methods"][method]["tickets"]
    assert {p: p.read_bytes() for p in root.glob("trials/*/events.jsonl")} == events_before


# --------------------------------------------------------------------------- crash and resume


class Crash(Exception):
    """Stands in for a worker killed mid-trial."""


class CrashingHooks(TrialDirHooks):
    """Reports each epoch, then fails right after reporting global step ``crash_step``."""

    def __init__(self, trial_dir, crash_step: int):
        super().__init__(trial_dir)
        self.crash_step = crash_step

    def epoch_end(self, event) -> None:
        super().epoch_end(event)
        if event.step == self.crash_step:
            raise Crash(f"crashed after step {event.step}")


class CrashOnTicketHooks(TrialDirHooks):
    """Fails right after saving and reporting the first ticket."""

    def ticket_found(self, ticket) -> None:
        super().ticket_found(ticket)
        raise Crash(f"crashed after saving ticket {ticket.name}")


TRIAL_METHODS = {
    "cs": {"cs": {"rounds": 2, "mask_init": 0.0}},
    "imp": {"imp": {"rounds": 3, "prune_fraction": 0.2}},
}


def single_trial(method: str):
    """The one trial of a tiny job running only ``method``."""
    (trial,) = job_spec(TRIAL_METHODS[method]).trials()
    return trial


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits):
    """Uninterrupted runs of the CS and IMP trials, each in its own folder."""
    base = tmp_path_factory.mktemp("reference")
    results = {}
    for method in TRIAL_METHODS:
        trial_dir = base / method
        results[method] = (run_trial(single_trial(method), digits, TrialDirHooks(trial_dir)),
                           trial_dir)
    return results


def comparable(event: dict) -> dict:
    """An epoch event without its timing, which differs between runs."""
    return {k: v for k, v in event.items()
            if k not in ("seconds", "t", "eval_seconds", "finished_at")}


def assert_same_tickets(resumed, ref) -> None:
    """Same names, masks, rewind states and accuracies, in the results and on disk."""
    assert [t.name for t in resumed.tickets] == [t.name for t in ref.tickets]
    for got, want in zip(resumed.tickets, ref.tickets, strict=True):
        assert got.masks.keys() == want.masks.keys()
        for layer in want.masks:
            assert torch.equal(got.masks[layer], want.masks[layer]), (got.name, layer)
        for key in want.rewind_state:
            assert torch.equal(got.rewind_state[key], want.rewind_state[key]), (got.name, key)
        for key in ("val_acc", "test_acc", "search_epochs", "retrain_epochs", "round"):
            assert got.meta[key] == want.meta[key], (got.name, key)


def assert_same_disk_tickets(resumed_dir, ref_dir, names) -> None:
    for name in names:
        got = load_ticket(resumed_dir / "tickets" / name)
        want = load_ticket(ref_dir / "tickets" / name)
        for layer in want.masks:
            assert torch.equal(got.masks[layer], want.masks[layer]), (name, layer)
        assert got.meta["test_acc"] == want.meta["test_acc"]


def assert_resumed_like_reference(resumed, resumed_dir, ref, ref_dir, lost: int) -> None:
    """The resumed trial matches the uninterrupted one exactly, lost epochs counted once."""
    assert resumed.ledger.summary()["epochs"] == ref.ledger.summary()["epochs"]
    assert ref.ledger.recomputed_epochs == 0
    assert resumed.ledger.recomputed_epochs == lost
    assert resumed.ledger.summary()["attempts"] == 2
    events = read_events(resumed_dir, "epoch")
    assert [e["step"] for e in events] == list(range(ref.ledger.epochs()))
    assert [comparable(e) for e in events] == [
        comparable(e) for e in read_events(ref_dir, "epoch")]
    assert [comparable(e) for e in read_events(resumed_dir, "round")] == [
        comparable(e) for e in read_events(ref_dir, "round")]
    ticket_events = [e["name"] for e in read_events(resumed_dir, "ticket")]
    assert ticket_events == [e["name"] for e in read_events(ref_dir, "ticket")]
    assert resumed.rounds == ref.rounds
    assert resumed.final == ref.final
    assert_same_tickets(resumed, ref)
    assert_same_disk_tickets(resumed_dir, ref_dir, [t.name for t in ref.tickets])


def crash_then_resume(trial, digits, trial_dir, crash_step: int, lost: int):
    """Crash ``trial`` after ``crash_step``, check what is left, then resume it."""
    with pytest.raises(Crash):
        run_trial(trial, digits, CrashingHooks(trial_dir, crash_step))
    assert [e["step"] for e in read_events(trial_dir, "epoch")] == list(range(crash_step + 1))
    state = torch.load(trial_dir / "checkpoint.pt", weights_only=True)
    assert state["ledger"]["entries"] == crash_step + 1 - lost  # a count: the events hold them
    return run_trial(trial, digits, TrialDirHooks(trial_dir))


def test_a_crashed_attempts_time_after_its_checkpoint_is_kept(tmp_path, digits):
    """The ledger's first attempt lasts until the crash, not until its last checkpoint."""
    trial_dir = tmp_path / "cs"
    with pytest.raises(Crash):
        run_trial(single_trial("cs"), digits, CrashingHooks(trial_dir, 5))
    crashed_at = max(e["t"] for e in read_events(trial_dir, "epoch"))
    checkpoint = torch.load(trial_dir / "checkpoint.pt", weights_only=True)
    saved_end = checkpoint["ledger"]["attempts"][0][1]
    assert saved_end < crashed_at  # two epochs ran after the checkpoint
    resumed = run_trial(single_trial("cs"), digits, TrialDirHooks(trial_dir))
    first, second = resumed.ledger.attempts
    assert first[1] >= crashed_at
    assert resumed.ledger.wall_clock_s == pytest.approx(
        (first[1] - first[0]) + (second[1] - second[0]))


# CS, E=4, checkpoint every 2 epochs: checkpoints after steps 1, 3 (round end), 5,
# 7 (search done), 9. A crash after step k loses the epochs since the last checkpoint.
@pytest.mark.parametrize(
    ("crash_step", "lost"),
    [(5, 2), (6, 1), (9, 2)],
    ids=["round-2-before-its-checkpoint", "round-2-after-its-checkpoint", "retraining"],
)
def test_cs_trial_resumes_exactly_after_a_crash(tmp_path, digits, reference, crash_step, lost):
    ref, ref_dir = reference["cs"]
    trial_dir = tmp_path / "cs"
    resumed = crash_then_resume(single_trial("cs"), digits, trial_dir, crash_step, lost)
    assert [t.name for t in resumed.tickets] == ["final"]
    assert resumed.tickets[0].meta["test_acc"] == ref.tickets[0].meta["test_acc"]
    assert_resumed_like_reference(resumed, trial_dir, ref, ref_dir, lost)


# IMP, E=4, 3 rounds: the second round is steps 4-7; checkpoints after steps 3 and 5.
@pytest.mark.parametrize(
    ("crash_step", "lost"),
    [(5, 2), (6, 1), (7, 2)],
    ids=["before-its-checkpoint", "after-its-checkpoint", "its-last-epoch"],
)
def test_imp_trial_resumes_exactly_after_a_crash_in_round_two(
    tmp_path, digits, reference, crash_step, lost
):
    ref, ref_dir = reference["imp"]
    trial_dir = tmp_path / "imp"
    resumed = crash_then_resume(single_trial("imp"), digits, trial_dir, crash_step, lost)
    assert [t.name for t in resumed.tickets] == ["round-01", "round-02", "round-03"]
    assert_resumed_like_reference(resumed, trial_dir, ref, ref_dir, lost)


def test_imp_trial_resumes_after_a_crash_right_after_saving_a_ticket(
    tmp_path, digits, reference
):
    ref, ref_dir = reference["imp"]
    trial_dir = tmp_path / "imp"
    trial = single_trial("imp")
    with pytest.raises(Crash, match="round-01"):
        run_trial(trial, digits, CrashOnTicketHooks(trial_dir))
    assert (trial_dir / "tickets" / "round-01").is_dir()
    resumed = run_trial(trial, digits, TrialDirHooks(trial_dir))
    # round-01 is emitted after round 2 (steps 4-7); the last checkpoint was after step 5
    assert_resumed_like_reference(resumed, trial_dir, ref, ref_dir, lost=2)


def test_a_checkpoint_of_another_method_is_refused(tmp_path, digits):
    cs_dir, imp_dir = tmp_path / "cs", tmp_path / "imp"
    with pytest.raises(Crash):
        run_trial(single_trial("cs"), digits, CrashingHooks(cs_dir, 2))
    imp_dir.mkdir()
    shutil.copy(cs_dir / "checkpoint.pt", imp_dir / "checkpoint.pt")
    imp = single_trial("imp")
    with pytest.raises(ValueError, match="delete it") as caught:
        run_trial(imp, digits, TrialDirHooks(imp_dir))
    assert imp.trial_id in str(caught.value)
    assert "not a 'imp' checkpoint" in str(caught.value)


def test_a_checkpoint_of_another_version_is_refused(tmp_path, digits):
    trial_dir = tmp_path / "cs"
    trial = single_trial("cs")
    with pytest.raises(Crash):
        run_trial(trial, digits, CrashingHooks(trial_dir, 2))
    state = torch.load(trial_dir / "checkpoint.pt", weights_only=True)
    future = copy.copy(state)
    future["version"] = state["version"] + 1
    torch.save(future, trial_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match="delete it to start the trial over"):
        run_trial(trial, digits, TrialDirHooks(trial_dir))


# --------------------------------------------------------------------------- lean checkpoints


class SizeHooks(TrialDirHooks):
    """Records the size of every checkpoint written, by the rounds done before it."""

    def __init__(self, trial_dir):
        super().__init__(trial_dir)
        self.sizes: dict[int, int] = {}
        self.saves = 0

    def save_checkpoint(self, state) -> None:
        super().save_checkpoint(state)
        self.saves += 1
        self.sizes[len(state["rounds"])] = self.checkpoint_path.stat().st_size


def test_a_checkpoint_does_not_grow_with_the_rounds_and_tickets_done(tmp_path, digits):
    """After 30 IMP rounds (30 tickets, 60 ledger entries) the checkpoint is no larger than
    after one round, give or take the model's own state: tickets and ledger entries already
    on disk are referenced, not rewritten."""
    train = TRAIN | {"epochs_per_round": 2, "lr_milestones": [], "checkpoint_every": None}
    job = parse_job({"name": "lean", "data": {"dataset": "digits"},
                     "model": {"name": "mlp", "mlp_hidden": LAYER_SIZES[1:-1]},
                     "train": train, "methods": {"imp": {"rounds": 31}},
                     "retrain": {"enabled": False}})
    (trial,) = job.trials()
    hooks = SizeHooks(tmp_path / "imp")
    result = run_trial(trial, digits, hooks)
    assert len(result.tickets) == 31
    model_bytes = 2 * 4 * MASKED_WEIGHTS  # float32 weights and their float32 masks
    assert max(hooks.sizes) == 30  # the checkpoint at the start of round 31
    assert hooks.sizes[max(hooks.sizes)] <= hooks.sizes[1] + model_bytes


@pytest.mark.parametrize(("every_s", "saves"), [(1e-9, E - 1), (1e9, 0)])
def test_checkpoints_are_taken_by_time_and_at_round_starts(tmp_path, digits, every_s, saves):
    """With no epoch count, a round checkpoints once checkpoint_every_s has passed: here
    after every epoch but its last (whose checkpoint is the next round's start), or never."""
    train = TRAIN | {"checkpoint_every": None, "checkpoint_every_s": every_s}
    job = parse_job({"name": "by-time", "data": {"dataset": "digits"},
                     "model": {"name": "mlp", "mlp_hidden": LAYER_SIZES[1:-1]},
                     "train": train, "methods": {"dense": {}}})
    (trial,) = job.trials()
    hooks = SizeHooks(tmp_path / "dense")
    result = run_trial(trial, digits, hooks)
    assert result.ledger.epochs() == E
    assert hooks.saves == saves  # a dense trial is one round: no round-start checkpoint
