"""Tests for the on-disk ticket format (ticketsearch.sparsity.ticketfile)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ticketsearch.sparsity import ticketfile
from ticketsearch.sparsity.ticketfile import (
    FORMAT_VERSION,
    TRAINED_FILE,
    TicketFormatError,
    pack_mask,
    read_ticket_dir,
    read_trained_state,
    unpack_mask,
    write_ticket_dir,
)

# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------


def _hand_masks() -> dict[str, torch.Tensor]:
    """Masks with known counts: conv 5 of 27 kept, fc 7 of 10 kept (numeric 0/1)."""
    conv = torch.zeros(3, 3, 3, dtype=torch.bool)
    conv.view(-1)[[0, 4, 8, 13, 26]] = True
    fc = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 0, 1]], dtype=torch.float32)
    return {"conv.weight": conv, "fc.weight": fc}


def _state() -> dict[str, torch.Tensor]:
    """A rewind-point state with every kind of tensor a CIFAR model has, plus bfloat16."""
    gen = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(3, 3, 3, generator=gen),
        "bn.weight": torch.rand(3, generator=gen),
        "bn.bias": torch.randn(3, generator=gen),
        "bn.running_mean": torch.randn(3, generator=gen),
        "bn.running_var": torch.rand(3, generator=gen) + 0.5,
        "bn.num_batches_tracked": torch.tensor(391, dtype=torch.int64),
        "fc.weight": torch.randn(2, 5, generator=gen),
        "fc.bias": torch.randn(2, generator=gen).to(torch.bfloat16),
        "extra.half": torch.randn(3, generator=gen).to(torch.float16),
        "extra.flags": torch.tensor([True, False, True]),
    }


def _trained() -> dict[str, torch.Tensor]:
    """A retrained sparse model's plain state dict: masks multiplied in, float32, float64 and
    int64 tensors, 0-d ones among them (BatchNorm's num_batches_tracked)."""
    gen = torch.Generator().manual_seed(1)
    masks = _hand_masks()
    return {
        "conv.weight": torch.randn(3, 3, 3, generator=gen) * masks["conv.weight"],
        "bn.running_var": torch.rand(3, generator=gen, dtype=torch.float64) + 0.5,
        "bn.num_batches_tracked": torch.tensor(1955, dtype=torch.int64),
        "fc.weight": torch.randn(2, 5, generator=gen) * masks["fc.weight"],
        "fc.scale": torch.tensor(0.25, dtype=torch.float64),
        "fc.steps": torch.arange(4, dtype=torch.int64),
    }


META = {"method": "cs", "model": "resnet20", "rewind_epoch": 2, "test_accuracy": 0.9125}


@pytest.fixture
def ticket(tmp_path: Path) -> Path:
    """A freshly written ticket directory (no trained weights)."""
    return write_ticket_dir(tmp_path / "t1", _hand_masks(), _state(), META)


@pytest.fixture
def trained_ticket(tmp_path: Path) -> Path:
    """A freshly written ticket directory with trained weights."""
    return write_ticket_dir(tmp_path / "t2", _hand_masks(), _state(), META, trained=_trained())


def _assert_same_tensors(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(found) == list(expected)
    for name, tensor in expected.items():
        assert type(found[name]) is torch.Tensor, name
        assert found[name].dtype == tensor.dtype, name
        assert found[name].shape == tensor.shape, name
        assert torch.equal(found[name], tensor), name


def _flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0xFF
    path.write_bytes(bytes(data))


# ---------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 3, 3, 3), (7,), (1,), (100, 10), (8,), (2, 0, 3), ()])
@pytest.mark.parametrize("kind", ["random", "zeros", "ones"])
def test_pack_unpack_round_trip(shape: tuple[int, ...], kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    if kind == "random":
        mask = torch.rand(shape, generator=gen) < 0.3
    elif kind == "zeros":
        mask = torch.zeros(shape, dtype=torch.bool)
    else:
        mask = torch.ones(shape, dtype=torch.bool)
    packed = pack_mask(mask)
    assert len(packed) == math.ceil(mask.numel() / 8)
    restored = unpack_mask(packed, shape)
    assert restored.dtype == torch.bool
    assert restored.shape == torch.Size(shape)
    assert torch.equal(restored, mask)


def test_pack_is_one_bit_per_weight_big_bit_order() -> None:
    assert len(pack_mask(torch.ones(64, dtype=torch.bool))) == 8
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.bool)
    assert pack_mask(mask) == bytes([0b10000001, 0b11000000])
    assert pack_mask(torch.ones(7, dtype=torch.bool)) == bytes([0b11111110])


def test_pack_flattens_in_c_order() -> None:
    mask = torch.tensor([[1, 0], [0, 0], [0, 0], [0, 1]], dtype=torch.bool)
    assert pack_mask(mask) == bytes([0b10000001])
    assert pack_mask(mask.t().contiguous().t()) == bytes([0b10000001])


def test_pack_accepts_numeric_zero_one_and_rejects_other_values() -> None:
    numeric = torch.tensor([0.0, 1.0, 1.0, 0.0])
    assert pack_mask(numeric) == pack_mask(numeric.bool())
    assert pack_mask(torch.tensor([1, 0, 1], dtype=torch.int64)) == bytes([0b10100000])
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_mask(torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        pack_mask(torch.tensor([float("nan"), 1.0]))


def test_unpack_rejects_wrong_length_and_set_padding_bits() -> None:
    with pytest.raises(ValueError, match="needs 2 bytes, got 1"):
        unpack_mask(b"\xff", (9,))
    with pytest.raises(ValueError, match="padding bits"):
        unpack_mask(bytes([0b11111111]), (7,))
    assert unpack_mask(bytes([0b11111110]), (7,)).all()


def test_unpacked_mask_is_fresh_and_writable() -> None:
    data = bytearray(pack_mask(torch.ones(16, dtype=torch.bool)))
    mask = unpack_mask(bytes(data), (4, 4))
    mask[0, 0] = False
    data[0] = 0
    assert int(mask.sum()) == 15


# ---------------------------------------------------------------------------
# Full round trip
# ---------------------------------------------------------------------------


def test_round_trip_is_bit_exact(ticket: Path) -> None:
    masks, state, document = read_ticket_dir(ticket)
    expected_masks = {name: mask.bool() for name, mask in _hand_masks().items()}
    assert list(masks) == list(expected_masks)
    for name, mask in expected_masks.items():
        assert masks[name].dtype == torch.bool
        assert torch.equal(masks[name], mask)
    expected_state = _state()
    assert list(state) == list(expected_state)
    for name, tensor in expected_state.items():
        assert state[name].dtype == tensor.dtype, name
        assert state[name].shape == tensor.shape, name
        assert torch.equal(state[name], tensor), name
    assert state["bn.num_batches_tracked"].item() == 391
    assert state["bn.num_batches_tracked"].dim() == 0
    for key, value in META.items():
        assert document[key] == value


def test_returned_tensors_are_writable_and_independent(ticket: Path) -> None:
    masks, state, _ = read_ticket_dir(ticket)
    state["conv.weight"].add_(1.0)
    state["fc.bias"].zero_()
    masks["fc.weight"].fill_(False)
    masks2, state2, _ = read_ticket_dir(ticket)
    assert torch.equal(state2["conv.weight"], _state()["conv.weight"])
    assert int(masks2["fc.weight"].sum()) == 7


def test_ticket_without_trained_weights(ticket: Path) -> None:
    assert sorted(os.listdir(ticket)) == ["masks.bin", "rewind.safetensors", "ticket.json"]
    assert read_trained_state(ticket) is None
    document = json.loads((ticket / "ticket.json").read_text(encoding="utf-8"))
    assert "trained" not in document and "trained_sha256" not in document


def test_round_trip_with_trained_weights_is_bit_exact(trained_ticket: Path) -> None:
    masks, state, document = read_ticket_dir(trained_ticket)
    _assert_same_tensors(state, _state())
    assert int(masks["conv.weight"].sum()) == 5
    trained = read_trained_state(trained_ticket)
    assert trained is not None
    _assert_same_tensors(trained, _trained())
    assert trained["bn.num_batches_tracked"].dim() == 0
    assert trained["bn.num_batches_tracked"].item() == 1955
    assert trained["fc.scale"].item() == 0.25
    assert int((trained["conv.weight"] != 0).sum()) <= 5
    for key, value in META.items():
        assert document[key] == value


def test_trained_tensors_are_writable_and_independent(trained_ticket: Path) -> None:
    trained = read_trained_state(trained_ticket)
    trained["conv.weight"].add_(1.0)
    trained["bn.num_batches_tracked"].zero_()
    again = read_trained_state(trained_ticket)
    _assert_same_tensors(again, _trained())


def test_trained_index_and_checksum_in_ticket_json(trained_ticket: Path) -> None:
    document = json.loads((trained_ticket / "ticket.json").read_text(encoding="utf-8"))
    assert sorted(os.listdir(trained_ticket)) == [
        "masks.bin", "rewind.safetensors", "ticket.json", "trained.safetensors"
    ]
    data = (trained_ticket / TRAINED_FILE).read_bytes()
    assert document["trained_sha256"] == hashlib.sha256(data).hexdigest()
    assert document["trained"] == [
        {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
        for name, t in _trained().items()
    ]
    assert document["trained"][2] == {
        "name": "bn.num_batches_tracked", "dtype": "int64", "shape": []
    }
    assert document["meta_sha256"] == _canonical_sha256(document)
    loaded = safetensors.torch.load(data)
    assert sorted(loaded) == sorted(_trained())
    assert all(torch.equal(loaded[n], t) for n, t in _trained().items())


def test_metadata_sparsity_and_densities(ticket: Path) -> None:
    document = json.loads((ticket / "ticket.json").read_text(encoding="utf-8"))
    assert document["format_version"] == FORMAT_VERSION == 3
    assert document["total_masked"] == 37
    assert document["total_kept"] == 12
    assert document["sparsity"] == pytest.approx(25 / 37)
    conv, fc = document["masks"]
    assert conv == {
        "name": "conv.weight",
        "shape": [3, 3, 3],
        "numel": 27,
        "density": pytest.approx(5 / 27),
        "offset": 0,
        "nbytes": 4,
    }
    assert fc == {
        "name": "fc.weight",
        "shape": [2, 5],
        "numel": 10,
        "density": pytest.approx(0.7),
        "offset": 4,
        "nbytes": 2,
    }
    assert [entry["name"] for entry in document["state"]] == list(_state())
    by_name = {entry["name"]: entry for entry in document["state"]}
    assert by_name["bn.num_batches_tracked"] == {
        "name": "bn.num_batches_tracked",
        "dtype": "int64",
        "shape": [],
    }
    assert by_name["conv.weight"] == {"name": "conv.weight", "dtype": "float32", "shape": [3, 3, 3]}
    assert by_name["fc.bias"]["dtype"] == "bfloat16"
    assert by_name["extra.half"]["dtype"] == "float16"
    assert by_name["extra.flags"]["dtype"] == "bool"


def test_ticket_json_is_indented_sorted_utf8(tmp_path: Path) -> None:
    path = write_ticket_dir(tmp_path / "t", _hand_masks(), {}, {"note": "schön", "a": 1})
    text = (path / "ticket.json").read_bytes().decode("utf-8")
    assert "schön" in text
    assert text.startswith('{\n  "a": 1,\n')
    keys = list(json.loads(text))
    assert keys == sorted(keys)


def test_checksums_in_json_match_files(ticket: Path) -> None:
    document = json.loads((ticket / "ticket.json").read_text(encoding="utf-8"))
    masks_sha = hashlib.sha256((ticket / "masks.bin").read_bytes()).hexdigest()
    state_sha = hashlib.sha256((ticket / "rewind.safetensors").read_bytes()).hexdigest()
    assert document["mask_sha256"] == masks_sha
    assert document["state_sha256"] == state_sha


def test_files_are_packed_bits_and_safetensors_not_pickle(ticket: Path) -> None:
    masks_bin = (ticket / "masks.bin").read_bytes()
    rewind = (ticket / "rewind.safetensors").read_bytes()
    assert len(masks_bin) == math.ceil(27 / 8) + math.ceil(10 / 8) == 6
    assert masks_bin[:1] != b"\x80"
    assert masks_bin == pack_mask(_hand_masks()["conv.weight"]) + pack_mask(
        _hand_masks()["fc.weight"]
    )
    # safetensors: an 8-byte little-endian header length, a JSON header, the raw tensor bytes
    # (10 tensors: 27*4 + 4*3*4 + 8 + 10*4 + 2*2 + 3*2 + 3 = 217 bytes).
    header_length = int.from_bytes(rewind[:8], "little")
    header = json.loads(rewind[8 : 8 + header_length])
    assert len(rewind) == 8 + header_length + 217
    assert header["conv.weight"]["dtype"] == "F32" and header["conv.weight"]["shape"] == [3, 3, 3]
    assert header["bn.num_batches_tracked"]["shape"] == []
    assert rewind[:1] != b"\x80" and b"PK" not in rewind[:2]
    begin, end = header["conv.weight"]["data_offsets"]
    data = rewind[8 + header_length + begin : 8 + header_length + end]
    assert data == _state()["conv.weight"].numpy().astype("<f4").tobytes()
    loaded = safetensors.torch.load(rewind)
    assert all(torch.equal(loaded[name], tensor) for name, tensor in _state().items())


def test_write_accepts_masks_and_state_on_other_layouts(tmp_path: Path) -> None:
    weight = torch.randn(4, 6)
    mask = (torch.rand(6, 4) > 0.5).t()
    path = write_ticket_dir(
        tmp_path / "t", {"w": mask}, {"w": weight.t(), "p": torch.nn.Parameter(torch.ones(2))}, {}
    )
    masks, state, _ = read_ticket_dir(path)
    assert torch.equal(masks["w"], mask)
    assert torch.equal(state["w"], weight.t())
    assert type(state["p"]) is torch.Tensor


def test_write_accepts_tensors_sharing_storage(tmp_path: Path) -> None:
    """Tied weights and views of one another are stored as tensors of their own."""
    weight = torch.randn(4, 6)
    tied = {"a.weight": weight, "b.weight": weight, "row": weight[1], "col": weight[:, 2]}
    path = write_ticket_dir(tmp_path / "t", {"w": weight > 0}, tied, {}, trained=tied)
    _, state, _ = read_ticket_dir(path)
    _assert_same_tensors(state, tied)
    _assert_same_tensors(read_trained_state(path), tied)


# ---------------------------------------------------------------------------
# Write errors
# ---------------------------------------------------------------------------


def test_write_onto_existing_path_leaves_old_ticket_untouched(ticket: Path) -> None:
    before = {name: (ticket / name).read_bytes() for name in ticketfile.TICKET_FILES}
    other = {"conv.weight": torch.ones(3, dtype=torch.bool)}
    with pytest.raises(FileExistsError, match="t1"):
        write_ticket_dir(ticket, other, {}, {})
    after = {name: (ticket / name).read_bytes() for name in ticketfile.TICKET_FILES}
    assert after == before
    assert sorted(os.listdir(ticket.parent)) == ["t1"]


@pytest.mark.parametrize(
    "meta, needle",
    [
        ({"test_accuracy": float("nan")}, "meta\\['test_accuracy'\\]"),
        ({"settings": {"lr": float("inf")}}, "meta\\['settings'\\]"),
        ({"model": object()}, "meta\\['model'\\]"),
        ({"epochs": torch.tensor(3)}, "meta\\['epochs'\\]"),
        ({"sparsity": 0.5}, "meta key 'sparsity' is reserved"),
        ({"trained": True}, "meta key 'trained' is reserved"),
        ({"trained_sha256": "0" * 64}, "meta key 'trained_sha256' is reserved"),
        ({1: "x"}, "meta keys must be strings"),
    ],
)
def test_bad_meta_raises_and_leaves_nothing(tmp_path: Path, meta: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        write_ticket_dir(tmp_path / "t", _hand_masks(), _state(), meta)
    assert os.listdir(tmp_path) == []


def test_bad_masks_and_state_raise_naming_the_tensor(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mask 'm' must contain only 0 and 1"):
        write_ticket_dir(tmp_path / "t", {"m": torch.tensor([0, 2])}, {}, {})
    with pytest.raises(ValueError, match="masks is empty"):
        write_ticket_dir(tmp_path / "t", {}, {}, {})
    with pytest.raises(ValueError, match="state 'z' has dtype torch.complex64"):
        write_ticket_dir(
            tmp_path / "t", _hand_masks(), {"z": torch.zeros(2, dtype=torch.complex64)}, {}
        )
    with pytest.raises(TypeError, match="state 'n' must be a torch.Tensor"):
        write_ticket_dir(tmp_path / "t", _hand_masks(), {"n": [1.0]}, {})
    with pytest.raises(ValueError, match="state name '__metadata__' is reserved by safetensors"):
        write_ticket_dir(tmp_path / "t", _hand_masks(), {"__metadata__": torch.ones(1)}, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "trained, error, needle",
    [
        ({}, ValueError, "trained is empty; pass None"),
        ([torch.ones(1)], TypeError, "trained must be a state dict"),
        ({"z": torch.zeros(2, dtype=torch.complex64)}, ValueError, "trained 'z' has dtype"),
        ({"n": 1.0}, TypeError, "trained 'n' must be a torch.Tensor"),
        ({"": torch.ones(1)}, ValueError, "trained names must be non-empty strings"),
        ({"__metadata__": torch.ones(1)}, ValueError, "'__metadata__' is reserved"),
    ],
)
def test_bad_trained_raises_and_leaves_nothing(
    tmp_path: Path, trained: object, error: type, needle: str
) -> None:
    with pytest.raises(error, match=needle):
        write_ticket_dir(tmp_path / "t", _hand_masks(), _state(), META, trained=trained)
    assert os.listdir(tmp_path) == []


def test_failure_during_write_removes_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_rename(src: object, dst: object) -> None:
        raise OSError("disk went away")

    monkeypatch.setattr(ticketfile.os, "rename", broken_rename)
    with pytest.raises(OSError, match="disk went away"):
        write_ticket_dir(tmp_path / "t", _hand_masks(), _state(), META, trained=_trained())
    assert os.listdir(tmp_path) == []


def test_failure_writing_trained_file_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written: list[str] = []
    real_write = ticketfile._write_file

    def failing_write(path: Path, data: bytes) -> None:
        if path.name == TRAINED_FILE:
            raise OSError("disk full")
        written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(ticketfile, "_write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        write_ticket_dir(tmp_path / "t", _hand_masks(), _state(), META, trained=_trained())
    assert written == ["masks.bin", "rewind.safetensors"]
    assert os.listdir(tmp_path) == []


def test_write_creates_missing_parents(tmp_path: Path) -> None:
    path = write_ticket_dir(tmp_path / "a" / "b" / "t", _hand_masks(), _state(), META)
    assert path == tmp_path / "a" / "b" / "t"
    assert sorted(os.listdir(path)) == sorted(ticketfile.TICKET_FILES)
    assert sorted(ticketfile.TICKET_FILES) == ["masks.bin", "rewind.safetensors", "ticket.json"]


# ---------------------------------------------------------------------------
# Read errors
# ---------------------------------------------------------------------------


def test_flipped_byte_in_masks_bin_is_a_checksum_error(ticket: Path) -> None:
    _flip_byte(ticket / "masks.bin", 1)
    with pytest.raises(TicketFormatError, match="masks.bin checksum mismatch"):
        read_ticket_dir(ticket)


def _refuse_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to decode a safetensors file fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reader decoded a safetensors file before verifying it")

    monkeypatch.setattr(ticketfile.safetensors.torch, "load", refuse)


@pytest.mark.parametrize("index", [3, 20, -5], ids=["header_length", "header", "data"])
def test_flipped_byte_in_rewind_safetensors_is_a_checksum_error(
    ticket: Path, monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    _flip_byte(ticket / "rewind.safetensors", index)
    _refuse_decoding(monkeypatch)
    with pytest.raises(TicketFormatError, match="rewind.safetensors checksum mismatch") as info:
        read_ticket_dir(ticket)
    assert str(ticket) in str(info.value)


@pytest.mark.parametrize("index", [3, 20, -5], ids=["header_length", "header", "data"])
def test_flipped_byte_in_trained_safetensors_is_a_checksum_error(
    trained_ticket: Path, monkeypatch: pytest.MonkeyPatch, index: int
) -> None:
    _flip_byte(trained_ticket / TRAINED_FILE, index)
    _refuse_decoding(monkeypatch)
    with pytest.raises(TicketFormatError, match="trained.safetensors checksum mismatch") as info:
        read_trained_state(trained_ticket)
    assert str(trained_ticket) in str(info.value)


def test_read_ticket_dir_does_not_read_the_trained_weights(trained_ticket: Path) -> None:
    """The trained weights are verified when they are read, by read_trained_state."""
    _flip_byte(trained_ticket / TRAINED_FILE, -5)
    _, state, _ = read_ticket_dir(trained_ticket)
    _assert_same_tensors(state, _state())


@pytest.mark.parametrize("cut", [1, 100], ids=["last_byte", "most"])
def test_truncated_rewind_safetensors_is_a_checksum_error(ticket: Path, cut: int) -> None:
    data = (ticket / "rewind.safetensors").read_bytes()
    (ticket / "rewind.safetensors").write_bytes(data[:-cut])
    with pytest.raises(TicketFormatError, match="rewind.safetensors checksum mismatch"):
        read_ticket_dir(ticket)


def test_extra_bytes_in_rewind_safetensors_are_a_checksum_error(ticket: Path) -> None:
    with open(ticket / "rewind.safetensors", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(TicketFormatError, match="rewind.safetensors checksum mismatch"):
        read_ticket_dir(ticket)


def test_truncated_masks_bin(ticket: Path) -> None:
    data = (ticket / "masks.bin").read_bytes()
    (ticket / "masks.bin").write_bytes(data[:-2])
    with pytest.raises(
        TicketFormatError, match="masks.bin is truncated: expected 6 bytes, found 4"
    ):
        read_ticket_dir(ticket)


def test_garbage_ticket_json(ticket: Path) -> None:
    (ticket / "ticket.json").write_bytes(b"\x00{not json")
    with pytest.raises(TicketFormatError, match="ticket.json is not valid"):
        read_ticket_dir(ticket)


def test_ticket_json_not_an_object(ticket: Path) -> None:
    (ticket / "ticket.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(TicketFormatError, match="ticket.json must hold a JSON object"):
        read_ticket_dir(ticket)


@pytest.mark.parametrize("filename", ["ticket.json", "masks.bin", "rewind.safetensors"])
def test_missing_file_is_named(ticket: Path, filename: str) -> None:
    (ticket / filename).unlink()
    with pytest.raises(TicketFormatError, match=f"{filename} is missing"):
        read_ticket_dir(ticket)
    with pytest.raises(TicketFormatError, match=f"{filename} is missing"):
        read_trained_state(ticket)


def test_missing_trained_file_is_a_clear_error(trained_ticket: Path) -> None:
    (trained_ticket / TRAINED_FILE).unlink()
    needle = (
        r"trained\.safetensors is missing; this ticket \(format version 3, with trained "
        r"weights\) holds \['ticket\.json', 'masks\.bin', 'rewind\.safetensors', "
        r"'trained\.safetensors'\]"
    )
    with pytest.raises(TicketFormatError, match=needle) as info:
        read_trained_state(trained_ticket)
    assert str(trained_ticket) in str(info.value)
    with pytest.raises(TicketFormatError, match=needle):
        read_ticket_dir(trained_ticket)


def test_unrecorded_trained_file_is_not_part_of_the_ticket(ticket: Path) -> None:
    (ticket / TRAINED_FILE).write_bytes(safetensors.torch.save(_trained()))
    assert read_trained_state(ticket) is None
    _, state, _ = read_ticket_dir(ticket)
    _assert_same_tensors(state, _state())


def test_missing_directory_for_trained_state(tmp_path: Path) -> None:
    with pytest.raises(TicketFormatError, match="no ticket directory exists"):
        read_trained_state(tmp_path / "nope")


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TicketFormatError, match="no ticket directory exists"):
        read_ticket_dir(tmp_path / "nope")


def _canonical_sha256(document: dict) -> str:
    """sha256 of the canonical JSON of ``document`` without ``meta_sha256``, as the format
    describes it (sorted keys, no whitespace, UTF-8), computed independently of the reader."""
    rest = {key: value for key, value in document.items() if key != "meta_sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _edit_json(ticket: Path, edit, reseal: bool = True) -> None:
    """Apply ``edit`` to ticket.json. ``reseal`` recomputes ``meta_sha256`` afterwards (as a
    buggy writer would), so that the checks behind the metadata checksum are exercised."""
    document = json.loads((ticket / "ticket.json").read_text(encoding="utf-8"))
    edit(document)
    if reseal and "meta_sha256" in document:
        document["meta_sha256"] = _canonical_sha256(document)
    (ticket / "ticket.json").write_text(json.dumps(document), encoding="utf-8")


def _replace_file(ticket: Path, filename: str, key: str, data: bytes) -> None:
    """Replace ``filename`` by ``data`` and record its sha256 (``key + "_sha256"``) and a
    resealed ``meta_sha256`` in ticket.json, so that only checks past the checksums can
    tell."""
    (ticket / filename).write_bytes(data)
    _edit_json(ticket, lambda d: d.update({f"{key}_sha256": hashlib.sha256(data).hexdigest()}))


@pytest.mark.parametrize("version", [4, 0, "1", "3", True, 3.0])
def test_unsupported_format_version(ticket: Path, version: object) -> None:
    _edit_json(ticket, lambda d: d.update(format_version=version))
    with pytest.raises(TicketFormatError, match=r"reads format versions \[1, 2, 3\]"):
        read_ticket_dir(ticket)
    with pytest.raises(TicketFormatError, match=r"reads format versions \[1, 2, 3\]"):
        read_trained_state(ticket)


# ---------------------------------------------------------------------------
# Metadata checksum (format versions 2 and 3)
# ---------------------------------------------------------------------------


def test_meta_sha256_is_the_sha256_of_the_canonical_json(ticket: Path) -> None:
    document = json.loads((ticket / "ticket.json").read_text(encoding="utf-8"))
    assert document["format_version"] == 3
    assert document["meta_sha256"] == _canonical_sha256(document)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d.update(test_accuracy=0.99),
        lambda d: d.update(model_kwargs={"width": 2}),
        lambda d: d.pop("method"),
        lambda d: d["masks"][0].update(density=0.5),
        lambda d: d["state"][0].update(dtype="float64"),
        lambda d: d.update(sparsity=0.1),
    ],
    ids=["test_accuracy", "new_key", "removed_key", "mask_index", "state_index", "sparsity"],
)
def test_edited_metadata_is_a_checksum_error(ticket: Path, edit) -> None:
    _edit_json(ticket, edit, reseal=False)
    with pytest.raises(
        TicketFormatError, match=r"ticket.json metadata checksum mismatch.*edited or corrupted"
    ) as info:
        read_ticket_dir(ticket)
    assert str(ticket) in str(info.value)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["trained"][0].update(shape=[27]),
        lambda d: d["trained"].pop(),
        lambda d: d.update(trained_sha256="0" * 64),
        lambda d: (d.pop("trained"), d.pop("trained_sha256")),
    ],
    ids=["trained_shape", "trained_entry", "trained_sha256", "trained_removed"],
)
def test_edited_trained_index_is_a_checksum_error(trained_ticket: Path, edit) -> None:
    _edit_json(trained_ticket, edit, reseal=False)
    with pytest.raises(TicketFormatError, match=r"ticket.json metadata checksum mismatch"):
        read_trained_state(trained_ticket)
    with pytest.raises(TicketFormatError, match=r"ticket.json metadata checksum mismatch"):
        read_ticket_dir(trained_ticket)


@pytest.mark.parametrize(
    "key, other", [("trained", "trained_sha256"), ("trained_sha256", "trained")]
)
def test_trained_index_and_checksum_come_together(
    trained_ticket: Path, key: str, other: str
) -> None:
    _edit_json(trained_ticket, lambda d: d.pop(key))
    needle = rf"ticket.json has \['{other}'\] but lacks \['{key}'\]"
    with pytest.raises(TicketFormatError, match=needle):
        read_ticket_dir(trained_ticket)
    with pytest.raises(TicketFormatError, match=needle):
        read_trained_state(trained_ticket)


def test_reformatted_ticket_json_still_loads(ticket: Path) -> None:
    _edit_json(ticket, lambda d: None, reseal=False)
    masks, _, document = read_ticket_dir(ticket)
    assert document["test_accuracy"] == META["test_accuracy"]
    assert int(masks["conv.weight"].sum()) == 5


def test_caller_cannot_set_meta_sha256(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta key 'meta_sha256' is reserved"):
        write_ticket_dir(tmp_path / "t", _hand_masks(), {}, {"meta_sha256": "0" * 64})


# A ticket written by the version-1 writer (before meta_sha256), kept byte for byte.
V1_TICKET_JSON = """{
  "format_version": 1,
  "mask_sha256": "bb81243f60afb620e29be7f53bf0b71804ec88c3a548a533871a12906b3e563f",
  "masks": [{"density": 0.6, "name": "fc.weight", "nbytes": 2, "numel": 10, "offset": 0,
             "shape": [2, 5]}],
  "method": "imp",
  "name": "old",
  "sparsity": 0.4,
  "state": [
    {"dtype": "float32", "name": "fc.weight", "nbytes": 40, "offset": 0, "shape": [2, 5]},
    {"dtype": "float32", "name": "fc.bias", "nbytes": 8, "offset": 40, "shape": [2]}
  ],
  "state_sha256": "2ce9a98e3f0cfae7b7ed0231012abf726776990cb07cae647dc13987d9238046",
  "test_acc": 0.5,
  "total_kept": 6,
  "total_masked": 10
}
"""
V1_MASKS_BIN = bytes.fromhex("b340")
V1_STATE_BIN = bytes.fromhex(
    "0000003f000080bf000000400000803e000040400000c03f000000bf0000000000008040000000c0"
    "0000003e000040bf"
)


def _write_v1_ticket(path: Path) -> Path:
    path.mkdir()
    (path / "ticket.json").write_text(V1_TICKET_JSON, encoding="utf-8")
    (path / "masks.bin").write_bytes(V1_MASKS_BIN)
    (path / "state.bin").write_bytes(V1_STATE_BIN)
    return path


def test_version_1_ticket_without_meta_checksum_still_loads(tmp_path: Path) -> None:
    masks, state, document = read_ticket_dir(_write_v1_ticket(tmp_path / "old"))
    assert document["format_version"] == 1 and "meta_sha256" not in document
    assert document["test_acc"] == 0.5
    expected = torch.tensor([[1, 0, 1, 1, 0], [0, 1, 1, 0, 1]], dtype=torch.bool)
    assert torch.equal(masks["fc.weight"], expected)
    assert torch.equal(state["fc.bias"], torch.tensor([0.125, -0.75]))
    assert state["fc.weight"][1, 3].item() == 4.0
    assert read_trained_state(tmp_path / "old") is None


def test_version_1_ticket_carrying_a_meta_checksum_is_rejected(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d.update(format_version=1), reseal=False)
    with pytest.raises(TicketFormatError, match="format_version 1.*meta_sha256"):
        read_ticket_dir(ticket)


def _write_v2_ticket(path: Path, masks: dict, state: dict, meta: dict) -> Path:
    """Write a version-2 ticket the way the version-2 writer did: masks.bin as today,
    state.bin with the raw little-endian bytes of every tensor at 8-byte aligned offsets,
    each ``state`` entry with its ``offset`` and ``nbytes``, ``state_sha256`` of state.bin."""
    mask_entries, mask_bytes = [], b""
    for name, mask in masks.items():
        packed, kept = pack_mask(mask), int(mask.bool().sum())
        mask_entries.append(
            {"name": name, "shape": list(mask.shape), "numel": mask.numel(),
             "density": kept / mask.numel(), "offset": len(mask_bytes), "nbytes": len(packed)}
        )
        mask_bytes += packed
    state_entries, state_bytes = [], b""
    for name, tensor in state.items():
        raw = ticketfile.tensor_to_bytes(tensor)
        state_bytes += bytes(-len(state_bytes) % 8)
        state_entries.append(
            {"name": name, "dtype": str(tensor.dtype).removeprefix("torch."),
             "shape": list(tensor.shape), "offset": len(state_bytes), "nbytes": len(raw)}
        )
        state_bytes += raw
    total = sum(mask.numel() for mask in masks.values())
    kept = sum(int(mask.bool().sum()) for mask in masks.values())
    document = {
        **meta,
        "format_version": 2,
        "masks": mask_entries,
        "sparsity": (total - kept) / total,
        "total_masked": total,
        "total_kept": kept,
        "mask_sha256": hashlib.sha256(mask_bytes).hexdigest(),
        "state": state_entries,
        "state_sha256": hashlib.sha256(state_bytes).hexdigest(),
    }
    document["meta_sha256"] = _canonical_sha256(document)
    path.mkdir(parents=True)
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (path / "ticket.json").write_text(text, encoding="utf-8")
    (path / "masks.bin").write_bytes(mask_bytes)
    (path / "state.bin").write_bytes(state_bytes)
    return path


@pytest.fixture
def v2_ticket(tmp_path: Path) -> Path:
    """A ticket of format version 2, written as the version-2 writer wrote it."""
    return _write_v2_ticket(tmp_path / "v2", _hand_masks(), _state(), META)


def test_version_2_ticket_still_loads(v2_ticket: Path) -> None:
    assert sorted(os.listdir(v2_ticket)) == ["masks.bin", "state.bin", "ticket.json"]
    masks, state, document = read_ticket_dir(v2_ticket)
    assert document["format_version"] == 2
    _assert_same_tensors(state, _state())
    assert torch.equal(masks["conv.weight"], _hand_masks()["conv.weight"])
    assert torch.equal(masks["fc.weight"], _hand_masks()["fc.weight"].bool())
    assert document["test_accuracy"] == META["test_accuracy"]
    assert read_trained_state(v2_ticket) is None


def test_version_2_state_bin_layout(v2_ticket: Path) -> None:
    state_bin = (v2_ticket / "state.bin").read_bytes()
    # float32 conv 27*4=108 -> pad to 112; bn weight/bias/mean/var 4*(12 -> 16) = 64 -> 176;
    # int64 scalar 8 -> 184; fc.weight 40 -> 224; bf16 fc.bias 4 -> 228, pad 232;
    # fp16 extra.half 6 -> 238, pad 240; bool extra.flags 3 -> 243.
    assert len(state_bin) == 243
    assert state_bin[:108] == _state()["conv.weight"].numpy().astype("<f4").tobytes()
    assert state_bin[108:112] == bytes(4)


def test_version_2_trained_keys_are_caller_metadata(tmp_path: Path) -> None:
    """Before version 3 the writer did not own 'trained' and 'trained_sha256'."""
    meta = {**META, "trained": True, "trained_sha256": "not a checksum"}
    path = _write_v2_ticket(tmp_path / "v2", _hand_masks(), _state(), meta)
    _, _, document = read_ticket_dir(path)
    assert document["trained"] is True
    assert read_trained_state(path) is None


def test_version_2_missing_state_bin_is_named(v2_ticket: Path) -> None:
    (v2_ticket / "state.bin").unlink()
    with pytest.raises(TicketFormatError, match=r"state\.bin is missing; this ticket \(format "
                       r"version 2\) holds \['ticket\.json', 'masks\.bin', 'state\.bin'\]"):
        read_ticket_dir(v2_ticket)


def test_version_2_flipped_byte_in_state_bin(v2_ticket: Path) -> None:
    _flip_byte(v2_ticket / "state.bin", 200)
    with pytest.raises(TicketFormatError, match="state.bin checksum mismatch"):
        read_ticket_dir(v2_ticket)


def test_version_2_truncated_state_bin(v2_ticket: Path) -> None:
    data = (v2_ticket / "state.bin").read_bytes()
    (v2_ticket / "state.bin").write_bytes(data[:100])
    with pytest.raises(
        TicketFormatError, match="state.bin is truncated: expected 243 bytes, found 100"
    ):
        read_ticket_dir(v2_ticket)


def test_version_2_extra_bytes_in_state_bin(v2_ticket: Path) -> None:
    with open(v2_ticket / "state.bin", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(
        TicketFormatError, match="state.bin is too long: expected 243 bytes, found 244"
    ):
        read_ticket_dir(v2_ticket)


def test_version_2_inconsistent_state_shape(v2_ticket: Path) -> None:
    _edit_json(v2_ticket, lambda d: d["state"][0].update(shape=[3, 3, 4]))
    with pytest.raises(TicketFormatError, match="state 'conv.weight' has nbytes=108, expected 144"):
        read_ticket_dir(v2_ticket)


def test_version_2_misaligned_state_offset(v2_ticket: Path) -> None:
    _edit_json(v2_ticket, lambda d: d["state"][1].update(offset=108))
    with pytest.raises(TicketFormatError, match="state 'bn.weight' has offset=108, expected 112"):
        read_ticket_dir(v2_ticket)


# ---------------------------------------------------------------------------
# Safetensors files against their index (format version 3)
# ---------------------------------------------------------------------------


def _dropped(name: str):
    return lambda tensors: tensors.pop(name)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t.update({"conv.weight": t["conv.weight"].double()}),
         r"it holds 'conv\.weight' as float64 of shape \[3, 3, 3\], the index lists float32 "
         r"of shape \[3, 3, 3\]"),
        (lambda t: t.update({"conv.weight": t["conv.weight"].reshape(27)}),
         r"it holds 'conv\.weight' as float32 of shape \[27\], the index lists float32 of "
         r"shape \[3, 3, 3\]"),
        (lambda t: t.update({"bn.num_batches_tracked": torch.tensor([391])}),
         r"it holds 'bn\.num_batches_tracked' as int64 of shape \[1\], the index lists int64 "
         r"of shape \[\]"),
        (_dropped("bn.bias"), r"it lacks \['bn\.bias'\]"),
        (lambda t: t.update(intruder=torch.zeros(1)),
         r"it holds \['intruder'\], which the index does not list"),
        (lambda t: t.update({"bn.weight2": t.pop("bn.weight")}), r"it lacks \['bn\.weight'\]"),
    ],
    ids=["dtype", "shape", "scalar_shape", "missing", "extra", "renamed"],
)
def test_rewind_file_disagreeing_with_the_index_is_refused(
    ticket: Path, monkeypatch: pytest.MonkeyPatch, change, needle: str
) -> None:
    state = _state()
    change(state)
    _replace_file(ticket, "rewind.safetensors", "state", safetensors.torch.save(state))
    _refuse_decoding(monkeypatch)
    prefix = r"rewind\.safetensors does not match its index ticket\.json 'state': "
    with pytest.raises(TicketFormatError, match=prefix + needle) as info:
        read_ticket_dir(ticket)
    assert str(ticket) in str(info.value)


@pytest.mark.parametrize(
    "change, needle",
    [
        (lambda t: t.update({"fc.scale": t["fc.scale"].float()}),
         r"it holds 'fc\.scale' as float32 of shape \[\], the index lists float64"),
        (_dropped("bn.num_batches_tracked"), r"it lacks \['bn\.num_batches_tracked'\]"),
        (lambda t: t.update({"fc.steps": torch.arange(5)}),
         r"it holds 'fc\.steps' as int64 of shape \[5\]"),
    ],
    ids=["dtype", "missing", "shape"],
)
def test_trained_file_disagreeing_with_the_index_is_refused(
    trained_ticket: Path, monkeypatch: pytest.MonkeyPatch, change, needle: str
) -> None:
    trained = _trained()
    change(trained)
    _replace_file(trained_ticket, TRAINED_FILE, "trained", safetensors.torch.save(trained))
    _refuse_decoding(monkeypatch)
    prefix = r"trained\.safetensors does not match its index ticket\.json 'trained': "
    with pytest.raises(TicketFormatError, match=prefix + needle):
        read_trained_state(trained_ticket)


def test_rewind_file_of_another_ticket_is_refused(ticket: Path, trained_ticket: Path) -> None:
    data = (trained_ticket / TRAINED_FILE).read_bytes()
    _replace_file(ticket, "rewind.safetensors", "state", data)
    with pytest.raises(TicketFormatError, match="rewind.safetensors does not match its index"):
        read_ticket_dir(ticket)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01\x02",
        b"\xff" * 8 + b"{}",
        (4).to_bytes(8, "little") + b"[1,2]",
        (2).to_bytes(8, "little") + b"\xff\xfe",
        (13).to_bytes(8, "little") + b'{"a":{"x":1}}',
    ],
    ids=["empty", "short", "header_past_end", "not_an_object", "not_utf8", "no_dtype"],
)
def test_rewind_file_without_a_safetensors_header_is_refused(ticket: Path, data: bytes) -> None:
    _replace_file(ticket, "rewind.safetensors", "state", data)
    with pytest.raises(TicketFormatError, match="rewind.safetensors has no valid safetensors"):
        read_ticket_dir(ticket)


def test_rewind_file_with_a_bad_data_section_is_refused(ticket: Path) -> None:
    data = (ticket / "rewind.safetensors").read_bytes() + b"\0" * 8
    _replace_file(ticket, "rewind.safetensors", "state", data)
    with pytest.raises(TicketFormatError, match="rewind.safetensors is not a valid safetensors"):
        read_ticket_dir(ticket)


def test_safetensors_string_metadata_is_ignored(ticket: Path) -> None:
    data = safetensors.torch.save(_state(), metadata={"format": "pt"})
    _replace_file(ticket, "rewind.safetensors", "state", data)
    _, state, _ = read_ticket_dir(ticket)
    _assert_same_tensors(state, _state())


# ---------------------------------------------------------------------------
# Declared sizes against the bytes present
# ---------------------------------------------------------------------------


def _no_unpacking(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to unpack a mask or build a state tensor fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the reader decoded a tensor before checking the file sizes")

    monkeypatch.setattr(ticketfile, "unpack_mask", refuse)
    monkeypatch.setattr(ticketfile, "tensor_from_bytes", refuse)
    monkeypatch.setattr(ticketfile.safetensors.torch, "load", refuse)


def test_huge_mask_shape_is_rejected_before_allocating(
    ticket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = [1_000_000, 1_000_000, 1000]
    numel = math.prod(shape)
    _edit_json(
        ticket,
        lambda d: d["masks"][1].update(shape=shape, numel=numel, nbytes=-(-numel // 8)),
    )
    _no_unpacking(monkeypatch)
    with pytest.raises(
        TicketFormatError, match=r"mask 'fc\.weight'.*masks\.bin holds only 6 bytes"
    ) as info:
        read_ticket_dir(ticket)
    assert str(ticket) in str(info.value)


def test_huge_state_shape_is_rejected_before_allocating(
    ticket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = [1_000_000, 1_000_000, 1000]
    _edit_json(ticket, lambda d: d["state"][-1].update(shape=shape))
    _no_unpacking(monkeypatch)
    monkeypatch.setattr(ticketfile, "unpack_mask", unpack_mask)
    with pytest.raises(
        TicketFormatError,
        match=r"rewind\.safetensors does not match its index.*'extra\.flags' as bool of shape "
        r"\[3\], the index lists bool of shape \[1000000, 1000000, 1000\]",
    ):
        read_ticket_dir(ticket)


def test_version_2_huge_state_shape_is_rejected_before_allocating(
    v2_ticket: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shape = [1_000_000, 1_000_000, 1000]
    _edit_json(v2_ticket, lambda d: d["state"][-1].update(shape=shape, nbytes=math.prod(shape)))
    _no_unpacking(monkeypatch)
    with pytest.raises(
        TicketFormatError, match=r"state 'extra\.flags'.*state\.bin holds only 243 bytes"
    ):
        read_ticket_dir(v2_ticket)


def test_huge_mask_shape_without_reseal_is_a_checksum_error(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d["masks"][0].update(shape=[1_000_000, 1_000_000, 1000]),
               reseal=False)
    with pytest.raises(TicketFormatError, match="metadata checksum mismatch"):
        read_ticket_dir(ticket)


@pytest.mark.parametrize(
    "entry, needle",
    [
        ({"numel": 26}, r"mask 'conv\.weight' has numel=26, expected 27"),
        ({"shape": [3, -3, -3]}, r"mask 'conv\.weight' has an invalid shape"),
        ({"shape": [3.0, 3, 3]}, r"mask 'conv\.weight' has an invalid shape"),
        ({"numel": True}, r"mask 'conv\.weight' has numel=True"),
    ],
)
def test_inconsistent_mask_entry_names_the_mask(ticket: Path, entry: dict, needle: str) -> None:
    _edit_json(ticket, lambda d: d["masks"][0].update(entry))
    with pytest.raises(TicketFormatError, match=needle):
        read_ticket_dir(ticket)


def test_missing_writer_key(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d.pop("state_sha256"))
    with pytest.raises(TicketFormatError, match=r"ticket.json lacks the keys \['state_sha256'\]"):
        read_ticket_dir(ticket)


def test_unknown_dtype(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d["state"][0].update(dtype="float8"))
    with pytest.raises(TicketFormatError, match="state 'conv.weight' has unknown dtype 'float8'"):
        read_ticket_dir(ticket)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["trained"][1].update(dtype=["float64"]),
         r"trained 'bn\.running_var' has unknown dtype"),
        (lambda d: d["trained"][1].pop("shape"),
         r"trained 'bn\.running_var' lacks the field 'shape'"),
        (lambda d: d["trained"].append(dict(d["trained"][0])), r"lists 'conv\.weight' twice"),
        (lambda d: d.update(trained={}), r"'trained' must be a list"),
    ],
    ids=["dtype", "shape", "twice", "not_a_list"],
)
def test_bad_trained_index_is_refused_by_both_readers(trained_ticket: Path, edit, needle) -> None:
    _edit_json(trained_ticket, edit)
    with pytest.raises(TicketFormatError, match=needle):
        read_trained_state(trained_ticket)
    with pytest.raises(TicketFormatError, match=needle):
        read_ticket_dir(trained_ticket)


def test_inconsistent_mask_index(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d["masks"][1].update(offset=3))
    with pytest.raises(TicketFormatError, match="mask 'fc.weight' has offset=3, expected 4"):
        read_ticket_dir(ticket)


def test_recorded_total_kept_must_match_masks(ticket: Path) -> None:
    _edit_json(ticket, lambda d: d.update(total_kept=13))
    with pytest.raises(TicketFormatError, match="total_kept=13 but masks.bin gives 12"):
        read_ticket_dir(ticket)


def test_nonzero_padding_bits_are_rejected(tmp_path: Path) -> None:
    path = write_ticket_dir(tmp_path / "t", {"m": torch.ones(7, dtype=torch.bool)}, {}, {})
    (path / "masks.bin").write_bytes(b"\xff")
    _edit_json(path, lambda d: d.update(mask_sha256=hashlib.sha256(b"\xff").hexdigest()))
    with pytest.raises(TicketFormatError, match="masks.bin mask 'm'.*padding bits"):
        read_ticket_dir(path)


def test_empty_state_round_trips(tmp_path: Path) -> None:
    path = write_ticket_dir(tmp_path / "t", _hand_masks(), {}, {})
    assert safetensors.torch.load((path / "rewind.safetensors").read_bytes()) == {}
    masks, state, document = read_ticket_dir(path)
    assert state == {}
    assert document["state"] == []
    assert int(masks["conv.weight"].sum()) == 5
