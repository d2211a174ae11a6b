"""Tickets: a binary mask per masked tensor + the rewind-point state + metadata.

CS and IMP tickets are the same kind of object (plain 0/1 masks, no 1/sigmoid(s0) factor).
On disk a ticket is a directory in the format of ``sparsity/ticketfile.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .sparsity.masks import add_binary_masks, layer_densities, load_dense_state, mask_density
from .sparsity.ticketfile import WRITER_KEYS, read_ticket_dir, write_ticket_dir


@dataclass
class Ticket:
    """A winning-ticket candidate.

    ``masks``: bool tensor per masked layer (True = kept), keyed by module name.
    ``rewind_state``: every model tensor at the rewind point, under plain parameter names.
    ``meta``: method, settings, model, dataset, rewind epoch, epochs spent, accuracies, ...
    """

    name: str
    masks: dict[str, Tensor]
    rewind_state: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Fraction of masked entries that are pruned."""
        return 1.0 - mask_density(self.masks)

    def layer_densities(self) -> dict[str, float]:
        return layer_densities(self.masks)

    def build_model(self) -> nn.Module:
        """A fresh model of the ticket's architecture (from its metadata), unmasked."""
        from .models import create_model

        meta = self.meta
        return create_model(
            meta["model"], meta["num_classes"], tuple(meta["input_shape"]),
            **meta.get("model_kwargs", {}),
        )

    def apply(self, model: nn.Module | None = None) -> nn.Module:
        """Rewind ``model`` (or a fresh one) to the ticket's state and fix its masks.

        The model must be unmasked; the result trains as a sparse network whose pruned weights
        stay exactly zero in the forward pass.
        """
        model = self.build_model() if model is None else model
        load_dense_state(model, self.rewind_state)
        add_binary_masks(model, self.masks)
        return model

    def save(self, path: str | Path) -> Path:
        """Write the ticket directory at ``path`` (atomic; refuses to overwrite)."""
        meta = {"name": self.name, **self.meta}
        return write_ticket_dir(path, self.masks, self.rewind_state, meta)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description (no tensors)."""
        keys = ("method", "trial_id", "round", "val_acc", "test_acc", "search_epochs",
                "retrain_epochs", "target_sparsity", "achieved_sparsity")
        return {"name": self.name, "sparsity": self.sparsity,
                **{k: self.meta.get(k) for k in keys}}


def load_ticket(path: str | Path) -> Ticket:
    """Read a ticket directory, verifying its checksums (never unpickles anything)."""
    masks, state, meta = read_ticket_dir(path)
    own = {k: v for k, v in meta.items() if k not in WRITER_KEYS}
    name = own.pop("name", Path(path).name)
    return Ticket(name=name, masks=masks, rewind_state=state, meta=own)


def clone_state(state: dict[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Detached copies of a state dict on ``device``."""
    return {k: v.detach().to(device, copy=True) for k, v in state.items()}
