"""On-disk format of a ticket: the artifact users keep.

A ticket (format version 3, the one the writer writes) is a directory holding:

``ticket.json``
    UTF-8 JSON, indented, keys sorted. The writer owns the keys in ``WRITER_KEYS``; the
    caller's metadata (method, settings, model, dataset, rewind epoch, accuracy, ...) is
    merged into the same top-level object. The writer's keys:

    ``format_version``
        3.
    ``masks``
        The mask index, one entry per mask in ``masks.bin`` order: ``name``, ``shape``,
        ``numel``, ``density`` (kept / numel), ``offset`` and ``nbytes`` in ``masks.bin``.
    ``sparsity``, ``total_masked``, ``total_kept``
        Totals over every mask: pruned fraction, weights masked, weights kept.
    ``mask_sha256``
        sha256 (hex) of the bytes of ``masks.bin``.
    ``state``
        The index of the rewind-point state, one entry per tensor in the caller's order:
        ``name``, ``dtype`` (a key of ``DTYPES``) and ``shape`` (a list, ``[]`` for 0-d).
    ``state_sha256``
        sha256 (hex) of the bytes of ``rewind.safetensors``.
    ``trained``
        Only in a ticket holding trained weights: the index of ``trained.safetensors``,
        entries as in ``state``.
    ``trained_sha256``
        Only beside ``trained``: sha256 (hex) of the bytes of ``trained.safetensors``.
    ``meta_sha256``
        sha256 (hex) of the canonical JSON of every other top-level key: ``json.dumps(rest,
        sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8. It
        covers the caller's metadata and the writer's keys alike (indexes, totals, file
        checksums), so any edit of ticket.json is detected, while re-indenting or
        reordering its keys is not an edit.
``masks.bin``
    The binary masks, 1 bit per weight: ``numpy.packbits`` (big bit order) of each
    flattened C-order bool mask. Every mask starts on a byte boundary; masks follow the
    order of ``ticket.json["masks"]`` with no gaps. Padding bits past ``numel`` are zero.
``rewind.safetensors``
    The rewind-point state as a safetensors file (https://github.com/huggingface/safetensors:
    an 8-byte little-endian header length, a JSON header giving each tensor's dtype, shape
    and data offsets, then the raw little-endian tensor bytes). It holds exactly the
    tensors of ``ticket.json["state"]``, with the same names, dtypes and shapes.
``trained.safetensors``
    Optional (present exactly when ticket.json has ``trained``): the retrained sparse
    model behind the ticket's reported accuracy, as its plain state dict (parameter and
    buffer names, masks already multiplied in, so pruned weights are zeros), in the same
    safetensors layout, matching ``ticket.json["trained"]``.

The files every ticket of version 3 holds are ``TICKET_FILES``; ``trained.safetensors``
(``TRAINED_FILE``) comes on top when the ticket has trained weights. A
``trained.safetensors`` that ticket.json does not record is not part of the ticket and is
never read.

Older versions, which the reader still reads (``SUPPORTED_FORMAT_VERSIONS``):

* Version 2 keeps the state in ``state.bin`` instead of ``rewind.safetensors``: the raw
  little-endian bytes of every tensor, concatenated in the order of ``ticket.json["state"]``,
  each starting at an 8-byte aligned offset (zero bytes fill the gaps), the file ending
  with the last tensor's last byte. Its ``state`` entries carry ``offset`` and ``nbytes``
  (in ``state.bin``) besides ``name``, ``dtype`` and ``shape``, and ``state_sha256`` is
  the sha256 of ``state.bin``. It has no trained weights; ``trained`` and
  ``trained_sha256``, if present, are the caller's metadata.
* Version 1 is version 2 without ``meta_sha256`` (its metadata is not checksummed).

Reading verifies before decoding. Every index entry of ``masks.bin`` and ``state.bin`` is
checked against the size of its file before anything is read, so a damaged or crafted
index cannot make the reader allocate more than the files hold. A safetensors file is read
whole, its sha256 checked against ticket.json, and only then its header is parsed and
compared with the ticket.json index (names, dtypes, shapes) before
``safetensors.torch.load`` decodes any tensor. Nothing here pickles or unpickles: the
format is plain JSON, raw bytes and safetensors, and every problem found while reading
raises ``TicketFormatError`` naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1, 2, 3)

TICKET_JSON = "ticket.json"
MASKS_BIN = "masks.bin"
REWIND_FILE = "rewind.safetensors"
TRAINED_FILE = "trained.safetensors"
# The state file of versions 1 and 2.
STATE_BIN = "state.bin"
# The files every ticket of the writer's version holds (TRAINED_FILE comes on top).
TICKET_FILES: tuple[str, ...] = (TICKET_JSON, MASKS_BIN, REWIND_FILE)
_FILES_BY_VERSION: dict[int, tuple[str, ...]] = {
    1: (TICKET_JSON, MASKS_BIN, STATE_BIN),
    2: (TICKET_JSON, MASKS_BIN, STATE_BIN),
    3: TICKET_FILES,
}

# Alignment of every tensor in state.bin (versions 1 and 2).
STATE_ALIGNMENT = 8

WRITER_KEYS: frozenset[str] = frozenset(
    {
        "format_version",
        "masks",
        "sparsity",
        "total_masked",
        "total_kept",
        "mask_sha256",
        "state",
        "state_sha256",
        "trained",
        "trained_sha256",
        "meta_sha256",
    }
)
META_SHA256 = "meta_sha256"
TRAINED_KEYS: frozenset[str] = frozenset({"trained", "trained_sha256"})
# Writer keys that every supported version has; version 2 adds META_SHA256, and a version-3
# ticket with trained weights TRAINED_KEYS.
_BASE_KEYS: frozenset[str] = WRITER_KEYS - {META_SHA256} - TRAINED_KEYS
# Largest accepted dimension: keeps every size computation within int64.
_MAX_DIM = 2**62

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
# The dtype codes of safetensors headers, by the names of DTYPES.
SAFETENSORS_DTYPES: dict[str, str] = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
# The header key safetensors keeps for its own string metadata; no tensor may be named so.
_SAFETENSORS_METADATA = "__metadata__"

_DENSITY_TOLERANCE = 1e-9


class TicketFormatError(ValueError):
    """A ticket directory is missing, incomplete, corrupted or of an unsupported version."""


# ---------------------------------------------------------------------------
# Bit-packed masks
# ---------------------------------------------------------------------------


def packed_nbytes(numel: int) -> int:
    """Number of bytes a mask of ``numel`` entries packs into: ``ceil(numel / 8)``."""
    return (numel + 7) // 8


def _mask_as_bool(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Return ``mask`` as a bool CPU tensor; numeric masks must hold only 0 and 1."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.layout != torch.strided:
        raise ValueError(
            f"{name} must be a dense tensor, got layout {mask.layout}; call .to_dense()"
        )
    mask = mask.detach().cpu()
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be a bool or 0/1 real tensor, got dtype {mask.dtype}")
    is_binary = (mask == 0) | (mask == 1)
    if not bool(is_binary.all()):
        bad = mask[~is_binary].reshape(-1)[0].item()
        raise ValueError(
            f"{name} must contain only 0 and 1 (or be a bool tensor); found the value {bad!r}"
        )
    return mask != 0


def pack_mask(mask: torch.Tensor) -> bytes:
    """Pack a mask (any shape, any device) into ``ceil(numel / 8)`` bytes.

    The mask is flattened in C order and packed 8 entries per byte, most significant
    bit first (``numpy.packbits`` with ``bitorder="big"``); unused bits of the last byte
    are zero. Bool masks are used as they are; numeric masks must contain only 0 and 1
    (``ValueError`` otherwise).
    """
    flat = _mask_as_bool(mask).reshape(-1).numpy()
    return np.packbits(flat, bitorder="big").tobytes()


def _checked_shape(shape: Sequence[int], what: str) -> tuple[int, ...]:
    """Return ``shape`` as a tuple of non-negative ints, or raise ``ValueError``."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise ValueError(f"{what} must be a list of non-negative integers, got {shape!r}")
    dims = tuple(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"{what} must be a list of non-negative integers, got {list(dims)!r}")
    return dims


def unpack_mask(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Unpack bytes written by ``pack_mask`` into a fresh, writable bool tensor of ``shape``.

    ``data`` must be exactly ``ceil(numel / 8)`` bytes and the padding bits past
    ``numel`` in the last byte must be zero; ``ValueError`` otherwise.
    """
    dims = _checked_shape(shape, "mask shape")
    numel = math.prod(dims)
    expected = packed_nbytes(numel)
    if len(data) != expected:
        raise ValueError(
            f"packed mask of shape {list(dims)} needs {expected} bytes, got {len(data)}"
        )
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="big")
    if bits[numel:].any():
        raise ValueError(
            f"packed mask of shape {list(dims)} has non-zero padding bits after its {numel} entries"
        )
    return torch.from_numpy(bits[:numel].astype(bool).reshape(dims))


# ---------------------------------------------------------------------------
# Raw tensor bytes (state.bin of format versions 1 and 2)
# ---------------------------------------------------------------------------


def _align(offset: int) -> int:
    """Round ``offset`` up to the next multiple of ``STATE_ALIGNMENT``."""
    return -(-offset // STATE_ALIGNMENT) * STATE_ALIGNMENT


def _swap_byte_order(raw: np.ndarray, itemsize: int) -> np.ndarray:
    """Reverse the byte order of every ``itemsize``-byte element of a flat uint8 array."""
    if itemsize == 1:
        return raw
    return np.ascontiguousarray(raw.reshape(-1, itemsize)[:, ::-1]).reshape(-1)


def tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    """Raw little-endian bytes of ``tensor`` (C order, any device, any supported dtype)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    raw = flat.view(torch.uint8).numpy()
    if sys.byteorder != "little":
        raw = _swap_byte_order(raw, flat.element_size())
    return raw.tobytes()


def tensor_from_bytes(data: bytes, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """Fresh, writable CPU tensor of ``dtype`` and ``shape`` from raw little-endian bytes."""
    dims = _checked_shape(shape, "tensor shape")
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(dims) * itemsize
    if len(data) != expected:
        raise ValueError(
            f"tensor of dtype {dtype} and shape {list(dims)} needs {expected} bytes, got {len(data)}"
        )
    raw = np.frombuffer(data, dtype=np.uint8).copy()
    if sys.byteorder != "little":
        raw = _swap_byte_order(raw, itemsize)
    return torch.from_numpy(raw).view(dtype).reshape(dims).clone()


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _check_names(tensors: Mapping[str, Any], what: str) -> None:
    """Every key of ``tensors`` must be a non-empty string."""
    for name in tensors:
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what} names must be non-empty strings, got {name!r}")


def _encode_masks(
    masks: Mapping[str, torch.Tensor],
) -> tuple[list[dict[str, Any]], bytes, int, int]:
    """Pack every mask; return (index entries, masks.bin payload, total masked, total kept)."""
    if not masks:
        raise ValueError("masks is empty: a ticket needs at least one mask")
    _check_names(masks, "mask")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    offset = total_masked = total_kept = 0
    for name, mask in masks.items():
        bool_mask = _mask_as_bool(mask, f"mask '{name}'")
        numel = bool_mask.numel()
        if numel == 0:
            raise ValueError(f"mask '{name}' has no elements (shape {list(bool_mask.shape)})")
        kept = int(bool_mask.sum().item())
        payload = pack_mask(bool_mask)
        entries.append(
            {
                "name": name,
                "shape": list(bool_mask.shape),
                "numel": numel,
                "density": kept / numel,
                "offset": offset,
                "nbytes": len(payload),
            }
        )
        chunks.append(payload)
        offset += len(payload)
        total_masked += numel
        total_kept += kept
    return entries, b"".join(chunks), total_masked, total_kept


def _check_tensor(name: str, tensor: Any, what: str) -> None:
    """``tensor`` must be a dense tensor of a dtype in ``DTYPES``."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise ValueError(f"{what} '{name}' must be a dense tensor, got layout {tensor.layout}")
    if tensor.dtype not in DTYPE_NAMES:
        raise ValueError(
            f"{what} '{name}' has dtype {tensor.dtype}, which the ticket format does not "
            f"store; supported dtypes: {sorted(DTYPES)}"
        )


def _encode_tensors(
    tensors: Mapping[str, torch.Tensor], what: str
) -> tuple[list[dict[str, Any]], bytes]:
    """Serialise ``tensors`` as a safetensors file; return (index entries, file bytes).

    Every tensor is copied to a contiguous CPU tensor of its own first, so views, other
    devices and tensors sharing storage (tied weights) are all stored as plain tensors.
    """
    _check_names(tensors, what)
    if _SAFETENSORS_METADATA in tensors:
        raise ValueError(f"{what} name '{_SAFETENSORS_METADATA}' is reserved by safetensors")
    entries: list[dict[str, Any]] = []
    copies: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        _check_tensor(name, tensor, what)
        copies[name] = tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        entries.append(
            {"name": name, "dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape)}
        )
    return entries, safetensors.torch.save(copies)


def _encode_trained(
    trained: Mapping[str, torch.Tensor] | None,
) -> tuple[list[dict[str, Any]], bytes] | None:
    """``_encode_tensors`` of the trained weights, or None when there are none."""
    if trained is None:
        return None
    if not isinstance(trained, Mapping):
        raise TypeError(
            f"trained must be a state dict (a mapping of names to tensors) or None, "
            f"got {type(trained).__name__}"
        )
    if not trained:
        raise ValueError("trained is empty; pass None for a ticket without trained weights")
    return _encode_tensors(trained, "trained")


def _check_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``meta`` as a dict after checking keys and JSON-serialisability of every value."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a mapping, got {type(meta).__name__}")
    checked: dict[str, Any] = {}
    for key, value in meta.items():
        if not isinstance(key, str):
            raise ValueError(f"meta keys must be strings, got {key!r}")
        if key in WRITER_KEYS:
            raise ValueError(
                f"meta key '{key}' is reserved: the ticket writer sets it; rename the key "
                f"(reserved keys: {sorted(WRITER_KEYS)})"
            )
        try:
            json.dumps(value, allow_nan=False, sort_keys=True)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"meta['{key}'] is not JSON-serialisable ({err}); use plain str/int/float/bool/"
                f"None/list/dict values, and no NaN or infinity"
            ) from err
        checked[key] = value
    return checked


def meta_sha256(document: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of every top-level key of ``document`` except
    ``meta_sha256``: sorted keys, ``(",", ":")`` separators, UTF-8, non-ASCII kept."""
    rest = {key: value for key, value in document.items() if key != META_SHA256}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """fsync a directory so that entries created or renamed in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_ticket_dir(
    path: str | Path,
    masks: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    trained: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write a ticket directory (format version 3) at ``path`` atomically; return its path.

    ``masks`` maps names to bool (or 0/1 numeric) tensors on any device; ``state`` maps
    names to tensors of a dtype in ``DTYPES`` (every tensor of the rewind point);
    ``meta`` holds the caller's JSON-serialisable metadata, merged into ticket.json
    beside the writer's keys (``WRITER_KEYS``; a collision raises ``ValueError``).
    ``trained``, if given, is the retrained sparse model's plain state dict (masks
    multiplied in) behind the reported accuracy, written to ``trained.safetensors``.

    The files are written and fsynced in a temporary sibling directory which is then
    renamed onto ``path``. If ``path`` exists already, ``FileExistsError`` is raised and
    nothing is touched; on any error nothing is left at ``path`` and the temporary
    directory is removed. Missing parent directories are created.
    """
    target = Path(path).expanduser()
    if target.exists():
        raise FileExistsError(
            f"ticket path {target} already exists; choose a new path or remove it first"
        )
    caller_meta = _check_meta(meta)
    mask_entries, mask_payload, total_masked, total_kept = _encode_masks(masks)
    state_entries, state_payload = _encode_tensors(state, "state")
    encoded_trained = _encode_trained(trained)
    document = {
        **caller_meta,
        "format_version": FORMAT_VERSION,
        "masks": mask_entries,
        "sparsity": (total_masked - total_kept) / total_masked,
        "total_masked": total_masked,
        "total_kept": total_kept,
        "mask_sha256": hashlib.sha256(mask_payload).hexdigest(),
        "state": state_entries,
        "state_sha256": hashlib.sha256(state_payload).hexdigest(),
    }
    files = {MASKS_BIN: mask_payload, REWIND_FILE: state_payload}
    if encoded_trained is not None:
        document["trained"], files[TRAINED_FILE] = encoded_trained
        document["trained_sha256"] = hashlib.sha256(files[TRAINED_FILE]).hexdigest()
    document[META_SHA256] = meta_sha256(document)
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)
    files[TICKET_JSON] = (text + "\n").encode("utf-8")
    _write_atomically(target, files)
    return target


def _write_atomically(target: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name to bytes, in order) into a staging directory beside
    ``target``, fsync them and rename the directory onto ``target``; leave nothing on error."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        _fsync_dir(staging)
        if target.exists():
            raise FileExistsError(
                f"ticket path {target} was created while the ticket was being written; "
                "choose a new path or remove it first"
            )
        os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(target.parent)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def _fail(directory: Path, message: str) -> TicketFormatError:
    """A ``TicketFormatError`` about the ticket at ``directory``."""
    return TicketFormatError(f"ticket {directory}: {message}")


def _parse_json(directory: Path) -> dict[str, Any]:
    """Parse ticket.json into a dict, or raise ``TicketFormatError`` naming it."""
    try:
        text = (directory / TICKET_JSON).read_bytes().decode("utf-8")
        document = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(directory, f"{TICKET_JSON} is not valid UTF-8 JSON: {err}") from err
    if not isinstance(document, dict):
        raise _fail(
            directory, f"{TICKET_JSON} must hold a JSON object, got {type(document).__name__}"
        )
    return document


def _check_version(directory: Path, document: dict[str, Any]) -> int:
    """The writer keys of every version must be present; return the supported version."""
    missing = sorted(_BASE_KEYS - document.keys())
    if missing:
        raise _fail(directory, f"{TICKET_JSON} lacks the keys {missing}")
    version = document["format_version"]
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        raise _fail(
            directory,
            f"{TICKET_JSON} has format_version {version!r}; this build of ticketsearch reads "
            f"format versions {list(SUPPORTED_FORMAT_VERSIONS)}",
        )
    return version


def _check_meta_sha256(directory: Path, document: dict[str, Any], version: int) -> None:
    """Versions 2 and 3: ``meta_sha256`` must match the metadata. Version 1 has none (and
    must not carry one: that is a later ticket whose version was edited)."""
    if version == 1:
        if META_SHA256 in document:
            raise _fail(
                directory,
                f"{TICKET_JSON} has format_version 1 but carries {META_SHA256}, which only "
                "versions 2 and 3 write; ticket.json was edited or corrupted",
            )
        return
    if META_SHA256 not in document:
        raise _fail(directory, f"{TICKET_JSON} lacks the keys {[META_SHA256]}")
    recorded, digest = document[META_SHA256], meta_sha256(document)
    if recorded != digest:
        raise _fail(
            directory,
            f"{TICKET_JSON} metadata checksum mismatch: {META_SHA256} records {recorded!r}, "
            f"the metadata hashes to {digest}; ticket.json was edited or corrupted, so its "
            "metadata (accuracies, settings, model, indexes) cannot be trusted",
        )


def _check_trained_keys(directory: Path, document: dict[str, Any], version: int) -> None:
    """Version 3 records trained weights with both ``TRAINED_KEYS`` or with neither. (In
    versions 1 and 2 these keys, if present, are the caller's metadata.)"""
    present = sorted(TRAINED_KEYS & document.keys())
    if version >= 3 and len(present) == 1:
        raise _fail(
            directory,
            f"{TICKET_JSON} has {present} but lacks {sorted(TRAINED_KEYS - document.keys())}; "
            "a ticket with trained weights records both",
        )


def _read_json(directory: Path) -> dict[str, Any]:
    """Parse ticket.json and verify its version, (versions 2 and 3) metadata checksum and
    (version 3) trained keys; any problem raises ``TicketFormatError`` naming it."""
    document = _parse_json(directory)
    version = _check_version(directory, document)
    _check_meta_sha256(directory, document, version)
    _check_trained_keys(directory, document, version)
    return document


def _has_trained(document: dict[str, Any]) -> bool:
    """True if the (verified) ticket.json records trained weights."""
    return document["format_version"] >= 3 and "trained_sha256" in document


def _ticket_files(document: dict[str, Any]) -> tuple[str, ...]:
    """The files the ticket of (verified) ticket.json ``document`` holds."""
    files = _FILES_BY_VERSION[document["format_version"]]
    return files + (TRAINED_FILE,) if _has_trained(document) else files


def _is_int(value: Any) -> bool:
    """True for a JSON integer (Python int that is not a bool)."""
    return type(value) is int


def _entry_field(directory: Path, entry: Any, key: str, where: str) -> Any:
    """``entry[key]`` from an index entry, or ``TicketFormatError`` if absent."""
    if not isinstance(entry, dict) or key not in entry:
        raise _fail(directory, f"{TICKET_JSON} {where} lacks the field '{key}'")
    return entry[key]


def _entry_shape(directory: Path, entry: dict[str, Any], where: str) -> tuple[int, ...]:
    """The validated ``shape`` of an index entry."""
    shape = _entry_field(directory, entry, "shape", where)
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d <= _MAX_DIM for d in shape):
        raise _fail(directory, f"{TICKET_JSON} {where} has an invalid shape {shape!r}")
    return tuple(shape)


def _entry_name(directory: Path, entry: Any, where: str, seen: set[str]) -> str:
    """The validated, unique ``name`` of an index entry."""
    name = _entry_field(directory, entry, "name", where)
    if not isinstance(name, str) or not name:
        raise _fail(directory, f"{TICKET_JSON} {where} has an invalid name {name!r}")
    if name in seen:
        raise _fail(directory, f"{TICKET_JSON} lists '{name}' twice")
    seen.add(name)
    return name


def _entry_index_list(directory: Path, document: dict[str, Any], key: str) -> list[Any]:
    """``document[key]`` if it is a list, else ``TicketFormatError``."""
    entries = document[key]
    if not isinstance(entries, list):
        raise _fail(
            directory, f"{TICKET_JSON} '{key}' must be a list, got {type(entries).__name__}"
        )
    return entries


def _mask_layout(
    directory: Path, document: dict[str, Any]
) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Validate the mask index; return (name, shape, offset, nbytes) per mask."""
    layout: list[tuple[str, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    expected_offset = 0
    for position, entry in enumerate(_entry_index_list(directory, document, "masks")):
        where = f"masks[{position}]"
        name = _entry_name(directory, entry, where, seen)
        where = f"mask '{name}'"
        shape = _entry_shape(directory, entry, where)
        numel = math.prod(shape)
        if numel == 0:
            raise _fail(directory, f"{TICKET_JSON} {where} has no elements (shape {list(shape)})")
        fields = {
            key: _entry_field(directory, entry, key, where) for key in ("numel", "offset", "nbytes")
        }
        expected = {"numel": numel, "offset": expected_offset, "nbytes": packed_nbytes(numel)}
        for key, value in expected.items():
            if not _is_int(fields[key]) or fields[key] != value:
                raise _fail(
                    directory,
                    f"{TICKET_JSON} {where} has {key}={fields[key]!r}, expected {value} "
                    f"for shape {list(shape)}",
                )
        layout.append((name, shape, expected_offset, expected["nbytes"]))
        expected_offset += expected["nbytes"]
    if not layout:
        raise _fail(directory, f"{TICKET_JSON} lists no masks")
    return layout


def _index_entry(
    directory: Path, entry: Any, where: str, seen: set[str], key: str
) -> tuple[str, str, tuple[int, ...]]:
    """The validated (name, dtype name, shape) of an entry of the tensor index ``key``."""
    name = _entry_name(directory, entry, where, seen)
    where = f"{key} '{name}'"
    dtype_name = _entry_field(directory, entry, "dtype", where)
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise _fail(
            directory,
            f"{TICKET_JSON} {where} has unknown dtype {dtype_name!r}; known: {sorted(DTYPES)}",
        )
    return name, dtype_name, _entry_shape(directory, entry, where)


def _tensor_index(
    directory: Path, document: dict[str, Any], key: str
) -> list[tuple[str, str, tuple[int, ...]]]:
    """Validate the version-3 tensor index ``key`` (``state`` or ``trained``); return
    (name, dtype name, shape) per tensor."""
    seen: set[str] = set()
    return [
        _index_entry(directory, entry, f"{key}[{position}]", seen, key)
        for position, entry in enumerate(_entry_index_list(directory, document, key))
    ]


def _state_layout(
    directory: Path, document: dict[str, Any]
) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """Validate the state index of versions 1 and 2; return (name, dtype, shape, offset,
    nbytes) per tensor in state.bin."""
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    end = 0
    for position, entry in enumerate(_entry_index_list(directory, document, "state")):
        name, dtype_name, shape = _index_entry(
            directory, entry, f"state[{position}]", seen, "state"
        )
        where = f"state '{name}'"
        dtype = DTYPES[dtype_name]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        expected = {"offset": _align(end), "nbytes": nbytes}
        for key, value in expected.items():
            found = _entry_field(directory, entry, key, where)
            if not _is_int(found) or found != value:
                raise _fail(
                    directory,
                    f"{TICKET_JSON} {where} has {key}={found!r}, expected {value} "
                    f"for dtype {dtype_name} and shape {list(shape)}",
                )
        layout.append((name, dtype, shape, expected["offset"], nbytes))
        end = expected["offset"] + nbytes
    return layout


def _check_size(directory: Path, filename: str, spans: list[tuple[str, int, int]]) -> int:
    """Check the byte ``spans`` (description, offset, nbytes) an index declares against the
    size of ``filename`` on disk, before anything is read or allocated; return the size.

    The spans are contiguous in file order, so the file must end where the last one ends.
    """
    size = (directory / filename).stat().st_size
    expected = spans[-1][1] + spans[-1][2] if spans else 0
    if size > expected:
        raise _fail(directory, f"{filename} is too long: expected {expected} bytes, found {size}")
    for what, offset, nbytes in spans:
        if offset + nbytes > size:
            raise _fail(
                directory,
                f"{filename} is truncated: expected {expected} bytes, found {size}; "
                f"{TICKET_JSON} {what} needs bytes {offset} to {offset + nbytes}, but "
                f"{filename} holds only {size} bytes",
            )
    return size


def _check_sha256(directory: Path, filename: str, data: bytes, sha256: Any) -> None:
    """The sha256 of ``data``, the bytes of ``filename``, must be the recorded ``sha256``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise _fail(
            directory,
            f"{filename} checksum mismatch: {TICKET_JSON} records sha256 {sha256!r}, the file "
            f"has {digest}; the ticket is corrupted or was modified",
        )


def _read_payload(directory: Path, filename: str, size: int, sha256: Any) -> bytes:
    """Read a binary file whose size ``_check_size`` accepted; verify size and sha256."""
    data = (directory / filename).read_bytes()
    if len(data) != size:
        raise _fail(
            directory, f"{filename} changed while being read: expected {size} bytes, "
            f"found {len(data)}"
        )
    _check_sha256(directory, filename, data, sha256)
    return data


def _decode_masks(
    directory: Path,
    document: dict[str, Any],
    layout: list[tuple[str, tuple[int, ...], int, int]],
    size: int,
) -> dict[str, torch.Tensor]:
    """Read, verify and unpack masks.bin (``size`` bytes, as checked against ``layout``)."""
    data = _read_payload(directory, MASKS_BIN, size, document["mask_sha256"])
    masks: dict[str, torch.Tensor] = {}
    for name, shape, offset, nbytes in layout:
        try:
            masks[name] = unpack_mask(data[offset : offset + nbytes], shape)
        except ValueError as err:
            raise _fail(directory, f"{MASKS_BIN} mask '{name}': {err}") from err
    _check_mask_totals(directory, document, masks)
    return masks


def _check_mask_totals(
    directory: Path, document: dict[str, Any], masks: dict[str, torch.Tensor]
) -> None:
    """The densities and totals recorded in ticket.json must match the unpacked masks."""
    total_masked = sum(mask.numel() for mask in masks.values())
    total_kept = sum(int(mask.sum().item()) for mask in masks.values())
    for entry, (name, mask) in zip(document["masks"], masks.items(), strict=True):
        density = int(mask.sum().item()) / mask.numel()
        if not _close(entry.get("density"), density):
            raise _fail(
                directory,
                f"{TICKET_JSON} mask '{name}' has density {entry.get('density')!r} but "
                f"{MASKS_BIN} gives {density}",
            )
    recorded = {key: document[key] for key in ("total_masked", "total_kept", "sparsity")}
    actual = {
        "total_masked": total_masked,
        "total_kept": total_kept,
        "sparsity": (total_masked - total_kept) / total_masked,
    }
    for key, value in actual.items():
        if not _close(recorded[key], value):
            raise _fail(
                directory,
                f"{TICKET_JSON} has {key}={recorded[key]!r} but {MASKS_BIN} gives {value}",
            )


def _close(recorded: Any, actual: float) -> bool:
    """True if a recorded JSON number equals ``actual`` (floats within rounding)."""
    if isinstance(recorded, bool) or not isinstance(recorded, (int, float)):
        return False
    return math.isclose(recorded, actual, rel_tol=_DENSITY_TOLERANCE, abs_tol=_DENSITY_TOLERANCE)


def _decode_state(
    directory: Path,
    document: dict[str, Any],
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]],
    size: int,
) -> dict[str, torch.Tensor]:
    """Read, verify and decode state.bin (``size`` bytes, as checked against ``layout``)."""
    data = _read_payload(directory, STATE_BIN, size, document["state_sha256"])
    return {
        name: tensor_from_bytes(data[offset : offset + nbytes], dtype, shape)
        for name, dtype, shape, offset, nbytes in layout
    }


def _safetensors_header(directory: Path, filename: str, data: bytes) -> dict[str, Any]:
    """(dtype name, shape) of every tensor that the header of the safetensors bytes ``data``
    (the contents of ``filename``) declares, read without decoding any tensor."""
    length = int.from_bytes(data[:8], "little")
    try:
        if len(data) < 8 or length > len(data) - 8:
            raise ValueError(f"its header length {length} runs past its {len(data)} bytes")
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
        return {
            name: (SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"]), info["shape"])
            for name, info in header.items()
            if name != _SAFETENSORS_METADATA
        }
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise _fail(directory, f"{filename} has no valid safetensors header: {err!r}") from err


def _index_difference(index: list[tuple[str, str, tuple[int, ...]]], found: dict[str, Any]) -> str:
    """How the tensors ``found`` in a file ((dtype name, shape) by name) differ from
    ``index``; empty if they are the same."""
    listed = {name: (dtype, list(shape)) for name, dtype, shape in index}
    missing = [name for name in listed if name not in found]
    extra = sorted(str(name) for name in found if name not in listed)
    if missing:
        return f"it lacks {missing}"
    if extra:
        return f"it holds {extra}, which the index does not list"
    for name, (dtype, shape) in listed.items():
        if found[name] != (dtype, shape):
            return (
                f"it holds '{name}' as {found[name][0]} of shape {found[name][1]}, the index "
                f"lists {dtype} of shape {shape}"
            )
    return ""


def _check_index(
    directory: Path, filename: str, key: str, index: list[Any], found: dict[str, Any]
) -> None:
    """The tensors ``found`` in ``filename`` must be exactly those of the index ``key``."""
    difference = _index_difference(index, found)
    if difference:
        raise _fail(
            directory,
            f"{filename} does not match its index {TICKET_JSON} '{key}': {difference}; the "
            "ticket was written wrongly or modified",
        )


def _read_safetensors(
    directory: Path,
    document: dict[str, Any],
    filename: str,
    key: str,
    index: list[tuple[str, str, tuple[int, ...]]],
) -> dict[str, torch.Tensor]:
    """Read the safetensors file ``filename`` of the (validated) tensor index ``key``:
    verify its sha256 (``document[key + "_sha256"]``), check its header against the index,
    then decode it; return its tensors (fresh, writable CPU tensors) in index order."""
    data = (directory / filename).read_bytes()
    _check_sha256(directory, filename, data, document[f"{key}_sha256"])
    _check_index(directory, filename, key, index, _safetensors_header(directory, filename, data))
    try:
        tensors = safetensors.torch.load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise _fail(directory, f"{filename} is not a valid safetensors file: {err}") from err
    found = {name: (DTYPE_NAMES.get(t.dtype), list(t.shape)) for name, t in tensors.items()}
    _check_index(directory, filename, key, index, found)
    return {name: tensors[name] for name, _, _ in index}


def _open_ticket(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The ticket directory at ``path`` and its verified ticket.json, after checking that
    every file the ticket holds (by its version and trained weights) is present."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise _fail(directory, "no ticket directory exists at this path")
    if not (directory / TICKET_JSON).is_file():
        raise _fail(directory, f"{TICKET_JSON} is missing; a ticket holds {list(TICKET_FILES)}")
    document = _read_json(directory)
    files = _ticket_files(document)
    trained = ", with trained weights" if _has_trained(document) else ""
    for filename in files:
        if not (directory / filename).is_file():
            raise _fail(
                directory,
                f"{filename} is missing; this ticket (format version "
                f"{document['format_version']}{trained}) holds {list(files)}",
            )
    return directory, document


def _mask_spans(layout: list[tuple[str, tuple[int, ...], int, int]]) -> list[tuple[str, int, int]]:
    """The byte spans of the masks in masks.bin, for ``_check_size``."""
    return [(f"mask '{n}' of shape {list(dims)}", off, nb) for n, dims, off, nb in layout]


def _state_reader(directory: Path, document: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    """Validate the state index (versions 1 and 2: and the size of state.bin against it)
    before anything is decoded; return the function that then reads the state."""
    if document["format_version"] >= 3:
        index = _tensor_index(directory, document, "state")
        return lambda: _read_safetensors(directory, document, REWIND_FILE, "state", index)
    layout = _state_layout(directory, document)
    spans = [(f"state '{n}' of shape {list(dims)}", off, nb) for n, _, dims, off, nb in layout]
    size = _check_size(directory, STATE_BIN, spans)
    return lambda: _decode_state(directory, document, layout, size)


def read_ticket_dir(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify the ticket directory at ``path`` (format version 1, 2 or 3).

    Returns ``(masks, state, document)``: masks as bool CPU tensors and the rewind-point
    state as CPU tensors (both freshly allocated and writable, in index order), and the
    full ticket.json dict. Verifies that the ticket's files exist (``trained.safetensors``
    too when ticket.json records trained weights), ticket.json parses and holds the writer
    keys of a supported ``format_version`` and (versions 2 and 3) the metadata checksum
    ``meta_sha256``, the indexes are consistent (names, dtypes, shapes; for masks.bin and
    state.bin numel, offsets and sizes, checked against the file sizes before anything is
    read or allocated), every binary file has the recorded sha256, the safetensors header
    of rewind.safetensors matches the state index, mask padding bits are zero and the
    recorded densities and totals match the masks. The trained weights themselves are
    read and verified by ``read_trained_state``. Any problem raises ``TicketFormatError``
    naming the file.
    """
    directory, document = _open_ticket(path)
    mask_layout = _mask_layout(directory, document)
    mask_size = _check_size(directory, MASKS_BIN, _mask_spans(mask_layout))
    read_state = _state_reader(directory, document)
    if _has_trained(document):
        _tensor_index(directory, document, "trained")  # a clear error early; read later
    masks = _decode_masks(directory, document, mask_layout, mask_size)
    return masks, read_state(), document


def read_trained_state(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The trained weights of the ticket at ``path``, or None when it has none.

    A plain state dict (fresh, writable CPU tensors in index order) of the retrained
    sparse model behind the ticket's reported accuracy. None for tickets of format
    version 1 or 2 and version-3 tickets written without trained weights. Verifies
    ticket.json as ``read_ticket_dir`` does, then the sha256 of trained.safetensors
    (``trained_sha256``) and that its header matches the ``trained`` index, before any
    tensor is decoded; any problem raises ``TicketFormatError`` naming the file.
    """
    directory, document = _open_ticket(path)
    if not _has_trained(document):
        return None
    index = _tensor_index(directory, document, "trained")
    return _read_safetensors(directory, document, TRAINED_FILE, "trained", index)
