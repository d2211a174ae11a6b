"""Dataset registry: every dataset yields batches already on the training device.

Small datasets (digits, synthetic, mnist, cifar10, cifar100) are held whole as tensors on
the device; an epoch is a device-side permutation plus a vectorised crop+flip, so the hot
loop runs no per-example Python. ImageNet streams through torchvision's ImageFolder and a
DataLoader. ``load_dataset(spec, device)`` is the single entry point; the dataset names and
loader paths are written in ``catalog.DATASETS``, from which ``_LOADERS`` is derived.

Randomness contract: ``train_batches`` draws everything it needs for the epoch from the
caller's CPU ``torch.Generator`` at call time (before the first batch), so saving the
generator state before the call and restoring it later replays the same epoch exactly.
"""

from __future__ import annotations

import abc
import copy
import gzip
import math
import pickle
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import catalog

SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("val", "test")
CROP_PADDING = 4

CIFAR10_MEAN = (0.491, 0.482, 0.447)
CIFAR10_STD = (0.247, 0.243, 0.262)
CIFAR100_MEAN = (0.507, 0.487, 0.441)
CIFAR100_STD = (0.267, 0.256, 0.276)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


class DatasetError(ValueError):
    """A dataset problem the user can fix: missing or corrupt files, a bad root, a bad size."""


# --------------------------------------------------------------------------- base classes


class Dataset(abc.ABC):
    """What the training loop sees of a dataset.

    Attributes: ``name``, ``num_classes``, ``input_shape`` (per example, e.g. ``(3, 32, 32)``),
    ``sizes`` (``{"train": n, "val": n, "test": n}``), ``device`` (where batches live) and
    ``augment`` (whether ``train_batches`` augments).
    """

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    sizes: dict[str, int]
    device: torch.device
    augment: bool

    @abc.abstractmethod
    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """One epoch of shuffled (and, if ``augment``, augmented) training batches.

        ``generator`` is a CPU generator; all of the epoch's random draws are taken from it
        when this method is called. ``x`` is float32, ``y`` int64, both on ``device``. The
        last partial batch is kept.
        """

    def num_train_batches(self, batch_size: int) -> int:
        """Number of batches ``train_batches(batch_size, ...)`` yields (last partial one included)."""
        _check_batch_size(batch_size)
        return math.ceil(self.sizes["train"] / batch_size)

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches of ``split`` ("val" or "test") in stored order, unaugmented, on ``device``.

        An empty split yields nothing.
        """


class TensorDataset(Dataset):
    """A dataset held whole as tensors on the device, with optional on-device crop+flip.

    ``splits`` maps each of "train", "val", "test" to ``(x, y)``: x float32 of shape
    ``(n, *input_shape)``, y int64 of shape ``(n,)``. Augmentation needs a ``(C, H, W)``
    input shape.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        input_shape: tuple[int, ...],
        splits: dict[str, tuple[Tensor, Tensor]],
        device: torch.device,
        augment: bool,
    ) -> None:
        if augment and len(input_shape) != 3:
            raise DatasetError(
                f"data.augment is true but dataset {name!r} has input shape {input_shape}; "
                "crop+flip augmentation needs (channels, height, width) images; "
                "set data.augment: false"
            )
        self.name = name
        self.num_classes = num_classes
        self.input_shape = tuple(input_shape)
        self.device = device
        self.augment = augment
        self._splits = {
            split: (
                x.to(device=device, dtype=torch.float32),
                y.to(device=device, dtype=torch.int64),
            )
            for split, (x, y) in splits.items()
        }
        self.sizes = {split: int(self._splits[split][1].shape[0]) for split in SPLITS}

    def tensors(self, split: str) -> tuple[Tensor, Tensor]:
        """The stored, unaugmented ``(x, y)`` of ``split`` on the device (do not modify)."""
        _check_split(split, SPLITS)
        return self._splits[split]

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.train_batches``. Draw order from ``generator``: the permutation
        (``torch.randperm(n)``), then, if augmenting, crop offsets ``(n, 2)`` in
        ``[0, 2*CROP_PADDING]`` and flip coins ``(n,)``, all indexed by position in the epoch."""
        _check_batch_size(batch_size)
        x, y = self._splits["train"]
        n = self.sizes["train"]
        perm = torch.randperm(n, generator=generator).to(self.device)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator).to(
                self.device
            )
            flips = (torch.rand(n, generator=generator) < 0.5).to(self.device)
        return self._iterate_train(x, y, perm, offsets, flips, batch_size)

    def _iterate_train(
        self,
        x: Tensor,
        y: Tensor,
        perm: Tensor,
        offsets: Tensor | None,
        flips: Tensor | None,
        batch_size: int,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        for start in range(0, perm.shape[0], batch_size):
            index = perm[start : start + batch_size]
            xb = x[index]
            if offsets is not None and flips is not None:
                end = start + index.shape[0]
                xb = crop_flip(xb, offsets[start:end], flips[start:end], CROP_PADDING)
            yield xb, y[index]

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.eval_batches``."""
        _check_split(split, EVAL_SPLITS)
        _check_batch_size(batch_size)
        x, y = self._splits[split]
        return _iterate_eval(x, y, batch_size)


def _iterate_eval(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, y.shape[0], batch_size):
        yield x[start : start + batch_size], y[start : start + batch_size]


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, padding: int = CROP_PADDING) -> Tensor:
    """Random-crop-with-zero-padding and horizontal flip of a batch, vectorised.

    ``x`` is ``(B, C, H, W)``; ``offsets`` ``(B, 2)`` int64 holds each example's (row, column)
    window start in the zero-padded image, in ``[0, 2*padding]`` (``padding`` = no shift);
    ``flips`` ``(B,)`` bool flips the chosen examples left-right after cropping. Output pixel
    ``[b, c, i, j]`` is ``padded[b, c, offsets[b,0] + i, offsets[b,1] + j]``. The zeros are
    added to the already-normalised image, as torchvision's ``RandomCrop(padding=4)`` does
    when applied after ``Normalize``.
    """
    batch, channels, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = offsets[:, 0:1] + torch.arange(height, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(width, device=x.device)  # (B, W)
    row_index = rows[:, None, :, None].expand(batch, channels, height, width + 2 * padding)
    picked_rows = padded.gather(2, row_index)
    col_index = cols[:, None, None, :].expand(batch, channels, height, width)
    cropped = picked_rows.gather(3, col_index)
    return torch.where(flips[:, None, None, None], cropped.flip(3), cropped)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"split must be one of {list(allowed)}, got {split!r}")


# --------------------------------------------------------------------------- splitting helpers


def resolve_val_size(spec: Any, default: int, available: int, dataset: str) -> int:
    """``spec.val_size`` (or ``default`` when None), checked to leave at least one training
    example out of ``available``."""
    val_size = default if spec.val_size is None else spec.val_size
    if not isinstance(val_size, int) or isinstance(val_size, bool) or not 0 <= val_size < available:
        raise DatasetError(
            f"data.val_size={val_size!r} is invalid for dataset {dataset!r}: it must be an integer "
            f"from 0 to {available - 1} (the training set has {available} examples); "
            "lower data.val_size"
        )
    return val_size


def stratified_holdout(labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices of ``labels`` into (kept, held_out) with ``count`` held out, stratified.

    Each class gets a share of ``count`` proportional to its frequency (leftover places go
    to the largest fractional shares, equal ones ordered at random by ``seed``), so balanced
    classes with ``count`` divisible by the number of classes get exactly equal shares. Examples within a class are chosen with a
    seeded generator. Both index arrays are sorted.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    quotas_exact = count * counts / labels.shape[0]
    quotas = np.floor(quotas_exact).astype(np.int64)
    remainder = count - int(quotas.sum())
    order = np.lexsort((rng.permutation(classes.shape[0]), -(quotas_exact - quotas)))
    quotas[order[:remainder]] += 1
    held_out = [
        rng.choice(np.flatnonzero(labels == cls), size=int(quota), replace=False)
        for cls, quota in zip(classes, quotas, strict=True)
    ]
    held = np.sort(np.concatenate(held_out)) if held_out else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(labels.shape[0]), held)
    return kept, held


def _resolve_augment(spec: Any, default: bool) -> bool:
    return default if spec.augment is None else bool(spec.augment)


def _require_root(spec: Any, dataset: str, expected: str) -> Path:
    if spec.root is None or str(spec.root) == "":
        raise DatasetError(
            f"data.root is not set; dataset {dataset!r} needs data.root pointing at the folder "
            f"that holds {expected}"
        )
    return Path(spec.root).expanduser()


# --------------------------------------------------------------------------- digits


def load_digits_dataset(spec: Any, device: torch.device) -> TensorDataset:
    """scikit-learn's bundled 8x8 digits: 1797 examples, 64 features, 10 classes.

    Pixels are scaled by 1/16 then standardised with the training split's per-feature mean
    and std (std clamped at 1e-6). Stratified seeded split: 20 % test, ``val_size``
    (default 180) validation, the rest train.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if _resolve_augment(spec, False):
        raise DatasetError(
            "data.augment is true but dataset 'digits' has flat 64-feature inputs; set data.augment: false"
        )
    bunch = load_digits()
    features = bunch.data.astype(np.float32) / 16.0
    labels = bunch.target.astype(np.int64)
    all_index = np.arange(labels.shape[0])
    trainval, test = train_test_split(
        all_index, test_size=0.2, stratify=labels, random_state=spec.split_seed
    )
    val_size = resolve_val_size(spec, 180, trainval.shape[0], "digits")
    if val_size > 0:
        try:
            train, val = train_test_split(
                trainval,
                test_size=val_size,
                stratify=labels[trainval],
                random_state=spec.split_seed,
            )
        except ValueError as error:
            raise DatasetError(
                f"data.val_size={val_size} cannot be split stratified for 'digits': {error}"
            ) from error
    else:
        train, val = trainval, np.zeros(0, dtype=np.int64)
    index = {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}
    x_all = torch.from_numpy(features)
    mean = x_all[index["train"]].mean(dim=0)
    std = x_all[index["train"]].std(dim=0, unbiased=False).clamp_min(1e-6)
    x_all = (x_all - mean) / std
    y_all = torch.from_numpy(labels)
    splits = {split: (x_all[idx], y_all[idx]) for split, idx in index.items()}
    return TensorDataset("digits", 10, (64,), splits, device, augment=False)


# --------------------------------------------------------------------------- synthetic


def load_synthetic_dataset(spec: Any, device: torch.device) -> TensorDataset:
    """Seeded, learnable random data: each class has a fixed random mean pattern (plus, for
    ``(C, H, W)`` shapes, a per-channel constant that survives crops and flips) and each
    example adds unit Gaussian noise. Labels are balanced. Train size ``synthetic_size``;
    test ``max(16, synthetic_size // 8)``; val ``val_size`` (default: the test size)."""
    shape = tuple(int(d) for d in spec.synthetic_shape)
    classes = int(spec.synthetic_classes)
    train_size = int(spec.synthetic_size)
    if not shape or any(d < 1 for d in shape):
        raise DatasetError(
            f"data.synthetic_shape={list(shape)} must be a non-empty list of positive sizes"
        )
    if classes < 2:
        raise DatasetError(f"data.synthetic_classes={classes} must be at least 2")
    if train_size < 1:
        raise DatasetError(f"data.synthetic_size={train_size} must be at least 1")
    test_size = max(16, train_size // 8)
    val_size = test_size if spec.val_size is None else spec.val_size
    if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
        raise DatasetError(
            f"data.val_size={val_size!r} must be a non-negative integer for dataset 'synthetic'"
        )
    generator = torch.Generator().manual_seed(int(spec.split_seed))
    means = torch.randn((classes, *shape), generator=generator)
    if len(shape) == 3:
        means = means + torch.randn((classes, shape[0], 1, 1), generator=generator)
    total = train_size + val_size + test_size
    labels = (torch.arange(total) % classes)[torch.randperm(total, generator=generator)]
    features = means[labels] + torch.randn((total, *shape), generator=generator)
    val_end = train_size + val_size
    bounds = {"train": (0, train_size), "val": (train_size, val_end), "test": (val_end, total)}
    splits = {split: (features[a:b], labels[a:b]) for split, (a, b) in bounds.items()}
    augment = _resolve_augment(spec, False)
    return TensorDataset("synthetic", classes, shape, splits, device, augment)


# --------------------------------------------------------------------------- CIFAR

_PICKLE_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that only builds dicts, lists, bytes, numbers and numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"disallowed object {module}.{name}")
        return super().find_class(module, name)


def read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python-format batch: images ``(N, 3, 32, 32)`` uint8, labels ``(N,)`` int64.

    Raises DatasetError naming ``path`` if it cannot be unpickled or does not hold a
    ``b"data"`` N x 3072 uint8 array and ``label_key`` labels in ``[0, num_classes)``.
    """
    try:
        with open(path, "rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except OSError as error:
        raise DatasetError(f"cannot read CIFAR batch file {path}: {error}") from error
    except Exception as error:  # any unpickling failure means the file is corrupt
        raise DatasetError(
            f"CIFAR batch file {path} is corrupt or not a CIFAR pickle ({error}); delete it and re-download"
        ) from error
    if not isinstance(content, dict) or b"data" not in content or label_key not in content:
        raise DatasetError(
            f"CIFAR batch file {path} lacks the b'data' and {label_key!r} entries; delete it and re-download"
        )
    data = np.asarray(content[b"data"])
    labels = np.asarray(content[label_key], dtype=np.int64)
    if (
        data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
        or data.shape[0] != labels.shape[0]
    ):
        raise DatasetError(
            f"CIFAR batch file {path} has data {data.dtype} {tuple(data.shape)} and {labels.shape[0]} labels; "
            "expected uint8 N x 3072 with N labels; delete it and re-download"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"CIFAR batch file {path} has labels outside 0..{num_classes - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _normalise_images(
    images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]
) -> Tensor:
    """uint8 ``(N, C, H, W)`` -> float32 ``(x/255 - mean[c]) / std[c]``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def _missing_files(folder: Path, names: list[str]) -> list[str]:
    return [name for name in names if not (folder / name).is_file()]


def _download_with_torchvision(dataset_class_name: str, root: Path, dataset: str) -> None:
    """Fetch ``dataset`` into ``root`` with ``torchvision.datasets.<dataset_class_name>``."""
    import torchvision

    dataset_class = getattr(torchvision.datasets, dataset_class_name)
    try:
        root.mkdir(parents=True, exist_ok=True)
        dataset_class(str(root), train=True, download=True)
        dataset_class(str(root), train=False, download=True)
    except Exception as error:  # network, disk or checksum failure: all user-fixable
        raise DatasetError(
            f"downloading {dataset!r} into {root} failed ({error}); check the network or place the files "
            "there yourself and set data.download: false"
        ) from error


def _load_cifar(spec: Any, device: torch.device, variant: str) -> TensorDataset:
    if variant == "cifar10":
        folder_name, train_files, test_files, label_key = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            b"labels",
        )
        num_classes, mean, std, url, tv_class = (
            10,
            CIFAR10_MEAN,
            CIFAR10_STD,
            CIFAR10_URL,
            "CIFAR10",
        )
    else:
        folder_name, train_files, test_files, label_key = (
            "cifar-100-python",
            ["train"],
            ["test"],
            b"fine_labels",
        )
        num_classes, mean, std, url, tv_class = (
            100,
            CIFAR100_MEAN,
            CIFAR100_STD,
            CIFAR100_URL,
            "CIFAR100",
        )
    root = _require_root(spec, variant, f"{folder_name}/")
    folder = root / folder_name
    expected = train_files + test_files
    missing = _missing_files(folder, expected)
    if missing and spec.download:
        _download_with_torchvision(tv_class, root, variant)
        missing = _missing_files(folder, expected)
    if missing:
        raise DatasetError(
            f"{variant} files not found: looked in {folder} for {expected}, missing {missing}; "
            f"set data.download: true to fetch them, or download {url} and extract it into {root}"
        )
    train_parts = [read_cifar_batch(folder / name, label_key, num_classes) for name in train_files]
    test_images, test_labels = read_cifar_batch(folder / test_files[0], label_key, num_classes)
    train_images = np.concatenate([part[0] for part in train_parts])
    train_labels = np.concatenate([part[1] for part in train_parts])
    val_size = resolve_val_size(spec, 5000, train_labels.shape[0], variant)
    keep, held = stratified_holdout(train_labels, val_size, spec.split_seed)
    x_train = _normalise_images(train_images, mean, std)
    y_train = torch.from_numpy(train_labels)
    splits = {
        "train": (x_train[keep], y_train[keep]),
        "val": (x_train[held], y_train[held]),
        "test": (_normalise_images(test_images, mean, std), torch.from_numpy(test_labels)),
    }
    return TensorDataset(
        variant, num_classes, (3, 32, 32), splits, device, _resolve_augment(spec, True)
    )


def load_cifar10_dataset(spec: Any, device: torch.device) -> TensorDataset:
    """CIFAR-10 from ``root/cifar-10-batches-py``: 45k/5k (500 per class)/10k, augmented by default."""
    return _load_cifar(spec, device, "cifar10")


def load_cifar100_dataset(spec: Any, device: torch.device) -> TensorDataset:
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``: 45k/5k (50 per class)/10k, augmented by default."""
    return _load_cifar(spec, device, "cifar100")


# --------------------------------------------------------------------------- MNIST


def read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (plain or ``.gz``) into a uint8 array of ``ndim`` dims.

    Raises DatasetError naming ``path`` if it is unreadable, its magic number is not
    ``magic``, or its length disagrees with the dimensions in its header.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                raw = handle.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as error:
        raise DatasetError(
            f"cannot read IDX file {path}: {error}; delete it and re-download"
        ) from error
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(
            f"IDX file {path} is truncated: {len(raw)} bytes is shorter than its {header_size}-byte header"
        )
    (found_magic,) = struct.unpack(">i", raw[:4])
    if found_magic != magic:
        raise DatasetError(
            f"IDX file {path} has magic number {found_magic}, expected {magic}; "
            "the file is corrupt or not the expected MNIST file; delete it and re-download"
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header_size])
    expected_size = header_size + math.prod(dims)
    if len(raw) != expected_size:
        raise DatasetError(
            f"IDX file {path} has {len(raw)} bytes but its header {list(dims)} needs {expected_size}; "
            "the file is truncated or corrupt; delete it and re-download"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(dims).copy()


def _find_mnist_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _locate_mnist(folder: Path) -> dict[str, Path | None]:
    return {key: _find_mnist_file(folder, name) for key, name in MNIST_FILES.items()}


def _read_mnist_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IDX_IMAGES_MAGIC, 3)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC, 1).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds {labels.shape[0]} labels"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"MNIST label file {labels_path} has labels outside 0..9")
    return images, labels


def load_mnist_dataset(spec: Any, device: torch.device) -> TensorDataset:
    """MNIST from torchvision's layout ``root/MNIST/raw`` (IDX files, plain or gzipped).

    Normalised with (0.1307, 0.3081); ``val_size`` (default 5000) held out stratified from
    train; no augmentation by default.
    """
    root = _require_root(spec, "mnist", "MNIST/raw/")
    folder = root / "MNIST" / "raw"
    paths = _locate_mnist(folder)
    if any(p is None for p in paths.values()) and spec.download:
        _download_with_torchvision("MNIST", root, "mnist")
        paths = _locate_mnist(folder)
    missing = [MNIST_FILES[key] for key, p in paths.items() if p is None]
    if missing:
        raise DatasetError(
            f"mnist files not found: looked in {folder} for {list(MNIST_FILES.values())} (or their .gz), "
            f"missing {missing}; set data.download: true to fetch them, or download them from {MNIST_URL} into {folder}"
        )
    train_images, train_labels = _read_mnist_pair(paths["train_images"], paths["train_labels"])
    test_images, test_labels = _read_mnist_pair(paths["test_images"], paths["test_labels"])
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DatasetError(
            f"MNIST train images are {train_images.shape[1:]} but test images are {test_images.shape[1:]} in {folder}"
        )
    val_size = resolve_val_size(spec, 5000, train_labels.shape[0], "mnist")
    keep, held = stratified_holdout(train_labels, val_size, spec.split_seed)
    x_train = _normalise_images(train_images[:, None], (MNIST_MEAN,), (MNIST_STD,))
    y_train = torch.from_numpy(train_labels)
    splits = {
        "train": (x_train[keep], y_train[keep]),
        "val": (x_train[held], y_train[held]),
        "test": (
            _normalise_images(test_images[:, None], (MNIST_MEAN,), (MNIST_STD,)),
            torch.from_numpy(test_labels),
        ),
    }
    input_shape = (1, int(train_images.shape[1]), int(train_images.shape[2]))
    return TensorDataset("mnist", 10, input_shape, splits, device, _resolve_augment(spec, False))


# --------------------------------------------------------------------------- ImageNet


class ImageFolderDataset(Dataset):
    """ImageNet-style folders streamed by a DataLoader; batches are moved to ``device``.

    ``train_view`` and ``eval_view`` are torch datasets over the same training images with
    train and eval transforms; ``train_index``/``val_index`` pick the train and held-out
    validation images; ``test_set`` is the ``val/`` folder with the eval transform.
    """

    def __init__(
        self,
        name: str,
        train_view: torch.utils.data.Dataset,
        eval_view: torch.utils.data.Dataset,
        train_index: list[int],
        val_index: list[int],
        test_set: torch.utils.data.Dataset,
        num_classes: int,
        device: torch.device,
        num_workers: int,
        augment: bool,
    ) -> None:
        self.name = name
        self.num_classes = num_classes
        self.input_shape = (3, 224, 224)
        self.device = device
        self.augment = augment
        self.num_workers = num_workers
        self._train = torch.utils.data.Subset(train_view, train_index)
        self._eval = {"val": torch.utils.data.Subset(eval_view, val_index), "test": test_set}
        self.sizes = {"train": len(train_index), "val": len(val_index), "test": len(test_set)}

    def _loader(
        self, dataset: torch.utils.data.Dataset, batch_size: int, seed: int | None
    ) -> torch.utils.data.DataLoader:
        shuffle_generator = None if seed is None else torch.Generator().manual_seed(seed)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=seed is not None,
            generator=shuffle_generator,
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
        )

    def _to_device(self, loader: torch.utils.data.DataLoader) -> Iterator[tuple[Tensor, Tensor]]:
        for x, y in loader:
            yield (
                x.to(self.device, non_blocking=True),
                y.to(self.device, dtype=torch.int64, non_blocking=True),
            )

    def train_batches(
        self, batch_size: int, generator: torch.Generator
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.train_batches``: the loader's shuffle seed is one draw from ``generator``."""
        _check_batch_size(batch_size)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
        return self._to_device(self._loader(self._train, batch_size, seed))

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """See ``Dataset.eval_batches``."""
        _check_split(split, EVAL_SPLITS)
        _check_batch_size(batch_size)
        if self.sizes[split] == 0:
            return iter(())
        return self._to_device(self._loader(self._eval[split], batch_size, None))


def _image_folder(path: Path, transform: Callable[[Any], Any], root: Path) -> Any:
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise DatasetError(
            f"imagenet folder {path} does not exist; point data.root at a folder with train/ and val/ "
            f"class subfolders (data.root is {root})"
        )
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, OSError) as error:
        raise DatasetError(
            f"imagenet folder {path} holds no usable images ({error}); expected {path}/<class>/*.JPEG; "
            "point data.root at a folder with train/ and val/ class subfolders"
        ) from error


def load_imagenet_dataset(spec: Any, device: torch.device) -> ImageFolderDataset:
    """ImageNet from ``root/train/<wnid>/*`` and ``root/val/<wnid>/*`` via ImageFolder.

    Test = ``root/val``; ``val_size`` (default 10000, 0 allowed) training images held out
    at random with ``split_seed``. Train transform RandomResizedCrop(224) + flip, eval
    Resize(256) + CenterCrop(224) (also used for train when
    ``augment`` is false); both normalised.
    """
    from torchvision import transforms

    root = _require_root(spec, "imagenet", "train/ and val/ class subfolders")
    normalise = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_transform = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalise,
        ]
    )
    eval_transform = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalise]
    )
    augment = _resolve_augment(spec, True)
    train_view = _image_folder(root / "train", train_transform if augment else eval_transform, root)
    test_set = _image_folder(root / "val", eval_transform, root)
    if test_set.class_to_idx != train_view.class_to_idx:
        raise DatasetError(
            f"imagenet class folders differ between {root / 'train'} ({len(train_view.classes)} classes) and "
            f"{root / 'val'} ({len(test_set.classes)} classes); both need the same <class> subfolders"
        )
    eval_view = copy.copy(train_view)
    eval_view.transform = eval_transform
    total = len(train_view)
    val_size = resolve_val_size(spec, 10000, total, "imagenet")
    order = torch.randperm(total, generator=torch.Generator().manual_seed(int(spec.split_seed)))
    val_index = sorted(order[:val_size].tolist())
    train_index = sorted(order[val_size:].tolist())
    return ImageFolderDataset(
        "imagenet",
        train_view,
        eval_view,
        train_index,
        val_index,
        test_set,
        len(train_view.classes),
        device,
        int(spec.num_workers),
        augment,
    )


# --------------------------------------------------------------------------- your own data


def load_folder_dataset(spec: Any, device: torch.device) -> Dataset:
    """Any ImageFolder tree under ``data.root``, streamed (see ``userdata.load_folder``)."""
    from .userdata import load_folder

    return load_folder(spec, device)


# --------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[[Any, torch.device], Dataset]] = {
    name: catalog.resolve(entry.loader) for name, entry in catalog.DATASETS.items()
}
"""One loader per ``catalog.DATASETS`` entry (the loaders live in this module)."""


def dataset_names() -> list[str]:
    """Names accepted by ``load_dataset`` (``spec.dataset``), sorted."""
    return sorted(_LOADERS)


def load_dataset(spec: Any, device: torch.device | str = "cpu") -> Dataset:
    """Build the dataset ``spec.factory`` returns (see ``userdata.py``), else the dataset
    ``spec.dataset``, with its splits on ``device``.

    ``spec`` is a ``DataSpec`` (only its attributes are read). Raises DatasetError for an
    unknown name, for missing or corrupt files, and for a factory that cannot be imported or
    called or returns unusable data.
    """
    if getattr(spec, "factory", None) is not None:
        from .userdata import load_factory_dataset

        return load_factory_dataset(spec, torch.device(device))
    loader = _LOADERS.get(spec.dataset)
    if loader is None:
        raise DatasetError(
            f"data.dataset={spec.dataset!r} is not a known dataset; choose one of {dataset_names()}"
        )
    return loader(spec, torch.device(device))
