"""Your own data: a ``data.factory`` returning splits, and ``data.dataset: folder``.

A data factory is called with ``data.kwargs`` and returns a dict of splits::

    {"train": (x, y), "val": (x, y), "test": (x, y)}      # val, test optional

``x`` a float array or tensor of shape ``(N, ...)``, ``y`` integer class labels of shape
``(N,)``, as numpy arrays or torch tensors: held whole on the training device like digits
(``data.TensorDataset``). Or the same dict with ``torch.utils.data.Dataset`` values yielding
``(x, y)`` pairs: streamed through a DataLoader like ImageNet (``StreamedDataset``). An
optional ``"num_classes"`` entry sets the number of classes (default: the largest label + 1;
a torch Dataset's ``classes`` or ``targets`` also tell it).

Missing splits are split off ``train`` with ``data.split_seed``: ``test`` takes 20 %, then
``val`` takes ``data.val_size`` (default 10 % of the rest). Arrays are split stratified
(scikit-learn's ``train_test_split``, as digits is); torch Datasets by a seeded permutation
(as ImageNet is).

``data.dataset: folder`` reads an ImageFolder tree: ``data.root/<class>/*`` or
``data.root/train`` (``val``, ``test`` optional) of class folders, RGB images normalised with
the ImageNet statistics, resized when ``data.image_size`` is set.

Every mistake raises ``DatasetError`` naming ``data.factory`` (or ``data.root``) and the split.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import (
    EVAL_SPLITS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SPLITS,
    Dataset,
    DatasetError,
    TensorDataset,
)
from .usercode import UserCodeError, call_factory, import_factory

__all__ = ["StreamedDataset", "load_factory_dataset", "load_folder"]

TEST_FRACTION = 0.2
VAL_FRACTION = 0.1
FIELD = "data.factory"
TorchDataset = torch.utils.data.Dataset


class StreamedDataset(Dataset):
    """Splits held as torch Datasets, batched by a DataLoader and moved to ``device``.

    ``splits`` maps "train", "val", "test" to torch Datasets yielding ``(x, y)``; a split
    may be empty (a dataset of length 0).
    """

    def __init__(self, name: str, splits: dict[str, TorchDataset], num_classes: int,
                 input_shape: tuple[int, ...], device: torch.device, num_workers: int,
                 augment: bool = False) -> None:
        self.name, self.num_classes, self.input_shape = name, num_classes, tuple(input_shape)
        self.device, self.num_workers, self.augment = device, num_workers, augment
        self._splits = splits
        self.sizes = {split: len(splits[split]) for split in SPLITS}

    def _batches(self, split: str, batch_size: int,
                 seed: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        shuffle = None if seed is None else torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(
            self._splits[split], batch_size=batch_size, shuffle=seed is not None,
            generator=shuffle, num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda")
        for x, y in loader:
            yield (x.to(self.device, dtype=torch.float32, non_blocking=True),
                   torch.as_tensor(y).to(self.device, dtype=torch.int64, non_blocking=True))

    def train_batches(self, batch_size: int,
                      generator: torch.Generator) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.train_batches``: the shuffle seed is one draw from ``generator``."""
        _check_batch_size(batch_size)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return self._batches("train", batch_size, seed)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.eval_batches``."""
        if split not in EVAL_SPLITS:
            raise ValueError(f"split must be one of {list(EVAL_SPLITS)}, got {split!r}")
        _check_batch_size(batch_size)
        if self.sizes[split] == 0:
            return iter(())
        return self._batches(split, batch_size, None)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# --------------------------------------------------------------------------- the factory


def load_factory_dataset(spec: Any, device: torch.device) -> Dataset:
    """Call ``spec.factory`` with ``spec.kwargs`` and hold (arrays) or stream (torch
    Datasets) what it returns; see the module doc."""
    try:
        factory = import_factory(spec.factory, FIELD)
        value = call_factory(factory, FIELD, spec.factory, spec.kwargs)
    except UserCodeError as err:
        raise DatasetError(str(err)) from None
    splits, num_classes = _read_splits(value, spec.factory)
    if any(isinstance(part, TorchDataset) for part in splits.values()):
        return _streamed(spec, splits, num_classes, device)
    return _held(spec, splits, num_classes, device)


def _read_splits(value: Any, path: str) -> tuple[dict[str, Any], int | None]:
    """The splits of a factory's result and its ``num_classes`` entry (None if absent)."""
    shape_hint = ("return {'train': (x, y), 'val': (x, y), 'test': (x, y)} (val and test "
                  "optional) with numpy arrays or tensors, or torch Datasets as values")
    if not isinstance(value, Mapping):
        raise DatasetError(f"{FIELD}: {path} returned a {type(value).__name__}, not a dict "
                           f"of splits; {shape_hint}")
    unknown = sorted(str(key) for key in value if key not in (*SPLITS, "num_classes"))
    if unknown or "train" not in value:
        what = f"unknown keys {unknown}" if unknown else "no 'train' split"
        raise DatasetError(f"{FIELD}: {path} returned a dict with {what}; {shape_hint}")
    num_classes = value.get("num_classes")
    if num_classes is not None and not (isinstance(num_classes, int | np.integer)
                                        and num_classes >= 2):
        raise DatasetError(f"{FIELD}: {path} returned num_classes={num_classes!r}; it must "
                           "be an integer of at least 2")
    splits = {split: value[split] for split in SPLITS if split in value}
    for split, part in splits.items():
        if not (isinstance(part, TorchDataset) or
                (isinstance(part, tuple | list) and len(part) == 2)):
            raise DatasetError(f"{FIELD}: split {split!r} is a {type(part).__name__}; "
                               f"expected an (x, y) pair or a torch Dataset; {shape_hint}")
    return splits, None if num_classes is None else int(num_classes)


def _held(spec: Any, splits: dict[str, Any], num_classes: int | None,
          device: torch.device) -> TensorDataset:
    pairs = {split: _tensor_pair(split, *part) for split, part in splits.items()}
    shape = tuple(pairs["train"][0].shape[1:])
    for split, (x, _) in pairs.items():
        if tuple(x.shape[1:]) != shape:
            raise DatasetError(f"{FIELD}: split {split!r} has examples of shape "
                               f"{tuple(x.shape[1:])}, but train's are {shape}")
    num_classes = _check_labels(pairs, num_classes)
    pairs = _fill_held(spec, pairs)
    augment = bool(spec.augment)
    return TensorDataset(spec.factory, num_classes, shape, pairs, device, augment)


def _tensor_pair(split: str, x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` as tensors, checked: x floating ``(N, ...)``, y integer ``(N,)``, N > 0."""
    for name, array in (("x", x), ("y", y)):
        if not isinstance(array, np.ndarray | Tensor):
            raise DatasetError(f"{FIELD}: split {split!r} {name} is a {type(array).__name__}; "
                               "use a numpy array or a torch tensor")
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if x.ndim < 2:
        raise DatasetError(f"{FIELD}: split {split!r} x has shape {tuple(x.shape)}; it must "
                           "be (N, ...) with one row per example")
    if not x.is_floating_point():
        raise DatasetError(f"{FIELD}: split {split!r} x has dtype {x.dtype}; x must be "
                           "floating point (convert and scale it in your loader, e.g. "
                           "x.astype('float32') / 255)")
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DatasetError(f"{FIELD}: split {split!r} labels y have dtype {y.dtype} and shape "
                           f"{tuple(y.shape)}; they must be integer class indices of shape "
                           "(N,)")
    if len(x) != len(y):
        raise DatasetError(f"{FIELD}: split {split!r} has {len(x)} examples but {len(y)} "
                           "labels")
    if len(y) == 0:
        raise DatasetError(f"{FIELD}: split {split!r} is empty; leave it out to split it "
                           "off train, or give it examples")
    if not torch.isfinite(x).all():
        raise DatasetError(f"{FIELD}: split {split!r} x holds NaN or infinite values")
    return x.float(), y.long()


def _check_labels(pairs: dict[str, tuple[Tensor, Tensor]], num_classes: int | None) -> int:
    """The number of classes (given, or the largest label + 1), every label checked in it."""
    largest = max(int(y.max()) for _, y in pairs.values())
    count = num_classes if num_classes is not None else largest + 1
    for split, (_, y) in pairs.items():
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= count:
            bad = low if low < 0 else high
            classes = f"{count} class" + ("es" if count != 1 else "")
            raise DatasetError(f"{FIELD}: split {split!r} has label {bad}, outside 0..{count - 1} "
                               f"({classes}); labels must be class indices from 0")
    if count < 2:
        raise DatasetError(f"{FIELD}: every label is 0: a classifier needs at least 2 "
                           "classes")
    return count


def _fill_held(spec: Any, pairs: dict[str, tuple[Tensor, Tensor]]
               ) -> dict[str, tuple[Tensor, Tensor]]:
    """Split the missing test, then val, off train (stratified, seeded)."""
    pairs = dict(pairs)
    for split in ("test", "val"):
        if split in pairs:
            continue
        x, y = pairs["train"]
        count = _held_out_count(spec, split, len(y))
        keep, held = _stratified(y.cpu().numpy(), count, spec.split_seed)
        pairs["train"], pairs[split] = (x[keep], y[keep]), (x[held], y[held])
    return pairs


def _held_out_count(spec: Any, split: str, available: int) -> int:
    if split == "val" and spec.val_size is not None:
        count = spec.val_size
    else:
        fraction = TEST_FRACTION if split == "test" else VAL_FRACTION
        count = max(1, round(fraction * available)) if available > 1 else 0
    if count >= available:
        raise DatasetError(f"{FIELD}: split 'train' has {available} examples, too few to split "
                           f"off {count} for {split}; give a {split} split or lower "
                           "data.val_size")
    return count


def _stratified(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices, ``count`` held out, stratified when every class allows it."""
    from sklearn.model_selection import train_test_split

    index = np.arange(labels.shape[0])
    if count == 0:
        return index, index[:0]
    try:
        keep, held = train_test_split(index, test_size=count, stratify=labels,
                                      random_state=seed)
    except ValueError:  # a class too small to stratify
        keep, held = train_test_split(index, test_size=count, random_state=seed)
    return np.sort(keep), np.sort(held)


# --------------------------------------------------------------------------- streamed


def _streamed(spec: Any, splits: dict[str, Any], num_classes: int | None,
              device: torch.device) -> StreamedDataset:
    sets = {split: _as_torch_dataset(split, part) for split, part in splits.items()}
    shape = _example_shape("train", sets["train"])
    for split, part in sets.items():
        if split != "train" and _example_shape(split, part) != shape:
            raise DatasetError(f"{FIELD}: split {split!r} has examples of shape "
                               f"{_example_shape(split, part)}, but train's are {shape}")
    count = num_classes or _classes_of(sets["train"])
    sets = _fill_streamed(spec, sets, sets["train"])
    return StreamedDataset(spec.factory, sets, count, shape, device, spec.num_workers)


def _as_torch_dataset(split: str, part: Any) -> TorchDataset:
    if isinstance(part, TorchDataset):
        return part
    return torch.utils.data.TensorDataset(*_tensor_pair(split, *part))


def _example_shape(split: str, part: TorchDataset, field: str = FIELD) -> tuple[int, ...]:
    """The shape of the first example of a torch Dataset yielding ``(x, y)``, checked."""
    if len(part) == 0:
        raise DatasetError(f"{field}: split {split!r} is empty; leave it out to split it off "
                           "train, or give it examples")
    example = part[0]
    if not (isinstance(example, tuple | list) and len(example) == 2):
        raise DatasetError(f"{field}: split {split!r} yields {type(example).__name__}s; a "
                           "torch Dataset must yield (x, y) pairs")
    x, y = example
    if not (isinstance(x, Tensor) and x.is_floating_point()):
        raise DatasetError(f"{field}: split {split!r} yields x of type {type(x).__name__}; x "
                           "must be a float tensor (add a transform such as ToTensor)")
    if not isinstance(y, int | np.integer) and not (
            isinstance(y, Tensor) and y.ndim == 0 and not y.is_floating_point()):
        raise DatasetError(f"{field}: split {split!r} yields labels of type "
                           f"{type(y).__name__}; labels must be integer class indices")
    return tuple(x.shape)


def _classes_of(train: TorchDataset) -> int:
    classes = getattr(train, "classes", None)
    if classes is not None:
        return len(classes)
    targets = getattr(train, "targets", None)
    if targets is not None and len(targets):
        return int(max(int(t) for t in targets)) + 1
    if isinstance(train, torch.utils.data.TensorDataset):
        return int(train.tensors[1].max()) + 1
    raise DatasetError(f"{FIELD}: cannot tell the number of classes of the streamed train "
                       "split (no classes or targets attribute); add 'num_classes': N to the "
                       "dict your loader returns")


def _fill_streamed(spec: Any, sets: dict[str, TorchDataset],
                   eval_view: TorchDataset) -> dict[str, TorchDataset]:
    """Split the missing test, then val, off train by a seeded permutation; the held-out
    parts read ``eval_view`` (train's examples without augmentation)."""
    missing = [split for split in ("test", "val") if split not in sets]
    if not missing:
        return sets
    train = sets["train"]
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(
        int(spec.split_seed))).tolist()
    sets = dict(sets)
    for split in missing:
        count = _held_out_count(spec, split, len(order))
        held, order = sorted(order[:count]), order[count:]
        sets[split] = torch.utils.data.Subset(eval_view, held)
    sets["train"] = torch.utils.data.Subset(train, sorted(order))
    return sets


# --------------------------------------------------------------------------- folder


def load_folder(spec: Any, device: torch.device) -> StreamedDataset:
    """An ImageFolder tree under ``spec.root`` (see the module doc), streamed."""
    root = Path(str(spec.root)).expanduser()
    parts = ({split: root / split for split in SPLITS if (root / split).is_dir()}
             if (root / "train").is_dir() else {"train": root})
    eval_transform = _folder_transform(spec.image_size, None)
    views = {split: _image_folder(path, eval_transform) for split, path in parts.items()}
    classes = views["train"].classes
    for split, view in views.items():
        if view.classes != classes:
            raise DatasetError(f"data.root: {parts[split]} has classes {view.classes[:5]}, "
                               f"but {parts['train']} has {classes[:5]}; every split needs "
                               "the same class folders")
    shape = _example_shape("train", views["train"], "data.root")
    sets: dict[str, TorchDataset] = dict(views)
    augment = bool(spec.augment)
    if augment:
        sets["train"] = copy.copy(views["train"])
        sets["train"].transform = _folder_transform(spec.image_size, shape[1:])
    sets = _fill_streamed(spec, sets, views["train"])
    return StreamedDataset("folder", sets, len(classes), shape, device, spec.num_workers,
                           augment)


def _folder_transform(size: int | None, crop: tuple[int, ...] | None) -> Any:
    """ToTensor + ImageNet normalisation, after a resize to ``size``; with ``crop`` (the
    image's (H, W)) also a random crop (padding 4) and a horizontal flip."""
    from torchvision import transforms

    steps: list[Any] = [transforms.Resize(size), transforms.CenterCrop(size)] if size else []
    if crop is not None:
        steps += [transforms.RandomCrop(tuple(crop), padding=4),
                  transforms.RandomHorizontalFlip()]
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def _image_folder(path: Path, transform: Any) -> Any:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DatasetError(f"data.root: {path} is not a folder; point data.root at a folder "
                           "of class subfolders (or of train/, val/, test/ folders of them)")
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as err:
        raise DatasetError(f"data.root: {path} holds no class folders with images ({err}); "
                           f"expected {path}/<class>/<image>") from None
