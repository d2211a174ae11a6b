"""Which trials of a job train together: ``plan_units`` splits a job's unfinished trials
into units of work — a trial alone, or a fused group (``methods.group.GroupRun``) — by
``resources.fuse``.

Trials may share a group when their method has a group runner and they differ only in the
method's fusible knobs (``Method.fuse_axes``; ``fusion_key``). ``auto`` sizes the groups:

- on CPUs, ``CPU_FUSE`` members for networks of linear layers when a trial has at least
  ``CPU_FUSE_MIN_CPUS`` CPUs, else no fusion. What ``ticketsearch bench throughput``
  measured on a 2-core machine: a fused group of 4 digits MLPs trains 1.4x the member-epochs
  per second of the 4 trials one after another with 2 threads, but 0.9x with one (the
  matmuls are compute-bound either way; only the larger fused ones use a second thread
  well); a fused ResNet-20 trains at 0.6x (its convolutions and their element-wise
  neighbours work on K times larger tensors that no longer stay in cache);
- on a GPU, as many members as fit in half of the trial's share of the GPU's memory
  (``member_bytes``), at most ``GPU_FUSE_MAX``.
"""

from __future__ import annotations

import functools
import json

import torch
from torch import Tensor, nn

from ..fusion import check_fused, fuse_models
from .registry import get_method

CPU_FUSE = 4  # auto on CPU: the measured sweet spot (ticketsearch bench throughput)
CPU_FUSE_MIN_CPUS = 2  # ... for trials with at least this many CPUs (threads)
GPU_FUSE_MAX = 16  # auto on a GPU: at most this many members, as memory allows
ASSUMED_GPU_BYTES = 16 * 2**30  # a cluster GPU's memory when the driver sees no GPU


def fusion_key(trial) -> str | None:
    """Trials with one key may share a group: same method, data, model, training, retraining
    and resources, same settings but for the method's ``fuse_axes`` (set or unset alike in
    all of them: targeted CS does not fuse with plain CS). None: the trial cannot be fused."""
    method = get_method(trial.method)
    if method.run_group is None or trial.resources.world > 1:
        return None
    if method.fusible is not None and method.fusible(trial) is not None:
        return None
    settings = trial.settings.model_dump(mode="json", by_alias=True)
    kinds = {axis: settings.pop(axis, None) is None for axis in method.fuse_axes}
    data = trial.model_dump(mode="json", exclude={"trial_id", "name", "seed", "settings"})
    return json.dumps([trial.method, settings, data, kinds], sort_keys=True)


def plan_units(trials, fuse: str | int, gpu_bytes: float | None = None) -> list[list]:
    """The job's trials as units of work: a list of one trial, or a fused group of several.

    ``fuse``: off (every trial alone), K (groups of at most K members) or auto (the module's
    rule; ``gpu_bytes``: the memory of the GPU a trial gets, None for the assumed
    ``ASSUMED_GPU_BYTES``). Fusible trials with one key are split into groups of near-equal
    size; a group of one is a trial alone.
    """
    if fuse == "off" or fuse == 1:
        return [[t] for t in trials]
    buckets: dict[str, list] = {}
    units: list[list] = []
    for trial in trials:
        key = fusion_key(trial)
        if key is None:
            units.append([trial])
        else:
            buckets.setdefault(key, []).append(trial)
    for members in buckets.values():
        size = fuse if isinstance(fuse, int) else auto_size(members[0], gpu_bytes)
        count = -(-len(members) // max(1, size))
        units += [members[index::count] for index in range(count)]
    return units


def on_gpu(trial) -> bool:
    return trial.resources.gpus > 0 or trial.train.device == "cuda"


def auto_size(trial, gpu_bytes: float | None = None) -> int:
    """The group size ``fuse: auto`` gives the trial's bucket (see the module doc)."""
    if not on_gpu(trial):
        if trial.resources.cpus < CPU_FUSE_MIN_CPUS or _has_convolutions(trial):
            return 1
        return CPU_FUSE
    share = (gpu_bytes or ASSUMED_GPU_BYTES) * min(1.0, trial.resources.gpus or 1.0)
    return max(1, min(GPU_FUSE_MAX, int(0.5 * share // member_bytes(trial))))


def _has_convolutions(trial) -> bool:
    model, _ = _model_and_data(trial)
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())


@functools.lru_cache(maxsize=8)
def _built(model_json: str, data_json: str):
    from ..data import load_dataset
    from ..models import build_model
    from ..spec import DataSpec, ModelSpec

    data = load_dataset(DataSpec.model_validate_json(data_json), "cpu")
    model = build_model(ModelSpec.model_validate_json(model_json), data.num_classes,
                        tuple(data.input_shape))
    return model, data


def _model_and_data(trial):
    """The trial's model (freshly initialised, on the CPU) and data, built once per spec."""
    return _built(trial.model.model_dump_json(), trial.data.model_dump_json())


def _models(trials, data, count: int) -> list[nn.Module]:
    from ..models import build_model

    models = []
    for trial in trials[:count]:
        torch.manual_seed(trial.seed)
        models.append(build_model(trial.model, data.num_classes, tuple(data.input_shape)))
    return models


def probe_batch(data) -> Tensor:
    """Two examples of ``data`` (on the CPU): what a fused model is checked on."""
    batch = next(iter(data.eval_batches("test", 2)), None) or \
        next(iter(data.train_batches(2, torch.Generator().manual_seed(0))))
    return batch[0].cpu()


def check_fusible(trials, data) -> None:
    """Raise FusionError unless the trials' model can be fused (two members fused and
    compared on a probe batch, on the CPU)."""
    models = _models(trials, data, 2)
    check_fused(fuse_models(models), models, probe_batch(data))


def member_bytes(trial) -> float:
    """An estimate of the GPU memory one member of a fused group takes: its weights, their
    gradients, momentum and mask logits (4 copies in fp32), plus every layer's output for a
    batch of ``train.batch_size`` kept for the backward pass and its gradient (2 copies)."""
    model, data = _model_and_data(trial)
    outputs: list[int] = []

    def count(_module, _inputs, out) -> None:
        outputs.append(out.numel() if isinstance(out, Tensor) else 0)

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    with torch.no_grad():
        model(probe_batch(data))
    for hook in hooks:
        hook.remove()
    params = sum(p.numel() for p in model.parameters())
    per_example = sum(outputs) / 2
    return 4.0 * (4 * params + 2 * per_example * trial.train.batch_size)
