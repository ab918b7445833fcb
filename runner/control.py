"""How a worker or learner talks to the coordinator (no MLX): control messages, and the weight transport.

`ControlClient` is one process's connection: a DEALER for requests and weight uploads, a heartbeat thread with its
own socket (so a long training step or model load never looks like a dead worker), and a SUB socket for the weight
fan-out to other hosts. Frames on the control socket (after the ROUTER's identity frame):

    [b"C", control-msgpack]            a control message (`runner.messages`)
    [b"W", message]                    a weight message (`runner.wire`)

Weight transport: the learner publishes with ``transport.send(client, version, step, base_model_id, adapter_config,
tensors)`` and a receiver reads a version with ``transport.read(payload, ...)``; `weight_transport` picks one of two
implementations from the coordinator's ``welcome``:

- `FrameTransport` (any host): the version, one frame, goes to the coordinator on the control socket; the
  coordinator sends it on to same-host workers on the control socket and to other hosts on the weights PUB socket.
- `SlotTransport` (the coordinator's host): the learner writes the version once (the same bytes as the frame) into
  a slot file of a private shared-memory directory (`/dev/shm` on Linux, page-cache backed elsewhere) and
  sends the coordinator a ``weights_slot`` notice ``{"slot", "version", "nbytes"}``. The coordinator verifies its own
  copy, keeps it as the latest, and passes the notice to its same-host workers; each copies the tensors into MLX and
  verifies its copy before installing it. Slots are reused round-robin (version % SLOTS), so a reader more than
  SLOTS - 1 versions behind may read a slot being rewritten: its copy then fails the checksum and it asks for the
  latest (``get_latest``) instead. A slot directory without room for a version (free space checked, pages allocated
  up front: a full tmpfs would kill the writer with SIGBUS) makes the learner say so in its log and send that version
  and the next ones as frames (`SlotSpaceError`). The directory (0700) also holds the Unix socket the coordinator's
  children join on; the coordinator removes it at shutdown, and one left by a killed coordinator is removed by the
  next one.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import mmap
import os
import secrets
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from runner import messages, wire
from runner.config import LoraConfig
from runner.rundir import check_job

log = logging.getLogger(__name__)

CONTROL = b"C"
WEIGHTS = b"W"
SLOTS = 3
SLOT_HEADROOM = 1 << 20  # free space a new slot file must leave in its directory (others share /dev/shm)
_SLOT_DIR_PREFIX = "runner-weights-"
EXIT_ORPHANED = 3  # a child of a coordinator that went silent exits with this code
EXIT_FATAL = 4  # a child that stopped for a reason a restart would only repeat; the coordinator ends the job
# A child's role secret, given by the coordinator in its environment (never on a command line): its hello carries it.
ROLE_TOKEN_ENV = "RUNNER_ROLE_TOKEN"
# The role secret of a generation worker that the learner's process runs on a thread (`[generation] colocate`).
HOSTED_TOKEN_ENV = "RUNNER_HOSTED_TOKEN"
# The largest frame a control-only socket takes (ZMQ_MAXMSGSIZE): a control message, with room to spare.
CONTROL_MAX_BYTES = messages.MAX_BYTES + 2**16
# What a socket that may get weight messages takes when the adapter's size is not known yet: the format's own limits.
WEIGHTS_MAX_BYTES = wire.MAX_HEADER_BYTES + wire.MAX_TOTAL_BYTES


def weights_max_bytes(model_dir: str | Path, lora: LoraConfig) -> int:
    """ZMQ_MAXMSGSIZE of a socket that takes this job's weight messages (and control messages): the largest message
    an adapter of `lora` on the model in `model_dir` can make."""
    return max(CONTROL_MAX_BYTES, wire.adapter_message_bound(model_dir, lora.rank, lora.keys, lora.num_layers))


class SlotSpaceError(OSError):
    """The slot directory has no room for a version; the learner sends versions as frames instead."""


class CoordinatorGone(RuntimeError):
    """The coordinator did not answer in time."""


class HelloRefused(CoordinatorGone):
    """The coordinator answered hello with `rejected` (e.g. the name is live in another process): a rejoining worker
    tries again with backoff, as for a coordinator that is not there."""


class ControlClient:
    """One worker's connection to the coordinator. Safe to share between threads: a lock serialises use of the
    socket, so a request and its reply stay together (the heartbeat thread has a socket of its own).

    Liveness both ways (the ZeroMQ guide's Paranoid Pirate): the heartbeat thread sends a beat every
    `heartbeat_interval` and hears the coordinator's beats on the same socket. Silence for `silence_limit`, or a beat
    saying `rejoin` (a restarted coordinator that does not know us), means the coordinator is gone: a process it
    started (`supervised`, from the welcome) exits with EXIT_ORPHANED, so a killed `runner launch` leaves nothing
    behind (at once when its parent process is gone, else within the heartbeat timeout); any other sets
    `coordinator_lost` and its owner rejoins (`reconnect`, then `hello` again)."""

    def __init__(
        self,
        endpoint: str,
        name: str,
        role: str,
        heartbeat_interval: float = 1.0,
        curve: dict | None = None,
        max_message_bytes: int = CONTROL_MAX_BYTES,
        token: str | None = None,
        api_token: str = "",
    ):
        self.endpoint, self.name, self.role = endpoint, name, role
        self.api_token = api_token  # the job's HTTP token, when this process has it: proves a worker's hello
        # What proves to the coordinator that a message naming us is ours: the role secret it gave us (taken out of
        # the environment, so nothing we start inherits it), or one made up here and told once at hello.
        self.token = token or os.environ.pop(ROLE_TOKEN_ENV, "") or secrets.token_hex(16)
        # ZMQ_MAXMSGSIZE of the sockets it opens from now on: a larger frame drops the connection before it is
        # buffered. Control messages only, or for a generation worker weight messages too (it lowers this to its
        # adapter's bound once its model is loaded, for the weights SUB socket and any new control socket).
        self.max_message_bytes = max_message_bytes
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = 10.0  # the job's [coordinator] heartbeat_timeout, once the worker knows it
        self.supervised = False  # started by the coordinator: ends with it
        # Called on the heartbeat thread right before each beat, to refresh `status` (a generation worker's engine
        # progress and health): it must not block or raise.
        self.before_beat: Callable[[], None] | None = None
        self.coordinator_lost = threading.Event()
        self._last_beat = time.monotonic()  # when the coordinator was last heard
        self._parent = 0
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

    def _socket(self, kind: int, immediate: bool = False, max_message_bytes: int | None = None) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 1000)
        s.setsockopt(zmq.MAXMSGSIZE, max_message_bytes or self.max_message_bytes)  # fixed when it connects
        if immediate:  # for NOBLOCK senders: drop rather than queue for a coordinator that is not there
            s.setsockopt(zmq.IMMEDIATE, 1)
        if self.curve:
            from runner.keys import curve_client

            curve_client(s, self.curve["secret"], self.curve["server_public"])
        return s

    # ----- messages --------------------------------------------------------------------------------------------
    def send(self, msg: dict) -> None:
        with self._lock:
            self.sock.send_multipart([CONTROL, messages.pack(self._signed(msg))])

    def _signed(self, msg: dict) -> dict:
        """`msg` with our token when it names us (see `runner.messages`)."""
        if msg.get("name") == self.name and "token" in messages.MESSAGES[msg["type"]]:
            return {**msg, "token": self.token}
        return msg

    def send_weights(self, frames: list) -> None:
        with self._lock:
            self.sock.send_multipart([WEIGHTS, *frames], copy=False)

    def receive(self, timeout: float) -> list | None:
        """The next message: ['C', dict] or ['W', frames]; None on timeout."""
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

    def hello(self, timeout: float = 60.0, **info) -> dict:
        info = {
            "type": "hello",
            "name": self.name,
            "role": self.role,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            **info,
        }
        if self.api_token:
            info["proof"] = hello_proof(self.api_token, self.name, self.token)
        welcome = self.request(info, ("welcome", "rejected"), timeout=timeout)[1]
        if welcome["type"] == "rejected":
            why = welcome["reason"]
            raise HelloRefused(f"the coordinator at {self.endpoint} refused hello as {self.name!r}: {why}")
        self.supervised = welcome.get("supervised", False)
        self._parent = os.getppid()  # a supervised process's parent is the coordinator (or a wrapper it started)
        self._last_beat = time.monotonic()
        return welcome

    def reconnect(self) -> None:
        """A fresh control socket: a new identity, and nothing queued for a coordinator that went away is delivered
        to the next one."""
        with self._lock:
            self.sock.close(linger=0)
            self._inbox.clear()
            self.sock = self._socket(zmq.DEALER)
            self.sock.connect(self.endpoint)

    # ----- heartbeats and acks ---------------------------------------------------------------------------------
    def start_heartbeats(self) -> None:
        self._hb_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        self._hb_thread.start()

    @property
    def silence_limit(self) -> float:
        """How long the coordinator may be silent: one interval less than its own heartbeat_timeout, counted from
        its last beat (which came before it died), so a child of a killed coordinator is gone within that timeout;
        never less than 1.5 intervals, since the coordinator beats once an interval (the config keeps
        heartbeat_timeout >= 2 x heartbeat_interval, so this stays within the timeout)."""
        return max(self.heartbeat_timeout - self.heartbeat_interval, 1.5 * self.heartbeat_interval)

    def _heartbeat_loop(self) -> None:
        hb = self._socket(zmq.DEALER, immediate=True, max_message_bytes=CONTROL_MAX_BYTES)  # beats only
        hb.connect(self.endpoint)
        self._last_beat = time.monotonic()
        next_beat = time.monotonic()  # at once: the coordinator beats back to the socket it hears from
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    next_beat = now + self.heartbeat_interval
                    msg = {"type": "heartbeat", "name": self.name, "pid": os.getpid(), "token": self.token}
                    if self.before_beat:
                        self.before_beat()
                    keys = ("state", "version", "http_url", "engine_steps")
                    msg.update((k, self.status[k]) for k in keys if k in self.status)
                    try:
                        hb.send_multipart([CONTROL, messages.pack(msg)], flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # coordinator unreachable right now; the next beat tries again
                wake = (
                    next_beat
                    if self.coordinator_lost.is_set()
                    else min(next_beat, self._last_beat + self.silence_limit)
                )
                if hb.poll(max(0, int((wake - time.monotonic()) * 1000))):
                    beat = _parse(hb.recv_multipart())
                    if beat and beat[0] == "C" and beat[1]["type"] == "heartbeat":
                        self._last_beat = time.monotonic()
                        if beat[1].get("rejoin"):
                            self._lost("the coordinator does not know this worker (it restarted)")
                elif not self.coordinator_lost.is_set() and time.monotonic() - self._last_beat > self.silence_limit:
                    self._lost(f"the coordinator has been silent for {time.monotonic() - self._last_beat:.1f}s")
                if self.supervised and os.getppid() != self._parent:  # reparented: it died (no need to wait)
                    self._lost(f"the coordinator (parent pid {self._parent}) exited")
                if self.supervised and (why := check_job()):  # our launch died, or another took the run dir
                    self._lost(why)
        finally:
            hb.close()

    def _lost(self, why: str) -> None:
        if self.supervised:
            # os._exit: the main thread may be deep in a model load or a training step; nothing of ours outlives
            # the coordinator that started it (the learner resumes from its last checkpoint).
            log.error("%s; exiting, as this process was started by it", why)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os._exit(EXIT_ORPHANED)
        if not self.coordinator_lost.is_set():
            log.warning("%s; serving on and rejoining", why)
            self.coordinator_lost.set()

    def acker(self) -> Callable[[int], None]:
        """A function that acks an adapter version on a socket of its own: for one thread at a time (a zmq socket
        may change threads only across a lock or similar full memory barrier)."""
        sock = self._socket(zmq.DEALER, immediate=True)
        sock.connect(self.endpoint)
        self._extra_sockets.append(sock)

        def ack(version: int) -> None:
            self.status["version"] = version  # heartbeats carry it too, should this ack be lost
            try:
                msg = messages.pack({"type": "ack", "name": self.name, "version": version, "token": self.token})
                sock.send_multipart([CONTROL, msg], flags=zmq.NOBLOCK)
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
    """Split a control-socket message into ['C', dict] or ['W', frames]; garbage is logged and dropped."""
    if not frames:
        return None
    kind = bytes(getattr(frames[0], "buffer", frames[0]))
    if kind == WEIGHTS:
        return ["W", frames[1:]]
    if kind == CONTROL and len(frames) == 2:
        try:
            return ["C", messages.unpack(frames[1])]
        except messages.MessageError as e:
            log.warning("dropped a malformed control message: %s", e)
            return None
    log.warning("dropped a control message with unknown framing (%d frames, starting %r)", len(frames), kind[:40])
    return None


WILDCARDS = ("0.0.0.0", "::", "")


def advertised_url(bind_host: str, port: int, coordinator: str, advertise_url: str | None = None) -> str:
    """The HTTP address a generation worker reports (the learner and router send requests there): `advertise_url`
    if given, else its bind address or, bound to a wildcard, the address of the local interface that routes to the
    coordinator. ValueError (one line) when the coordinator's side could not reach it: a wildcard, or a loopback
    address while the coordinator is on another host."""
    coordinator_host = urlsplit(coordinator).hostname if coordinator.startswith("tcp://") else None  # ipc: this host
    if advertise_url:
        url = advertise_url.rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--advertise-url {advertise_url!r} is not an http(s)://HOST[:PORT] URL")
        host = parts.hostname
    else:
        host = bind_host
        if host in WILDCARDS:
            host = _interface_towards(coordinator_host) if coordinator_host else "127.0.0.1"
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    if host in WILDCARDS:
        raise ValueError(f"{url} is a wildcard address nobody can send to; pass --advertise-url http://THIS-HOST:PORT")
    if coordinator_host and _is_loopback(host) and not _is_this_host(coordinator_host):
        raise ValueError(
            f"{url} is a loopback address, unreachable from the coordinator at {coordinator_host}; bind a reachable "
            "address (--host 0.0.0.0 or this host's address) or pass --advertise-url http://THIS-HOST:PORT"
        )
    return url


def _interface_towards(host: str) -> str:
    """The address of the local interface that routes to `host` (a UDP connect sends nothing)."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(address)
            return s.getsockname()[0]
    except OSError as e:
        raise ValueError(f"no local interface reaches the coordinator at {host} ({e}); pass --advertise-url") from None


def _addresses(host: str) -> list[str]:
    try:
        return [info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)]
    except OSError:
        return []


def _is_loopback(host: str) -> bool:
    addresses = _addresses(host)
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def _is_this_host(host: str) -> bool:
    """Whether `host` is an address of this machine (then loopback reaches us from there too): one we can bind."""
    for address in _addresses(host):
        if ipaddress.ip_address(address.split("%")[0]).is_unspecified:
            return True
        try:
            with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((address, 0))
            return True
        except OSError:
            continue
    return False


def model_id(model_path: str | Path) -> str:
    """A short id of a base model: a hash of its config and of its weight files' names and sizes. Cheap (no reading
    of weights) and enough to tell apart the models a job could mix up; workers on other machines must match it."""
    model_path = Path(model_path)
    h = hashlib.blake2b(digest_size=8)
    h.update((model_path / "config.json").read_bytes())
    for f in sorted(model_path.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


# ----- weight transport ----------------------------------------------------------------------------------------
class FrameTransport:
    """A version as frames on the control socket: works from any host."""

    name = "frames"

    def send(self, client: ControlClient, version: int, step: int, base_model_id: str, config: dict, tensors) -> None:
        client.send_weights(wire.encode(version, step, base_model_id, config, tensors))

    def read(self, frames: list, expected: wire.Expectation | None = None, verify: bool = True) -> wire.WeightMessage:
        return wire.decode(frames, expected, verify=verify)


class SlotTransport:
    """A version in a same-host shared-memory slot, announced by a notice; each slot file is mapped once per process
    (read-write by the learner, read-only by the coordinator and workers)."""

    name = "slots"

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self._writable: dict[int, mmap.mmap] = {}
        self._readable: dict[int, tuple[tuple[int, int], mmap.mmap]] = {}

    def send(self, client: ControlClient, version: int, step: int, base_model_id: str, config: dict, tensors) -> None:
        client.send(self.write(version, step, base_model_id, config, tensors))

    def write(self, version: int, step: int, base_model_id: str, config: dict, tensors) -> dict[str, Any]:
        """Encode one version into its slot (see `wire.encode_into`); returns the notice for the coordinator."""
        slot = version % SLOTS
        size = wire.encode_into(lambda n: self._mapping(slot, n), version, step, base_model_id, config, tensors)
        return {"type": "weights_slot", "slot": slot, "version": version, "nbytes": size}

    def _mapping(self, slot: int, size: int) -> mmap.mmap:
        mapped = self._writable.get(slot)
        if mapped is None or len(mapped) != size:
            # Writing pages a full tmpfs cannot back kills the process with SIGBUS: check the free space first, and
            # allocate the pages up front where the OS can (Linux), so a shortage is an error here, not a signal.
            free = shutil.disk_usage(self.directory).free  # statvfs
            if free < size + SLOT_HEADROOM:
                raise SlotSpaceError(
                    f"{self.directory} has {free / 2**20:.1f} MiB free; a version needs {size / 2**20:.1f} MiB "
                    f"(and {SLOT_HEADROOM / 2**20:.0f} MiB to spare)"
                )
            # A new file (renamed into place) rather than a resize: readers keep their old mapping valid.
            tmp = self.directory / f".slot-{slot}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:  # macOS: the temp dir is page-cache backed, not a small tmpfs
                    os.ftruncate(fd, size)
                mapped = mmap.mmap(fd, size)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise SlotSpaceError(f"{self.directory}: cannot allocate a {size / 2**20:.1f} MiB slot ({e})") from e
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / f"slot-{slot}")
            self._writable[slot] = mapped
        return mapped

    def segment(self, notice: dict[str, Any]) -> memoryview:
        """The slot a notice points at (a view of shared memory: copy before trusting it)."""
        slot, nbytes = notice.get("slot"), notice.get("nbytes")
        if type(slot) is not int or not 0 <= slot < SLOTS or type(nbytes) is not int:
            raise wire.WireError(f"slot notice {notice!r} needs an int slot in [0, {SLOTS}) and int nbytes")
        path = self.directory / f"slot-{slot}"
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_size)
            mapped = self._readable.get(slot)
            if mapped is None or mapped[0] != key:
                with open(path, "rb") as f:
                    mapped = (key, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
                self._readable[slot] = mapped
        except (OSError, ValueError) as e:
            raise wire.WireError(f"slot {slot} cannot be mapped ({e})") from None
        if key[1] != nbytes:
            raise wire.WireError(f"slot {slot} holds {key[1]} bytes, the notice says {nbytes} (it was rewritten)")
        return memoryview(mapped[1])

    def read(
        self, notice: dict, expected: wire.Expectation | None = None, verify: bool = True, copy: bool = False
    ) -> wire.WeightMessage:
        """The version a notice announces: views of the slot, or of a private copy of it with ``copy`` (verify a
        copy: the slot may be rewritten under a view)."""
        segment = self.segment(notice)
        message = wire.decode_segment(bytes(segment) if copy else segment, expected, verify=verify)
        if message.version != notice.get("version"):
            raise wire.WireError(
                f"slot {notice['slot']} holds version {message.version}, the notice announced {notice.get('version')!r}"
            )
        return message


def weight_transport(slots_info: Any) -> FrameTransport | SlotTransport:
    """The transport for a process that got ``slots_info`` (the welcome's ``weights_slots``): slots when it runs on
    the coordinator's host and may use its slot directory, frames otherwise."""
    directory = usable_slot_dir(slots_info)
    return SlotTransport(directory) if directory else FrameTransport()


def usable_slot_dir(info: Any) -> Path | None:
    """The slot directory from a coordinator's welcome, if this process is on the same host and may use it."""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return None
    directory = Path(str(info.get("dir", "")))
    return directory if directory.is_dir() and os.access(directory, os.R_OK | os.W_OK | os.X_OK) else None


def create_slot_dir() -> Path:
    """A fresh slot directory for this coordinator; removes those of coordinators that are gone."""
    shm = Path("/dev/shm")  # tmpfs on Linux; macOS has no such mount, and its temp dir is page-cache backed
    root = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for old in root.glob(f"{_SLOT_DIR_PREFIX}*"):
        try:
            pid = int(old.name[len(_SLOT_DIR_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if old.is_dir() and old.stat().st_uid == os.getuid() and not process_running(pid):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed the slot directory %s of a coordinator that is gone", old)
    return Path(tempfile.mkdtemp(prefix=f"{_SLOT_DIR_PREFIX}{os.getpid()}-", dir=root))


def advertise_slot_dir(directory: Path | None) -> dict[str, Any] | None:
    """What the coordinator tells joining processes, so those on this host can use the slots."""
    return {"dir": str(directory), "host": socket.gethostname()} if directory else None


def hello_proof(api_token: str, name: str, token: str) -> str:
    """What a worker's hello carries to show that it holds the job's API token without sending it: an HMAC of its
    name and its own per-process token (without CURVE, the one credential a worker the coordinator did not start
    has; the token is what the learner and the router send to the URL the worker registers)."""
    return hmac.new(api_token.encode(), f"runner-hello\0{name}\0{token}".encode(), hashlib.sha256).hexdigest()


def process_running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited orphan whose status waits for whoever adopted it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): os.kill said it exists
        return True


# ----- the two ends of a version's trip ------------------------------------------------------------------------
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

    def publish(self, version: int, step: int, buffers: list) -> None:
        """Send one version (host buffers: `Trainer.lora_buffers()`) and wait for the coordinator to accept it;
        RuntimeError if it rejects it."""
        try:
            self.transport.send(self.client, version, step, self.base_model_id, self.adapter_config, buffers)
        except SlotSpaceError as e:  # nothing was sent: send this version and the next ones as frames
            log.warning("%s: adapter versions go over the control socket from now on, not shared memory", e)
            self.transport = FrameTransport()
            self.transport.send(self.client, version, step, self.base_model_id, self.adapter_config, buffers)
        reply = self.client.wait_for(("published", "rejected"), timeout=60, what=f"adapter version {version}")[1]
        if reply["type"] == "rejected":
            raise RuntimeError(f"the coordinator rejected adapter version {version}: {reply['reason']}")

    def wait_for_workers(self, min_version: int, stopping: threading.Event, timeout: float = 600) -> int | None:
        """Block until every serving generation worker (at least one) serves `min_version` or newer; returns the
        oldest version served, or None once `stopping` is set (the caller stops between steps; not an error). The
        coordinator answers when the acks arrive, so there is no polling."""
        self.client.send({"type": "wait_serving", "version": max(min_version, 0)})  # versions start at 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if stopping.is_set():
                return None
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

    def __init__(self, engine: Any, base_model_id: str, slots: SlotTransport | None = None):
        # `engine`: a workers.generation.engine.Engine (lora_layout, newest_version, install_message); no MLX here.
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
            return self.engine.install_message(message)  # copies into MLX and verifies that copy
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
