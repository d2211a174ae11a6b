"""The preflight: a job's model and one batch of its data, checked before any trial starts.

``inspect_job`` loads the data (on the CPU), builds the model as the trials build it, works
out the masked layers (``layers.py``), and runs one batch through the model twice: as it is
and with all-ones masks on the masked layers. It catches, before anything is written or
trained: data or a model that cannot be built, labels out of range, a model whose input
does not fit the data or whose output is not ``(batch, num_classes)``, a layer that cannot
carry a mask, and retraining recipes the model or data cannot take. ``format_inspection``
renders what it found (``ticketsearch inspect``); ``needs_preflight`` says when ``run`` and
``validate`` run it (when the job names its own model, data or masked layers: a built-in
model on a built-in dataset is already checked by the spec's catalog rules, and ``run`` only
loads its data, ``check_data``). ``check_devices`` refuses a GPU the trials cannot have.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from .data import DatasetError, load_dataset
from .layers import LayerRow, layer_plan
from .models import ModelError, build_model
from .sparsity.masks import add_binary_masks
from .usercode import describe_error

__all__ = ["Inspection", "check_data", "check_devices", "format_inspection", "inspect_job",
           "needs_preflight", "summary_line"]


@dataclass(frozen=True)
class Inspection:
    """What the preflight found: the model and data (labels), the data's classes, example
    shape and split sizes, every weight layer, the parameter count and one forward pass."""

    model: str
    data: str
    num_classes: int
    input_shape: tuple[int, ...]
    sizes: dict[str, int]
    rows: list[LayerRow]
    total_params: int
    batch_shape: tuple[int, ...]
    output_shape: tuple[int, ...]

    @property
    def masked_params(self) -> int:
        return sum(row.params for row in self.rows if row.masked)


def needs_preflight(job) -> bool:
    """True when ``job`` names its own model or data, a library model, a folder of images or
    masked-layer patterns: what the spec alone cannot check."""
    model, data = job.model, job.data
    return (not model.builtin or data.factory is not None or data.dataset == "folder"
            or model.masked_layers is not None or model.unmasked_layers is not None)


def check_data(job) -> None:
    """Load the job's dataset on the CPU (what every job gets when ``inspect_job`` is not
    needed): a missing or unreadable dataset, or splits that do not fit it, raise now."""
    load_dataset(job.data, "cpu")


def check_devices(trials, on_ray: bool) -> None:
    """``train.device: cuda`` needs a GPU: one visible here for in-process trials, or
    ``resources.gpus`` > 0 for Ray trials (Ray hides the GPUs from a trial that asks none)."""
    from .spec import SpecError

    cuda = [t for t in trials if t.train.device == "cuda"]
    if not cuda:
        return
    if on_ray:
        none = [t.trial_id for t in cuda if t.resources.gpus <= 0]
        if none:
            raise SpecError(f"train.device: cuda, but resources.gpus is 0 (trial {none[0]}): "
                            "Ray gives such a trial no GPU; set resources.gpus (e.g. 1, or "
                            "0.25 to share one) or train.device: auto")
    elif not torch.cuda.is_available():
        raise SpecError("train.device: cuda, but this machine has no CUDA GPU (torch sees "
                        "none) and --in-process trains here; use train.device: auto or cpu, "
                        "or run on a cluster with GPUs")


def inspect_job(job, device: str = "cpu") -> Inspection:
    """Build ``job``'s data and model and check them together (see the module doc); raises
    DatasetError or ModelError naming the field at fault."""
    data = load_dataset(job.data, device)
    seed = job.trials()[0].seed
    torch.manual_seed(seed)
    model = build_model(job.model, data.num_classes, data.input_shape).to(device)
    rows = layer_plan(model, job.model, data.num_classes)
    x = _first_batch(job, data)
    output = _dry_forward(job, data, model, x)
    _dry_forward_masked(model, rows, x, output)
    _check_recipes(job, data)
    return Inspection(job.model.label(), job.data.label(), data.num_classes,
                      tuple(data.input_shape), dict(data.sizes), rows,
                      sum(p.numel() for p in model.parameters()), tuple(x.shape),
                      tuple(output.shape))


def _first_batch(job, data) -> torch.Tensor:
    """The first training batch's inputs, its labels checked against the classes."""
    try:
        x, y = next(iter(data.train_batches(job.train.batch_size,
                                            torch.Generator().manual_seed(0))))
    except Exception as err:
        hint = " (images of different sizes? set data.image_size)" if \
            job.data.dataset == "folder" else ""
        raise DatasetError(f"data: reading the first training batch of {job.data.label()} "
                           f"failed: {describe_error(err)}{hint}") from None
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DatasetError(f"data: {job.data.label()} has label {bad}, outside 0.."
                           f"{data.num_classes - 1} ({data.num_classes} classes)")
    return x


def _model_field(job) -> str:
    return "model.factory" if job.model.factory else "model.name"


def _dry_forward(job, data, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One batch through the model (eval mode, no grad); its output must be the logits
    ``(batch, num_classes)``."""
    field, name = _model_field(job), job.model.label()
    model.eval()
    try:
        with torch.no_grad():
            output = model(x)
    except Exception as err:
        raise ModelError(
            f"{field}: the data does not fit the model: {name} failed on a batch of shape "
            f"{tuple(x.shape)} from {job.data.label()} (examples of shape "
            f"{tuple(data.input_shape)}, {data.num_classes} classes): {describe_error(err)}; "
            "make the model take these inputs (a factory is given input_shape and "
            "num_classes)") from None
    if not isinstance(output, torch.Tensor):
        raise ModelError(f"{field}: {name} returns a {type(output).__name__}; it must "
                         f"return the logits, a tensor of shape (batch, num_classes)")
    expected = (x.shape[0], data.num_classes)
    if tuple(output.shape) != expected:
        raise ModelError(
            f"{field}: the data does not fit the model: on a batch of shape {tuple(x.shape)} "
            f"{name} returns shape {tuple(output.shape)}, but {job.data.label()} has "
            f"{data.num_classes} classes, so it must be {expected} (a factory is given "
            "num_classes)")
    return output


def _dry_forward_masked(model: torch.nn.Module, rows: list[LayerRow], x: torch.Tensor,
                        plain: torch.Tensor) -> None:
    """The same batch with all-ones masks on the masked layers gives the same output."""
    names = [row.name for row in rows if row.masked]
    masked = copy.deepcopy(model)
    layers = dict(masked.named_modules())
    try:
        add_binary_masks(masked, {n: torch.ones_like(layers[n].weight, dtype=torch.bool)
                                  for n in names})
        with torch.no_grad():
            output = masked(x)
    except Exception as err:
        raise ModelError(f"model.masked_layers: masking the weight of {', '.join(names[:4])}"
                         f"{', ...' if len(names) > 4 else ''} breaks the forward pass "
                         f"({describe_error(err)}): such a module type is not supported; "
                         "leave it out with model.unmasked_layers") from None
    if not torch.allclose(output, plain, rtol=1e-4, atol=1e-5):
        raise ModelError("model.masked_layers: with all-ones masks the model computes "
                         "something else: some masked module does not read its weight "
                         "through self.weight in forward; leave it out with "
                         "model.unmasked_layers")


def _check_recipes(job, data) -> None:
    """Activation swaps need nn.ReLU modules (own models); CutMix needs image examples."""
    if not job.retrain.enabled:
        return
    for index, recipe in enumerate(job.retrain.recipes):
        if recipe.activation != "relu" and not job.model.builtin:
            build_model(job.model, data.num_classes, data.input_shape, recipe.activation)
        if recipe.cutmix_alpha > 0 and len(data.input_shape) != 3:
            raise DatasetError(
                f"retrain.recipes[{index}].cutmix_alpha: CutMix pastes boxes between images, "
                f"but {job.data.label()} gives examples of shape {tuple(data.input_shape)}; "
                "use mixup_alpha instead or drop this recipe")


# --------------------------------------------------------------------------- rendering


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def format_inspection(found: Inspection) -> str:
    """The ``ticketsearch inspect`` report: model, data, a table of every weight layer,
    parameter counts and the forward pass."""
    sizes = ", ".join(f"{split} {count:,}" for split, count in found.sizes.items())
    head = ("layer", "type", "shape", "params", "masked", "why")
    table = [head] + [(r.name, r.kind, _shape(r.shape), f"{r.params:,}",
                       "yes" if r.masked else "no", r.why) for r in found.rows]
    widths = [max(len(row[col]) for row in table) for col in range(len(head) - 1)]
    lines = [f"model: {found.model} ({found.total_params:,} parameters)",
             f"data: {found.data}: {found.num_classes} classes, examples "
             f"{_shape(found.input_shape)}; {sizes}", ""]
    for row in table:
        cells = [row[col].rjust(widths[col]) if col == 3 else row[col].ljust(widths[col])
                 for col in range(len(widths))]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    masked = [r for r in found.rows if r.masked]
    share = found.masked_params / found.total_params if found.total_params else 0.0
    lines += ["", f"weight layers: {len(found.rows)}, masked: {len(masked)}; parameters: "
              f"{found.total_params:,}, masked: {found.masked_params:,} ({share:.1%})",
              f"forward: batch {_shape(found.batch_shape)} -> output "
              f"{_shape(found.output_shape)}"]
    return "\n".join(lines)


def summary_line(found: Inspection) -> str:
    """One line of what the preflight checked (``validate`` and ``run`` print it)."""
    masked = sum(row.masked for row in found.rows)
    return (f"preflight: {found.model} on {found.data}: {masked} of {len(found.rows)} weight "
            f"layers masked ({found.masked_params:,} of {found.total_params:,} parameters); "
            f"forward {_shape(found.batch_shape)} -> {_shape(found.output_shape)}: ok")
