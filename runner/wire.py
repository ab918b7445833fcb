"""Wire format of a versioned LoRA adapter: what the learner publishes, the coordinator keeps and fans out, and the
generation workers install. numpy, msgpack and xxhash only -- never MLX: this is the control plane. Control messages
have their own codec (`runner.messages`); `runner.control` moves messages (one ZeroMQ frame, or a same-host
shared-memory slot file, holding the same bytes).

Weight message, protocol 4: ONE buffer, sent as ONE ZeroMQ frame (no topic frame, SUB sockets subscribe to ``b""``)
or written into a slot file::

    bytes 0..8    header length L, unsigned little-endian
    bytes 8..8+L  the header, a msgpack map (``use_bin_type=True``, str keys), below
    then each tensor's bytes in table order, each starting at the next multiple of ``SEGMENT_ALIGN`` (the padding
    between is ignored and not hashed), and nothing after the last tensor

The header has exactly these keys::

    {"proto": 4,                    # int == PROTOCOL, checked first
     "kind": "adapter",             # str; the full LoRA tensors (the only kind)
     "version": int >= 1,           # adapter version, strictly increasing
     "step": int >= 0,              # learner optimizer step that produced it
     "base_model_id": str,          # non-empty; identifies the base weights
     "adapter_config": map,         # opaque msgpack-able values (rank, scale, keys, ...)
     "tensors": [{"name": str,      # non-empty, unique; one entry per tensor, in layout order
                  "dtype": str,     # float32 float16 bfloat16 int32 uint32 uint8 int8
                  "shape": [int],   # 0..8 dims, each >= 0 ([] = scalar)
                  "nbytes": int}],  # == prod(shape) * itemsize(dtype)
     "checksum": str}               # 16 lowercase hex chars, see below

"int" is a msgpack integer; booleans are NOT ints. Each tensor is ``nbytes`` long: C order, contiguous,
little-endian. ``bfloat16`` (no numpy dtype) travels as its raw 16-bit patterns and is received as a ``uint16`` array
with ``WeightMessage.dtypes[name] == "bfloat16"``. The checksum::

    h = xxhash.xxh3_64(msgpack.packb([proto, kind, version, step, base_model_id, adapter_config,
                                      [[name, dtype, shape, nbytes] for each tensor]], use_bin_type=True))
    for each tensor in order: h.update(xxhash.xxh3_64_digest(its bytes))
    checksum = h.hexdigest()

XXH3-64, not a cryptographic hash or CRC-32: it is faster than copying the bytes, and the learner and every worker
compute it on the publish-to-serving path; one digest per tensor lets a receiver hash each tensor right after copying
it. The sizes are in the hashed table, so tensors need no separators. It catches corruption, torn shared-memory reads
and bugs; it is not keyed, so it is no defence against a malicious sender (CURVE authenticates senders). Protocol 3
was the same header with one ZeroMQ frame per tensor; one frame per version costs far less per message in ZeroMQ and
is the same bytes as a slot file. (Protocol 1 used CRC-32; protocol 2 hashed the tensors in one stream.)

Receivers (``decode`` for a list of frames, ``decode_segment`` for one buffer) check, before returning anything:
there is exactly one frame; the header length fits; the header is at most ``MAX_HEADER_BYTES`` and unpacks (tight
msgpack limits, extension types refused) to a map; every key is present with the right type; proto, kind, version,
step; each tensor's name, dtype, shape and nbytes; the total size is at most ``max_total_bytes``; the buffer is
exactly as long as the header lays out; optionally an ``Expectation`` (base model id, exact names, shapes and dtypes,
version > min_version); finally the checksum (unless ``verify=False``: a receiver that copies the tensors and then
checks its copy with ``verify`` is safe even if the source changes under it). Any failure raises ``WireError`` (a
``ValueError``) with a one-sentence message; nothing else escapes. Tensors are ``np.frombuffer`` views of the buffer:
no copies, possibly read-only. Senders (``encode``, ``encode_into``) check their input once, so they never build a
message a receiver rejects, and copy each tensor once, into the message.
"""

from __future__ import annotations

import hmac
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
import numpy as np
import xxhash

PROTOCOL = 4
KIND = "adapter"
CHECKSUM_CHARS = 16  # xxh3_64 hex digest
SEGMENT_ALIGN = 64  # tensor offsets: cache-line aligned, so numpy/MLX views are aligned too

MAX_HEADER_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 8 * 2**30
MAX_NDIM = 8

# Wire dtype name -> little-endian numpy dtype used to view the buffer. bfloat16 is viewed as its raw uint16 bit
# patterns (numpy has no bfloat16).
DTYPES: dict[str, np.dtype] = {
    name: np.dtype(code)
    for name, code in [("float32", "<f4"), ("float16", "<f2"), ("bfloat16", "<u2"), ("int32", "<i4")]
    + [("uint32", "<u4"), ("uint8", "u1"), ("int8", "i1")]
}

HEADER_KEYS = frozenset({"proto", "kind", "version", "step", "base_model_id", "adapter_config", "tensors", "checksum"})
TENSOR_KEYS = frozenset({"name", "dtype", "shape", "nbytes"})

# Explicit limits so a hostile header cannot make msgpack allocate much more than the (already bounded) frame; ext
# types have no meaning here, so refuse them.
_UNPACK_LIMITS = dict(max_str_len=2**20, max_bin_len=2**20, max_array_len=2**20, max_map_len=2**16, max_ext_len=0)


Tensors = Sequence[tuple[str, str, Sequence[int], Any]]  # [(name, wire dtype, shape, buffer)], see `encode`


class WireError(ValueError):
    """A weight message is malformed or not the one expected."""


@dataclass(frozen=True)
class Expectation:
    """What a receiver's model can accept; checked by ``decode`` after the structure."""

    base_model_id: str
    shapes: dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, wire dtype)
    min_version: int = 0  # the message version must be strictly greater


@dataclass(frozen=True)
class WeightMessage:
    """A validated weight message; tensors are zero-copy views of the frames."""

    version: int
    header: dict[str, Any]  # as received (step, base_model_id, adapter_config, checksum, ...)
    specs: tuple  # the parsed tensor table, for a later ``verify``
    tensors: dict[str, np.ndarray]
    dtypes: dict[str, str]  # wire dtype per tensor ("bfloat16" arrays are uint16)
    nbytes: int
    frames: list[Any]  # [the message buffer] as received (e.g. a zmq.Frame, sent on by reference)


class _Spec(NamedTuple):
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # on the wire a bool is not an int


def _type_name(value: Any) -> str:
    return type(value).__name__


def _bytes_view(obj: Any, what: str, copy_strided: bool = False) -> memoryview:
    """A flat byte view of a frame or buffer (bytes, memoryview, zmq.Frame, ndarray, ...) without copying it; a
    non-contiguous buffer is an error, or copied into C order with ``copy_strided``."""
    obj = getattr(obj, "buffer", obj)  # a zmq.Frame
    try:
        view = memoryview(obj)
    except TypeError:
        raise WireError(f"{what} is a {_type_name(obj)}, not a bytes-like object") from None
    if not view.c_contiguous and not copy_strided:
        raise WireError(f"{what} is not a contiguous buffer")
    if not view.c_contiguous:
        view = memoryview(view.tobytes())  # tobytes() yields C order
    if view.nbytes == 0:
        return memoryview(b"")  # memoryview cannot cast a shape with zeros in it
    if view.ndim != 1 or view.format != "B":
        try:
            view = view.cast("B")
        except (TypeError, ValueError):
            raise WireError(f"{what} cannot be viewed as bytes") from None
    return view


def _checksum(header: Mapping[str, Any], specs: Sequence[_Spec], digests: Iterable[bytes]) -> str:
    """The checksum from the header fields, the tensor table and the buffers' own XXH3-64 digests."""
    fields = [header[k] for k in ("proto", "kind", "version", "step", "base_model_id", "adapter_config")]
    fields.append([[s.name, s.dtype, list(s.shape), s.nbytes] for s in specs])
    digest = xxhash.xxh3_64(msgpack.packb(fields, use_bin_type=True))
    for buffer_digest in digests:
        digest.update(buffer_digest)
    return digest.hexdigest()


def _entries(tensors: Any) -> list[tuple[_Spec, memoryview]]:
    """The checked tensor table and buffers of `encode`'s ``tensors`` argument."""
    if not isinstance(tensors, (list, tuple)):
        raise WireError(f"tensors must be a list of (name, dtype, shape, buffer), not a {_type_name(tensors)}")
    entries = []
    for index, entry in enumerate(tensors):
        try:
            name, dtype, shape, buf = entry
        except (TypeError, ValueError):
            raise WireError("each tensor must be (name, dtype, shape, buffer)") from None
        spec = _spec(index, name, dtype, list(shape) if isinstance(shape, (list, tuple)) else shape)
        view = _bytes_view(buf, f"tensor {name!r} buffer", copy_strided=True)
        if view.nbytes != spec.nbytes:
            raise WireError(f"tensor {name!r} buffer has {view.nbytes} bytes but {dtype}{shape} needs {spec.nbytes}")
        entries.append((spec, view))
    _check_unique([spec.name for spec, _ in entries])
    return entries


def _sender_header(
    version: int, step: int, base_model_id: str, adapter_config: dict[str, Any], specs: Sequence[_Spec]
) -> dict[str, Any]:
    """The header with a placeholder checksum, checked as a receiver would check it (the tensor table was checked
    when it was built)."""
    table = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape), "nbytes": s.nbytes} for s in specs]
    header = {"proto": PROTOCOL, "kind": KIND, "version": version, "step": step, "base_model_id": base_model_id}
    header.update(adapter_config=adapter_config, tensors=table, checksum="0" * CHECKSUM_CHARS)
    _check_fields(header)
    try:
        packed_config = msgpack.packb(adapter_config, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise WireError(f"header is not msgpack-serializable: adapter_config does not pack ({exc})") from None
    _unpack(packed_config, "header field adapter_config")  # e.g. a non-str map key, which every receiver refuses
    return header


def encode(version: int, step: int, base_model_id: str, adapter_config: dict[str, Any], tensors: Tensors) -> list[Any]:
    """The frames (one) of a message for one adapter version. ``tensors`` is a list of ``(name, dtype, shape,
    buffer)``, ``buffer`` any buffer-protocol object holding exactly ``prod(shape) * itemsize(dtype)`` little-endian
    bytes (bfloat16 as its uint16 bit patterns)."""
    frames = []
    encode_into(
        lambda size: frames.append(bytearray(size)) or frames[0], version, step, base_model_id, adapter_config, tensors
    )
    return frames


def encode_into(
    allocate: Callable[[int], Any],
    version: int,
    step: int,
    base_model_id: str,
    adapter_config: dict[str, Any],
    tensors: Tensors,
) -> int:
    """``encode`` into a buffer of the caller's (e.g. a slot file's memory): ``allocate(size)`` returns a writable
    buffer of at least ``size`` bytes. Each tensor is copied in once and hashed from its copy. Returns the size."""
    entries = _entries(tensors)
    specs = [s for s, _ in entries]
    header = _sender_header(version, step, base_model_id, adapter_config, specs)
    header_len = len(msgpack.packb(header, use_bin_type=True))  # the placeholder checksum packs to the same length
    offsets, size = _segment_offsets(header_len, [s.nbytes for s in specs])
    out = memoryview(allocate(size)).cast("B")
    if out.nbytes < size:
        raise WireError(f"the buffer has {out.nbytes} bytes, the message needs {size}")
    digests = []
    for (spec, buf), offset in zip(entries, offsets):
        copy = out[offset : offset + spec.nbytes]
        copy[:] = buf
        digests.append(xxhash.xxh3_64_digest(copy))
    header["checksum"] = _checksum(header, specs, digests)
    out[:8] = header_len.to_bytes(8, "little")
    out[8 : 8 + header_len] = msgpack.packb(header, use_bin_type=True)
    return size


def _unpack(data: Any, what: str) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except Exception as exc:  # msgpack raises many types on garbage; all mean the same here
        raise WireError(f"{what} is not valid msgpack ({_type_name(exc)})") from None


def _require(header: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = header[key]
    if not (_is_int(value) if kind is int else isinstance(value, kind)):
        raise WireError(f"header field {key!r} must be {what}, got {_type_name(value)}")
    return value


def _check_fields(header: dict[str, Any]) -> None:
    """Every header key but the tensor table."""
    # proto first: a future protocol may change every other key, and this is the useful message.
    proto = header.get("proto")
    if not _is_int(proto) or proto != PROTOCOL:
        raise WireError(f"header proto is {proto!r}, this receiver speaks protocol {PROTOCOL}")
    if missing := HEADER_KEYS - set(header):
        raise WireError(f"header is missing key(s) {sorted(missing)}")
    if extra := set(header) - HEADER_KEYS:
        raise WireError(f"header has unknown key(s) {sorted(extra)} (new keys need a new protocol)")
    if _require(header, "kind", str, "a str") != KIND:
        raise WireError(f"header kind {header['kind']!r} is not supported by protocol {PROTOCOL} (only {KIND!r})")
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


def _spec(index: int, name: Any, dtype: Any, shape: Any) -> _Spec:
    if not isinstance(name, str) or not name:
        raise WireError(f"tensors[{index}] name must be a non-empty str")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(f"tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"tensor {name!r} shape must be a list of at most {MAX_NDIM} dims")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise WireError(f"tensor {name!r} shape {shape!r} must hold non-negative ints")
    # Python ints do not overflow, so absurd shapes are caught by the size checks without allocating.
    return _Spec(name, dtype, tuple(shape), math.prod(shape) * DTYPES[dtype].itemsize)


def _parse_tensor(index: int, entry: Any) -> _Spec:
    if not isinstance(entry, dict) or entry.keys() != TENSOR_KEYS:
        raise WireError(f"tensors[{index}] must be a map with exactly the keys {sorted(TENSOR_KEYS)}")
    spec, nbytes = _spec(index, entry["name"], entry["dtype"], entry["shape"]), entry["nbytes"]
    if not _is_int(nbytes):
        raise WireError(f"tensor {spec.name!r} nbytes must be an int, got {_type_name(nbytes)}")
    if nbytes != spec.nbytes:
        raise WireError(
            f"tensor {spec.name!r} declares nbytes={nbytes} but {spec.dtype}{list(spec.shape)} is {spec.nbytes} bytes"
        )
    return spec


def _check_unique(names: list[str]) -> None:
    if len(set(names)) != len(names):
        raise WireError(f"tensor name {next(n for n in names if names.count(n) > 1)!r} appears more than once")


def _parse_header(view: memoryview) -> tuple[dict[str, Any], tuple[_Spec, ...]]:
    if view.nbytes == 0:
        raise WireError("header is empty")
    if view.nbytes > MAX_HEADER_BYTES:
        raise WireError(f"header is {view.nbytes} bytes, more than the {MAX_HEADER_BYTES} allowed")
    header = _unpack(view, "header")
    if not isinstance(header, dict):
        raise WireError(f"header is a msgpack {_type_name(header)}, not a map")
    _check_fields(header)
    table = _require(header, "tensors", list, "a list")
    specs = tuple(_parse_tensor(i, entry) for i, entry in enumerate(table))
    _check_unique([s.name for s in specs])
    return header, specs


def _check_expected(header: dict[str, Any], specs: Sequence[_Spec], expected: Expectation) -> None:
    if header["base_model_id"] != expected.base_model_id:
        raise WireError(f"message is for base model {header['base_model_id']!r}, expected {expected.base_model_id!r}")
    if header["version"] <= expected.min_version:
        raise WireError(f"message version {header['version']} is not newer than {expected.min_version}")
    got = {s.name: s for s in specs}
    missing = sorted(set(expected.shapes) - set(got))
    extra = sorted(set(got) - set(expected.shapes))
    if missing or extra:
        raise WireError(f"tensor names differ from the expected set (missing {missing}, unexpected {extra})")
    for name, (shape, dtype) in expected.shapes.items():
        if got[name].shape != tuple(shape):
            raise WireError(f"tensor {name!r} has shape {list(got[name].shape)}, expected {list(shape)}")
        if got[name].dtype != dtype:
            raise WireError(f"tensor {name!r} has dtype {got[name].dtype}, expected {dtype}")


def verify(message: WeightMessage, buffers: Iterable[Any]) -> None:
    """Check ``message``'s checksum against ``buffers``: the receiver's own copies of its tensors, in header order
    (an iterator works: each buffer is hashed as it comes)."""
    actual = _checksum(
        message.header, message.specs, (xxhash.xxh3_64_digest(_bytes_view(b, "buffer")) for b in buffers)
    )
    if not hmac.compare_digest(actual, message.header["checksum"]):
        raise WireError(f"checksum mismatch (header {message.header['checksum']}, computed {actual})")


def _checked(
    frames: list[Any],
    header: dict[str, Any],
    specs: Sequence[_Spec],
    buffers: list[memoryview],
    expected: Expectation | None,
    verify_checksum: bool,
) -> WeightMessage:
    total = sum(s.nbytes for s in specs)
    if expected is not None:
        _check_expected(header, specs, expected)  # cheap semantic checks before hashing possibly hundreds of MB
    # np.frombuffer views keep the frames alive; no tensor bytes are copied.
    tensors = {s.name: np.frombuffer(buf, DTYPES[s.dtype]).reshape(s.shape) for s, buf in zip(specs, buffers)}
    dtypes = {s.name: s.dtype for s in specs}
    message = WeightMessage(header["version"], header, tuple(specs), tensors, dtypes, total, frames)
    if verify_checksum:
        verify(message, buffers)
    return message


def decode(
    frames: Sequence[Any],
    expected: Expectation | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    verify: bool = True,
) -> WeightMessage:
    """Validate a received message (its list of frames: exactly one) and return zero-copy views of its tensors.
    With ``verify=False`` the checksum is left to a later ``verify`` of the caller's own copy of the tensors."""
    if not isinstance(frames, (list, tuple)):
        raise WireError(f"frames must be a list of frames, not {_type_name(frames)}")
    if len(frames) != 1:
        raise WireError(f"message has {len(frames)} frames; a protocol {PROTOCOL} message is one frame")
    return decode_segment(frames[0], expected, max_total_bytes, verify)


def _segment_offsets(header_len: int, sizes: Sequence[int]) -> tuple[list[int], int]:
    """Offsets of the tensors in a message, and the message's total size."""
    offsets, end = [], 8 + header_len
    for size in sizes:
        offsets.append(-(-end // SEGMENT_ALIGN) * SEGMENT_ALIGN)
        end = offsets[-1] + size
    return offsets, end


def decode_segment(
    segment: Any,
    expected: Expectation | None = None,
    max_total_bytes: int = MAX_TOTAL_BYTES,
    verify: bool = True,
) -> WeightMessage:
    """``decode`` for a message buffer (a frame's, or a slot file's memory). The header is copied out first (a writer
    may be changing a slot); the tensors stay views of the buffer."""
    view = _bytes_view(segment, "message")
    if view.nbytes < 8:
        raise WireError(f"message is {view.nbytes} bytes, too short for a header length")
    header_len = int.from_bytes(view[:8], "little")
    if not 0 < header_len <= min(MAX_HEADER_BYTES, view.nbytes - 8):
        raise WireError(f"message declares a {header_len}-byte header in {view.nbytes} bytes")
    header, specs = _parse_header(memoryview(bytes(view[8 : 8 + header_len])))
    if (total := sum(s.nbytes for s in specs)) > max_total_bytes:
        raise WireError(f"message declares {total} bytes of tensors, more than the {max_total_bytes} allowed")
    offsets, size = _segment_offsets(header_len, [s.nbytes for s in specs])
    if size != view.nbytes:
        raise WireError(f"message is {view.nbytes} bytes but its header lays out {size}")
    buffers = [view[o : o + s.nbytes] for o, s in zip(offsets, specs)]
    return _checked([segment], header, specs, buffers, expected, verify)


def adapter_message_bound(model_dir: str | Path, rank: int, keys: Sequence[str], num_layers: int = -1) -> int:
    """An upper bound on the size of one weight message for a LoRA of `rank` on `keys` of the model in `model_dir`
    (its config.json), for receivers' ``ZMQ_MAXMSGSIZE``: each adapted linear of a block carries rank x (in + out)
    values, both at most the model's widest dimension, in at most 4 bytes each (times the experts of a mixture);
    plus each tensor's header entry and alignment. A model whose config cannot be read gets the format's own limits."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
        config = {**config.get("text_config", {}), **config}  # multimodal configs nest the language model's
        heads = int(config.get("num_attention_heads") or 0)
        head_dim = int(config.get("head_dim") or 0) or (int(config["hidden_size"]) // heads if heads else 0)
        widest = max(
            int(config.get(k) or 0) for k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "n_embd")
        )
        widest = max(widest, heads * head_dim, int(config.get("num_key_value_heads") or 0) * head_dim)
        experts = max(int(config.get(k) or 1) for k in ("num_experts", "num_local_experts", "n_routed_experts"))
        layers = int(config.get("num_hidden_layers") or config.get("n_layer"))
    except (OSError, ValueError, KeyError, TypeError):
        return MAX_HEADER_BYTES + MAX_TOTAL_BYTES
    adapted = (layers if num_layers < 0 else min(num_layers, layers)) * len(keys)
    tensors = 2 * adapted  # lora_a and lora_b
    data = adapted * experts * rank * 2 * widest * 4
    return data + tensors * (256 + SEGMENT_ALIGN) + 2**16
