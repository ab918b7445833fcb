"""The worker side of the coordinator's control plane (no MLX): a DEALER for requests and weight uploads, a
heartbeat thread with its own socket (so a long training step or model load never looks like a dead worker), and
a SUB socket for the weight fan-out.

Frames on the control socket (after the ROUTER's identity frame):
    [b"C", control-msgpack]            a control message (see `runner.wire`)
    [b"W", header, buf1, ..., bufn]    a weight message (see `runner.wire`)
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from runner import wire

log = logging.getLogger(__name__)

CONTROL = b"C"
WEIGHTS = b"W"


class CoordinatorGone(RuntimeError):
    """The coordinator did not answer in time."""


class ControlClient:
    """One worker's connection to the coordinator. Safe to share between threads: a lock serialises use of the
    socket, so a request and its reply stay together (the heartbeat thread has a socket of its own)."""

    def __init__(self, endpoint: str, name: str, role: str, heartbeat_interval: float = 1.0, curve: dict | None = None):
        self.endpoint, self.name, self.role = endpoint, name, role
        self.heartbeat_interval = heartbeat_interval
        self.curve = curve  # {"secret": path, "server_public": path} when the coordinator requires CURVE
        self.ctx = zmq.Context.instance()
        self.sock = self._socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.status: dict[str, Any] = {"state": "starting", "version": 0}
        self._stop = threading.Event()
        self._hb_thread: threading.Thread | None = None
        self._inbox: list[list] = []  # messages received while waiting for a specific reply
        self._lock = threading.RLock()
        self._extra_sockets: list[zmq.Socket] = []

    def _socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 1000)
        if self.curve:
            from runner.keys import curve_client

            curve_client(s, self.curve["secret"], self.curve["server_public"])
        return s

    # ----- messages --------------------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        with self._lock:
            self.sock.send_multipart([CONTROL, wire.pack_control(msg)])

    def send_weights(self, frames: list) -> None:
        with self._lock:
            wire.send(self.sock, [WEIGHTS, *frames], copy=False)

    def receive(self, timeout: float) -> list | None:
        """The next message: ('C', dict) or ('W', frames); None on timeout."""
        with self._lock:
            if self._inbox:
                return self._inbox.pop(0)
            if not self.sock.poll(int(timeout * 1000)):
                return None
            return _parse(self.sock.recv_multipart(copy=False))

    def request(self, msg: dict, reply_types: tuple[str, ...], timeout: float = 30.0) -> list:
        """Send a control message and wait for its reply (see `wait_for`)."""
        with self._lock:
            self.send(msg)
            return self.wait_for(reply_types, timeout, what=repr(msg["type"]))

    def wait_for(self, reply_types: tuple[str, ...], timeout: float = 30.0, what: str = "a reply") -> list:
        """Wait for a message of one of `reply_types` (control types, or 'W' for a weight message). Other messages
        that arrive meanwhile are kept for `receive`."""

        def wanted(parsed: list) -> bool:
            return (parsed[0] == "W" and "W" in reply_types) or (parsed[0] == "C" and parsed[1]["type"] in reply_types)

        with self._lock:
            for i, parsed in enumerate(self._inbox):  # it may have arrived while we waited for something else
                if wanted(parsed):
                    return self._inbox.pop(i)
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not self.sock.poll(int(left * 1000)):
                    break
                parsed = _parse(self.sock.recv_multipart(copy=False))
                if parsed is None:
                    continue
                if wanted(parsed):
                    return parsed
                self._inbox.append(parsed)
        raise CoordinatorGone(f"the coordinator at {self.endpoint} did not answer {what} within {timeout:.0f}s")

    def hello(self, **info) -> dict:
        info = {
            "type": "hello",
            "name": self.name,
            "role": self.role,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **info,
        }
        return self.request(info, ("welcome", "refused"), timeout=60.0)[1]

    # ----- heartbeats ------------------------------------------------------------------------------------------
    def start_heartbeats(self) -> None:
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def _heartbeat_loop(self) -> None:
        hb = self._socket(zmq.DEALER)
        hb.connect(self.endpoint)
        try:
            while not self._stop.wait(self.heartbeat_interval):
                msg = {"type": "heartbeat", "name": self.name, **self.status}
                try:
                    hb.send_multipart([CONTROL, wire.pack_control(msg)], flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # coordinator unreachable right now; the next beat tries again
        finally:
            hb.close()

    def acker(self) -> Callable[[int], None]:
        """A function that acks an adapter version on a socket of its own: for one thread at a time (a zmq socket
        may change threads only across a lock or similar full memory barrier)."""
        sock = self._socket(zmq.DEALER)
        sock.connect(self.endpoint)
        self._extra_sockets.append(sock)

        def ack(version: int) -> None:
            self.status["version"] = version  # heartbeats carry it too, should this ack be lost
            try:
                sock.send_multipart(
                    [CONTROL, wire.pack_control({"type": "ack", "name": self.name, "version": version})],
                    flags=zmq.NOBLOCK,
                )
            except zmq.Again:
                log.warning("could not ack adapter version %d now; the next heartbeat reports it", version)

        return ack

    def close(self) -> None:
        self._stop.set()
        if self._hb_thread:
            self._hb_thread.join(5)
        for s in self._extra_sockets:
            s.close()
        self.sock.close()

    def subscribe_weights(self, endpoint: str) -> zmq.Socket:
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        return sub


def _parse(frames: list) -> list | None:
    """Split a control-socket message into ('C', dict) or ('W', frames); garbage is logged and dropped."""
    if not frames:
        return None
    kind = bytes(frames[0].buffer) if hasattr(frames[0], "buffer") else bytes(frames[0])
    try:
        if kind == CONTROL and len(frames) == 2:
            return ["C", wire.unpack_control(frames[1])]
        if kind == WEIGHTS:
            return ["W", frames[1:]]
    except wire.WireError as e:
        log.warning("dropped a malformed control message: %s", e)
        return None
    log.warning("dropped a control message with unknown framing (%d frames, starting %r)", len(frames), kind[:40])
    return None


def model_id(model_path: str | Path) -> str:
    """A short id of a base model: a hash of its config and of its weight files' names and sizes. Cheap (no reading
    of weights) and enough to tell apart the models a job could mix up; workers on other machines must match it."""
    model_path = Path(model_path)
    h = hashlib.blake2b(digest_size=8)
    h.update((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
