"""The training fast path on CPU: autocast precision (bf16, fp16 with a gradient scaler),
channels-last and torch.compile knobs, and which tensors stay fp32."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_job_dict, tiny_trial

from ticketsearch.methods import TrialRun, run_trial
from ticketsearch.models import create_model
from ticketsearch.sparsity import cs
from ticketsearch.sparsity.masks import add_soft_masks, soft_masks
from ticketsearch.spec import SpecError, load_job, parse_job
from ticketsearch.training import FastPath, make_optimizer, train_epoch


def cs_trial(precision: str, **settings):
    train = tiny_job_dict()["train"] | {"precision": precision, "epochs_per_round": 10,
                                         "lr_milestones": [9]}
    return tiny_trial("cs", {"rounds": 3, **settings}, train=train)


def test_auto_precision_is_fp32_on_cpu(digits):
    run = TrialRun(cs_trial("auto"), digits)
    assert (run.fast.precision, run.fast.channels_last, run.fast.compile) == ("fp32", False,
                                                                               "off")
    assert run.fast.scaler is None


@pytest.mark.parametrize("settings", [{"mask_init": -0.02}, {"target_sparsity": 0.9}],
                         ids=["plain", "targeted"])
def test_bf16_finds_tickets_of_the_same_sparsity(digits, settings):
    fp32 = run_trial(cs_trial("fp32", **settings), digits).tickets[0]
    bf16 = run_trial(cs_trial("bf16", **settings), digits).tickets[0]
    assert 0.5 < fp32.sparsity < 0.95
    assert bf16.sparsity == pytest.approx(fp32.sparsity, abs=0.01)
    assert bf16.meta["test_acc"] > 0.5


def test_under_bf16_autocast_only_matmuls_are_half(digits):
    model = create_model("mlp", 10, (64,), mlp_hidden=[32])
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    add_soft_masks(model, linears[:-1], 0.0)
    fast = FastPath("cpu", "bf16")
    x, y = next(iter(digits.train_batches(32, torch.Generator().manual_seed(0))))
    with fast.autocast():
        logits = model(x)
        penalty = cs.l0_penalty(model)
        loss = F.cross_entropy(logits, y)
    assert logits.dtype == torch.bfloat16
    assert penalty.dtype == torch.float32 and loss.dtype == torch.float32
    for mask in soft_masks(model).values():
        assert mask.logits.dtype == torch.float32
        with fast.autocast():
            assert mask.soft_mask().dtype == torch.float32
    optimizer = make_optimizer(model, parse_job(tiny_job_dict()).train)
    train_epoch(model, digits.train_batches(64, torch.Generator().manual_seed(0)), optimizer,
                lambda: 1e-4 * cs.l0_penalty(model), fast=fast)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp16_scales_gradients_and_checkpoints_the_scaler(digits):
    run = TrialRun(cs_trial("fp16"), digits)
    assert run.fast.scaler is not None
    result = run.run()
    assert result.tickets and all(torch.isfinite(torch.tensor(t.meta["test_acc"]))
                                  for t in result.tickets)
    state = run.state()["extra"]
    assert state["amp.scale"].item() == run.fast.scaler.get_scale() > 0
    again = FastPath("cpu", "fp16")
    again.load_state({k: v for k, v in state.items() if k.startswith("amp.")})
    assert again.scaler.get_scale() == run.fast.scaler.get_scale()


def small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 64, 10))


def image_batches(digits):
    return [(x.view(-1, 1, 8, 8), y)
            for x, y in digits.train_batches(64, torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("knob", ["channels_last", "compile"])
def test_channels_last_and_compile_train_as_the_plain_loop_does(digits, knob):
    train = parse_job(tiny_job_dict()).train
    batches = image_batches(digits)[:6]
    plain, fast_model = small_cnn(), small_cnn()
    fast = FastPath("cpu", channels_last=knob == "channels_last",
                    compile="default" if knob == "compile" else "off")
    fast.prepare(fast_model)
    if knob == "channels_last":
        assert fast_model[0].weight.is_contiguous(memory_format=torch.channels_last)
    train_epoch(plain, batches, make_optimizer(plain, train))
    train_epoch(fast_model, batches, make_optimizer(fast_model, train), fast=fast)
    for (name, a), b in zip(plain.state_dict().items(), fast_model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name


def test_the_knobs_are_checked_and_yaml_off_means_off(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: j\ndata: {dataset: digits}\nmodel: {name: mlp}\n"
                    "train: {compile: off, precision: bf16, channels_last: true}\n"
                    "methods: {dense: {}}\n")
    train = load_job(spec).train
    assert (train.compile, train.precision, train.channels_last) == ("off", "bf16", True)
    with pytest.raises(SpecError, match="train.precision"):
        parse_job(tiny_job_dict() | {"train": {"precision": "fp8"}})
    with pytest.raises(SpecError, match="train.compile"):
        parse_job(tiny_job_dict() | {"train": {"compile": "fast"}})
    default = parse_job(tiny_job_dict())
    assert default.spec_hash() == parse_job(
        tiny_job_dict() | {"train": tiny_job_dict()["train"] | {"precision": "auto"}}).spec_hash()


def test_the_gpu_check_skips_cleanly_without_a_gpu():
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: tools/gpu-check would run for real")
    script = Path(__file__).resolve().parents[1] / "tools" / "gpu-check"
    done = subprocess.run([str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stderr
    assert "no CUDA GPU visible" in done.stdout and "skipped" in done.stdout


def test_bench_precision_and_methods_print_their_tables(capsys):
    from ticketsearch import cli

    assert cli.main(["bench", "precision", "--images", "256", "--repeats", "1",
                     "--configs", "fp32,bf16", "--device", "cpu"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["config", "device", "images", "epoch_s", "epochs/s", "speed-up"]
    assert [line.split()[0] for line in table[1:]] == ["fp32", "bf16"]
    assert table[1].split()[-1] == "1.0"
    assert cli.main(["bench", "precision", "--configs", "fp8"]) == 2
    assert "unknown ['fp8']" in capsys.readouterr().err
    assert cli.main(["bench", "methods", "--images", "128", "--epochs", "1",
                     "--device", "cpu"]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [r.split()[0] for r in rows] == ["dense", "cs", "imp", "rigl"]
