"""Your own data: a data factory's arrays (held on the device) or torch Datasets (streamed),
missing splits split off train with the seed, ImageFolder trees, and every bad input."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ticketsearch.cli import main
from ticketsearch.data import DatasetError, TensorDataset, load_dataset
from ticketsearch.spec import DataSpec
from ticketsearch.userdata import StreamedDataset

pytestmark = pytest.mark.usefixtures("own_imports")


@pytest.fixture
def own_imports(monkeypatch, tmp_path):
    """The test's modules live in tmp_path, on sys.path for the test only."""
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("owndata"):
            del sys.modules[name]


def write_loader(folder: Path, name: str, body: str) -> str:
    """A module ``name`` whose ``load(**kwargs)`` runs ``body``; returns its factory path."""
    source = "import numpy as np\nimport torch\n\ndef load(**kwargs):\n" + textwrap.indent(
        textwrap.dedent(body), "    ")
    (folder / f"{name}.py").write_text(source)
    return f"{name}:load"


def images(n: int, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % classes).astype(np.int64)
    return rng.normal(size=(n, 1, 4, 4)).astype(np.float32), y


def test_arrays_are_held_on_the_device_and_missing_splits_split_off_stratified(tmp_path):
    path = write_loader(tmp_path, "owndata_arrays", """
        rng = np.random.default_rng(0)
        y = np.arange(200) % 4
        x = rng.normal(size=(200, 1, 4, 4)).astype(np.float32)
        return {"train": (x, y)}
    """)
    data = load_dataset(DataSpec(factory=path), "cpu")
    assert isinstance(data, TensorDataset)
    assert (data.num_classes, data.input_shape) == (4, (1, 4, 4))
    assert data.sizes == {"train": 144, "val": 16, "test": 40}  # test 20 %, val 10 % of the rest
    for split in ("train", "val", "test"):
        _, y = data.tensors(split)
        assert y.dtype == torch.int64
        assert torch.bincount(y, minlength=4).tolist() == [data.sizes[split] // 4] * 4
    again = load_dataset(DataSpec(factory=path), "cpu")
    assert torch.equal(again.tensors("val")[0], data.tensors("val")[0])
    other = load_dataset(DataSpec(factory=path, split_seed=1, val_size=20), "cpu")
    assert other.sizes["val"] == 20
    assert not torch.equal(other.tensors("test")[1], data.tensors("test")[1]) or not \
        torch.equal(other.tensors("test")[0], data.tensors("test")[0])


def test_given_splits_tensors_kwargs_and_num_classes(tmp_path):
    path = write_loader(tmp_path, "owndata_tensors", """
        x = torch.randn(kwargs["n"], 6, dtype=torch.float64)
        y = torch.arange(kwargs["n"]) % 2
        return {"train": (x, y), "val": (x[:5], y[:5]), "test": (x[:7], y[:7]),
                "num_classes": 5}
    """)
    data = load_dataset(DataSpec(factory=path, kwargs={"n": 30}), "cpu")
    assert data.sizes == {"train": 30, "val": 5, "test": 7}
    assert (data.num_classes, data.input_shape) == (5, (6,))
    assert data.tensors("train")[0].dtype == torch.float32


def test_torch_datasets_are_streamed(tmp_path):
    path = write_loader(tmp_path, "owndata_stream", """
        class Squares(torch.utils.data.Dataset):
            classes = ["even", "odd"]
            def __len__(self):
                return 50
            def __getitem__(self, i):
                return torch.full((3,), float(i)), i % 2
        return {"train": Squares(), "test": (np.ones((4, 3), np.float32), np.array([0, 1, 0, 1]))}
    """)
    data = load_dataset(DataSpec(factory=path, num_workers=0), "cpu")
    assert isinstance(data, StreamedDataset)
    assert (data.num_classes, data.input_shape) == (2, (3,))
    assert data.sizes == {"train": 45, "val": 5, "test": 4}
    batches = list(data.train_batches(16, torch.Generator().manual_seed(0)))
    assert [len(y) for _, y in batches] == [16, 16, 13]
    seen = sorted(int(x[0]) for xb, _ in batches for x in xb)
    assert len(set(seen)) == 45
    val = [int(x[0]) for xb, _ in data.eval_batches("val", 8) for x in xb]
    assert len(val) == 5 and not set(val) & set(seen)
    (xt, yt), = data.eval_batches("test", 8)
    assert yt.dtype == torch.int64 and xt.shape == (4, 3)


def write_png_tree(root: Path, classes: dict[str, int], size=(6, 5)) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


def test_folder_of_class_folders_with_any_names(tmp_path):
    write_png_tree(tmp_path / "imgs", {"cat": 10, "dog house": 10, "zebra": 10})
    spec = DataSpec(dataset="folder", root=str(tmp_path / "imgs"), num_workers=0)
    data = load_dataset(spec, "cpu")
    assert (data.num_classes, data.input_shape) == (3, (3, 5, 6))
    assert data.sizes == {"train": 22, "val": 2, "test": 6}
    x, y = next(iter(data.train_batches(8, torch.Generator().manual_seed(0))))
    assert x.shape == (8, 3, 5, 6) and y.dtype == torch.int64
    resized = load_dataset(spec.model_copy(update={"image_size": 4, "augment": True}), "cpu")
    assert resized.input_shape == (3, 4, 4)
    x, _ = next(iter(resized.train_batches(8, torch.Generator().manual_seed(0))))
    assert x.shape == (8, 3, 4, 4)


def test_folder_with_train_and_test_folders(tmp_path):
    write_png_tree(tmp_path / "d" / "train", {"a": 6, "b": 6})
    write_png_tree(tmp_path / "d" / "test", {"a": 2, "b": 2})
    data = load_dataset(DataSpec(dataset="folder", root=str(tmp_path / "d"), val_size=2,
                                 num_workers=0), "cpu")
    assert data.sizes == {"train": 10, "val": 2, "test": 4}
    write_png_tree(tmp_path / "e" / "train", {"a": 2, "b": 2})
    write_png_tree(tmp_path / "e" / "val", {"a": 2, "c": 2})
    with pytest.raises(DatasetError, match=r"^data.root: .*/e/val has classes \['a', 'c'\], "
                                           r"but .*/e/train has \['a', 'b'\]"):
        load_dataset(DataSpec(dataset="folder", root=str(tmp_path / "e")), "cpu")
    with pytest.raises(DatasetError, match=r"^data.root: .*/nowhere is not a folder"):
        load_dataset(DataSpec(dataset="folder", root=str(tmp_path / "nowhere")), "cpu")


BAD_DATA = {
    "labels out of range": (
        "x, y = images(30); return {'train': (x, y + 1), 'num_classes': 2}",
        "data.factory: split 'train' has label 2, outside 0..1 (2 classes); labels must be "
        "class indices from 0"),
    "negative labels": (
        "x, y = images(30); return {'train': (x, y - 1)}",
        "data.factory: split 'train' has label -1, outside 0..0 (1 class)"),
    "labels not integers": (
        "x, y = images(30); return {'train': (x, y.astype('float32'))}",
        "data.factory: split 'train' labels y have dtype torch.float32 and shape (30,); they "
        "must be integer class indices of shape (N,)"),
    "empty split": (
        "x, y = images(30); return {'train': (x, y), 'val': (x[:0], y[:0])}",
        "data.factory: split 'val' is empty; leave it out to split it off train, or give it "
        "examples"),
    "not a dict": (
        "return [images(30)]",
        "data.factory: owndata_bad:load returned a list, not a dict of splits; return "
        "{'train': (x, y), 'val': (x, y), 'test': (x, y)} (val and test optional) with numpy "
        "arrays or tensors, or torch Datasets as values"),
    "unknown split": (
        "return {'training': images(30)}",
        "data.factory: owndata_bad:load returned a dict with unknown keys ['training']"),
    "split of the wrong kind": (
        "return {'train': 'train.csv'}",
        "data.factory: split 'train' is a str; expected an (x, y) pair or a torch Dataset"),
    "integer inputs": (
        "x, y = images(30); return {'train': ((x * 255).astype('uint8'), y)}",
        "data.factory: split 'train' x has dtype torch.uint8; x must be floating point"),
    "lists": (
        "x, y = images(30); return {'train': (x.tolist(), y)}",
        "data.factory: split 'train' x is a list; use a numpy array or a torch tensor"),
    "lengths differ": (
        "x, y = images(30); return {'train': (x, y[:20])}",
        "data.factory: split 'train' has 30 examples but 20 labels"),
    "shapes differ": (
        "x, y = images(30); return {'train': (x, y), 'test': (x[:, :, :2], y)}",
        "data.factory: split 'test' has examples of shape (1, 2, 4), but train's are (1, 4, 4)"),
    "factory raising": (
        "raise OSError('no such file: /data/blobs.npz')",
        "data.factory: owndata_bad:load(n=30) raised OSError: no such file: /data/blobs.npz "
        "(at {folder}/owndata_bad.py:"),
    "streamed without classes": (
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i): return torch.zeros(2), 0\n"
        "return {'train': D()}",
        "data.factory: cannot tell the number of classes of the streamed train split"),
    "streamed images not tensors": (
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 4\n"
        "    def __getitem__(self, i): return [0.0, 1.0], 0\n"
        "return {'train': D(), 'num_classes': 2}",
        "data.factory: split 'train' yields x of type list; x must be a float tensor (add a "
        "transform such as ToTensor)"),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_exits_2_naming_the_field_and_writes_nothing(case, tmp_path, capsys):
    body, message = BAD_DATA[case]
    source = textwrap.dedent('''
        import numpy as np
        import torch

        def net(num_classes, input_shape):
            return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8),
                                       torch.nn.ReLU(), torch.nn.Linear(8, num_classes))

        def images(n):
            y = (np.arange(n) % 2).astype(np.int64)
            return np.zeros((n, 1, 4, 4), np.float32), y

        def load(n):
    ''') + textwrap.indent(body, "    ") + "\n"
    (tmp_path / "owndata_bad.py").write_text(source)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "bad", "methods": {"cs": {}},
        "model": {"factory": "owndata_bad:net"},
        "data": {"factory": "owndata_bad:load", "kwargs": {"n": 30}}}))
    storage = tmp_path / "runs"
    assert main(["run", str(job), "--in-process", "--storage", str(storage)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.replace("{folder}", str(tmp_path))), err
    assert "Traceback" not in err and not storage.exists()


def test_data_and_dataset_together_is_a_spec_error():
    from ticketsearch.spec import SpecError, parse_job

    with pytest.raises(SpecError) as error:
        parse_job({"name": "j", "methods": {"cs": {}},
                   "data": {"factory": "m:load", "dataset": "cifar10", "root": "/d"}})
    assert error.value.problems == [
        "data.dataset: give either data.dataset (with its root) or data.factory, not both",
        "data.root: give either data.dataset (with its root) or data.factory, not both"]


def test_a_factory_job_survives_its_normalised_dump_and_its_trials_json(tmp_path):
    from ticketsearch.spec import TrialSpec, dump_job, load_job, parse_job

    job = parse_job({"name": "j", "methods": {"cs": {}},
                     "model": {"factory": "m.nets:build", "kwargs": {"width": 4}},
                     "data": {"factory": "m.data:load", "kwargs": {"n": 3}}})
    (tmp_path / "job.yaml").write_text(dump_job(job))
    again = load_job(tmp_path / "job.yaml")
    assert again == job and again.spec_hash() == job.spec_hash()
    (trial,) = job.trials()
    assert TrialSpec.model_validate_json(trial.to_json()) == trial
