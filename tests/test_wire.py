"""Tests for runner.wire (the LoRA weight message) and runner.messages (the control messages)."""

from __future__ import annotations

import random
import time

import msgpack
import numpy as np
import pytest
import zmq

from runner import messages, wire
from runner.messages import MessageError
from runner.wire import MAX_HEADER_BYTES, PROTOCOL, Expectation, WireError

BASE = "tiny-llama@abc123"
CONFIG = {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"], "num_layers": 2}


# --------------------------------------------------------------------------- fixtures / helpers


@pytest.fixture
def ctx():
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def _tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "layers.0.q.lora_a": rng.standard_normal((16, 8)).astype(np.float32),
        "layers.0.q.lora_b": rng.standard_normal((8, 16)).astype(np.float16),
        "ids": np.arange(-5, 7, dtype=np.int32).reshape(3, 4),
        "counts": np.arange(10, dtype=np.uint32),
        "bytes": np.arange(256, dtype=np.uint8).reshape(2, 2, 64),
        "signed": np.arange(-128, 128, dtype=np.int8),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def _bf16_bits() -> np.ndarray:
    # bfloat16 bit patterns = top 16 bits of float32 (truncation is fine for a test)
    values = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def _join(parts: list) -> bytearray:
    """One message buffer from its parts (the header, then each tensor's bytes), laid out as the wire module's
    docstring says: an 8-byte little-endian header length, the header, each tensor at the next aligned offset."""
    header = bytes(parts[0])
    out = bytearray(len(header).to_bytes(8, "little") + header)
    for buf in parts[1:]:
        out += bytes(-len(out) % 64)
        out += bytes(buf)
    return out


def encode(version: int, step: int, base: str, config: dict, tensors) -> list:
    """The parts of wire.encode's message (header, then each tensor's bytes), so tests can change one; also takes
    the tests' shorthand {name: ndarray}."""
    if isinstance(tensors, dict):
        tensors = [(name, arr.dtype.name, arr.shape, arr) for name, arr in tensors.items()]
    (frame,) = wire.encode(version, step, base, config, tensors)
    header_len = int.from_bytes(frame[:8], "little")
    parts = [bytes(frame[8 : 8 + header_len])] + [a.tobytes() for a in wire.decode([frame]).tensors.values()]
    assert _join(parts) == frame  # the documented layout, exactly
    return parts


def decode_parts(parts: list, *args, **kwargs) -> wire.WeightMessage:
    """wire.decode of the one-frame message made of ``parts``."""
    return wire.decode([_join(parts)], *args, **kwargs)


def compute_checksum(header: dict, buffers: list) -> str:
    """The checksum as the wire module's docstring defines it, computed independently."""
    import xxhash

    table = [[t["name"], t["dtype"], list(t["shape"]), t["nbytes"]] for t in header["tensors"]]
    fields = [header[k] for k in ("proto", "kind", "version", "step", "base_model_id", "adapter_config")] + [table]
    h = xxhash.xxh3_64(msgpack.packb(fields, use_bin_type=True))
    for buf in buffers:
        h.update(xxhash.xxh3_64_digest(bytes(buf)))
    return h.hexdigest()


def _frames(version: int = 1) -> list:
    return encode(version, 7, BASE, CONFIG, _tensors())


def _as_bytes(frames: list) -> list[bytes]:
    return [bytes(f) for f in frames]


def _header(frames: list) -> dict:
    return msgpack.unpackb(bytes(frames[0]), raw=False)


def _with_header(frames: list, header: dict, resign: bool = True) -> list:
    """Replace the header; re-sign so the check under test is the one that fires."""
    if resign:
        header["checksum"] = compute_checksum(header, frames[1:])
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


def _expectation(min_version: int = 0) -> Expectation:
    return Expectation(BASE, {n: (a.shape, a.dtype.name) for n, a in _tensors().items()}, min_version)


# --------------------------------------------------------------------------- round trip


def test_round_trip_dtypes_and_shapes():
    tensors = _tensors()
    bf16 = _bf16_bits()
    raw = [(n, a.dtype.name, a.shape, a) for n, a in tensors.items()]
    raw.append(("layers.0.v.lora_a", "bfloat16", (3, 4), memoryview(bf16)))
    frames = encode(3, 2, BASE, CONFIG, raw)
    msg = decode_parts(_as_bytes(frames))

    assert (msg.version, msg.header["step"], msg.header["base_model_id"], msg.header["kind"]) == (3, 2, BASE, "adapter")
    assert msg.header["adapter_config"] == CONFIG
    assert list(msg.tensors) == [n for n, *_ in raw]
    for name, arr in tensors.items():
        got = msg.tensors[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape
        np.testing.assert_array_equal(got, arr)
        assert msg.dtypes[name] == arr.dtype.name
    assert msg.dtypes["layers.0.v.lora_a"] == "bfloat16"
    assert msg.tensors["layers.0.v.lora_a"].dtype == np.uint16
    np.testing.assert_array_equal(msg.tensors["layers.0.v.lora_a"], bf16)
    assert msg.tensors["scalar"].shape == () and msg.tensors["empty"].shape == (0, 4)
    assert msg.nbytes == sum(a.nbytes for a in tensors.values()) + bf16.nbytes


def test_dict_form_round_trip_and_header_contents():
    frames = _frames()
    header = _header(frames)
    assert set(header) == wire.HEADER_KEYS
    assert header["proto"] == PROTOCOL == 4 and header["kind"] == "adapter"
    assert header["tensors"][0] == {"name": "layers.0.q.lora_a", "dtype": "float32", "shape": [16, 8], "nbytes": 512}
    assert len(header["checksum"]) == 16
    msg = decode_parts(frames, _expectation())
    for name, arr in _tensors().items():
        np.testing.assert_array_equal(msg.tensors[name], arr)


def test_encode_makes_one_frame_laid_out_as_documented():
    """One frame per version: the 8-byte header length, the header, each tensor at the next 64-byte boundary,
    nothing after the last (checked against an independent layout in `encode`); tensors are views of it."""
    bf16 = _bf16_bits()
    frames = wire.encode(1, 0, BASE, CONFIG, [("w", "bfloat16", (3, 4), memoryview(bf16)), ("e", "int8", (0,), b"")])
    assert len(frames) == 1
    msg = wire.decode(frames)
    base = np.frombuffer(frames[0], np.uint8).ctypes.data
    assert (msg.tensors["w"].ctypes.data - base) % wire.SEGMENT_ALIGN == 0
    np.testing.assert_array_equal(msg.tensors["w"], bf16)
    assert encode(1, 0, BASE, CONFIG, [("w", "bfloat16", (3, 4), memoryview(bf16))])[1] == bf16.tobytes()


def test_encode_copies_noncontiguous_buffers_into_c_order():
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    frames = encode(1, 0, BASE, {}, {"t": base.T, "s": base[:, ::2]})
    msg = decode_parts(_as_bytes(frames))
    np.testing.assert_array_equal(msg.tensors["t"], base.T)
    np.testing.assert_array_equal(msg.tensors["s"], base[:, ::2])


def test_decoded_arrays_are_views_of_the_frame():
    frame = _join(_frames())
    msg = wire.decode([frame])
    for arr in msg.tensors.values():
        assert arr.flags.owndata is False
        if arr.size:
            assert np.shares_memory(arr, np.frombuffer(frame, dtype=np.uint8))


def test_decode_does_not_mutate_or_copy_the_frame():
    frame = _join(_frames())
    snapshot = bytes(frame)
    msg = wire.decode([frame])
    assert bytes(frame) == snapshot
    # A writable frame gives writable views: a write through the array shows in the frame.
    arr = msg.tensors["counts"]
    arr[0] = 123456
    assert (
        np.frombuffer(frame, dtype=np.uint8)[arr.ctypes.data - np.frombuffer(frame, np.uint8).ctypes.data]
        == 123456 % 256
    )


@pytest.mark.parametrize("with_expectation", [False, True])
def test_encode_accepts_what_decode_accepts(with_expectation):
    frames = _frames(version=5)
    msg = decode_parts(frames, _expectation(4) if with_expectation else None)
    assert msg.version == 5 and msg.header["step"] == 7


def test_empty_tensor_list_is_a_valid_message():
    msg = decode_parts(encode(1, 0, BASE, {}, {}))
    assert msg.tensors == {} and msg.nbytes == 0


# --------------------------------------------------------------------------- real sockets


def test_push_pull_inproc_zero_copy(ctx):
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    try:
        pull.bind("inproc://weights")
        push.connect("inproc://weights")
        tensors = _tensors()
        tensors["big"] = np.arange(100_000, dtype=np.float32)  # above pyzmq's copy threshold
        push.send_multipart(wire.encode(1, 0, BASE, CONFIG, _listed(tensors)), copy=False)
        assert pull.poll(5000)
        frames = pull.recv_multipart(copy=False)
        assert len(frames) == 1 and isinstance(frames[0], zmq.Frame)
        msg = wire.decode(frames, Expectation(BASE, {n: (a.shape, a.dtype.name) for n, a in tensors.items()}))
        assert msg.frames[0] is frames[0]  # kept as received, to be sent on by reference
        for name, arr in tensors.items():
            got = msg.tensors[name]
            np.testing.assert_array_equal(got, arr)
            assert got.flags.owndata is False
            if arr.size:
                assert np.shares_memory(got, np.asarray(frames[0].buffer))
    finally:
        push.close(linger=0)
        pull.close(linger=0)


def test_pub_sub_tcp_recv(ctx):
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        bf16 = _bf16_bits()
        frames = wire.encode(
            2, 1, BASE, CONFIG, [("a", "bfloat16", (3, 4), memoryview(bf16)), ("b", "int8", (0,), b"")]
        )
        deadline = time.monotonic() + 5
        while not sub.poll(50):  # PUB drops messages until the subscription has propagated
            assert time.monotonic() < deadline, "subscriber never received a message"
            pub.send_multipart(frames, copy=False)
        expected = Expectation(BASE, {"a": ((3, 4), "bfloat16"), "b": ((0,), "int8")}, min_version=1)
        msg = wire.decode(sub.recv_multipart(copy=False), expected)
        assert msg.version == 2 and msg.dtypes == {"a": "bfloat16", "b": "int8"}
        np.testing.assert_array_equal(msg.tensors["a"], bf16)
    finally:
        pub.close(linger=0)
        sub.close(linger=0)


# --------------------------------------------------------------------------- malformed messages


def test_not_exactly_one_frame():
    with pytest.raises(WireError, match="has 0 frames"):
        wire.decode([])
    frame = _join(_frames())
    with pytest.raises(WireError, match="has 2 frames"):
        wire.decode([frame, b"extra"])
    with pytest.raises(WireError, match="has 9 frames"):
        wire.decode(_frames())  # protocol 3's frame per tensor


@pytest.mark.parametrize("frames", [None, b"abc", "abc", 5])
def test_frames_not_a_list(frames):
    with pytest.raises(WireError):
        wire.decode(frames)


def test_empty_header():
    with pytest.raises(WireError, match="0-byte header"):
        decode_parts([b""])


def test_frame_not_bytes_like():
    with pytest.raises(WireError, match="not a bytes-like"):
        wire.decode(["a string"])
    with pytest.raises(WireError, match="not a bytes-like"):
        wire.decode([42])


def test_oversized_header_rejected_before_unpacking():
    with pytest.raises(WireError, match="header in"):
        decode_parts([bytes(MAX_HEADER_BYTES + 1)])


def test_garbage_header_bytes():
    for seed in range(1000):
        rng = random.Random(seed)
        garbage = rng.randbytes(rng.randint(1, 200))
        with pytest.raises(WireError):
            decode_parts([garbage, rng.randbytes(8)])


def test_every_single_bit_flip_in_the_header_is_rejected():
    frames = _as_bytes(encode(1, 0, BASE, {"rank": 4}, {"a": np.ones(3, np.float32)}))
    header = bytearray(frames[0])
    for bit in range(len(header) * 8):
        flipped = bytearray(header)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(WireError):
            decode_parts([bytes(flipped), frames[1]])


@pytest.mark.parametrize(
    "payload, match",
    [
        ([1, 2, 3], "not a map"),
        (7, "not a map"),
        ("header", "not a map"),
        (None, "not a map"),
    ],
)
def test_header_not_a_map(payload, match):
    with pytest.raises(WireError, match=match):
        decode_parts([msgpack.packb(payload)])


@pytest.mark.parametrize(
    "data",
    [
        msgpack.packb({1: 2}),  # non-str map key
        msgpack.packb(msgpack.ExtType(3, b"xyz")),  # extension types are refused
        msgpack.packb({"a": 1}) + b"\x00",  # trailing bytes
        b"\x91" * 5000,  # nesting deeper than the unpacker's stack
        b"\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
    ],
)
def test_header_msgpack_edge_cases(data):
    with pytest.raises(WireError, match="not valid msgpack"):
        decode_parts([data])


def test_header_with_a_huge_map_is_refused_by_the_unpack_limits():
    with pytest.raises(WireError, match="not valid msgpack"):
        decode_parts([msgpack.packb({f"k{i}": 0 for i in range(100_000)})])


@pytest.mark.parametrize("key", sorted(wire.HEADER_KEYS - {"proto"}))
def test_missing_key(key):
    frames = _frames()
    header = _header(frames)
    del header[key]
    with pytest.raises(WireError, match="missing key"):
        decode_parts(_with_header(frames, header, resign=False))


def test_unknown_key():
    frames = _frames()
    header = _header(frames)
    header["extra"] = 1
    with pytest.raises(WireError, match="unknown key"):
        decode_parts(_with_header(frames, header))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("version", True, "'version' must be an int"),
        ("version", "3", "'version' must be an int"),
        ("version", 1.0, "'version' must be an int"),
        ("step", False, "'step' must be an int"),
        ("step", None, "'step' must be an int"),
        ("kind", 1, "'kind' must be a str"),
        ("base_model_id", b"bytes", "'base_model_id' must be a str"),
        ("adapter_config", [1, 2], "'adapter_config' must be a map"),
        ("checksum", 5, "'checksum' must be a str"),
        ("tensors", {"a": 1}, "'tensors' must be a list"),
    ],
)
def test_wrong_types(key, value, match):
    frames = _frames()
    header = _header(frames)
    header[key] = value
    with pytest.raises(WireError, match=match):
        decode_parts(_with_header(frames, header, resign=False))


@pytest.mark.parametrize("proto", [0, 1, 2, 3, 5, True, "4", None])
def test_proto_mismatch(proto):
    frames = _frames()
    header = _header(frames)
    header["proto"] = proto
    with pytest.raises(WireError, match="proto"):
        decode_parts(_with_header(frames, header))


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("version", 0, "version must be >= 1"),
        ("version", -3, "version must be >= 1"),
        ("step", -1, "step must be >= 0"),
        ("kind", "delta", "not supported"),
        ("kind", "weights", "not supported"),
        ("base_model_id", "", "non-empty"),
        ("checksum", "ABCDEF0123456789", "lowercase hex"),
        ("checksum", "00", "lowercase hex"),
    ],
)
def test_bad_values(key, value, match):
    frames = _frames()
    header = _header(frames)
    header[key] = value
    with pytest.raises(WireError, match=match):
        decode_parts(_with_header(frames, header, resign=key != "checksum"))


def _mutate_tensor(index: int, **changes) -> list:
    frames = _frames()
    header = _header(frames)
    header["tensors"][index].update(changes)
    return _with_header(frames, header)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"shape": [16, -8]}, "non-negative"),
        ({"shape": [16, True]}, "non-negative ints"),
        ({"shape": [16, 8.0]}, "non-negative ints"),
        ({"shape": "16x8"}, "shape must be a list"),
        ({"shape": [1] * 9}, "at most 8"),
        ({"dtype": "float64"}, "unsupported dtype"),
        ({"dtype": "complex64"}, "unsupported dtype"),
        ({"dtype": 4}, "unsupported dtype"),
        ({"name": ""}, "non-empty str"),
        ({"name": 3}, "non-empty str"),
        ({"nbytes": 511}, "declares nbytes=511"),
        ({"nbytes": "512"}, "nbytes must be an int"),
        ({"nbytes": True}, "nbytes must be an int"),
        ({"extra": 1}, "exactly the keys"),
    ],
)
def test_bad_tensor_entries(changes, match):
    with pytest.raises(WireError, match=match):
        decode_parts(_mutate_tensor(0, **changes))


def test_tensor_entry_not_a_map():
    frames = _frames()
    header = _header(frames)
    header["tensors"][1] = ["layers.0.q.lora_b", "float16", [8, 16], 256]
    with pytest.raises(WireError, match="exactly the keys"):
        decode_parts(_with_header(frames, header, resign=False))


def test_huge_declared_shapes_do_not_allocate():
    # nbytes that does not match the product (the product itself exceeds uint64)
    with pytest.raises(WireError, match="declares nbytes"):
        decode_parts(_mutate_tensor(0, shape=[2**40, 2**40], nbytes=16))
    # a consistent but enormous declaration hits the size limit before frames are examined
    frames = _frames()
    header = _header(frames)
    header["tensors"][0].update(shape=[2**20, 2**20], nbytes=2**42)
    with pytest.raises(WireError, match="more than the"):
        decode_parts(_with_header(frames, header))


def test_configurable_size_limit():
    frames = _frames()
    total = decode_parts(frames).nbytes
    assert decode_parts(frames, max_total_bytes=total).nbytes == total
    with pytest.raises(WireError, match="more than the"):
        decode_parts(frames, max_total_bytes=total - 1)


def test_duplicate_names():
    frames = _frames()
    header = _header(frames)
    header["tensors"][1]["name"] = header["tensors"][0]["name"]
    header["tensors"][1].update(dtype="float32", shape=[16, 8], nbytes=512)
    frames[2] = bytes(512)
    with pytest.raises(WireError, match="more than once"):
        decode_parts(_with_header(frames, header))


def test_truncated_tensor():
    frames = _frames()
    frames[1] = frames[1][:-1]  # the padding before the next tensor may absorb it: then the checksum fails
    with pytest.raises(WireError, match="lays out|checksum mismatch"):
        decode_parts(frames)


def test_extra_bytes():
    frames = _frames()
    with pytest.raises(WireError, match="lays out"):
        decode_parts([*frames, b"extra"])


def test_missing_tensor():
    frames = _frames()
    with pytest.raises(WireError, match="lays out"):
        decode_parts(frames[:-2])  # the last one is empty: drop two
    with pytest.raises(WireError, match="lays out"):
        decode_parts(frames[:1])


def test_bad_checksum_flipped_buffer_byte():
    frames = [bytearray(f) for f in _frames()]
    frames[2][5] ^= 0x01
    with pytest.raises(WireError, match="checksum mismatch"):
        decode_parts(frames)


def test_bad_checksum_header_field_changed():
    frames = _frames()
    header = _header(frames)
    header["step"] = 8  # valid value, but not what was signed
    with pytest.raises(WireError, match="checksum mismatch"):
        decode_parts(_with_header(frames, header, resign=False))


def _nested(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def _pack_deep(frames: list, depth: int, sign: bool = True) -> list:
    """A message whose adapter_config nests ``depth`` arrays (packed by hand, no recursion), signed if ``sign``."""
    header = _header(frames)
    header["adapter_config"] = {"deep": _nested(depth)}
    if sign:
        header["checksum"] = compute_checksum(header, frames[1:])
    del header["adapter_config"]
    cfg = msgpack.packb("adapter_config") + b"\x81" + msgpack.packb("deep") + b"\x91" * depth + b"\x90"
    body = b"".join(msgpack.packb(k) + msgpack.packb(v, use_bin_type=True) for k, v in header.items())
    return [bytes([0x80 | (len(header) + 1)]) + body + cfg, *frames[1:]]


def test_deep_nesting_at_the_unpacker_limit():
    # header map -> adapter_config map -> 1021 arrays -> innermost array = 1024 levels, msgpack's stack
    frames = _frames()
    msg = decode_parts(_pack_deep(frames, 1021))  # the checksum re-pack copes with anything unpackable
    node, depth = msg.header["adapter_config"]["deep"], 0
    while node:
        node, depth = node[0], depth + 1
    assert depth == 1021
    with pytest.raises(WireError, match="not valid msgpack"):
        decode_parts(_pack_deep(frames, 1022))


# --------------------------------------------------------------------------- expectation


def test_expectation_wrong_base_id():
    exp = _expectation()
    with pytest.raises(WireError, match="base model"):
        decode_parts(_frames(), Expectation("other-model", exp.shapes))


def test_expectation_missing_tensor():
    exp = _expectation()
    shapes = {**exp.shapes, "layers.1.q.lora_a": ((16, 8), "float32")}
    with pytest.raises(WireError, match=r"missing \['layers.1.q.lora_a'\]"):
        decode_parts(_frames(), Expectation(BASE, shapes))


def test_expectation_extra_tensor():
    shapes = dict(_expectation().shapes)
    del shapes["scalar"]
    with pytest.raises(WireError, match=r"unexpected \['scalar'\]"):
        decode_parts(_frames(), Expectation(BASE, shapes))


def test_expectation_wrong_shape():
    shapes = {**_expectation().shapes, "layers.0.q.lora_a": ((8, 16), "float32")}
    with pytest.raises(WireError, match="has shape"):
        decode_parts(_frames(), Expectation(BASE, shapes))


def test_expectation_wrong_dtype():
    shapes = {**_expectation().shapes, "layers.0.q.lora_b": ((8, 16), "bfloat16")}
    with pytest.raises(WireError, match="has dtype float16, expected bfloat16"):
        decode_parts(_frames(), Expectation(BASE, shapes))


def test_every_message_is_compared_with_its_expectation():
    """No match is remembered: the same table against another expectation, or another table against the same
    expectation, is refused."""
    good = _expectation()
    assert decode_parts(_frames(), good).version == 1
    assert decode_parts(_frames(version=2), good).version == 2  # the remembered pair
    wrong = Expectation(BASE, {**good.shapes, "layers.0.q.lora_a": ((8, 16), "float32")})
    with pytest.raises(WireError, match="has shape"):
        decode_parts(_frames(), wrong)
    other = {**_tensors(), "layers.0.q.lora_a": np.zeros((8, 16), np.float32)}
    with pytest.raises(WireError, match="has shape"):
        decode_parts(encode(3, 0, BASE, CONFIG, other), good)
    assert decode_parts(_frames(version=4), good).version == 4


def test_expectation_stale_version():
    with pytest.raises(WireError, match="not newer"):
        decode_parts(_frames(version=3), _expectation(min_version=3))
    with pytest.raises(WireError, match="not newer"):
        decode_parts(_frames(version=3), _expectation(min_version=9))
    assert decode_parts(_frames(version=4), _expectation(min_version=3)).version == 4


# --------------------------------------------------------------------------- encode validation


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"version": 0}, "version must be >= 1"),
        ({"version": True}, "must be an int"),
        ({"step": -1}, "step must be >= 0"),
        ({"base_model_id": ""}, "non-empty"),
        ({"adapter_config": {"x": object()}}, "not msgpack-serializable"),
        ({"adapter_config": {1: "int key"}}, "not valid msgpack"),
        ({"adapter_config": [1]}, "must be a map"),
        ({"tensors": [("a", "float64", (2,), np.zeros(2))]}, "unsupported dtype"),
        ({"tensors": [("", "float32", (2,), b"12345678")]}, "non-empty str"),
        ({"tensors": [("a", "float32", (2,), b"1234567")]}, "needs 8"),
        ({"tensors": [("a", "float32", (2.5,), b"12345678")]}, "non-negative ints"),
        ({"tensors": [("a", "float32", (-2,), b"")]}, "non-negative"),
        ({"tensors": [("a", "float32", (1,) * 9, b"1234")]}, "at most 8"),
        ({"tensors": [("a", "float32", (2,))]}, r"\(name, dtype, shape, buffer\)"),
        ({"tensors": [("a", "float32", (2,), "12345678")]}, "not a bytes-like"),
        ({"tensors": [("a", "f32", (2,), b"12345678")]}, "unsupported dtype"),
        ({"tensors": "abc"}, "list of"),
        ({"tensors": {"a": np.zeros(2, np.float32)}}, "list of"),
        ({"tensors": [("a", "float32", (1,), b"1234"), ("a", "float32", (1,), b"1234")]}, "more than once"),
    ],
)
def test_encode_rejects_bad_input(kwargs, match):
    args = {"version": 1, "step": 0, "base_model_id": BASE, "adapter_config": {}, "tensors": []} | kwargs
    with pytest.raises(WireError, match=match):
        wire.encode(**args)


def test_encode_checks_every_buffer_of_every_message():
    """A learner encodes the same layout every version: each buffer is still checked against it every time."""
    a, b = np.arange(6, dtype=np.float32), np.arange(4, dtype=np.int8)
    layout = [("a", "float32", (2, 3), memoryview(a)), ("b", "int8", (4,), memoryview(b))]
    first, second = encode(1, 0, BASE, {}, layout), encode(1, 0, BASE, {}, list(layout))
    assert [bytes(f) for f in first] == [bytes(f) for f in second]
    with pytest.raises(WireError, match="needs 24"):  # same layout, a buffer of the wrong size
        encode(2, 0, BASE, {}, [layout[0][:3] + (memoryview(a[:5]),), layout[1]])
    with pytest.raises(WireError, match="needs 20"):  # another shape
        encode(2, 0, BASE, {}, [("a", "float32", (5,), memoryview(a)), layout[1]])
    with pytest.raises(WireError, match=r"\(name, dtype, shape, buffer\)"):
        encode(2, 0, BASE, {}, [layout[0] + ("extra",), layout[1]])
    with pytest.raises(WireError, match="shape"):
        encode(2, 0, BASE, {}, [("a", "float32", (2, -3), memoryview(a)), layout[1]])
    assert decode_parts(encode(3, 0, BASE, {}, layout)).version == 3


def test_encode_raw_noncontiguous_memoryview_is_copied_once():
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    strided = memoryview(base[:, ::2])
    assert not strided.c_contiguous
    frames = encode(1, 0, BASE, {}, [("a", "float32", (3, 2), strided)])
    np.testing.assert_array_equal(decode_parts(frames).tensors["a"], base[:, ::2])


# --------------------------------------------------------------------------- control messages (runner.messages)


def test_control_round_trip():
    for msg in [
        {"type": "hello", "name": "gen-0", "role": "generate", "pid": 123, "host": "mac1", "capabilities": {"a": [1]}},
        {"type": "heartbeat", "name": "gen-0", "version": 4, "state": "serving", "http_url": "http://x"},
        {"type": "ack", "name": "gen-0", "version": 7},
        {"type": "status", "job": {"step": 1}, "workers": [{"id": "w1", "ready": False}]},
        {"type": "get_latest"},
        {"type": "get_latest", "name": "gen-0", "slots": True},
        {"type": "weights_slot", "slot": 1, "version": 4, "nbytes": 1000},
        {
            "type": "welcome",
            "base_model_id": "b",
            "latest_version": 0,
            "weights_endpoint": "tcp://x:1",
            "weights_slots": None,
        },
        {"type": "config", "toml": "[model]\n"},
        {"type": "stop"},
    ]:
        data = messages.pack(msg)
        assert isinstance(data, bytes)
        assert messages.unpack(data) == msg
        assert messages.unpack(memoryview(data)) == msg
        assert messages.unpack(zmq.Frame(data)) == msg


def test_every_message_type_is_documented_and_its_required_fields_are_fields():
    for kind, required in messages.REQUIRED.items():
        assert required <= set(messages.MESSAGES[kind]), kind
    assert {"hello", "welcome", "get_config", "config", "weights_slot", "wait_serving", "serving"} <= set(
        messages.MESSAGES
    )
    for kind in messages.MESSAGES:
        assert f"``{kind}``" in messages.__doc__, f"{kind} is not described in runner.messages"


@pytest.mark.parametrize(
    "msg, match",
    [
        ([1, 2], "not a map"),
        ("hello", "not a map"),
        ({}, "type None is not one of"),
        ({"type": ""}, "is not one of"),
        ({"type": 5}, "is not one of"),
        ({"type": "no_such_type"}, "is not one of"),
        ({"type": "hello", "name": "x", "x": 1}, r"unknown field\(s\) \['x'\]"),
        ({"type": "hello"}, r"missing field\(s\) \['name'\]"),
        ({"type": "weights_slot", "slot": 0, "version": 1}, r"missing field\(s\) \['nbytes'\]"),
        ({"type": "weights_slot", "slot": "0", "version": 1, "nbytes": 2}, "'slot' must be int, got str"),
        ({"type": "weights_slot", "slot": 0, "version": True, "nbytes": 2}, "'version' must be int, got bool"),
        ({"type": "weights_slot", "slot": 0, "version": 1, "nbytes": 0.5}, "'nbytes' must be int, got float"),
        ({"type": "status", "job": {"x": object()}}, "not msgpack-serializable"),
        ({"type": "hello", "name": "x", "capabilities": {"x": object()}}, r"'capabilities'\['x'\] must be"),
        ({"type": "config", "toml": "a" * messages.MAX_BYTES}, "more than"),
    ],
)
def test_pack_rejects(msg, match):
    with pytest.raises(MessageError, match=match):
        messages.pack(msg)


def test_unpack_rejects_garbage_and_says_the_type_when_it_can():
    for seed in range(1000):
        rng = random.Random(10_000 + seed)
        with pytest.raises(MessageError):
            messages.unpack(rng.randbytes(rng.randint(0, 64)))
    for data in [
        b"",
        msgpack.packb([1]),
        msgpack.packb({"kind": "hello"}),
        msgpack.packb({"type": None}),
        msgpack.packb({2: "x"}),
        msgpack.packb({"type": "progress", "name": "x", "metrics": {1: 2}}),  # non-str key deep inside
        bytes(messages.MAX_BYTES + 1),
        "not bytes",
        None,
    ]:
        with pytest.raises(MessageError):
            messages.unpack(data)
    with pytest.raises(MessageError) as bad:
        messages.unpack(msgpack.packb({"type": "weights_slot", "slot": 0, "version": 1}))
    assert bad.value.type == "weights_slot"  # so the coordinator can answer the learner


def test_control_over_router_dealer(ctx):
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(messages.pack({"type": "hello", "name": "w", "role": "generate"}))
        assert router.poll(5000)
        identity, data = router.recv_multipart(copy=False)
        assert messages.unpack(data) == {"type": "hello", "name": "w", "role": "generate"}
        router.send_multipart([identity, messages.pack({"type": "latest", "version": 0})])
        assert dealer.poll(5000)
        assert messages.unpack(dealer.recv()) == {"type": "latest", "version": 0}
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


# --------------------------------------------------------------------------- segment form


def _listed(tensors: dict) -> list:
    return [(name, arr.dtype.name, arr.shape, arr) for name, arr in tensors.items()]


def _segment(version: int = 1) -> bytearray:
    holder = {}

    def allocate(size: int) -> bytearray:
        holder["buf"] = bytearray(size)
        return holder["buf"]

    size = wire.encode_into(allocate, version, 7, BASE, CONFIG, _listed(_tensors()))
    assert size == len(holder["buf"])
    return holder["buf"]


def _covered(segment) -> list[int]:
    """Offsets of the segment's bytes that carry the message (length, header, tensors), not alignment padding."""
    msg = wire.decode_segment(segment, verify=False)
    base = np.frombuffer(segment, np.uint8).ctypes.data
    covered = list(range(8 + int.from_bytes(segment[:8], "little")))
    for arr in msg.tensors.values():
        start = arr.ctypes.data - base if arr.size else 0
        covered += range(start, start + arr.nbytes)
    return covered


def test_segment_round_trip_matches_frames():
    segment = _segment()
    msg, ref = wire.decode_segment(segment, _expectation()), decode_parts(_frames(), _expectation())
    assert msg.header == ref.header and msg.version == 1
    for name, arr in _tensors().items():
        np.testing.assert_array_equal(msg.tensors[name], arr)
    # The tensors start on SEGMENT_ALIGN boundaries and are views of the segment, not copies.
    base = np.frombuffer(segment, np.uint8).ctypes.data
    for arr in msg.tensors.values():
        assert (arr.ctypes.data - base) % wire.SEGMENT_ALIGN == 0 or arr.size == 0
    segment[_covered(segment)[-1]] ^= 0xFF  # the last tensor byte: visible through the views
    assert msg.tensors["scalar"] != _tensors()["scalar"]


def test_checksum_is_the_documented_tree_of_xxh3_digests():
    """The module docstring's definition, computed here independently, for frames and for a segment (with uneven
    tensors, one empty)."""
    import xxhash

    rng = np.random.default_rng(1)
    tensors = {f"t{i}": rng.standard_normal(n).astype(np.float32) for i, n in enumerate([7, 300_000, 1, 90_000, 0])}
    fields = [
        PROTOCOL,
        "adapter",
        4,
        2,
        BASE,
        CONFIG,
        [[name, "float32", list(t.shape), t.nbytes] for name, t in tensors.items()],
    ]
    h = xxhash.xxh3_64(msgpack.packb(fields, use_bin_type=True))
    for t in tensors.values():
        h.update(xxhash.xxh3_64_digest(t.tobytes()))
    frames = encode(4, 2, BASE, CONFIG, tensors)
    assert _header(frames)["checksum"] == h.hexdigest()
    holder = {}
    size = wire.encode_into(lambda n: holder.setdefault("buf", bytearray(n)), 4, 2, BASE, CONFIG, _listed(tensors))
    msg = wire.decode_segment(holder["buf"])  # verifies the checksum
    assert msg.header["checksum"] == h.hexdigest() and size == len(holder["buf"])
    for name, t in tensors.items():
        np.testing.assert_array_equal(msg.tensors[name], t)


def test_segment_too_short_for_its_header_length():
    with pytest.raises(WireError, match="too short"):
        wire.decode_segment(b"\x01\x00")


def test_decode_segment_verifies_the_checksum_unless_told_not_to():
    segment = _segment()
    last = _covered(segment)[-1]
    segment[last] ^= 1
    with pytest.raises(WireError, match="checksum mismatch"):
        wire.decode_segment(segment)
    msg = wire.decode_segment(segment, verify=False)
    with pytest.raises(WireError, match="checksum mismatch"):
        wire.verify(msg, [a.tobytes() for a in msg.tensors.values()])
    segment[last] ^= 1
    wire.verify(msg, iter([a.tobytes() for a in msg.tensors.values()]))  # an iterator works: hashed as it comes


def test_every_truncation_and_extension_of_a_segment_is_rejected():
    segment = bytes(_segment())
    for n in range(len(segment)):
        with pytest.raises(WireError):
            wire.decode_segment(segment[:n])
    with pytest.raises(WireError, match="lays out"):
        wire.decode_segment(segment + b"\0")


@pytest.mark.parametrize("header_len", [0, 2**62, MAX_HEADER_BYTES + 1])
def test_segment_header_length_out_of_bounds(header_len):
    segment = bytearray(_segment())
    segment[:8] = header_len.to_bytes(8, "little")
    with pytest.raises(WireError, match="header in"):
        wire.decode_segment(segment)


def test_random_segments_raise_only_wire_errors():
    rng = np.random.default_rng(3)
    good = bytes(_segment())
    covered = np.array(_covered(good))  # padding between tensors is not part of the message
    for i in range(1000):
        if i % 2:  # random bytes
            data = rng.bytes(int(rng.integers(0, 256)))
        else:  # a valid segment with a few of its message bytes overwritten
            data = bytearray(good)
            for pos in rng.choice(covered, size=int(rng.integers(1, 4))):
                data[pos] = int(rng.integers(0, 256))
            if bytes(data) == good:
                continue
        with pytest.raises(WireError):
            wire.decode_segment(data)


def test_encode_into_a_buffer_too_small():
    with pytest.raises(WireError, match="needs"):
        wire.encode_into(lambda size: bytearray(size - 1), 1, 0, BASE, {}, _listed(_tensors()))


def test_encode_into_checks_the_header_before_writing():
    allocated = []
    with pytest.raises(WireError, match="header"):
        wire.encode_into(
            lambda size: allocated.append(size) or bytearray(size), 1, 0, BASE, {1: "k"}, _listed(_tensors())
        )
    assert allocated == []  # a bad header fails before the slot is touched
