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

from .sparsity.masks import (
    add_binary_masks,
    dense_state_dict,
    layer_densities,
    load_dense_state,
    mask_density,
    masked_modules,
)
from .sparsity.ticketfile import (
    WRITER_KEYS,
    read_ticket_dir,
    read_trained_state,
    write_ticket_dir,
)


@dataclass
class Ticket:
    """A winning-ticket candidate.

    ``masks``: bool tensor per masked layer (True = kept), keyed by module name.
    ``rewind_state``: every model tensor at the rewind point, under plain parameter names.
    ``meta``: method, settings, model, dataset, rewind epoch, epochs spent, accuracies, ...
    ``trained``: the retrained sparse model behind the reported accuracy (plain names, masks
    multiplied in; built with activation ``meta["trained_activation"]``), or None.
    """

    name: str
    masks: dict[str, Tensor]
    rewind_state: dict[str, Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    trained: dict[str, Tensor] | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of masked entries that are pruned."""
        return 1.0 - mask_density(self.masks)

    def layer_densities(self) -> dict[str, float]:
        return layer_densities(self.masks)

    def build_model(self) -> nn.Module:
        """A fresh model of the ticket's architecture, unmasked: built from its metadata
        (the built-in model, library model or factory and its kwargs; a factory must be
        importable here)."""
        from .models import model_from_meta

        return model_from_meta(self.meta)

    def apply(self, model: nn.Module | None = None) -> nn.Module:
        """Rewind ``model`` (or a fresh one) to the ticket's state and fix its masks.

        The model must be unmasked and built as the ticket's was (same factory, kwargs and
        data shape); TicketMismatchError lists how it differs otherwise. The result trains as
        a sparse network whose pruned weights stay exactly zero in the forward pass.
        """
        model = self.build_model() if model is None else model
        check_fits(self, model)
        load_dense_state(model, self.rewind_state)
        add_binary_masks(model, self.masks)
        return model

    def trained_model(self) -> nn.Module:
        """The trained sparse model behind the ticket's reported accuracy: a plain model (no
        masks; pruned weights are zeros) in eval mode. ValueError if the ticket has none."""
        from .models import model_from_meta

        if self.trained is None:
            raise ValueError(f"ticket {self.name!r} holds no trained weights (retraining was "
                             "off, or it was written before tickets kept them)")
        model = model_from_meta(self.meta, self.meta.get("trained_activation", "relu"))
        load_dense_state(model, self.trained)
        return model.eval()

    def save(self, path: str | Path) -> Path:
        """Write the ticket directory at ``path`` (atomic; refuses to overwrite)."""
        meta = {"name": self.name, **self.meta}
        return write_ticket_dir(path, self.masks, self.rewind_state, meta, trained=self.trained)

    def summary(self) -> dict[str, Any]:
        """Small JSON-able description (no tensors)."""
        keys = ("method", "trial_id", "round", "val_acc", "test_acc", "search_epochs",
                "retrain_epochs", "target_sparsity", "achieved_sparsity")
        return {"name": self.name, "sparsity": self.sparsity,
                **{k: self.meta.get(k) for k in keys}}


class TicketMismatchError(ValueError):
    """A ticket applied to a model it was not made for (other layer names or shapes)."""


def check_fits(ticket: Ticket, model: nn.Module, shown: int = 5) -> None:
    """Raise TicketMismatchError unless ``model`` is unmasked and has the ticket's masked
    layers and state tensors under the same names with the same shapes."""
    if masked_modules(model):
        raise TicketMismatchError(f"ticket {ticket.name!r}: the model already carries masks; "
                                  "apply the ticket to a freshly built model")
    problems = _shape_problems("layer", {n: t.shape for n, t in ticket.masks.items()},
                               _weight_shapes(model))
    state = {n: t.shape for n, t in dense_state_dict(model, clone=False).items()}
    problems += _shape_problems("tensor", {n: t.shape for n, t in ticket.rewind_state.items()},
                                state, both_ways=True)
    if problems:
        more = f" (and {len(problems) - shown} more)" if len(problems) > shown else ""
        raise TicketMismatchError(
            f"ticket {ticket.name!r} does not fit this model: {'; '.join(problems[:shown])}"
            f"{more}. The ticket was made for {_made_for(ticket.meta)}; build the model the "
            "same way")


def _weight_shapes(model: nn.Module) -> dict[str, torch.Size]:
    return {name: module.weight.shape for name, module in model.named_modules()
            if isinstance(getattr(module, "weight", None), Tensor)}


def _shape_problems(kind: str, ticket: dict, model: dict, both_ways: bool = False) -> list[str]:
    problems = [f"{kind} {name!r} is not in the model" for name in ticket if name not in model]
    problems += [f"{kind} {name!r} has shape {tuple(model[name])} in the model but "
                 f"{tuple(shape)} in the ticket"
                 for name, shape in ticket.items() if name in model and model[name] != shape]
    if both_ways:
        problems += [f"the model's {kind} {name!r} is not in the ticket"
                     for name in model if name not in ticket]
    return problems


def _made_for(meta: dict[str, Any]) -> str:
    what = (f"model.factory {meta['model_factory']}" if meta.get("model_factory")
            else f"model {meta.get('model')}")
    kwargs = meta.get("model_kwargs")
    return (f"{what} with kwargs {kwargs}, {meta.get('num_classes')} classes and input "
            f"shape {meta.get('input_shape')}")


def load_ticket(path: str | Path) -> Ticket:
    """Read the ticket in directory ``path``, verifying its checksums (never unpickles
    anything). (``ticketsearch.load_ticket`` also takes MLflow artifact URIs.)"""
    return load_ticket_dir(Path(path))


def is_artifact_uri(path: str | Path) -> bool:
    """True if ``path`` names an MLflow artifact (``runs:/...``, ``models:/...``, or any
    ``scheme://...``) rather than a local directory."""
    text = str(path)
    return "://" in text or text.startswith(("runs:/", "models:/"))


def load_ticket_dir(path: Path, name: str | None = None) -> Ticket:
    """The ticket in directory ``path``; its name is the recorded one, else ``name``, else
    the directory's name."""
    masks, state, meta = read_ticket_dir(path)
    own = {k: v for k, v in meta.items() if k not in WRITER_KEYS}
    name = own.pop("name", name or path.name)
    return Ticket(name=name, masks=masks, rewind_state=state, meta=own,
                  trained=read_trained_state(path))


def clone_state(state: dict[str, Tensor], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Detached copies of a state dict on ``device``."""
    return {k: v.detach().to(device, copy=True) for k, v in state.items()}
