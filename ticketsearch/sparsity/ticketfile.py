"""On-disk format of a ticket: the artifact users keep.

A ticket is a directory holding three files:

``ticket.json``
    UTF-8 JSON, indented, keys sorted. The writer owns the keys in ``WRITER_KEYS``
    (format version, mask and state indexes, sparsity totals, sha256 checksums); the
    caller's metadata (method, settings, model, dataset, rewind epoch, accuracy, ...)
    is merged into the same top-level object. ``meta_sha256`` is the sha256 (hex) of the
    canonical JSON of every other top-level key: ``json.dumps(rest, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)`` encoded as UTF-8. It covers the caller's
    metadata and the writer's keys alike (indexes with names, shapes, numel, dtypes,
    offsets and sizes; totals; the two file checksums), so any edit of ticket.json is
    detected, while re-indenting or reordering its keys is not an edit.
``masks.bin``
    The binary masks, 1 bit per weight: ``numpy.packbits`` (big bit order) of each
    flattened C-order bool mask. Every mask starts on a byte boundary; masks follow the
    order of ``ticket.json["masks"]`` with no gaps. Padding bits past ``numel`` are zero.
``state.bin``
    The rewind-point state: the raw little-endian bytes of every tensor, concatenated in
    the order of ``ticket.json["state"]``, each starting at an 8-byte aligned offset
    (zero bytes fill the gaps); the file ends with the last tensor's last byte.

Format versions: the writer writes version 2. Version 1 is version 2 without
``meta_sha256`` (its metadata is not checksummed); the reader still reads it.

Before decoding anything the reader checks every index entry against the sizes of the
binary files, so a damaged or crafted index cannot make it allocate more than the files
hold. Nothing here pickles or unpickles: the format is plain JSON plus raw bytes, and every
problem found while reading raises ``TicketFormatError`` naming the file at fault.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2
SUPPORTED_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)

TICKET_JSON = "ticket.json"
MASKS_BIN = "masks.bin"
STATE_BIN = "state.bin"
TICKET_FILES: tuple[str, ...] = (TICKET_JSON, MASKS_BIN, STATE_BIN)

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
        "meta_sha256",
    }
)
META_SHA256 = "meta_sha256"
# Writer keys that every supported version has; version 2 adds META_SHA256.
_BASE_KEYS: frozenset[str] = WRITER_KEYS - {META_SHA256}
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
# Raw tensor bytes
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


def _encode_state(state: Mapping[str, torch.Tensor]) -> tuple[list[dict[str, Any]], bytes]:
    """Serialise every state tensor; return (index entries, state.bin payload)."""
    _check_names(state, "state")
    entries: list[dict[str, Any]] = []
    payload = bytearray()
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state '{name}' must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.layout != torch.strided:
            raise ValueError(f"state '{name}' must be a dense tensor, got layout {tensor.layout}")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(
                f"state '{name}' has dtype {tensor.dtype}, which the ticket format does not "
                f"store; supported dtypes: {sorted(DTYPES)}"
            )
        raw = tensor_to_bytes(tensor)
        offset = _align(len(payload))
        payload.extend(bytes(offset - len(payload)))
        payload.extend(raw)
        entries.append(
            {
                "name": name,
                "dtype": DTYPE_NAMES[tensor.dtype],
                "shape": list(tensor.shape),
                "offset": offset,
                "nbytes": len(raw),
            }
        )
    return entries, bytes(payload)


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
) -> Path:
    """Write a ticket directory at ``path`` atomically and return its path.

    ``masks`` maps names to bool (or 0/1 numeric) tensors on any device; ``state`` maps
    names to tensors of a dtype in ``DTYPES`` (every tensor of the rewind point);
    ``meta`` holds the caller's JSON-serialisable metadata, merged into ticket.json
    beside the writer's keys (``WRITER_KEYS``; a collision raises ``ValueError``).

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
    state_entries, state_payload = _encode_state(state)
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
    document[META_SHA256] = meta_sha256(document)
    text = json.dumps(document, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _write_file(staging / MASKS_BIN, mask_payload)
        _write_file(staging / STATE_BIN, state_payload)
        _write_file(staging / TICKET_JSON, (text + "\n").encode("utf-8"))
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
    return target


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
    """Version 2: ``meta_sha256`` must match the metadata. Version 1 has none (and must not
    carry one: that is a version-2 ticket whose version was edited)."""
    if version == 1:
        if META_SHA256 in document:
            raise _fail(
                directory,
                f"{TICKET_JSON} has format_version 1 but carries {META_SHA256}, which only "
                "version 2 writes; ticket.json was edited or corrupted",
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


def _read_json(directory: Path) -> dict[str, Any]:
    """Parse ticket.json and verify its version and (version 2) metadata checksum; any
    problem raises ``TicketFormatError`` naming it."""
    document = _parse_json(directory)
    version = _check_version(directory, document)
    _check_meta_sha256(directory, document, version)
    return document


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


def _state_layout(
    directory: Path, document: dict[str, Any]
) -> list[tuple[str, torch.dtype, tuple[int, ...], int, int]]:
    """Validate the state index; return (name, dtype, shape, offset, nbytes) per tensor."""
    layout: list[tuple[str, torch.dtype, tuple[int, ...], int, int]] = []
    seen: set[str] = set()
    end = 0
    for position, entry in enumerate(_entry_index_list(directory, document, "state")):
        where = f"state[{position}]"
        name = _entry_name(directory, entry, where, seen)
        where = f"state '{name}'"
        dtype_name = _entry_field(directory, entry, "dtype", where)
        if dtype_name not in DTYPES:
            raise _fail(
                directory,
                f"{TICKET_JSON} {where} has unknown dtype {dtype_name!r}; known: {sorted(DTYPES)}",
            )
        dtype = DTYPES[dtype_name]
        shape = _entry_shape(directory, entry, where)
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


def _read_payload(directory: Path, filename: str, size: int, sha256: Any) -> bytes:
    """Read a binary file whose size ``_check_size`` accepted; verify size and sha256."""
    data = (directory / filename).read_bytes()
    if len(data) != size:
        raise _fail(
            directory, f"{filename} changed while being read: expected {size} bytes, "
            f"found {len(data)}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise _fail(
            directory,
            f"{filename} checksum mismatch: {TICKET_JSON} records sha256 {sha256!r}, the file "
            f"has {digest}; the ticket is corrupted or was modified",
        )
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


def read_ticket_dir(
    path: str | Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify the ticket directory at ``path``.

    Returns ``(masks, state, document)``: masks as bool CPU tensors and state as CPU
    tensors (both freshly allocated and writable, in index order), and the full
    ticket.json dict. Verifies that the three files exist, ticket.json parses and holds
    the writer keys of a supported ``format_version`` and (version 2) the metadata
    checksum ``meta_sha256``, the indexes are consistent (names, dtypes, shapes, numel,
    offsets, sizes), every indexed tensor lies within the binary files and they have
    exactly the indexed size (checked before anything is read or allocated) and the
    recorded sha256, mask padding bits are zero and the recorded densities and totals
    match the masks. Any problem raises ``TicketFormatError`` naming the file.
    """
    directory = Path(path).expanduser()
    if not directory.is_dir():
        raise _fail(directory, "no ticket directory exists at this path")
    for filename in TICKET_FILES:
        if not (directory / filename).is_file():
            raise _fail(directory, f"{filename} is missing; a ticket holds {list(TICKET_FILES)}")
    document = _read_json(directory)
    mask_layout = _mask_layout(directory, document)
    state_layout = _state_layout(directory, document)
    mask_spans = [(f"mask '{n}' of shape {list(dims)}", off, nb) for n, dims, off, nb in mask_layout]
    mask_size = _check_size(directory, MASKS_BIN, mask_spans)
    state_spans = [(f"state '{n}' of shape {list(dims)}", off, nb)
                   for n, _, dims, off, nb in state_layout]
    state_size = _check_size(directory, STATE_BIN, state_spans)
    masks = _decode_masks(directory, document, mask_layout, mask_size)
    state = _decode_state(directory, document, state_layout, state_size)
    return masks, state, document
