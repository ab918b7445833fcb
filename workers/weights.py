"""The MLX ends of the weight plane: adapter tensors to wire frames (learner) and back (generation worker).

The wire format itself lives in `runner.wire` (no MLX). Sending is zero-copy: the frames are views of the MLX
arrays' own host memory (MLX on Apple silicon shares memory with the GPU, so this holds on Metal too); bfloat16
travels as its raw 16-bit patterns.
"""

from __future__ import annotations

import threading
import time

import mlx.core as mx
import numpy as np

from runner import slots, wire
from runner.control import ControlClient, CoordinatorGone
from runner.slots import SlotWriter

_WIRE_DTYPES = {getattr(mx, name): name for name in wire.DTYPES}  # a dict lookup: str(mx.Dtype) is slow


def host_buffers(tensors: dict[str, mx.array]) -> list[tuple[str, str, tuple[int, ...], memoryview]]:
    """(name, wire dtype, shape, bytes) of MLX arrays (evaluated first), as views of their own memory (no copies)."""
    mx.eval(list(tensors.values()))
    out = []
    for name, t in tensors.items():
        dtype = _WIRE_DTYPES.get(t.dtype) or str(t.dtype).removeprefix("mlx.core.")  # the encoder rejects others
        host = t.view(mx.uint16) if dtype == "bfloat16" else t  # numpy has no bfloat16: its 16-bit patterns travel
        out.append((name, dtype, tuple(t.shape), memoryview(np.asarray(host))))
    return out


def encode_adapter(
    version: int, step: int, base_model_id: str, adapter_config: dict, tensors: dict[str, mx.array]
) -> list:
    """Frames of one weight message; keep `tensors` alive until ZeroMQ has sent them."""
    return wire.encode(version, step, base_model_id, adapter_config, host_buffers(tensors))


def write_adapter(
    slot_writer: SlotWriter,
    version: int,
    step: int,
    base_model_id: str,
    adapter_config: dict,
    tensors: dict[str, mx.array],
) -> dict:
    """Write one weight message into a shared-memory slot (one copy); returns the notice for the coordinator."""
    return slot_writer.write(version, step, base_model_id, adapter_config, host_buffers(tensors))


def verified_copy(message: wire.WeightMessage) -> dict[str, mx.array]:
    """MLX arrays from a message (one copy into MLX-owned memory), then the checksum checked on that copy: what gets
    installed is exactly what was verified, even if the source (a shared-memory slot) is rewritten meanwhile. Raises
    WireError on a mismatch. (One `mx.array` of a whole segment copies faster, but then the hash reads it back from
    memory: measured slower than copying and hashing tensor by tensor while each is in cache.)"""
    out = {}

    def copies():
        for name, arr in message.tensors.items():
            a = mx.array(arr)
            out[name] = a.view(mx.bfloat16) if message.dtypes[name] == "bfloat16" else a
            yield np.asarray(a)

    wire.verify(message, copies())  # each tensor hashed right after its copy, while it is still in cache
    mx.eval(list(out.values()))
    return out


class Publisher:
    """Sends adapter versions to the coordinator and answers questions about what the workers serve. On the
    coordinator's host a version is written into a shared-memory slot and only a notice is sent (`runner.slots`);
    from elsewhere it is uploaded as frames."""

    def __init__(self, client: ControlClient, welcome: dict, adapter_config: dict):
        self.client, self.base_model_id, self.adapter_config = client, welcome["base_model_id"], adapter_config
        slot_dir = slots.usable_dir(welcome.get("weights_slots"))
        self.slot_writer = slots.SlotWriter(slot_dir) if slot_dir else None

    def status(self) -> dict:
        return self.client.request({"type": "status"}, ("status",), timeout=30)[1]

    def serving_urls(self) -> list[str]:
        return [
            w["http_url"]
            for w in self.status()["workers"]
            if w["role"] == "generate" and w["state"] == "serving" and w["http_url"]
        ]

    def publish(self, version: int, step: int, tensors) -> None:
        if self.slot_writer:
            self.client.send(
                write_adapter(self.slot_writer, version, step, self.base_model_id, self.adapter_config, tensors)
            )
        else:
            self.client.send_weights(encode_adapter(version, step, self.base_model_id, self.adapter_config, tensors))
        reply = self.client.wait_for(("published", "rejected"), timeout=60, what=f"adapter version {version}")[1]
        if reply["type"] == "rejected":
            raise RuntimeError(f"the coordinator rejected adapter version {version}: {reply['reason']}")

    def wait_for_workers(self, min_version: int, stopping: threading.Event, timeout: float = 600) -> int:
        """Block until every serving generation worker (at least one) serves `min_version` or newer; returns the
        oldest version served. The coordinator answers when the acks arrive, so there is no polling."""
        self.client.send({"type": "wait_serving", "version": min_version})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stopping.is_set():
            try:
                return self.client.wait_for(("serving",), timeout=1.0)[1]["version"]
            except CoordinatorGone:
                continue
        raise TimeoutError(f"no generation worker served adapter version >= {min_version} within {timeout:.0f}s")
