"""The training loop, evaluation, and the ledger of epochs and seconds actually spent.

One loop for every method: SGD (Nesterov by default) whose LR schedule restarts each round,
weight decay on every dense parameter and never on mask logits, an optional extra loss term
(the CS penalty), an optional per-step hook before the forward pass (the per-iteration
temperature schedule), an optional hook between backward and the optimizer step (RigL's mask
updates) and an optional batch loss replacing the plain cross-entropy (the retraining recipes'
label smoothing, mixup and CutMix). Nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sparsity.masks import mask_parameters

HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device: 'cuda' was asked for but no CUDA GPU is visible; "
                           "use 'auto' or 'cpu'")
    return torch.device(name)


def device_kind(device: torch.device) -> str:
    """Human-readable device kind for the ledger, e.g. ``cpu`` or ``cuda:NVIDIA H100``."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def make_optimizer(model: nn.Module, train) -> torch.optim.SGD:
    """SGD over all trainable parameters: weight decay on dense ones, none on mask logits."""
    logits = mask_parameters(model)
    logit_ids = {id(p) for p in logits}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in logit_ids]
    groups = [{"params": dense, "weight_decay": train.weight_decay}]
    if logits:
        groups.append({"params": logits, "weight_decay": 0.0})
    return torch.optim.SGD(
        groups, lr=train.lr, momentum=train.momentum,
        nesterov=train.nesterov and train.momentum > 0, foreach=True,
    )


def lr_for_epoch(epoch: int, train, epochs: int | None = None) -> float:
    """LR for epoch ``epoch`` (0-based) of a round of ``epochs`` epochs (default
    ``train.epochs_per_round``): ``lr * gamma ** (milestones passed)``; milestones are scaled
    to rounds of another length (``train.milestones_for``)."""
    milestones = train.lr_milestones if epochs is None else train.milestones_for(epochs)
    passed = sum(1 for m in milestones if epoch >= m)
    return train.lr * train.lr_gamma**passed


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@dataclass
class FastPath:
    """How training steps run on the device: under autocast in ``precision`` (``fp32`` =
    off; ``fp16`` with a gradient scaler), in channels-last memory format, and with the
    model ``torch.compile``-d (``compile`` = off, default or max-autotune).

    Autocast lowers only the matmuls and convolutions: weights, mask logits, the soft masks
    and the CS penalty (element-wise ops on fp32 parameters), the loss and the optimizer stay
    fp32, and evaluation never uses it (reported accuracies are fp32 numbers).
    """

    device_type: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = False
    compile: str = "off"
    scaler: torch.amp.GradScaler | None = None
    shard: Any = None  # parallel.Shard of a data-parallel trial: its part of each batch

    def __post_init__(self):
        if self.precision == "fp16" and self.scaler is None:
            self.scaler = torch.amp.GradScaler(self.device_type)

    @classmethod
    def for_trial(cls, train, device: torch.device, model: nn.Module) -> FastPath:
        """The fast path ``train`` asks for on ``device`` (``auto`` resolved: bf16 on a GPU
        that supports it, else fp16; fp32 on CPU; channels-last for conv nets on a GPU)."""
        cuda = device.type == "cuda"
        precision = train.precision
        if precision == "auto":
            precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
        channels_last = train.channels_last
        if channels_last == "auto":
            channels_last = cuda and any(isinstance(m, nn.Conv2d) for m in model.modules())
        if cuda:  # TF32 matmuls and convolutions for what stays fp32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return cls(device.type, precision, bool(channels_last), train.compile)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Put ``model`` (in place) in channels-last format and compile it, once."""
        if getattr(model, "_ticketsearch_fast", None) == (self.channels_last, self.compile):
            return model
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.compile != "off":
            model.compile(mode=self.compile)
        model._ticketsearch_fast = (self.channels_last, self.compile)
        return model

    def inputs(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self):
        return torch.autocast(self.device_type, dtype=HALF.get(self.precision),
                              enabled=self.precision in HALF)

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state(self) -> dict[str, Tensor]:
        """The gradient scaler's state as tensors (for a trial checkpoint)."""
        if self.scaler is None:
            return {}
        return {f"amp.{k}": torch.tensor(v) for k, v in self.scaler.state_dict().items()}

    def load_state(self, state: dict[str, Tensor]) -> None:
        values = {k[4:]: v.item() for k, v in state.items() if k.startswith("amp.")}
        if self.scaler is not None and values:
            self.scaler.load_state_dict(values)


PLAIN = FastPath()


@dataclass
class EpochStats:
    train_loss: float
    iterations: int
    seconds: float


def train_epoch(
    model: nn.Module,
    batches,
    optimizer: torch.optim.Optimizer,
    extra_loss: Callable[[], Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    after_backward: Callable[[int], None] | None = None,
    batch_loss: Callable[[nn.Module, Tensor, Tensor, int], Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    fast: FastPath = PLAIN,
) -> EpochStats:
    """One pass over ``batches``: loss (+ ``extra_loss()``), backward, step, as ``fast`` says
    (autocast, gradient scaling, channels-last inputs).

    The loss is ``batch_loss(model, x, y, i)`` when given, else ``cross_entropy(model(x), y)``;
    the reported ``train_loss`` is its batch-size-weighted mean. ``on_step(i)`` runs before
    step ``i`` (0-based within the epoch), ``after_backward(i)`` after its backward pass,
    before the optimizer step, and ``after_step(i)`` after the optimizer step. The batch losses are kept on the device and read once at the
    end, so the loop never syncs per step (and does no per-step bookkeeping beyond that:
    ``bench overhead`` holds it to a minimal loop).
    """
    model.train()
    start = time.perf_counter()
    losses, sizes = [], []
    for step, (x, y) in enumerate(batches):
        if on_step is not None:
            on_step(step)
        x, scale = fast.inputs(x), 1.0
        if fast.shard is not None:
            x, y, scale = fast.shard.split(x, y)
        with fast.autocast():
            if batch_loss is None:
                loss = F.cross_entropy(model(x), y)
            else:
                loss = batch_loss(model, x, y, step)
            total = loss if scale == 1.0 else loss * scale
            total = total if extra_loss is None else total + extra_loss()
        optimizer.zero_grad(set_to_none=True)
        fast.backward(total)
        if fast.shard is not None:
            fast.shard.average_gradients(model)
        if after_backward is not None:
            after_backward(step)
        fast.step(optimizer)
        if after_step is not None:
            after_step(step)
        losses.append(loss.detach())
        sizes.append(y.shape[0])
    if not sizes:
        raise ValueError("the training split is empty")
    seen = sum(sizes)
    weights = torch.tensor(sizes, dtype=torch.float32, device=losses[0].device)
    loss_sum = float(torch.stack(losses).float() @ weights)
    stats = EpochStats(loss_sum / seen, len(sizes), 0.0)
    stats.seconds = time.perf_counter() - start
    return stats


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> tuple[float, float] | None:
    """(mean loss, accuracy) over ``batches`` in eval mode; None if there are none."""
    model.eval()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    seen = 0
    for x, y in batches:
        logits = model(x)
        loss_sum = loss_sum.to(logits.device) + F.cross_entropy(logits, y, reduction="sum")
        correct = correct.to(logits.device) + (logits.argmax(1) == y).sum()
        seen += y.shape[0]
    if seen == 0:
        return None
    return float(loss_sum) / seen, float(correct) / seen


@dataclass
class LedgerEntry:
    """One epoch actually trained."""

    phase: str  # "search", "retrain", "dense" or "train" (RigL)
    round: int
    epoch: int
    seconds: float  # training time of the epoch (evaluation excluded)
    eval_seconds: float
    finished_at: float  # unix time


@dataclass
class EpochLedger:
    """Every epoch a trial trained, its seconds, and the device it ran on.

    The raw material of the cost report: counts come from epochs trained, never from the
    config. ``recomputed_epochs`` counts epochs trained again after a resume (work lost
    between the last checkpoint and a failure); they are not counted twice in ``entries``.
    """

    device: str = "cpu"
    device_fraction: float = 1.0
    entries: list[LedgerEntry] = field(default_factory=list)
    recomputed_epochs: int = 0
    attempts: list[list[float]] = field(default_factory=list)  # [start, end] unix times

    def record(self, phase: str, round: int, epoch: int, seconds: float,
               eval_seconds: float) -> LedgerEntry:
        entry = LedgerEntry(phase, round, epoch, seconds, eval_seconds, time.time())
        self.entries.append(entry)
        return entry

    def start_attempt(self) -> None:
        now = time.time()
        self.attempts.append([now, now])

    def touch(self) -> None:
        """Mark the current attempt as alive until now."""
        if self.attempts:
            self.attempts[-1][1] = time.time()

    def merge_attempts(self, windows: list[list[float]]) -> None:
        """Take in attempt windows seen elsewhere (a trial's event log): a window of a known
        attempt (same start) extends it, an unknown one is added (a killed attempt's time
        after its last checkpoint is work lost, and still time spent)."""
        known = {round(a[0], 6): a for a in self.attempts}
        for start, end in windows:
            attempt = known.get(round(start, 6))
            if attempt is None:
                self.attempts.append([start, end])
            else:
                attempt[1] = max(attempt[1], end)
        self.attempts.sort(key=lambda a: a[0])

    def epochs(self, phase: str | None = None, round: int | None = None) -> int:
        """Epochs trained, optionally only those of ``phase`` and of ``round``."""
        return sum(1 for e in self.entries if (phase is None or e.phase == phase)
                   and (round is None or e.round == round))

    def seconds(self, phase: str | None = None) -> float:
        return sum(e.seconds + e.eval_seconds for e in self.entries
                   if phase is None or e.phase == phase)

    @property
    def wall_clock_s(self) -> float:
        return sum(end - start for start, end in self.attempts)

    @property
    def device_s(self) -> float:
        return self.wall_clock_s * self.device_fraction

    def summary(self) -> dict:
        phases = sorted({e.phase for e in self.entries})
        return {
            "device": self.device,
            "device_fraction": self.device_fraction,
            "epochs": {p: self.epochs(p) for p in phases} | {"total": self.epochs()},
            "train_seconds": {p: round(self.seconds(p), 3) for p in phases},
            "recomputed_epochs": self.recomputed_epochs,
            "wall_clock_s": round(self.wall_clock_s, 3),
            "device_s": round(self.device_s, 3),
            "attempts": len(self.attempts),
            "attempt_windows": [list(a) for a in self.attempts],
        }

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EpochLedger:
        entries = [LedgerEntry(**e) for e in data.get("entries", [])]
        return cls(
            device=data.get("device", "cpu"),
            device_fraction=data.get("device_fraction", 1.0),
            entries=entries,
            recomputed_epochs=data.get("recomputed_epochs", 0),
            attempts=[list(a) for a in data.get("attempts", [])],
        )
