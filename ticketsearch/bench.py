"""``ticketsearch bench overhead``: what masking, our loop and a trial's bookkeeping cost,
measured side by side.

For each model, three epoch kinds run interleaved (rotating order) in one process:
- ``dense``: the package's ``train_epoch`` on the unmasked model;
- ``cs``: the package's ``train_epoch`` on the CS soft-masked model with the L0 penalty;
- ``minimal``: a hand-written PyTorch loop (zero_grad, forward, cross-entropy, backward,
  step) over the same batches with the same optimizer settings.
It reports the median epoch seconds of each and the ratios CS/dense and loop/minimal.

``measure_bookkeeping`` runs a real trial (its job directory, events, checkpoints and MLflow
run on a local SQLite store) and reports what happens between epochs as a fraction of the
training epoch.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import load_dataset
from .models import create_model, masked_layer_names, model_info
from .sparsity import cs
from .sparsity.masks import add_soft_masks
from .spec import DataSpec, TrainSpec
from .training import FastPath, make_optimizer, resolve_device, train_epoch

TARGETS = {"cs/dense": 1.10, "loop/minimal": 1.05}

BENCH_DATA = {
    "mlp": DataSpec(dataset="digits"),
    "resnet20": DataSpec(dataset="synthetic", synthetic_shape=[3, 32, 32], synthetic_size=1024),
}


@dataclass
class OverheadResult:
    model: str
    device: str
    batches: int
    repeats: int
    dense_s: float
    cs_s: float
    minimal_s: float

    @property
    def cs_ratio(self) -> float:
        return self.cs_s / self.dense_s

    @property
    def loop_ratio(self) -> float:
        return self.dense_s / self.minimal_s

    def row(self) -> dict:
        return {
            "model": self.model, "device": self.device, "batches/epoch": self.batches,
            "repeats": self.repeats, "dense_s": round(self.dense_s, 4),
            "cs_s": round(self.cs_s, 4), "minimal_s": round(self.minimal_s, 4),
            "cs/dense": round(self.cs_ratio, 3), "loop/minimal": round(self.loop_ratio, 3),
        }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def minimal_epoch(model, batches, optimizer) -> None:
    """The plainest correct PyTorch training epoch."""
    model.train()
    for x, y in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure_overhead(model_name: str, repeats: int = 5, device: str = "auto",
                     batch_size: int = 128) -> OverheadResult:
    """Median epoch seconds of dense, CS and minimal epochs on ``model_name``."""
    dev = resolve_device(device)
    data = load_dataset(BENCH_DATA[model_name], dev)
    train = TrainSpec()
    torch.manual_seed(0)
    dense = create_model(model_name, data.num_classes, tuple(data.input_shape)).to(dev)
    masked = copy.deepcopy(dense)
    minimal = copy.deepcopy(dense)
    add_soft_masks(masked, masked_layer_names(masked, model_info(model_name).masked_layers), 0.0)
    cs.set_beta(masked, 5.0)
    optimizers = {name: make_optimizer(m, train) for name, m in
                  (("dense", dense), ("cs", masked), ("minimal", minimal))}
    generator = torch.Generator().manual_seed(0)

    def batches():
        return data.train_batches(batch_size, generator)

    def penalty():
        return 1e-8 * cs.l0_penalty(masked)

    runs = {
        "dense": lambda: train_epoch(dense, batches(), optimizers["dense"]),
        "cs": lambda: train_epoch(masked, batches(), optimizers["cs"], penalty),
        "minimal": lambda: minimal_epoch(minimal, batches(), optimizers["minimal"]),
    }
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up
        fn()
    order = list(runs)
    for i in range(repeats):
        for name in order[i % 3:] + order[: i % 3]:
            times[name].append(_timed(runs[name], dev))
    return OverheadResult(
        model_name, str(dev), data.num_train_batches(batch_size), repeats,
        statistics.median(times["dense"]), statistics.median(times["cs"]),
        statistics.median(times["minimal"]),
    )


def format_results(results: list[OverheadResult]) -> str:
    """A plain-text table of the results plus target verdicts."""
    lines = [format_rows([r.row() for r in results])]
    for r in results:
        for key, ratio in (("cs/dense", r.cs_ratio), ("loop/minimal", r.loop_ratio)):
            verdict = "meets" if ratio <= TARGETS[key] else "MISSES"
            lines.append(f"{r.model} on {r.device}: {key} = {ratio:.3f} {verdict} the target "
                         f"<= {TARGETS[key]:.2f}")
    return "\n".join(lines)


# --- ``ticketsearch bench precision`` and ``bench methods``: the GPU fast path ---------------

PRECISION_CONFIGS = {  # name: FastPath knobs
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True,
                                   "compile": "default"},
}


def cifar_shaped(images: int, device) -> object:
    """Synthetic data of CIFAR-10's shape (3x32x32, 10 classes), ``images`` in all."""
    spec = DataSpec(dataset="synthetic", synthetic_shape=[3, 32, 32], synthetic_size=images)
    return load_dataset(spec, device)


def measure_precision(model_name: str = "resnet20", images: int = 2048, repeats: int = 3,
                      device: str = "auto", batch_size: int = 128,
                      configs: tuple[str, ...] = tuple(PRECISION_CONFIGS)) -> list[dict]:
    """Median seconds of a CS-masked training epoch under each fast-path config, measured
    interleaved in one process; epochs/s and the speed-up over fp32 per config."""
    dev = resolve_device(device)
    data = cifar_shaped(images, dev)
    train = TrainSpec()
    runs = {}
    for name in configs:
        torch.manual_seed(0)
        model = create_model(model_name, data.num_classes, tuple(data.input_shape)).to(dev)
        add_soft_masks(model, masked_layer_names(model, model_info(model_name).masked_layers),
                       0.0)
        fast = FastPath(dev.type, **PRECISION_CONFIGS[name])
        fast.prepare(model)
        optimizer = make_optimizer(model, train)
        generator = torch.Generator().manual_seed(0)
        runs[name] = (lambda m=model, o=optimizer, f=fast, g=generator: train_epoch(
            m, data.train_batches(batch_size, g), o, lambda m=m: 1e-8 * cs.l0_penalty(m),
            fast=f))
    times = {name: [] for name in runs}
    for fn in runs.values():  # warm-up (and compilation)
        fn()
    order = list(runs)
    for i in range(repeats):
        for name in order[i % len(order):] + order[: i % len(order)]:
            times[name].append(_timed(runs[name], dev))
    base = statistics.median(times[order[0]])
    return [{"config": name, "device": str(dev), "images": images,
             "epoch_s": round(statistics.median(t), 4),
             "epochs/s": round(1 / statistics.median(t), 3),
             "speed-up": round(base / statistics.median(t), 3)} for name, t in times.items()]


def measure_methods(images: int = 2048, device: str = "auto", epochs: int = 2,
                    precision: str = "auto") -> list[dict]:
    """The paper preset cut down (resnet20 on CIFAR-shaped data, ``epochs`` per round,
    in-process, untracked): epochs/s of a trial of each method."""
    from .methods import TrialRun
    from .spec import parse_job

    dev = resolve_device(device)
    data = cifar_shaped(images, dev)
    methods = {"dense": {}, "cs": {"rounds": 2}, "imp": {"rounds": 2},
               "rigl": {"sparsity": 0.9}}
    rows = []
    for method, settings in [("dense", {}), *methods.items()]:  # the first one warms up
        job = parse_job({"name": "bench", "model": {"name": "resnet20"},
                         "data": {"dataset": "synthetic", "synthetic_shape": [3, 32, 32],
                                  "synthetic_size": images},
                         "train": {"epochs_per_round": epochs, "lr_milestones": [],
                                   "rewind_epoch": min(1, epochs - 1), "device": dev.type,
                                   "precision": precision, "eval_every": epochs},
                         "methods": {method: settings}})
        run = TrialRun(job.trials()[0], data)
        start = time.perf_counter()
        result = run.run()
        _sync(dev)
        seconds = time.perf_counter() - start
        rows.append({"method": method, "device": str(dev), "precision": run.fast.precision,
                     "epochs": result.ledger.epochs(), "seconds": round(seconds, 2),
                     "epochs/s": round(result.ledger.epochs() / seconds, 3)})
    return rows[1:]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of ``rows`` (dicts with the same keys)."""
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(row[h])) for row in rows)) for h in headers]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(str(row[h]).ljust(w) for h, w in zip(headers, widths)) for row in rows]
    return "\n".join(lines)


# --- the bookkeeping of a trial: events, checkpoints, MLflow ------------------------------------

BOOKKEEPING_TARGET = 0.10


def measure_bookkeeping(epochs: int = 60, checkpoint_every: int | None = None) -> dict:
    """One CS round of ``epochs`` epochs on digits + mlp, run as a job's trial is (job
    directory, event log, checkpoints by the spec's rule, MLflow on a local SQLite store, in
    this process): the seconds spent between one epoch's end and the next epoch's training
    and evaluation (events, MLflow, checkpoints, the loop itself), relative to the training
    epoch. ``checkpoint_every=1`` shows what a checkpoint after every epoch would cost."""
    import tempfile

    from .job import JobRun, run_one_trial
    from .spec import parse_job

    train = {"epochs_per_round": epochs, "lr_milestones": [], "rewind_epoch": 1,
             "device": "cpu", "checkpoint_every": checkpoint_every}
    job = parse_job({"name": "bench-bookkeeping", "data": {"dataset": "digits"},
                     "model": {"name": "mlp"}, "train": train,
                     "methods": {"cs": {"rounds": 1}}, "retrain": {"enabled": False}})
    with tempfile.TemporaryDirectory() as folder:
        run = JobRun(job, storage=folder, echo=lambda _: None)
        run.open()
        try:
            (trial,) = run.trials
            run_one_trial(trial, run.root, run.tracker)
            entries = read_ledger_entries(run.trial_dir(trial))
        finally:
            run.release()
    gaps = [b["finished_at"] - a["finished_at"] - b["seconds"] - b["eval_seconds"]
            for a, b in zip(entries, entries[1:])]
    train_s = sum(e["seconds"] for e in entries[1:])
    return {"trial": "cs digits+mlp", "epochs": len(entries),
            "checkpoints": "every epoch" if checkpoint_every == 1 else "by time (60 s)",
            "epoch_ms": round(1000 * train_s / len(gaps), 2),
            "bookkeeping_ms": round(1000 * sum(gaps) / len(gaps), 2),
            "bookkeeping/epoch": round(sum(gaps) / train_s, 3)}


def read_ledger_entries(trial_dir) -> list[dict]:
    """The ledger entries a finished trial's event log carries, in order."""
    from .jobdir import read_jsonl

    return [e for e in read_jsonl(trial_dir / "events.jsonl") if e.get("kind") == "epoch"]


def format_bookkeeping(rows: list[dict]) -> str:
    lines = [format_rows(rows)]
    for row in rows:
        if row["checkpoints"].startswith("by time"):
            ratio = row["bookkeeping/epoch"]
            verdict = "meets" if ratio <= BOOKKEEPING_TARGET else "MISSES"
            lines.append(f"bookkeeping/epoch = {ratio:.3f} {verdict} the target <= "
                         f"{BOOKKEEPING_TARGET:.2f}")
    return "\n".join(lines)


# --- throughput: trials one after another, concurrent Ray trials, one fused group ---------------

THROUGHPUT_EPOCHS = {"mlp": 20, "resnet20": 2}


class _NoCheckpoint:
    """A group checkpoint store that keeps nothing (benchmarks are not resumed)."""

    path = "(benchmark: none)"

    def load(self):
        return None

    def save(self, state) -> None:
        pass


def throughput_job(model_name: str, members: int, epochs: int, device: str, fuse) -> object:
    """A job of ``members`` CS trials (one search round of ``epochs`` epochs, no retraining,
    one evaluation) that differ in seed and s0: what a sweep fuses."""
    from .spec import parse_job

    data = BENCH_DATA[model_name].model_dump(exclude_defaults=True)
    seeds = list(range(members))
    return parse_job({
        "name": f"bench-throughput-{model_name}", "data": data, "model": {"name": model_name},
        "train": {"epochs_per_round": epochs, "lr_milestones": [], "rewind_epoch": 0,
                  "eval_every": epochs, "device": device, "checkpoint_every_s": 3600},
        "methods": {"cs": {"rounds": 1, "sweep": {"seed": seeds}}},
        "retrain": {"enabled": False},
        "resources": {"fuse": fuse, "cpus": max(0.01, round(_cpus() / members, 2)),
                      "gpus": round(1 / members, 3) if device == "cuda" else 0},
    })


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _sequential(trials, data) -> float:
    from .methods import run_trial

    start = time.perf_counter()
    for trial in trials:
        run_trial(trial, data)
    return time.perf_counter() - start


def _fused(trials, data) -> float:
    from .hooks import Hooks
    from .methods.group import GroupRun

    start = time.perf_counter()
    GroupRun(trials, data, [Hooks() for _ in trials], _NoCheckpoint()).run()
    return time.perf_counter() - start


def _concurrent_on_ray(job) -> float:
    """The makespan (first trial start to last trial end, process start-up excluded) of the
    job's trials run as concurrent Ray Tune trials sharing the device."""
    import tempfile

    from .cluster import init_ray, run_job_on_ray

    init_ray(None)
    with tempfile.TemporaryDirectory() as folder:
        summary = run_job_on_ray(job, storage=folder, echo=lambda _: None, track=False)
    return summary["makespan_s"]


def measure_throughput(model_name: str, members: int = 4, epochs: int | None = None,
                       device: str = "auto", ray: bool = True) -> dict:
    """Member-epochs per second of ``members`` CS trials of ``model_name`` trained (a) one
    after another in this process, (b) as concurrent Ray trials sharing the device
    (fractional CPUs/GPU) and (c) as one fused group in this process, side by side."""
    dev = resolve_device(device)
    epochs = epochs or THROUGHPUT_EPOCHS[model_name]
    job = throughput_job(model_name, members, epochs, dev.type, "off")
    trials = job.trials()
    data = load_dataset(trials[0].data, dev)
    warm = throughput_job(model_name, 2, 1, dev.type, "off").trials()
    _sequential(warm, data)
    _fused(warm, data)
    seconds = {"sequential": _sequential(trials, data), "fused": _fused(trials, data)}
    if ray:
        seconds["concurrent"] = _concurrent_on_ray(job)
    work = members * epochs
    row = {"model": model_name, "device": str(dev), "members": members, "epochs": epochs}
    for mode in ("sequential", "concurrent", "fused"):
        if mode in seconds:
            row[f"{mode}_s"] = round(seconds[mode], 2)
            row[f"{mode} ep/s"] = round(work / seconds[mode], 2)
    row["fused/sequential"] = round(seconds["sequential"] / seconds["fused"], 2)
    if ray:
        row["fused/concurrent"] = round(seconds["concurrent"] / seconds["fused"], 2)
    return row
