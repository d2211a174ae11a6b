"""Data-parallel trials (``parallel.py``): two gloo workers train exactly as one worker at the
same global batch."""

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import kill_after_epochs, read_events, tiny_job_dict, tiny_trial
from servers import free_port

from ticketsearch.data import load_dataset
from ticketsearch.methods import TrialRun
from ticketsearch.parallel import Shard

pytestmark = pytest.mark.integration

EXAMPLES = str(Path(__file__).resolve().parents[1] / "examples")
MY_CNN = {"model": {"factory": "my_cnn:build_cnn", "kwargs": {"width": 8}},
          "data": {"factory": "my_cnn:load_digit_images", "kwargs": {"test_fraction": 0.2}}}
CASES = {  # method, its settings, the rest of the job
    "dense-cnn-batchnorm": ("dense", {}, MY_CNN),  # conv, BatchNorm, conv, BatchNorm, fc
    "cs-mlp": ("cs", {"rounds": 1}, {}),
    "imp-cnn-batchnorm": ("imp", {"rounds": 2}, MY_CNN),
    "rigl-mlp": ("rigl", {"sparsity": 0.8, "update_interval": 4}, {}),
}


def trial_of(case: str):
    method, settings, top = CASES[case]
    train = tiny_job_dict()["train"] | {"epochs_per_round": 1, "lr_milestones": [],
                                         "batch_size": 30, "rewind_epoch": 0}
    return tiny_trial(method, settings, train=train, retrain={"enabled": False}, **top)


def final_state(case: str) -> dict[str, torch.Tensor]:
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    trial = trial_of(case)
    torch.set_num_threads(1)
    run = TrialRun(trial, load_dataset(trial.data, "cpu"))
    run.run()
    return {k: v.detach().clone() for k, v in run.model.state_dict().items()}


def worker(rank: int, world: int, port: int, case: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    if world == 1:  # one worker with the data-parallel code path (its BatchNorm included)
        import ticketsearch.methods.base as base
        base.Shard.current = classmethod(lambda cls: cls(0, 1))
    state = final_state(case)
    if rank == 0:
        torch.save(state, out)
    # Leave together and skip the interpreter's teardown: gloo's worker threads can still hold
    # work objects when Python finalises, which aborted a rank (SIGABRT) after its work was done.
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_workers_train_as_one_at_the_same_global_batch(case, tmp_path):
    """A 1-worker trial on the data-parallel code path (its synchronised BatchNorm included:
    mathematically plain BatchNorm, see the float64 test below) against 2 workers."""
    runs = {}
    for world in (1, 2):
        runs[world] = str(tmp_path / f"world{world}.pt")
        mp.start_processes(worker, args=(world, free_port(), case, runs[world]), nprocs=world,
                           join=True, start_method="spawn")
    alone, together = (torch.load(runs[w], weights_only=True) for w in (1, 2))
    assert together.keys() == alone.keys()
    for name, value in alone.items():
        assert torch.allclose(together[name].float(), value.float(), rtol=1e-5, atol=1e-6), name
    if case == "cs-mlp":
        assert any(k.endswith("logits") for k in alone)


def test_global_batch_norm_is_batch_norm_in_float64():
    """GlobalBatchNorm (the CPU SyncBatchNorm) computes what nn.BatchNorm2d does: outputs,
    gradients and running statistics, in a process group of one."""
    from ticketsearch.parallel import GlobalBatchNorm

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.BatchNorm2d(4).double()
        with torch.no_grad():
            plain.weight.uniform_(0.5, 2)
            plain.bias.uniform_(-1, 1)
        synced = GlobalBatchNorm.of(torch.nn.BatchNorm2d(4).double())
        synced.load_state_dict(plain.state_dict())
        x = (torch.randn(6, 4, 5, 5, dtype=torch.float64) * 3 + 2).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        weights = torch.randn(6, 4, 5, 5, dtype=torch.float64)
        (plain(x) * weights).sum().backward()
        (synced(x2) * weights).sum().backward()
        assert torch.allclose(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
        for a, b in zip(plain.parameters(), synced.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        for key, value in plain.state_dict().items():
            assert torch.allclose(value.double(), synced.state_dict()[key].double(),
                                  rtol=1e-10, atol=1e-12), key
    finally:
        dist.destroy_process_group()


def test_a_shard_is_a_contiguous_part_with_its_loss_scale():
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    parts = [Shard(rank, 3).split(x, y) for rank in range(3)]
    assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert [p[2] for p in parts] == pytest.approx([1.2, 0.9, 0.9])
    assert Shard.current() is None and os.environ.get("WORLD_SIZE") in (None, "1")


def test_a_two_worker_trial_runs_through_ray_train_inside_tune(ray_local, tmp_path):
    """resources.workers: 2 — a TorchTrainer of two gloo workers launched from the Tune trial;
    rank 0 writes the one result and the ledger counts each epoch once."""
    from ticketsearch.cluster import run_job_on_ray
    from ticketsearch.jobdir import read_result
    from ticketsearch.spec import parse_job

    data = tiny_job_dict(cs={"rounds": 2})
    data["resources"] = {"workers": 2, "cpus": 0.9}
    job = parse_job(data)
    summary = run_job_on_ray(job, storage=tmp_path, echo=lambda _: None, track=False)
    (trial,) = job.trials()
    record = read_result(tmp_path / f"{job.name}-{job.spec_hash()}" / "trials" / trial.trial_id)
    assert summary["status"] == "FINISHED"
    assert record.ledger.epochs == {"search": 8, "retrain": 4, "total": 12}
    assert len(record.tickets) == 1 and record.tickets[0].test_acc > 0.3


def test_a_two_worker_trial_resumes_after_a_worker_is_killed(ray_local, tmp_path):
    from ticketsearch.cluster import run_job_on_ray
    from ticketsearch.jobdir import read_result
    from ticketsearch.spec import parse_job

    data = tiny_job_dict(cs={"rounds": 3})
    data["train"] |= {"epochs_per_round": 6, "lr_milestones": [5], "checkpoint_every": 2}
    data["resources"] = {"workers": 2, "cpus": 0.9, "max_failures": 2}
    job = parse_job(data)
    (trial,) = job.trials()
    trial_dir = tmp_path / f"{job.name}-{job.spec_hash()}" / "trials" / trial.trial_id
    thread, killed = kill_after_epochs(trial_dir, 8, "worker-1.pid", timeout=240)
    summary = run_job_on_ray(job, storage=tmp_path, echo=lambda _: None, track=False)
    thread.join()
    assert "pid" in killed, "the trial finished before a worker could be killed"
    record = read_result(trial_dir)
    assert summary["status"] == "FINISHED"
    assert record.ledger.epochs == {"search": 18, "retrain": 6, "total": 24}  # each once
    assert record.ledger.attempts == 2 and record.ledger.recomputed_epochs >= 0
    steps = [e["step"] for e in read_events(trial_dir, "epoch")]
    assert sorted(set(steps)) == list(range(24))
    assert len(record.tickets) == 1
