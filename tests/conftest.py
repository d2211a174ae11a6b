import copy
import json
from pathlib import Path

import pytest
import torch

from ticketsearch.data import load_dataset
from ticketsearch.hooks import Hooks
from ticketsearch.spec import parse_job


def tiny_job_dict(**methods):
    """A job small enough to train in about a second on digits."""
    return {
        "name": "tiny",
        "data": {"dataset": "digits"},
        "model": {"name": "mlp", "mlp_hidden": [32, 16]},
        "train": {"epochs_per_round": 4, "lr_milestones": [3], "rewind_epoch": 1,
                  "checkpoint_every": 2},
        "methods": methods or {"cs": {"rounds": 2}},
    }


def tiny_trial(method: str, settings: dict | None = None, **top):
    job = tiny_job_dict(**{method: settings or {}})
    job.update(top)
    return parse_job(job).trials()[0]


@pytest.fixture(scope="session")
def digits():
    from types import SimpleNamespace

    spec = SimpleNamespace(dataset="digits", root=None, download=False, val_size=None,
                           augment=None, split_seed=0, synthetic_shape=[64],
                           synthetic_classes=10, synthetic_size=512, num_workers=0)
    return load_dataset(spec, "cpu")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models train fastest (and steadiest on a busy machine) on one thread; use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder(Hooks):
    """Hooks that keep every event, ticket and checkpoint (copied: the state passed to
    ``save_checkpoint`` is only valid during the call)."""

    def __init__(self):
        self.epochs, self.rounds, self.tickets, self.checkpoints = [], [], [], []

    def epoch_end(self, event):
        self.epochs.append(event)

    def round_end(self, event):
        self.rounds.append(event)

    def ticket_found(self, ticket):
        self.tickets.append(ticket)

    def save_checkpoint(self, state):
        self.checkpoints.append(copy.deepcopy(state))


def kill_after_epochs(trial_dir, epochs: int, pid_file: str = "worker.pid",
                      timeout: float = 120.0):
    """A started thread that SIGKILLs the process whose pid ``trial_dir/pid_file`` holds as
    soon as the trial has logged ``epochs`` epochs. Returns (thread, killed): ``killed``
    gets ``pid`` and ``seen`` (epochs logged then) once it struck."""
    import os
    import signal
    import threading
    import time

    killed: dict = {}

    def killer():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                seen = len(read_events(trial_dir, "epoch"))
            except (json.JSONDecodeError, FileNotFoundError):  # a line being written
                seen = 0
            pid_path = Path(trial_dir) / pid_file
            if seen >= epochs and pid_path.exists():
                killed.update(pid=int(pid_path.read_text()), seen=seen)
                os.kill(killed["pid"], signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer)
    thread.start()
    return thread, killed


def read_events(trial_dir, kind: str = "epoch") -> list[dict]:
    """All events of ``kind`` a trial logged to its ``events.jsonl``, in order."""
    path = Path(trial_dir) / "events.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == kind]


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session: 2 CPUs and 1 logical GPU. Its workers can import the
    test modules (as a user's own code on the cluster's path)."""
    import os

    import ray

    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield ray
    ray.shutdown()
