"""The MLX ends of the weight plane: the learner's `Publisher` and the generation worker's `WeightReceiver`.

A version's path: `Trainer` tensors -> `Publisher.publish` (host views of the MLX arrays, no copy) -> the transport
of `runner.control` (a shared-memory slot on the coordinator's host, frames otherwise; encoded by `runner.wire`) ->
the coordinator (verifies, keeps the latest, fans out) -> `WeightReceiver` (checks the message against the model,
copies it into MLX and verifies the copy) -> `Engine.install_adapter` -> every HTTP response after the swap reports
the version. bfloat16 travels as its raw 16-bit patterns.
"""

from __future__ import annotations

import logging
import threading
import time

import mlx.core as mx
import numpy as np
import zmq

from runner import wire
from runner.control import ControlClient, CoordinatorGone, SlotTransport, weight_transport

log = logging.getLogger(__name__)

_WIRE_DTYPES = {getattr(mx, name): name for name in wire.DTYPES}


def host_buffers(tensors: dict[str, mx.array]) -> list[tuple[str, str, tuple[int, ...], memoryview]]:
    """(name, wire dtype, shape, bytes) of MLX arrays (evaluated first), as views of their own memory (no copies:
    MLX on Apple silicon shares memory with the GPU)."""
    mx.eval(list(tensors.values()))
    out = []
    for name, t in tensors.items():
        dtype = _WIRE_DTYPES.get(t.dtype) or str(t.dtype).removeprefix("mlx.core.")  # the encoder rejects others
        host = t.view(mx.uint16) if dtype == "bfloat16" else t  # numpy has no bfloat16: its 16-bit patterns travel
        out.append((name, dtype, tuple(t.shape), memoryview(np.asarray(host))))
    return out


def verified_copy(message: wire.WeightMessage) -> dict[str, mx.array]:
    """MLX arrays from a message (one copy into MLX-owned memory), then the checksum checked on that copy: what gets
    installed is exactly what was verified, even if the source (a shared-memory slot) is rewritten meanwhile. Raises
    WireError on a mismatch."""
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
    """The learner's end: sends adapter versions to the coordinator over the transport its welcome allows, and
    answers questions about what the workers serve."""

    def __init__(self, client: ControlClient, welcome: dict, adapter_config: dict):
        self.client, self.base_model_id, self.adapter_config = client, welcome["base_model_id"], adapter_config
        self.transport = weight_transport(welcome.get("weights_slots"))

    def status(self) -> dict:
        return self.client.request({"type": "status"}, ("status",), timeout=30)[1]

    def serving_urls(self) -> list[str]:
        return [
            w["http_url"]
            for w in self.status()["workers"]
            if w["role"] == "generate" and w["state"] == "serving" and w["http_url"]
        ]

    def publish(self, version: int, step: int, tensors: dict[str, mx.array]) -> None:
        """Send one version and wait for the coordinator to accept it; RuntimeError if it rejects it."""
        buffers = host_buffers(tensors)
        self.transport.send(self.client, version, step, self.base_model_id, self.adapter_config, buffers)
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


class WeightReceiver:
    """The generation worker's end: every version (a slot notice or frames on the control socket from the
    coordinator's host, frames on the weights PUB socket from elsewhere) is checked against this worker's model
    (names, shapes, dtypes, base id, version newer), copied into MLX, verified, and handed to the engine. A bad
    message is logged and dropped; the current version keeps serving."""

    def __init__(self, engine, base_model_id: str, slots: SlotTransport | None = None):
        self.engine, self.base_model_id, self.slots = engine, base_model_id, slots
        self.rejected = 0

    def offer(self, frames: list | None = None, notice: dict | None = None) -> threading.Event | None:
        """Validate and schedule one message (frames, or a shared-memory slot notice); returns an event set once it
        is live, or None if it was dropped."""
        expected = wire.Expectation(self.base_model_id, self.engine.lora_layout, self.engine.newest_version)
        try:
            if notice is None:
                message = wire.decode(frames, expected, verify=False)
            elif self.slots is None:
                raise wire.WireError("a slot notice reached a worker that does not use slots")
            else:
                message = self.slots.read(notice, expected, verify=False)
            return self.engine.install_adapter(message.version, verified_copy(message))  # verified: the MLX copy
        except (wire.WireError, ValueError) as e:
            self.rejected += 1
            log.warning("dropped a weight message: %s", e)
            return None

    def catch_up(self, client: ControlClient, timeout: float = 60) -> None:
        """Subscribe to same-host fan-out and install the coordinator's latest version, if any (a worker that
        starts, restarts or joins late). Call after subscribing to the PUB socket, so no version falls between."""
        reply = client.request(self._get_latest(client), ("latest", "W"), timeout=timeout)
        if reply[0] == "W" and (applied := self.offer(reply[1])) is not None:
            applied.wait(timeout)

    def _get_latest(self, client: ControlClient) -> dict:
        return {"type": "get_latest", "name": client.name, "slots": self.slots is not None}

    def receive(self, client: ControlClient, sub: zmq.Socket | None, timeout: float) -> list[dict]:
        """Take every version that arrives within `timeout` (or is waiting); returns the other control messages."""
        poller = zmq.Poller()
        poller.register(client.sock, zmq.POLLIN)
        if sub is not None:
            poller.register(sub, zmq.POLLIN)
        others = []
        for sock, _ in poller.poll(int(timeout * 1000)):
            if sock is sub:
                self.offer(sub.recv_multipart(copy=False))
                continue
            while (msg := client.receive(0)) is not None:
                if msg[0] == "W":
                    self.offer(msg[1])
                elif msg[1]["type"] != "weights_slot":
                    others.append(msg[1])
                elif self.offer(notice=msg[1]) is None and self.engine.newest_version < msg[1]["version"]:
                    client.send(self._get_latest(client))  # the slot was rewritten under us: ask for the frames
        return others
