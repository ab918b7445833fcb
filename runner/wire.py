"""Wire format for versioned LoRA weight messages and small control messages.

This module is a contract between the learner (sender), the coordinator (which
keeps the latest message for late joiners) and the generation workers
(receivers). It imports numpy, msgpack and pyzmq only -- never MLX -- because it
is part of the control plane.

Weight message (protocol 3)
===========================

One adapter version travels as ONE ZeroMQ multipart message (so it arrives
whole or not at all). There is no topic frame: SUB sockets subscribe to ``b""``.

Frame 0 -- the header, a msgpack map (``use_bin_type=True``; strings are UTF-8
str, map keys are str) with exactly these keys, no others::

    {
      "proto":          3,            # int, == PROTOCOL; checked first
      "kind":           "adapter",    # str; "adapter" = the full LoRA tensors.
                                      # "delta" is reserved for a future
                                      # protocol and rejected by protocol 3.
      "version":        int >= 1,     # adapter version, strictly increasing
      "step":           int >= 0,     # learner optimizer step that produced it
      "base_model_id":  str,          # non-empty; identifies the base weights
      "adapter_config": map,          # opaque msgpack-able values, e.g. rank,
                                      # scale, dropout, keys/targets, num_layers
      "tensors": [                    # one entry per buffer frame, same order
        {"name":   str,               # non-empty, unique within the message
         "dtype":  str,               # float32 float16 bfloat16 int32 uint32
                                      # uint8 int8
         "shape":  [int, ...],        # 0..8 dims, each >= 0 ([] = scalar)
         "nbytes": int},              # == prod(shape) * itemsize(dtype)
        ...
      ],
      "checksum":       str,          # 16 lowercase hex chars, see below
    }

"int" means a msgpack integer; msgpack booleans are NOT accepted as ints.

Frames 1..n -- one frame per entry of "tensors", in the same order, each exactly
``nbytes`` long: the tensor's elements, C (row-major) order, contiguous,
little-endian. ``bfloat16`` has no numpy dtype: its frame holds the raw 16-bit
patterns (what ``mx_array.view(mx.uint16)`` gives) and the receiver exposes it
as a ``uint16`` array with ``WeightMessage.dtypes[name] == "bfloat16"``.

Checksum::

    h = xxhash.xxh3_64(msgpack.packb([proto, kind, version, step, base_model_id,
                                      adapter_config,
                                      [[name, dtype, shape, nbytes] for each tensor]],
                                     use_bin_type=True))
    for each buffer frame in order: h.update(xxhash.xxh3_64_digest(frame))
    checksum = h.hexdigest()

XXH3-64 rather than a cryptographic hash or CRC-32: it runs faster than a
memcpy (about 30 GB/s here, CRC-32 about 3), and the checksum is computed on
the publish-to-serving path by the learner and by every worker. Each buffer
has its own digest so buffers can be hashed in any order or in parallel (the
learner copies and hashes a big message with two threads). Protocol 1 was the
same message with a CRC-32 checksum; protocol 2 hashed the buffers themselves
in one stream.

Buffer boundaries need no separators because the sizes are in the hashed
table. The checksum catches corruption, torn shared-memory reads and
sender/receiver bugs; it is not keyed, so it is no defence against a
malicious sender (CURVE authenticates senders).

Segment form (same host)
========================

Processes on one host pass the same message through a shared-memory file
instead of socket frames (see ``runner.slots``): one segment holds

    bytes 0..8   header length L, unsigned little-endian
    bytes 8..8+L the header frame
    then each buffer frame in order, each starting at the next multiple of
    ``SEGMENT_ALIGN`` bytes (the padding between is ignored and not hashed)

and nothing after the last buffer. ``decode_segment`` validates a segment
exactly as ``decode`` validates frames (the tensors stay views, no copies).

Receivers (``decode``) validate, before returning anything: the frame list is
non-empty; the header frame is at most ``MAX_HEADER_BYTES`` and unpacks (with
tight msgpack limits, extension types refused) to a map; every key is present
with the right type; proto, kind, version, step; names, dtypes, shapes and
nbytes of each tensor; the total declared size is at most ``max_total_bytes``
(``MAX_TOTAL_BYTES`` by default); the number of buffer frames and each frame's
length; optionally an ``Expectation`` (base model id, exact tensor names,
shapes and dtypes, version > min_version); and finally the checksum (unless
``verify=False``: a receiver that copies the tensors first and then checks the
copy with ``verify`` is safe even if the source changes under it). Any
failure raises ``WireError`` (a ``ValueError``) with a one-sentence message;
nothing else escapes. Decoded arrays are ``np.frombuffer`` views of the
frames: no copies, and possibly read-only.

Senders keep the buffers alive and unmodified until ZeroMQ has sent them
(``copy=False`` hands ZeroMQ a reference, not a copy; use ``track=True`` if
the buffers may be reused).

Control messages
================

On the coordinator's ROUTER/DEALER control socket each message is one msgpack
map (at most ``MAX_CONTROL_BYTES``) with a non-empty str ``"type"`` and
msgpack-able values; routing identity frames are the socket's business, not
this module's. Types in use (the list is open; unknown types are passed
through for the coordinator to reject):

- ``hello``      -- a worker announces itself (role, pid, host, ...).
- ``heartbeat``  -- periodic liveness from a worker.
- ``ack``        -- a worker confirms it applied an adapter version.
- ``status``     -- request/reply for the coordinator's worker table.
- ``get_latest`` -- a (late or restarted) worker asks for the latest adapter.
- ``weights_slot`` -- a version in a same-host shared-memory slot (``runner.slots``).
"""

from __future__ import annotations

import bisect
import functools
import hmac
import itertools
import logging
import math
import operator
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash
import zmq

log = logging.getLogger(__name__)

PROTOCOL = 3
CHECKSUM_CHARS = 16  # xxh3_64 hex digest
PARALLEL_COPY_BYTES = 2**20  # encode_into copies a message at least this big with two threads
SEGMENT_ALIGN = 64  # buffer offsets in a segment: cache-line aligned, so numpy/MLX views are aligned too
KIND_ADAPTER = "adapter"
KIND_DELTA = "delta"  # reserved name; not sent or accepted by protocol 1
KINDS = (KIND_ADAPTER,)

MAX_HEADER_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 8 * 2**30
MAX_NDIM = 8
MAX_CONTROL_BYTES = 2**20

# Wire dtype name -> little-endian numpy dtype used to view the buffer.
# bfloat16 is viewed as its raw uint16 bit patterns (numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "uint32": np.dtype("<u4"),
    "uint8": np.dtype("u1"),
    "int8": np.dtype("i1"),
}

HEADER_KEYS = frozenset({"proto", "kind", "version", "step", "base_model_id", "adapter_config", "tensors", "checksum"})
TENSOR_KEYS = frozenset({"name", "dtype", "shape", "nbytes"})

# Explicit limits so a hostile header cannot make msgpack allocate much more
# than the (already bounded) frame; ext types have no meaning here, so refuse them.
_HEADER_UNPACK_LIMITS = dict(
    max_str_len=2**20, max_bin_len=2**20, max_array_len=2**20, max_map_len=2**16, max_ext_len=0
)
_CONTROL_UNPACK_LIMITS = dict(
    max_str_len=MAX_CONTROL_BYTES,
    max_bin_len=MAX_CONTROL_BYTES,
    max_array_len=2**16,
    max_map_len=2**16,
    max_ext_len=0,
)


class WireError(ValueError):
    """A weight or control message is malformed or not the one expected."""


@dataclass(frozen=True)
class Expectation:
    """What a receiver's model can accept; checked by ``decode`` after the structure."""

    base_model_id: str
    shapes: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, wire dtype); not changed once in use
    min_version: int = 0  # the message version must be strictly greater


@dataclass(frozen=True)
class WeightMessage:
    """A validated weight message; tensors are zero-copy views of the frames."""

    version: int
    step: int
    base_model_id: str
    adapter_config: dict[str, Any]
    kind: str
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]  # wire dtype per tensor ("bfloat16" arrays are uint16)
    nbytes: int
    checksum: str = field(default="", repr=False)
    header: dict[str, Any] = field(default_factory=dict, repr=False)  # as received, for a later ``verify``
    specs: tuple = field(default=(), repr=False)  # the parsed tensor table, for a later ``verify``
    frames: list[Any] = field(default_factory=list, repr=False)  # header + buffer views, e.g. to send it on


class _Spec(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


# --------------------------------------------------------------------------- helpers


def _is_int(value: Any) -> bool:
    # bool is a subclass of int in Python; on the wire it is a different type.
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: Any) -> str:
    return type(value).__name__


def _bytes_view(obj: Any, what: str) -> memoryview:
    """A flat, contiguous byte view of a frame without copying it."""
    if isinstance(obj, zmq.Frame):
        obj = obj.buffer
    try:
        view = memoryview(obj)
    except TypeError:
        raise WireError(f"{what} is a {_type_name(obj)}, not a bytes-like object") from None
    if not view.c_contiguous:
        raise WireError(f"{what} is not a contiguous buffer")
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except (TypeError, ValueError):
            raise WireError(f"{what} cannot be viewed as bytes") from None
    return view


def _itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def _table(specs: Sequence[_Spec]) -> list[dict[str, Any]]:
    return [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "nbytes": s.nbytes} for s in specs]


def compute_checksum(header: Mapping[str, Any], buffers: Iterable[Any]) -> str:
    """The header "checksum" value for ``header`` (its other fields, "tensors" a list of maps) and the buffer
    frames."""
    specs = [_Spec(t["name"], t["dtype"], t["shape"], t["nbytes"]) for t in header["tensors"]]
    return _checksum(header, specs, map(_buffer_digest, buffers))


def _checksum(header: Mapping[str, Any], specs: Sequence[_Spec], digests: Iterable[bytes]) -> str:
    """The checksum from the header fields, the tensor table and the buffers' own XXH3-64 digests (see the module
    docstring)."""
    table = [[s.name, s.dtype, list(s.shape), s.nbytes] for s in specs]
    fields = [
        header["proto"],
        header["kind"],
        header["version"],
        header["step"],
        header["base_model_id"],
        header["adapter_config"],
        table,
    ]
    try:
        packed = msgpack.packb(fields, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        # encode-side only (e.g. an object() in adapter_config): anything msgpack could
        # unpack it can re-pack, since its pack depth limit exceeds its unpack stack.
        raise WireError(f"header is not msgpack-serializable: its fields do not pack ({exc})") from None
    digest = xxhash.xxh3_64(packed)
    for buffer_digest in digests:
        digest.update(buffer_digest)
    return digest.hexdigest()


def _buffer_digest(buf: Any) -> bytes:
    # xxhash takes the buffer protocol directly, so large tensors are not copied.
    try:
        return xxhash.xxh3_64_digest(buf)
    except (TypeError, BufferError, ValueError):
        return xxhash.xxh3_64_digest(_bytes_view(buf, "buffer"))  # e.g. a non-contiguous view: the clear error


# --------------------------------------------------------------------------- encode


def _array_bytes(arr: np.ndarray) -> memoryview:
    """Bytes of ``arr`` in wire layout; copies only if it is not already C-contiguous LE."""
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
        log.debug("byte-swapping a big-endian %s array for the wire", arr.dtype)
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    if not arr.flags.c_contiguous:
        # zmq copy=False needs one contiguous buffer; this is the only copy encode makes.
        log.debug("copying a non-contiguous %s array of shape %s", arr.dtype, arr.shape)
        arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8))


def _buffer_bytes(buf: Any, name: str) -> memoryview:
    if isinstance(buf, np.ndarray):
        return _array_bytes(buf)
    try:
        view = memoryview(buf)
    except TypeError:
        raise WireError(f"tensor {name!r} buffer is a {_type_name(buf)}, not a buffer-protocol object") from None
    if view.nbytes == 0:
        return memoryview(b"")  # memoryview cannot cast a shape with zeros in it
    if not view.c_contiguous:
        view = memoryview(view.tobytes())  # tobytes() yields C order
    return view.cast("B") if (view.ndim != 1 or view.format != "B") else view


def _check_spec(name: Any, dtype: Any, shape: Any) -> tuple[int, ...]:
    if type(name) is not str or not name:
        raise WireError(f"tensor name {name!r} must be a non-empty str")
    if dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    try:
        dims = tuple(map(operator.index, shape))  # index() refuses floats, unlike int()
    except TypeError:
        raise WireError(f"tensor {name!r} shape {shape!r} is not a sequence of ints") from None
    if len(dims) > MAX_NDIM or (dims and min(dims) < 0) or bool in map(type, shape):
        raise WireError(f"tensor {name!r} shape {list(dims)} must have <= {MAX_NDIM} non-negative int dims")
    return dims


def _array_entry(name: str, arr: Any) -> tuple[_Spec, memoryview]:
    if not isinstance(arr, np.ndarray):
        raise WireError(f"tensor {name!r} is a {_type_name(arr)}; pass a numpy array or use the list form")
    dtype = arr.dtype.name  # an ml_dtypes bfloat16 array is named "bfloat16" and works as-is
    dims = _check_spec(name, dtype, arr.shape)
    view = _array_bytes(arr)
    return _Spec(name, dtype, dims, view.nbytes), view


def _raw_entry(entry: Any) -> tuple[_Spec, memoryview]:
    try:
        name, dtype, shape, buf = entry
    except (TypeError, ValueError):
        raise WireError("each tensor in the list form must be (name, dtype, shape, buffer)") from None
    dims = _check_spec(name, dtype, shape)
    spec = _Spec(name, dtype, dims, math.prod(dims) * _itemsize(dtype))
    return spec, _sized_buffer(spec, buf)


def _sized_buffer(spec: _Spec, buf: Any) -> memoryview:
    view = _buffer_bytes(buf, spec.name)
    if view.nbytes != spec.nbytes:
        raise WireError(
            f"tensor {spec.name!r} buffer has {view.nbytes} bytes but {spec.dtype}{list(spec.shape)} "
            f"needs {spec.nbytes}"
        )
    return view


def _entries(tensors: Any) -> list[tuple[_Spec, memoryview]]:
    if isinstance(tensors, Mapping):
        return [_array_entry(name, arr) for name, arr in tensors.items()]
    if isinstance(tensors, Sequence) and not isinstance(tensors, (str, bytes)):
        return [_raw_entry(entry) for entry in tensors]
    raise WireError(f"tensors must be a dict of arrays or a list of tuples, not {_type_name(tensors)}")


def encode(
    version: int,
    step: int,
    base_model_id: str,
    adapter_config: dict[str, Any],
    tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, str, Sequence[int], Any]],
    kind: str = KIND_ADAPTER,
) -> list[Any]:
    """Build ``[header_bytes, buf1, ...]`` for one adapter version; buffers are views, not copies.

    ``tensors`` is either ``{name: ndarray}`` (wire dtype from ``arr.dtype``) or a list of
    ``(name, dtype, shape, buffer)`` where ``buffer`` is any buffer-protocol object holding
    exactly ``prod(shape) * itemsize(dtype)`` little-endian bytes -- e.g. bfloat16 passed as
    ``("w", "bfloat16", shape, memoryview(uint16_array))``.
    """
    header, specs, buffers = _unsigned_header(version, step, base_model_id, adapter_config, tensors, kind)
    header["checksum"] = _checksum(header, specs, map(_buffer_digest, buffers))
    return [_pack_header(header), *buffers]


def encode_into(
    allocate: Callable[[int], Any],
    version: int,
    step: int,
    base_model_id: str,
    adapter_config: dict[str, Any],
    tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, str, Sequence[int], Any]],
    kind: str = KIND_ADAPTER,
) -> int:
    """``encode`` straight into segment form: ``allocate(size)`` returns a writable buffer of at least ``size``
    bytes. Each tensor is copied in once and hashed from its copy while that is still in cache; a large message is
    copied by two threads, each taking half of the bytes. Returns the size."""
    header, specs, buffers = _unsigned_header(version, step, base_model_id, adapter_config, tensors, kind)
    # A placeholder packs to the same length as the real checksum; it is checked as the real header would be, so a
    # bad header fails before anything is written.
    header["checksum"] = "0" * CHECKSUM_CHARS
    header_len = len(_pack_header(header))
    offsets, size = _segment_offsets(header_len, [b.nbytes for b in buffers])
    out = memoryview(allocate(size)).cast("B")
    if out.nbytes < size:
        raise WireError(f"segment buffer has {out.nbytes} bytes, the message needs {size}")

    segment = np.frombuffer(out, np.uint8, size)
    digests = [b""] * len(buffers)

    def copy_and_hash(indices: range) -> None:
        for i in indices:
            buf, copy = buffers[i], segment[offsets[i] : offsets[i] + buffers[i].nbytes]
            if buf.nbytes:
                np.copyto(copy, np.frombuffer(buf, np.uint8))
            digests[i] = xxhash.xxh3_64_digest(copy)

    sizes = list(itertools.accumulate(b.nbytes for b in buffers))
    if sizes and sizes[-1] >= PARALLEL_COPY_BYTES and (os.cpu_count() or 1) > 1:
        # np.copyto releases the GIL (xxhash does not): one thread copies while the other copies or hashes.
        half = bisect.bisect_left(sizes, sizes[-1] // 2)
        second = _copy_thread().submit(copy_and_hash, range(half, len(buffers)))
        try:
            copy_and_hash(range(half))
        finally:
            second.result()
    else:
        copy_and_hash(range(len(buffers)))
    header["checksum"] = _checksum(header, specs, digests)
    out[:8] = header_len.to_bytes(8, "little")
    out[8 : 8 + header_len] = _pack_header(header, check=False)
    return size


def _copy_thread() -> ThreadPoolExecutor:
    return _copy_thread_of(os.getpid())


@functools.cache
def _copy_thread_of(pid: int) -> ThreadPoolExecutor:
    # Per process: a child forked after a copy has the executor but not its thread.
    return ThreadPoolExecutor(1, thread_name_prefix="wire-copy")


# The last list-form layout encoded, [(name, dtype, shape)] as given, with its checked specs and header table: a
# learner encodes the same layout every version, and checking it again costs more than the rest of the header.
_last_layout: tuple[list, list[_Spec], list[dict[str, Any]]] = ([], [], [])


def _unsigned_header(
    version: int, step: int, base_model_id: str, adapter_config: dict[str, Any], tensors: Any, kind: str
) -> tuple[dict[str, Any], list[_Spec], list[memoryview]]:
    global _last_layout
    try:
        layout = [(name, dtype, shape) for name, dtype, shape, _ in tensors] if isinstance(tensors, list) else None
    except (TypeError, ValueError):
        layout = None  # malformed: the full check below says how
    last = _last_layout  # one read: another thread may replace it
    if layout is not None and layout == last[0]:  # equal layouts encode to the same table
        specs, table = last[1], last[2]
        buffers = [_sized_buffer(spec, entry[3]) for spec, entry in zip(specs, tensors)]
    else:
        entries = _entries(tensors)
        specs, buffers = [spec for spec, _ in entries], [view for _, view in entries]
        _check_unique([spec.name for spec in specs])
        table = _table(specs)
        if layout is not None:
            _last_layout = (layout, specs, table)
    header: dict[str, Any] = {
        "proto": PROTOCOL,
        "kind": kind,
        "version": version,
        "step": step,
        "base_model_id": base_model_id,
        "adapter_config": adapter_config,
        "tensors": table,
    }
    return header, specs, buffers


def _pack_header(header: dict[str, Any], check: bool = True) -> bytes:
    try:
        header_bytes = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"header is not msgpack-serializable ({exc})") from None
    if check:
        # Run the receiver's header checks (the tensor table was checked when it was built) so we never send what a
        # receiver would reject, e.g. an adapter_config with non-str map keys.
        _parse_fields(_unpack_header(_bytes_view(header_bytes, "header frame")))
    return header_bytes


def send(socket: zmq.Socket, frames: Sequence[Any], copy: bool = False, track: bool = False) -> Any:
    """Send encoded frames as one multipart message; returns a MessageTracker if ``track``."""
    return socket.send_multipart(frames, copy=copy, track=track)


# --------------------------------------------------------------------------- decode


def _unpack_header(view: memoryview) -> dict[str, Any]:
    """The header map, except that the value of "tensors" stays msgpack bytes for `_parse_tensors` (which skips
    tables it has seen: a run sends the same one with every version, and building it costs more than the rest)."""
    if view.nbytes == 0:
        raise WireError("header frame is empty")
    if view.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header frame is {view.nbytes} bytes, more than the {MAX_HEADER_BYTES} allowed")
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=view.nbytes, **_HEADER_UNPACK_LIMITS)
    unpacker.feed(view)
    header: dict[str, Any] = {}
    try:
        keys = unpacker.read_map_header()
    except ValueError:  # not a map, or not msgpack: unpacking it whole tells which
        value = _unpack_value(view, _HEADER_UNPACK_LIMITS, "header frame")
        raise WireError(f"header is a msgpack {_type_name(value)}, not a map") from None
    if keys > 4 * len(HEADER_KEYS):  # unpacked key by key below: refuse a huge map at once
        raise WireError(f"header map has {keys} keys; a protocol {PROTOCOL} header has {len(HEADER_KEYS)}")
    try:
        for _ in range(keys):
            key = unpacker.unpack()
            if type(key) is not str:
                raise ValueError("non-str map key")
            if key == "tensors":
                start = unpacker.tell()
                unpacker.skip()
                header[key] = view[start : unpacker.tell()].tobytes()
            else:
                header[key] = unpacker.unpack()
        if unpacker.tell() != view.nbytes:
            raise ValueError("trailing bytes")
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise WireError(f"header frame is not valid msgpack ({_type_name(exc)})") from None
    return header


def _unpack_value(view: memoryview, limits: dict[str, int], what: str) -> Any:
    try:
        return msgpack.unpackb(view, raw=False, strict_map_key=True, **limits)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise WireError(f"{what} is not valid msgpack ({_type_name(exc)})") from None


def _require(header: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = header[key]
    ok = _is_int(value) if kind is int else isinstance(value, kind)
    if not ok:
        raise WireError(f"header field {key!r} must be {what}, got {_type_name(value)}")
    return value


def _parse_tensor(index: int, entry: Any) -> _Spec:
    # Runs for every tensor of every message on the publish-to-serving path: exact type() tests (msgpack yields
    # plain dict/str/int/list, and bool is not int here) rather than isinstance chains.
    if type(entry) is not dict or entry.keys() != TENSOR_KEYS:
        raise WireError(f"tensors[{index}] must be a map with exactly the keys {sorted(TENSOR_KEYS)}")
    name, dtype, shape, nbytes = entry["name"], entry["dtype"], entry["shape"], entry["nbytes"]
    if type(name) is not str or not name:
        raise WireError(f"tensors[{index}] name must be a non-empty str")
    if type(dtype) is not str or dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise WireError(f"tensor {name!r} shape must be a list of at most {MAX_NDIM} dims")
    if shape and (set(map(type, shape)) != {int} or min(shape) < 0):
        raise WireError(f"tensor {name!r} shape {shape!r} must hold non-negative ints")
    if type(nbytes) is not int:
        raise WireError(f"tensor {name!r} nbytes must be an int, got {_type_name(nbytes)}")
    # Python ints do not overflow, so absurd shapes are caught here without allocating.
    expected = math.prod(shape) * _itemsize(dtype)
    if nbytes != expected:
        raise WireError(f"tensor {name!r} declares nbytes={nbytes} but {dtype}{shape} is {expected} bytes")
    return _Spec(name, dtype, tuple(shape), nbytes)


# The last tensor table parsed, by its msgpack bytes: a run sends the same table with every version, and checking
# 100+ entries again costs more per message than the rest of the header.
_last_table: tuple[bytes, tuple[_Spec, ...]] = (b"", ())


def _parse_tensors(table: bytes) -> tuple[_Spec, ...]:
    """The tensor table from its msgpack bytes (as `_unpack_header` leaves it)."""
    global _last_table
    last = _last_table  # one read: another thread may replace it
    if table == last[0]:
        return last[1]
    value = _unpack_value(memoryview(table), _HEADER_UNPACK_LIMITS, "header field 'tensors'")
    if not isinstance(value, list):
        raise WireError(f"header field 'tensors' must be a list, got {_type_name(value)}")
    specs = tuple(_parse_tensor(i, entry) for i, entry in enumerate(value))
    _check_unique([s.name for s in specs])
    _last_table = (table, specs)
    return specs


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise WireError(f"tensor name {next(n for n in names if names.count(n) > 1)!r} appears more than once")


def _parse_header(header: dict[str, Any]) -> tuple[_Spec, ...]:
    _parse_fields(header)
    return _parse_tensors(header["tensors"])


def _parse_fields(header: dict[str, Any]) -> None:
    """Every header key but the tensor table."""
    # proto first: a future protocol may change every other key, and this is the useful message.
    proto = header.get("proto")
    if not _is_int(proto) or proto != PROTOCOL:
        raise WireError(f"header proto is {proto!r}, this receiver speaks protocol {PROTOCOL}")
    missing = HEADER_KEYS - set(header)
    if missing:
        raise WireError(f"header is missing key(s) {sorted(missing)}")
    extra = set(header) - HEADER_KEYS
    if extra:
        raise WireError(f"header has unknown key(s) {sorted(extra)} (new keys need a new protocol)")
    kind = _require(header, "kind", str, "a str")
    if kind not in KINDS:
        raise WireError(f"header kind {kind!r} is not supported by protocol {PROTOCOL} (only {list(KINDS)})")
    if _require(header, "version", int, "an int") < 1:
        raise WireError(f"header version must be >= 1, got {header['version']}")
    if _require(header, "step", int, "an int") < 0:
        raise WireError(f"header step must be >= 0, got {header['step']}")
    if not _require(header, "base_model_id", str, "a str"):
        raise WireError("header base_model_id must be a non-empty str")
    _require(header, "adapter_config", dict, "a map")
    checksum = _require(header, "checksum", str, "a str")
    if len(checksum) != CHECKSUM_CHARS or any(c not in "0123456789abcdef" for c in checksum):
        raise WireError(f"header checksum must be {CHECKSUM_CHARS} lowercase hex characters")


def _check_sizes(specs: Sequence[_Spec], buffers: Sequence[memoryview], max_total_bytes: int) -> int:
    if len(buffers) != len(specs):
        raise WireError(f"message has {len(buffers)} buffer frame(s) but the header declares {len(specs)}")
    total = sum(s.nbytes for s in specs)
    if total > max_total_bytes:
        raise WireError(f"message declares {total} bytes of tensors, more than the {max_total_bytes} allowed")
    for spec, buf in zip(specs, buffers):
        if buf.nbytes != spec.nbytes:
            raise WireError(f"tensor {spec.name!r} frame has {buf.nbytes} bytes, header declares {spec.nbytes}")
    return total


# The (parsed table, expected shapes) pair last found to agree: `_parse_tensors` returns the same tuple for the same
# table, so a run's every version skips the per-tensor comparison against the model's layout.
_last_match: tuple[Any, Any] = (None, None)


def _check_expected(header: dict[str, Any], specs: Sequence[_Spec], expected: Expectation) -> None:
    global _last_match
    if header["base_model_id"] != expected.base_model_id:
        raise WireError(f"message is for base model {header['base_model_id']!r}, expected {expected.base_model_id!r}")
    if header["version"] <= expected.min_version:
        raise WireError(f"message version {header['version']} is not newer than {expected.min_version}")
    last = _last_match
    if last[0] is specs and last[1] is expected.shapes:
        return
    got = {s.name: s for s in specs}
    missing = sorted(set(expected.shapes) - set(got))
    extra = sorted(set(got) - set(expected.shapes))
    if missing or extra:
        raise WireError(f"tensor names differ from the expected set (missing {missing}, unexpected {extra})")
    for name, (shape, dtype) in expected.shapes.items():
        spec = got[name]
        if spec.shape != tuple(shape):
            raise WireError(f"tensor {name!r} has shape {list(spec.shape)}, expected {list(shape)}")
        if spec.dtype != dtype:
            raise WireError(f"tensor {name!r} has dtype {spec.dtype}, expected {dtype}")
    _last_match = (specs, expected.shapes)


def _check_checksum(header: dict[str, Any], specs: Sequence[_Spec], buffers: Iterable[Any]) -> None:
    actual = _checksum(header, specs, map(_buffer_digest, buffers))
    if not hmac.compare_digest(actual, header["checksum"]):
        raise WireError(f"checksum mismatch (header {header['checksum']}, computed {actual})")


def _arrays(specs: Sequence[_Spec], buffers: Sequence[memoryview]) -> dict[str, np.ndarray]:
    # frombuffer makes views that keep the frames alive; no tensor bytes are copied. Each buffer holds exactly its
    # tensor (checked by _check_sizes), so no count is needed.
    return {s.name: np.frombuffer(buf, DTYPES[s.dtype]).reshape(s.shape) for s, buf in zip(specs, buffers)}


def decode(
    frames: Sequence[Any],
    expected: Expectation | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    verify: bool = True,
) -> WeightMessage:
    """Validate a received multipart weight message and return zero-copy views of its tensors. With
    ``verify=False`` the checksum is left to a later ``verify`` of the caller's own copy of the tensors."""
    if not isinstance(frames, (list, tuple)):
        raise WireError(f"frames must be a list of frames, not {_type_name(frames)}")
    if not frames:
        raise WireError("message has no frames")
    header = _unpack_header(_bytes_view(frames[0], "header frame"))
    specs = _parse_header(header)
    buffers = [_bytes_view(f, f"frame {i}") for i, f in enumerate(frames[1:], start=1)]
    return _message(frames[0], header, specs, buffers, expected, max_total_bytes, verify)


def _message(
    header_frame: Any,
    header: dict[str, Any],
    specs: Sequence[_Spec],
    buffers: list[memoryview],
    expected: Expectation | None,
    max_total_bytes: int,
    verify: bool,
) -> WeightMessage:
    total = _check_sizes(specs, buffers, max_total_bytes)
    if expected is not None:
        # Cheap semantic checks before hashing possibly hundreds of MB.
        _check_expected(header, specs, expected)
    if verify:
        _check_checksum(header, specs, buffers)
    return WeightMessage(
        version=header["version"],
        step=header["step"],
        base_model_id=header["base_model_id"],
        adapter_config=header["adapter_config"],
        kind=header["kind"],
        tensors=_arrays(specs, buffers),
        dtypes={s.name: s.dtype for s in specs},
        nbytes=total,
        checksum=header["checksum"],
        header=header,
        specs=tuple(specs),
        frames=[header_frame, *buffers],
    )


def verify(message: WeightMessage, buffers: Iterable[Any]) -> None:
    """Check ``message``'s checksum against ``buffers``: the receiver's own copies of its tensors, in header order
    (an iterator works: each buffer is hashed as it comes)."""
    _check_checksum(message.header, message.specs, buffers)


# --------------------------------------------------------------------------- segment form


def _align(offset: int) -> int:
    return -(-offset // SEGMENT_ALIGN) * SEGMENT_ALIGN


def _segment_offsets(header_len: int, sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of the buffers in a segment, and the segment's total size."""
    if not sizes:
        return [], 8 + header_len
    start = _align(8 + header_len)
    relative, span = _relative_offsets(tuple(sizes))
    return [start + r for r in relative], start + span


@functools.lru_cache(maxsize=16)
def _relative_offsets(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], int]:
    """Offsets of the buffers from the first one's (aligned) start, and the span to the end of the last: the same
    for every version of a run, so cached."""
    offsets, end = [], 0
    for size in sizes:
        end = _align(end)
        offsets.append(end)
        end += size
    return tuple(offsets), end


def _segment_header(view: memoryview) -> tuple[bytes, dict[str, Any]]:
    if view.nbytes < 8:
        raise WireError(f"segment is {view.nbytes} bytes, too short for a header length")
    header_len = int.from_bytes(view[:8], "little")
    if not 0 < header_len <= min(MAX_HEADER_BYTES, view.nbytes - 8):
        raise WireError(f"segment declares a {header_len}-byte header in {view.nbytes} bytes")
    header_frame = bytes(view[8 : 8 + header_len])  # copied: a writer may be changing the segment
    header = _unpack_header(memoryview(header_frame))
    _parse_fields(header)
    return header_frame, header


def segment_header(segment: Any) -> dict[str, Any]:
    """A segment's header with every field but the tensor table checked (its "tensors" value is left as msgpack
    bytes): enough to route it. Receivers of the tensors ``decode_segment`` it."""
    return _segment_header(_bytes_view(segment, "segment"))[1]


def decode_segment(
    segment: Any,
    expected: Expectation | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    verify: bool = True,
) -> WeightMessage:
    """``decode`` for a message in segment form. The header is copied out first (a writer may be changing the
    segment); the tensors stay views of it."""
    view = _bytes_view(segment, "segment")
    header_frame, header = _segment_header(view)
    specs = _parse_tensors(header["tensors"])
    offsets, size = _segment_offsets(len(header_frame), [s.nbytes for s in specs])
    if size != view.nbytes:
        raise WireError(f"segment is {view.nbytes} bytes but its header lays out {size}")
    buffers = [view[o : o + s.nbytes] for o, s in zip(offsets, specs)]
    return _message(header_frame, header, specs, buffers, expected, max_total_bytes, verify)


def recv(
    socket: zmq.Socket,
    expected: Expectation | None = None,
    flags: int = 0,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> WeightMessage:
    """Receive one multipart weight message without copying and ``decode`` it."""
    frames = socket.recv_multipart(flags=flags, copy=False)
    return decode(frames, expected, max_total_bytes)


# --------------------------------------------------------------------------- control


def _check_control(msg: Any) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise WireError(f"control message is a {_type_name(msg)}, not a map")
    kind = msg.get("type")
    if not isinstance(kind, str) or not kind:
        raise WireError("control message needs a non-empty str 'type'")
    return msg


def _unpack_control_view(view: memoryview) -> dict[str, Any]:
    if view.nbytes > MAX_CONTROL_BYTES:
        raise WireError(f"control message is {view.nbytes} bytes, more than the {MAX_CONTROL_BYTES} allowed")
    return _check_control(_unpack_value(view, _CONTROL_UNPACK_LIMITS, "control message"))


def pack_control(msg: dict[str, Any]) -> bytes:
    """Serialize a control message; raises WireError if it is not one ``unpack_control`` accepts."""
    _check_control(msg)
    try:
        data = msgpack.packb(msg, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"control message is not msgpack-serializable ({exc})") from None
    # Round-trip so e.g. non-str map keys fail here at the sender, not at the receiver.
    _unpack_control_view(memoryview(data))
    return data


def unpack_control(data: bytes | memoryview | zmq.Frame) -> dict[str, Any]:
    """Parse and validate one control message frame."""
    return _unpack_control_view(_bytes_view(data, "control frame"))
