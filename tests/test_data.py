"""Tests for ticketsearch/data.py: registry, splits, normalisation, augmentation, file formats."""

from __future__ import annotations

import collections
import gzip
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ticketsearch.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetError,
    crop_flip,
    dataset_names,
    load_dataset,
    stratified_holdout,
)


def make_spec(**overrides) -> SimpleNamespace:
    """A stand-in for spec.DataSpec with every field load_dataset reads."""
    fields = dict(
        dataset="digits",
        root=None,
        download=False,
        val_size=None,
        augment=None,
        split_seed=0,
        synthetic_shape=[16],
        synthetic_classes=4,
        synthetic_size=256,
        num_workers=0,
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def concat_train(
    dataset, batch_size: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    xs, ys, sizes = [], [], []
    for x, y in dataset.train_batches(batch_size, seeded(seed)):
        xs.append(x)
        ys.append(y)
        sizes.append(int(y.shape[0]))
    return torch.cat(xs), torch.cat(ys), sizes


def concat_eval(dataset, split: str, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = list(dataset.eval_batches(split, batch_size))
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def row_multiset(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    rows, counts = np.unique(x.reshape(x.shape[0], -1).numpy(), axis=0, return_counts=True)
    return rows, counts


# --------------------------------------------------------------------------- registry


def test_dataset_names_lists_every_dataset():
    assert dataset_names() == ["cifar10", "cifar100", "digits", "folder", "imagenet", "mnist",
                               "synthetic"]


def test_unknown_dataset_names_the_field_and_choices():
    with pytest.raises(DatasetError, match=r"data\.dataset='nope'.*cifar10"):
        load_dataset(make_spec(dataset="nope"))


def test_stratified_holdout_is_proportional_sorted_and_disjoint():
    labels = np.array([0] * 6 + [1] * 4)
    kept, held = stratified_holdout(labels, 5, seed=3)
    assert np.bincount(labels[held]).tolist() == [3, 2]
    assert held.tolist() == sorted(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(10))
    kept_again, held_again = stratified_holdout(labels, 5, seed=3)
    assert held_again.tolist() == held.tolist()
    assert stratified_holdout(labels, 0, seed=3)[1].tolist() == []


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return load_dataset(make_spec(dataset="digits", split_seed=0))


def test_digits_sizes_and_shape(digits):
    assert digits.sizes == {"train": 1257, "val": 180, "test": 360}
    assert digits.input_shape == (64,)
    assert digits.num_classes == 10
    assert digits.augment is False
    x, y = digits.tensors("train")
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert tuple(x.shape) == (1257, 64)


def test_digits_split_is_stratified(digits):
    all_counts = torch.zeros(10)
    for split in ("train", "val", "test"):
        all_counts += torch.bincount(digits.tensors(split)[1], minlength=10)
    overall = all_counts / all_counts.sum()
    for split in ("train", "val", "test"):
        counts = torch.bincount(digits.tensors(split)[1], minlength=10).float()
        assert bool((counts > 0).all()), split
        assert torch.allclose(counts / counts.sum(), overall, atol=0.01), split


def test_digits_train_features_are_standardised(digits):
    x = digits.tensors("train")[0]
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False)
    varying = std > 0.5
    assert int(varying.sum()) >= 55  # only a few edge pixels are constant
    assert torch.allclose(mean, torch.zeros(64), atol=1e-5)
    assert torch.allclose(std[varying], torch.ones(int(varying.sum())), atol=1e-4)
    assert torch.equal(x[:, ~varying], torch.zeros_like(x[:, ~varying]))


def test_digits_split_depends_only_on_seed(digits):
    again = load_dataset(make_spec(dataset="digits", split_seed=0))
    other = load_dataset(make_spec(dataset="digits", split_seed=1))
    for split in ("train", "val", "test"):
        assert torch.equal(again.tensors(split)[0], digits.tensors(split)[0])
        assert torch.equal(again.tensors(split)[1], digits.tensors(split)[1])
    assert not torch.equal(other.tensors("test")[1], digits.tensors("test")[1])


def test_digits_epoch_covers_each_train_example_once(digits):
    x, y, sizes = concat_train(digits, 100, seed=7)
    assert sizes == [100] * 12 + [57]
    assert digits.num_train_batches(100) == 13
    train_x, train_y = digits.tensors("train")
    assert torch.equal(torch.bincount(y, minlength=10), torch.bincount(train_y, minlength=10))
    got_rows, got_counts = row_multiset(x)
    want_rows, want_counts = row_multiset(train_x)
    assert np.array_equal(got_rows, want_rows) and np.array_equal(got_counts, want_counts)


def test_digits_order_follows_the_generator(digits):
    first = concat_train(digits, 64, seed=11)
    same = concat_train(digits, 64, seed=11)
    other = concat_train(digits, 64, seed=12)
    assert torch.equal(first[0], same[0]) and torch.equal(first[1], same[1])
    assert not torch.equal(first[1], other[1])


def test_digits_epoch_is_randperm_of_generator(digits):
    train_x, train_y = digits.tensors("train")
    perm = torch.randperm(1257, generator=seeded(5))
    x, y, _ = concat_train(digits, 500, seed=5)
    assert torch.equal(x, train_x[perm]) and torch.equal(y, train_y[perm])


def test_digits_eval_batches_are_stored_order(digits):
    x, y = concat_eval(digits, "val", 64)
    assert torch.equal(x, digits.tensors("val")[0]) and torch.equal(y, digits.tensors("val")[1])
    assert [b[1].shape[0] for b in digits.eval_batches("test", 100)] == [100, 100, 100, 60]
    with pytest.raises(ValueError, match="split"):
        list(digits.eval_batches("train", 10))
    with pytest.raises(ValueError, match="batch_size"):
        digits.num_train_batches(0)


def test_digits_rejects_augmentation_and_bad_val_size():
    with pytest.raises(DatasetError, match=r"data\.augment"):
        load_dataset(make_spec(dataset="digits", augment=True))
    with pytest.raises(DatasetError, match=r"data\.val_size=5000"):
        load_dataset(make_spec(dataset="digits", val_size=5000))


def test_digits_val_size_zero_gives_empty_val():
    dataset = load_dataset(make_spec(dataset="digits", val_size=0))
    assert dataset.sizes == {"train": 1437, "val": 0, "test": 360}
    assert list(dataset.eval_batches("val", 32)) == []


# --------------------------------------------------------------------------- synthetic


def test_synthetic_shape_classes_and_sizes():
    dataset = load_dataset(
        make_spec(
            dataset="synthetic", synthetic_shape=[3, 8, 8], synthetic_classes=5, synthetic_size=200
        )
    )
    assert dataset.input_shape == (3, 8, 8)
    assert dataset.num_classes == 5
    assert dataset.sizes == {"train": 200, "val": 25, "test": 25}
    x, y = dataset.tensors("train")
    assert tuple(x.shape) == (200, 3, 8, 8) and x.dtype == torch.float32
    assert set(y.tolist()) == {0, 1, 2, 3, 4}
    small = load_dataset(make_spec(dataset="synthetic", synthetic_size=40, val_size=3))
    assert small.sizes == {"train": 40, "val": 3, "test": 16}


def test_synthetic_is_seeded():
    a = load_dataset(make_spec(dataset="synthetic", split_seed=4))
    b = load_dataset(make_spec(dataset="synthetic", split_seed=4))
    c = load_dataset(make_spec(dataset="synthetic", split_seed=5))
    assert torch.equal(a.tensors("train")[0], b.tensors("train")[0])
    assert not torch.equal(a.tensors("train")[0], c.tensors("train")[0])


def test_synthetic_is_learnable_by_a_linear_model():
    dataset = load_dataset(
        make_spec(
            dataset="synthetic", synthetic_shape=[16], synthetic_classes=4, synthetic_size=512
        )
    )
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    generator = seeded(0)
    for _ in range(3):
        for x, y in dataset.train_batches(64, generator):
            optimiser.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimiser.step()
    x_test, y_test = dataset.tensors("test")
    accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    assert accuracy > 0.8  # chance is 0.25


def test_synthetic_augmentation_needs_image_shape():
    images = load_dataset(make_spec(dataset="synthetic", synthetic_shape=[3, 8, 8], augment=True))
    x, _, _ = concat_train(images, 50, seed=0)
    assert tuple(x.shape) == (256, 3, 8, 8)
    with pytest.raises(DatasetError, match=r"data\.augment"):
        load_dataset(make_spec(dataset="synthetic", synthetic_shape=[16], augment=True))
    with pytest.raises(DatasetError, match=r"data\.synthetic_classes"):
        load_dataset(make_spec(dataset="synthetic", synthetic_classes=1))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_tensor_batches_live_on_the_device(device):
    dataset = load_dataset(
        make_spec(dataset="synthetic", synthetic_shape=[3, 8, 8], augment=True), device=device
    )
    for x, y in dataset.train_batches(100, seeded(0)):
        assert x.device.type == device and y.device.type == device
        assert x.dtype == torch.float32 and y.dtype == torch.int64
    for x, y in dataset.eval_batches("test", 100):
        assert x.device.type == device and y.device.type == device


# --------------------------------------------------------------------------- crop_flip


def test_crop_flip_identity_shift_and_flip():
    x = (torch.arange(16, dtype=torch.float32) + 1).view(1, 1, 4, 4).repeat(4, 1, 1, 1)
    offsets = torch.tensor([[2, 2], [0, 0], [4, 1], [2, 2]])
    flips = torch.tensor([False, False, False, True])
    out = crop_flip(x, offsets, flips, padding=2)
    assert out.shape == x.shape
    assert torch.equal(out[0], x[0])
    # offset (0, 0): image moves down-right by 2, zeros enter top and left
    assert torch.equal(out[1, 0, 2:, 2:], x[1, 0, :2, :2])
    assert torch.equal(out[1, 0, :2, :], torch.zeros(2, 4))
    assert torch.equal(out[1, 0, :, :2], torch.zeros(4, 2))
    # offset (4, 1): rows come from 2 further down, columns from 1 further left
    assert torch.equal(out[2, 0, :2, 1:], x[2, 0, 2:, :3])
    assert torch.equal(out[2, 0, 2:, :], torch.zeros(2, 4))
    assert torch.equal(out[2, 0, :, 0], torch.zeros(4))
    # flip: first row reversed
    assert out[3, 0, 0].tolist() == [4.0, 3.0, 2.0, 1.0]
    assert torch.equal(out[3], x[3].flip(-1))


# --------------------------------------------------------------------------- CIFAR files


def write_cifar10(
    root: Path, per_batch: int = 20, test_count: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """Write CIFAR-10 python-format batches; returns the raw (N, 3, 32, 32) train images and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    total = 5 * per_batch
    images = rng.integers(0, 256, size=(total, 3072), dtype=np.uint8)
    labels = [k % 10 for k in range(total)]
    for b in range(5):
        part = slice(b * per_batch, (b + 1) * per_batch)
        with open(folder / f"data_batch_{b + 1}", "wb") as handle:
            pickle.dump(
                {b"data": images[part], b"labels": labels[part], b"batch_label": b"x"}, handle
            )
    test_images = rng.integers(0, 256, size=(test_count, 3, 32, 32), dtype=np.uint8)
    test_images[0, :, 0, 0] = [255, 0, 51]
    with open(folder / "test_batch", "wb") as handle:
        pickle.dump(
            {
                b"data": test_images.reshape(test_count, 3072),
                b"labels": [k % 10 for k in range(test_count)],
            },
            handle,
        )
    return images.reshape(total, 3, 32, 32), np.array(labels)


def write_cifar100(root: Path) -> np.ndarray:
    """CIFAR-100 with 100 train images, image k having fine label k; returns the raw images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(100, 3, 32, 32), dtype=np.uint8)
    with open(folder / "train", "wb") as handle:
        pickle.dump(
            {
                b"data": images.reshape(100, 3072),
                b"fine_labels": list(range(100)),
                b"coarse_labels": [0] * 100,
            },
            handle,
        )
    with open(folder / "test", "wb") as handle:
        pickle.dump(
            {b"data": images[:10].reshape(10, 3072), b"fine_labels": list(range(10))}, handle
        )
    return images


def normalised(images: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(images).float() / 255.0
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def match_rows(stored: torch.Tensor, reference: torch.Tensor) -> list[int]:
    """Index into reference of each stored example (asserting an exact-to-float match exists)."""
    flat_stored = stored.reshape(stored.shape[0], 1, -1)
    flat_reference = reference.reshape(1, reference.shape[0], -1)
    distance = (flat_stored - flat_reference).abs().amax(dim=2)
    assert bool((distance.min(dim=1).values < 1e-5).all())
    return distance.argmin(dim=1).tolist()


def test_cifar10_loads_splits_and_normalises(tmp_path):
    raw, labels = write_cifar10(tmp_path)
    dataset = load_dataset(
        make_spec(dataset="cifar10", root=str(tmp_path), val_size=10, augment=False)
    )
    assert dataset.sizes == {"train": 90, "val": 10, "test": 20}
    assert dataset.input_shape == (3, 32, 32) and dataset.num_classes == 10
    x_val, y_val = dataset.tensors("val")
    assert x_val.dtype == torch.float32 and y_val.dtype == torch.int64
    assert sorted(y_val.tolist()) == list(range(10))  # one per class
    x_test, y_test = dataset.tensors("test")
    assert y_test.tolist() == [k % 10 for k in range(20)]
    assert x_test[0, :, 0, 0].tolist() == pytest.approx(
        [(1.0 - 0.491) / 0.247, (0.0 - 0.482) / 0.243, (0.2 - 0.447) / 0.262], abs=1e-5
    )
    reference = normalised(raw, CIFAR10_MEAN, CIFAR10_STD)
    train_ids = match_rows(dataset.tensors("train")[0], reference)
    val_ids = match_rows(x_val, reference)
    assert sorted(train_ids + val_ids) == list(range(100))
    assert dataset.tensors("train")[1].tolist() == labels[train_ids].tolist()
    assert torch.allclose(dataset.tensors("train")[0], reference[train_ids], atol=1e-6)


def test_cifar10_val_split_is_stratified_and_seeded(tmp_path):
    write_cifar10(tmp_path)
    spec = dict(dataset="cifar10", root=str(tmp_path), val_size=20)
    a = load_dataset(make_spec(split_seed=0, **spec))
    b = load_dataset(make_spec(split_seed=0, **spec))
    c = load_dataset(make_spec(split_seed=1, **spec))
    assert torch.bincount(a.tensors("val")[1], minlength=10).tolist() == [2] * 10
    assert torch.bincount(a.tensors("train")[1], minlength=10).tolist() == [8] * 10
    assert torch.equal(a.tensors("val")[0], b.tensors("val")[0])
    assert not torch.equal(a.tensors("val")[0], c.tensors("val")[0])
    assert a.augment is True  # CIFAR default


def test_cifar10_unaugmented_batches_equal_stored_tensors(tmp_path):
    write_cifar10(tmp_path)
    dataset = load_dataset(
        make_spec(dataset="cifar10", root=str(tmp_path), val_size=10, augment=False)
    )
    perm = torch.randperm(90, generator=seeded(3))
    x, y, sizes = concat_train(dataset, 32, seed=3)
    assert sizes == [32, 32, 26]
    train_x, train_y = dataset.tensors("train")
    assert torch.equal(x, train_x[perm]) and torch.equal(y, train_y[perm])
    x_val, y_val = concat_eval(dataset, "val", 4)
    assert torch.equal(x_val, dataset.tensors("val")[0]) and torch.equal(
        y_val, dataset.tensors("val")[1]
    )


def test_cifar100_augmentation_is_a_padded_crop_and_flip(tmp_path):
    raw = write_cifar100(tmp_path)
    dataset = load_dataset(make_spec(dataset="cifar100", root=str(tmp_path), val_size=10))
    assert dataset.augment is True and dataset.num_classes == 100
    assert dataset.sizes == {"train": 90, "val": 10, "test": 10}
    source = normalised(raw, CIFAR100_MEAN, CIFAR100_STD)  # image k has label k
    padded = F.pad(source, (4, 4, 4, 4))
    seen_flip = seen_shift = False
    x, y, _ = concat_train(dataset, 32, seed=0)
    assert tuple(x.shape) == (90, 3, 32, 32)
    for image, label in zip(x, y.tolist(), strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            if torch.allclose(
                image,
                padded[label, :, dy : dy + 32, dx : dx + 32].flip(-1)
                if flip
                else padded[label, :, dy : dy + 32, dx : dx + 32],
                atol=1e-6,
            )
        ]
        assert len(matches) == 1, f"label {label}: not a padded crop (+flip) of its source"
        dy, dx, flip = matches[0]
        seen_flip |= flip
        if dy != 4:
            seen_shift = True
            zero_rows = image[:, : 4 - dy] if dy < 4 else image[:, 32 - (dy - 4) :]
            assert torch.equal(zero_rows, torch.zeros_like(zero_rows))
    assert seen_flip and seen_shift
    unaugmented = concat_eval(dataset, "test", 10)[0]
    assert torch.allclose(unaugmented, source[:10], atol=1e-6)


def test_cifar_missing_files_explain_where_and_how(tmp_path):
    missing_root = tmp_path / "nowhere"
    with pytest.raises(DatasetError) as info:
        load_dataset(make_spec(dataset="cifar10", root=str(missing_root)))
    message = str(info.value)
    assert str(missing_root / "cifar-10-batches-py") in message
    assert "data.download: true" in message and "data_batch_1" in message
    with pytest.raises(DatasetError, match=r"data\.root is not set"):
        load_dataset(make_spec(dataset="cifar100", root=None))


def test_cifar_corrupt_files_name_the_file(tmp_path):
    write_cifar10(tmp_path)
    broken = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    broken.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match="data_batch_3"):
        load_dataset(make_spec(dataset="cifar10", root=str(tmp_path), val_size=10))
    with open(broken, "wb") as handle:
        pickle.dump({b"data": collections.OrderedDict(), b"labels": []}, handle)
    with pytest.raises(DatasetError, match="data_batch_3.*corrupt"):
        load_dataset(make_spec(dataset="cifar10", root=str(tmp_path), val_size=10))
    with open(broken, "wb") as handle:
        pickle.dump({b"data": np.zeros((20, 100), dtype=np.uint8), b"labels": [0] * 20}, handle)
    with pytest.raises(DatasetError, match="data_batch_3.*3072"):
        load_dataset(make_spec(dataset="cifar10", root=str(tmp_path), val_size=10))


def test_cifar_default_val_size_too_large_for_small_files(tmp_path):
    write_cifar10(tmp_path)
    with pytest.raises(DatasetError, match=r"data\.val_size=5000"):
        load_dataset(make_spec(dataset="cifar10", root=str(tmp_path)))


# --------------------------------------------------------------------------- MNIST files


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    return struct.pack(">iiii", magic, *images.shape) + images.tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">ii", magic, labels.shape[0]) + labels.astype(np.uint8).tobytes()


def write_mnist(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Train files plain, test files gzipped; returns raw train images and test images."""
    folder = root / "MNIST" / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    train = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    test[0, 0, 0], test[0, 0, 1] = 255, 0
    (folder / "train-images-idx3-ubyte").write_bytes(idx_images(train))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.arange(30) % 10))
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(test)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(np.arange(10))))
    return train, test


def test_mnist_reads_plain_and_gzipped_idx(tmp_path):
    train, _ = write_mnist(tmp_path)
    dataset = load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))
    assert dataset.sizes == {"train": 20, "val": 10, "test": 10}
    assert dataset.input_shape == (1, 28, 28) and dataset.num_classes == 10
    assert dataset.augment is False
    x_test, y_test = dataset.tensors("test")
    assert x_test.dtype == torch.float32 and y_test.dtype == torch.int64
    assert tuple(x_test.shape) == (10, 1, 28, 28)
    assert y_test.tolist() == list(range(10))
    assert x_test[0, 0, 0, 0].item() == pytest.approx((1.0 - 0.1307) / 0.3081, abs=1e-5)
    assert x_test[0, 0, 0, 1].item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)
    assert sorted(dataset.tensors("val")[1].tolist()) == list(range(10))
    reference = normalised(train[:, None], (MNIST_MEAN,), (MNIST_STD,))
    ids = match_rows(dataset.tensors("train")[0], reference) + match_rows(
        dataset.tensors("val")[0], reference
    )
    assert sorted(ids) == list(range(30))


def test_mnist_missing_files_mention_download(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError) as info:
        load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "train-labels-idx1-ubyte" in message and "data.download: true" in message


def test_mnist_wrong_magic_names_the_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    path.write_bytes(idx_labels(np.arange(30) % 10, magic=2051))
    with pytest.raises(DatasetError, match=f"{path}.*magic number 2051, expected 2049"):
        load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))


def test_mnist_truncated_file_names_the_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DatasetError, match=f"{path}.*truncated"):
        load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match=f"{path}.*truncated"):
        load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))


def test_mnist_corrupt_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(b"garbage, not gzip")
    with pytest.raises(DatasetError, match=str(path)):
        load_dataset(make_spec(dataset="mnist", root=str(tmp_path), val_size=10))


# --------------------------------------------------------------------------- ImageNet folders


def write_image_folder(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(3)
    for split, count, suffix in (("train", 3, "png"), ("val", 1, "JPEG")):
        for wnid in ("n01", "n02"):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for k in range(count):
                pixels = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"img{k}.{suffix}")


@pytest.mark.parametrize("device", DEVICES)
def test_imagenet_folders_load_and_batch_on_device(tmp_path, device):
    write_image_folder(tmp_path)
    dataset = load_dataset(
        make_spec(dataset="imagenet", root=str(tmp_path), val_size=2), device=device
    )
    assert dataset.num_classes == 2
    assert dataset.input_shape == (3, 224, 224)
    assert dataset.sizes == {"train": 4, "val": 2, "test": 2}
    batches = list(dataset.train_batches(3, seeded(0)))
    assert dataset.num_train_batches(3) == 2
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 224, 224), (1, 3, 224, 224)]
    for x, y in batches:
        assert x.device.type == device and y.device.type == device
        assert x.dtype == torch.float32 and y.dtype == torch.int64
    labels = torch.cat([y for _, y in batches]).cpu()
    again = torch.cat([y for _, y in dataset.train_batches(3, seeded(0))]).cpu()
    assert torch.equal(labels, again)
    x_test, y_test = concat_eval(dataset, "test", 8)
    assert tuple(x_test.shape) == (2, 3, 224, 224) and y_test.cpu().tolist() == [0, 1]
    assert concat_eval(dataset, "val", 8)[0].shape[0] == 2
    assert dataset.augment is True


def test_imagenet_without_augmentation_trains_on_eval_view(tmp_path):
    write_image_folder(tmp_path)
    spec = make_spec(dataset="imagenet", root=str(tmp_path), val_size=0, augment=False)
    dataset = load_dataset(spec)
    assert dataset.augment is False
    first = torch.cat([x for x, _ in dataset.train_batches(6, seeded(1))])
    second = torch.cat([x for x, _ in dataset.train_batches(6, seeded(1))])
    assert torch.equal(first, second)  # no random crop/flip: same order gives same pixels


def test_imagenet_val_size_zero_and_errors(tmp_path):
    write_image_folder(tmp_path)
    dataset = load_dataset(make_spec(dataset="imagenet", root=str(tmp_path), val_size=0))
    assert dataset.sizes == {"train": 6, "val": 0, "test": 2}
    assert list(dataset.eval_batches("val", 4)) == []
    with pytest.raises(DatasetError, match=r"data\.val_size=10000"):
        load_dataset(make_spec(dataset="imagenet", root=str(tmp_path)))
    missing = tmp_path / "absent"
    with pytest.raises(DatasetError, match=f"{missing}.*train/ and val/ class subfolders"):
        load_dataset(make_spec(dataset="imagenet", root=str(missing), val_size=0))
    (tmp_path / "val" / "n03").mkdir()
    (tmp_path / "val" / "n03" / "x.png").write_bytes(
        (tmp_path / "val" / "n01" / "img0.JPEG").read_bytes()
    )
    with pytest.raises(DatasetError, match="class folders differ"):
        load_dataset(make_spec(dataset="imagenet", root=str(tmp_path), val_size=0))
