"""Data-parallel training of one trial: every worker (rank) of a ``torch.distributed`` process
group runs the same ``TrialRun`` on its shard of each global batch, through
DistributedDataParallel.

- The global batch stays ``train.batch_size``: every rank draws the same batch (one seed, one
  data order) and trains on its contiguous part of it (``torch.tensor_split``); its loss is
  scaled by ``examples on this rank * world / global batch``, so DDP's mean over ranks is the
  gradient of the global batch's mean loss, with the LR unchanged.
- BatchNorm becomes SyncBatchNorm (``GlobalBatchNorm`` on CPUs, where torch's needs GPU
  modules): statistics over the global batch, as one worker has them.
- CS mask logits are ordinary parameters (DDP averages their gradients); masks and BN
  statistics are buffers DDP keeps equal. Weights start equal (same seed), so IMP's pruning
  and RigL's updates decide identically on every rank.
- Rank 0 alone reports: events, checkpoints, tickets, MLflow. The other ranks read its
  checkpoint when the trial resumes, so every rank continues from the same point.

Who starts the workers is the executor's business (``cluster.py`` launches them through Ray
Train); this module imports neither Ray nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .hooks import Hooks


@dataclass
class Shard:
    """This rank's place in the process group."""

    rank: int
    world: int
    wrapped: tuple[nn.Module, nn.Module] | None = None  # the last model and what trains it

    @classmethod
    def current(cls) -> Shard | None:
        """The process group's rank and size, or None outside a group of several."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    def split(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
        """This rank's part of a global batch and its loss scale."""
        part_x, part_y = torch.tensor_split(x, self.world)[self.rank], \
            torch.tensor_split(y, self.world)[self.rank]
        return part_x, part_y, part_y.shape[0] * self.world / y.shape[0]

    def module(self, model: nn.Module, device: torch.device) -> nn.Module:
        """What trains ``model`` on this rank (``wrap``-ped once per model)."""
        if self.wrapped is None or self.wrapped[0] is not model:
            self.wrapped = (model, self.wrap(model, device))
        return self.wrapped[1]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """``model`` with synchronised BatchNorm (in place); on GPUs inside
        DistributedDataParallel. On CPUs the model itself: ``average_gradients`` after each
        backward pass does DDP's work there (DDP's all-reduces, overlapping the backward pass,
        would interleave with GlobalBatchNorm's own in a different order on each rank)."""
        cuda = device.type == "cuda"
        sync_batch_norm(model, cuda)
        if not cuda:
            return model
        from torch.nn.parallel import DistributedDataParallel

        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index])

    def average(self, tensors: dict[str, Tensor]) -> None:
        """Replace each tensor (in place) by its mean over the ranks."""
        import torch.distributed as dist

        for tensor in tensors.values():
            dist.all_reduce(tensor)
            tensor /= self.world

    def average_gradients(self, model: nn.Module) -> None:
        """Mean of every gradient over the ranks (CPU workers; DDP does it on GPUs)."""
        import torch.distributed as dist

        if isinstance(model, nn.parallel.DistributedDataParallel):
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def sync_batch_norm(model: nn.Module, cuda: bool) -> None:
    """Replace every BatchNorm of ``model`` by one whose training statistics are the global
    batch's, holding the same tensors: torch's SyncBatchNorm on GPUs, ``GlobalBatchNorm``
    on CPUs (torch's works on GPU modules only)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.SyncBatchNorm | GlobalBatchNorm):
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child) if cuda
                    else GlobalBatchNorm.of(child))
        else:
            sync_batch_norm(child, cuda)


class SumOverRanks(torch.autograd.Function):
    """The sum of a tensor over the ranks, differentiable: the gradient is summed too."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        import torch.distributed as dist

        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        import torch.distributed as dist

        total = grad.contiguous().clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch of a CPU process group: in training, every rank's
    per-channel sums (of x, then of the squared deviations from the global mean) are summed
    over the ranks, differentiably, so the normalisation, its gradient and the running
    statistics are those of one worker seeing the whole batch."""

    @classmethod
    def of(cls, bn: nn.modules.batchnorm._BatchNorm) -> GlobalBatchNorm:
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        new.weight, new.bias = bn.weight, bn.bias
        new.running_mean, new.running_var = bn.running_mean, bn.running_var
        new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input (got {input.dim()}-d)")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        channels, dims = x.shape[1], [0, *range(2, x.dim())]
        shape = [1, channels] + [1] * (x.dim() - 2)
        total = SumOverRanks.apply(x.new_full((1,), x.numel() // channels))
        mean = SumOverRanks.apply(x.sum(dims)) / total  # two passes, as BatchNorm: no
        centred = x - mean.view(shape)  # cancellation in E[x^2] - mean^2
        var = SumOverRanks.apply((centred * centred).sum(dims)) / total
        self._track(mean.detach(), var.detach() * total / (total - 1))
        out = centred * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @torch.no_grad()
    def _track(self, mean: Tensor, unbiased_var: Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked += 1
        momentum = self.momentum if self.momentum is not None \
            else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        self.running_var.mul_(1 - momentum).add_(unbiased_var, alpha=momentum)


class FollowerHooks(Hooks):
    """A rank other than 0: reads the trial's checkpoint (to resume where rank 0 does) and
    reports nothing."""

    def __init__(self, leader: Hooks):
        self.leader = leader

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self.leader.load_checkpoint()

    def epochs_reported(self) -> int:
        return self.leader.epochs_reported()

    def attempt_windows(self) -> list[list[float]]:
        return self.leader.attempt_windows()
