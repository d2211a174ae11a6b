"""CUDA checks (``pytest -m gpu``; ``tools/gpu-check`` runs them on a GPU machine). Every test
skips cleanly where no CUDA GPU is visible, as on CI."""

import pytest
import torch
from conftest import tiny_job_dict, tiny_trial

from ticketsearch.data import load_dataset
from ticketsearch.methods import TrialRun
from ticketsearch.spec import parse_job
from ticketsearch.training import FastPath

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")]

METHODS = {"dense": {}, "cs": {"rounds": 2}, "imp": {"rounds": 2},
           "rigl": {"sparsity": 0.8, "update_interval": 2}}


def cuda_trial(method: str, settings: dict | None = None, top: dict | None = None, **train):
    values = tiny_job_dict()["train"] | {"device": "cuda", "epochs_per_round": 2,
                                         "lr_milestones": [1], "rewind_epoch": 1, **train}
    return tiny_trial(method, settings if settings is not None else METHODS[method],
                      train=values, **(top or {}))


@pytest.fixture(scope="module")
def cuda_digits():
    job = parse_job(tiny_job_dict())
    return load_dataset(job.data, "cuda")


def test_data_lives_on_the_gpu(cuda_digits):
    x, y = next(iter(cuda_digits.train_batches(32, torch.Generator().manual_seed(0))))
    assert x.is_cuda and y.is_cuda


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_the_gpu(method, cuda_digits):
    run = TrialRun(cuda_trial(method), cuda_digits)
    result = run.run()
    assert all(p.is_cuda for p in run.model.parameters())
    assert result.ledger.device.startswith("cuda:")
    assert (method == "dense") or result.tickets


def test_auto_precision_on_a_gpu_is_half_with_fp32_masks(cuda_digits):
    run = TrialRun(cuda_trial("cs"), cuda_digits)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert run.fast.precision == expected
    result = run.run()
    assert result.tickets[0].meta["test_acc"] > 0.3
    assert torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_each_precision_trains(precision, cuda_digits):
    result = TrialRun(cuda_trial("cs", precision=precision), cuda_digits).run()
    assert result.tickets and result.tickets[0].meta["test_acc"] > 0.3


@pytest.mark.parametrize("knobs", [{"channels_last": True}, {"compile": "default"}])
def test_channels_last_and_compile_on_a_conv_net(knobs):
    top = {"model": {"name": "resnet20"}, "data": {
        "dataset": "synthetic", "synthetic_shape": [3, 32, 32], "synthetic_size": 256}}
    trial = cuda_trial("dense", {}, top, **knobs)
    run = TrialRun(trial, load_dataset(trial.data, "cuda"))
    run.run()
    if knobs.get("channels_last"):
        assert run.model.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_shared_gpu_caps_the_trial_memory():
    from ticketsearch.cluster import _configure_torch

    trial = cuda_trial("dense", {})
    trial = trial.model_copy(update={"resources": trial.resources.model_copy(
        update={"gpus": 0.25, "cpus": 1})})
    _configure_torch(trial)
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(int(total * 0.3), dtype=torch.uint8, device="cuda")
    torch.cuda.set_per_process_memory_fraction(1.0)


def test_the_fast_path_defaults_on_cuda():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten())
    fast = FastPath.for_trial(parse_job(tiny_job_dict()).train, torch.device("cuda"), model)
    assert fast.channels_last and fast.compile == "off"


def test_a_fused_group_trains_on_the_gpu_as_its_members_do():
    """The grouped-convolution path (the one GPUs take) in float64 on CUDA: one fused round
    of three resnet20 members equals each member's own (as test_fusion checks on CPUs)."""
    import test_fusion
    from test_fusion import NoStore, member_trials, one_round, relative_error

    from ticketsearch.hooks import Hooks
    from ticketsearch.methods.group import GroupRun

    torch.set_default_dtype(torch.float64)
    try:
        cuda = {"device": "cuda", "precision": "fp32", "channels_last": False}
        trials = [t.model_copy(update={"train": t.train.model_copy(update=cuda)})
                  for t in member_trials({"name": "resnet20"}, {
                      "dataset": "synthetic", "synthetic_shape": [3, 32, 32],
                      "synthetic_size": 64})]
        data = test_fusion.small_data(trials[0])
        data._splits = {k: (x.cuda(), y.cuda()) for k, (x, y) in data._splits.items()}
        data.device = torch.device("cuda")
        group = GroupRun(trials, data, [Hooks() for _ in trials], NoStore())
        group.begin()
        group.enter("search")
        fused = one_round(group, group.new_model(), [t.settings for t in trials],
                          group.members)
        weights = dict(fused.named_parameters())
        for member, trial in enumerate(trials):
            run = TrialRun(trial, data, Hooks())
            run.begin()
            run.enter("search")
            alone = one_round(run, run.new_model(), [trial.settings], [run])
            for name, want in alone.named_parameters():
                if ".bank." not in name:
                    assert relative_error(weights[name][member], want) < 1e-5, name
    finally:
        torch.set_default_dtype(torch.float32)
