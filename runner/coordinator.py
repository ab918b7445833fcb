"""The coordinator: `runner launch` starts the generation workers and the learner as child processes, routes control
messages and weight versions between them over ZeroMQ, restarts what fails, and reports status. No MLX here.

Shape (after circus): the Coordinator is the arbiter; one `Watcher` per local child process owns its command, log
file and restart policy (exponential backoff, and a flapping limit of `restart_attempts` within `restart_window`
seconds past which the job stops with the reason). Remote generation workers (`runner worker generate --join`)
appear in the same worker table without a watcher: if they die they are dropped, not restarted.

Liveness both ways (Paranoid Pirate): every worker heartbeats, and the coordinator beats back to each one's heartbeat
socket (`_beat`); its children exit when the beats stop, remote workers say hello again, reporting the version they
serve (never newer than the run dir's `published_version`, above which a restarted coordinator continues). A
heartbeat reporting an older version than the latest gets the latest re-sent (`_heal`).

Trust (the README's Security section): every peer has one identity and one role. A message naming a worker counts
only with the token that worker's hello carried, from the same pid and CURVE key (`_sender`); weights, slot
notices, wait_serving, progress and done only from the learner's hello socket (`_learner`). Roles come from a
per-child secret in the environment (`grant`, `RUNNER_ROLE_TOKEN`) or from where a CURVE key sits in authorized_keys
(`runner.keys.key_roles`). What breaks a rule raises `Refused` and is answered `rejected`; nothing a peer sends ends
the loop (`_handle`).

Config: `create_coordinator` writes the resolved job config (absolute paths, every key) to
`RUN/config.resolved.toml` (mode 600: it holds the API token); every child starts from it (`--config`), the learner's
first start also with `--resume` when asked, and a remote worker without the file asks for it (`get_config`, secrets
redacted: it brings the token itself). `welcome` carries runtime facts only.

Sockets: control ROUTER (the messages of `runner.messages`, dispatched from a table, plus weight versions from the
learner as frames), also bound to a Unix socket in the slot directory for local children; weights PUB (fan-out to
workers on other hosts). Weight versions (see `runner.control`): the coordinator keeps ONE thing, `latest`, the
newest version it accepted, verified on its own copy. A new version is accepted only if it is for this job's base
model, newer than `latest` and intact; it is then fanned out (PUB frames for other hosts; the slot notice, or the
frames, on the control socket for same-host workers), and sent whole to any worker that starts or joins late
(`get_latest`).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import msgpack
import tenacity
import zmq

from runner import control, messages, wire
from runner.blas import blas_library, child_environment
from runner.config import Config, ConfigError, build_config, config_toml, write_resolved
from runner.control import CONTROL, WEIGHTS, model_id
from runner.files import write_atomic
from runner.hub import is_local, resolve_model
from runner.rundir import job_environment, lock_run_dir
from runner.status import eval_summary

log = logging.getLogger(__name__)

# A file in the run dir: a version number at or above every version the job published, written durably before any
# worker can hold a version. Numbers are reserved VERSION_RESERVE at a time, so a publish waits for the disk once
# per VERSION_RESERVE versions (an fsync here took ~7 ms, a fair share of a fast step); a coordinator started again
# continues above the reservation: versions may skip, never repeat.
PUBLISHED_VERSION = "published_version"
VERSION_RESERVE = 16

LIVE_STATES = ("starting", "loading", "catching_up", "serving", "training")
MAX_REMOTE_WORKERS = 256  # rows of remote workers the table holds; a hello beyond that is refused
LOST_ROW_TIMEOUTS = 3  # a remote row not live for this many heartbeat timeouts is removed
STATUS_FIELD_CHARS = 200  # a status row's strings are cut to this many characters
STATUS_CAPABILITIES_BYTES = 1024  # a status row's capabilities are left out when larger (msgpack)
STATUS_HTTP_THREADS = 8
STATUS_HTTP_TIMEOUT = 5.0


@dataclass
class WorkerRecord:
    name: str
    role: str
    state: str = "starting"
    pid: int = 0
    host: str = ""
    http_url: str = ""
    version: int = 0
    restarts: int = 0
    last_heartbeat: float = 0.0
    local: bool = True
    hosted_by: str = ""  # the local child whose process runs this worker on a thread ([generation] colocate)
    capabilities: dict = field(default_factory=dict)
    identity: bytes = b""
    beat_identity: bytes = b""  # the socket it heartbeats from, where the coordinator's beats go
    token: str = ""  # the secret its hello carried: messages naming it count only with it
    curve_key: str = ""  # the CURVE public key its hello came with (z85; "" without CURVE)
    weights_via: str = ""  # "slots" (same-host shared memory) or "pub" (the weights PUB socket)
    resent_version: int = 0  # the last version re-sent because its heartbeat reported an older one
    engine_steps: int = 0  # a generation worker's engine progress, as its last heartbeat said

    def row(self, now: float) -> dict:
        d = asdict(self)
        for private in ("identity", "beat_identity", "token", "curve_key"):
            d.pop(private)
        d["heartbeat_age"] = round(now - self.last_heartbeat, 2) if self.last_heartbeat else None
        return d


class Watcher:
    """One supervised local child process and its restart policy."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        log_path: Path,
        config: Config,
        restart_cmd: list[str] | None = None,
        env: dict[str, str] | None = None,
    ):
        self.name, self.cmd, self.log_path, self.env = name, cmd, log_path, env
        self.restart_cmd = restart_cmd or cmd  # e.g. without the learner's --resume, which is for its first start
        policy = config.coordinator
        self.attempts, self.window = policy.restart_attempts, policy.restart_window
        self.backoff = tenacity.wait_exponential(multiplier=policy.retry_in, max=policy.max_retry_in)
        self.proc: subprocess.Popen | None = None
        self.restart_times: deque[float] = deque()
        self.restart_at: float | None = None
        self.stopping = False

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            # A new session: Ctrl-C in the terminal reaches the coordinator only, which then stops children in order.
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
            )
        log.info("started %s (pid %d)", self.name, self.proc.pid)
        self.cmd = self.restart_cmd

    def exit_code(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def schedule_restart(self, now: float) -> bool:
        """Plan the next start with backoff; False when the flapping limit is reached."""
        while self.restart_times and now - self.restart_times[0] > self.window:
            self.restart_times.popleft()
        if len(self.restart_times) >= self.attempts:
            return False
        self.restart_times.append(now)
        state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
        state.attempt_number = len(self.restart_times)
        self.restart_at = now + self.backoff(state)
        return True

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                if sig == signal.SIGKILL:
                    # The child's whole session (it has its own): a multi-rank learner's launcher would otherwise
                    # leave its ranks running. Other signals go to the child alone, which stops its children itself.
                    os.killpg(self.proc.pid, sig)
                else:
                    self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL the child's process group (its own session) and reap the child."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no process of the group is left
            pass
        self.proc.wait()

    def last_lines(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class StatusHTTP(ThreadingHTTPServer):
    """A thread per connection, at most `STATUS_HTTP_THREADS` at once: a connection beyond that gets 503 at once and
    is closed, so idle connections cannot pile up threads (each also times out after `STATUS_HTTP_TIMEOUT`)."""

    daemon_threads = True

    def __init__(self, address, handler):
        self.slots = threading.BoundedSemaphore(STATUS_HTTP_THREADS)
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _status_handler(coordinator: Coordinator):
    token = coordinator.config.security.api_token
    expected = f"Bearer {token}".encode() if token else b""

    class Handler(BaseHTTPRequestHandler):
        timeout = STATUS_HTTP_TIMEOUT  # seconds a connection may sit idle or trickle its request

        def do_GET(self):
            # With [security] api_token set (it must be to listen beyond loopback), every request shows it.
            sent = (self.headers.get("Authorization") or "").encode("utf-8", "replace")
            if expected and not hmac.compare_digest(sent, expected):
                body = b'{"error": "missing or wrong bearer token"}'
                self.send_response(401)
                self.send_header("WWW-Authenticate", "Bearer")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if self.path == "/status":
                body, kind = json.dumps(coordinator.status()).encode(), "application/json"
            elif self.path == "/metrics":
                body, kind = coordinator.prometheus().encode(), "text/plain; version=0.0.4"
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


class Coordinator:
    def __init__(
        self,
        config: Config,
        resolved_path: Path,
        base_model_id: str,
        resume: str = "",
        blas: str | None = None,
        max_message_bytes: int = control.WEIGHTS_MAX_BYTES,
    ):
        self.config, self.resolved_path, self.run_dir = config, resolved_path, Path(config.checkpoint.dir)
        self.base_model_id = base_model_id
        # The BLAS preloaded into the MLX children (None: MLX's own), its threads split over the local children.
        local_children = config.generation.workers + max(
            1, sum(h.split("=")[0] == "localhost" for h in config.learner.hosts)
        )
        self.child_env = child_environment(blas, local_children)
        self.resume = resume  # the checkpoint the learner's first start resumes from ("" = its run dir's newest)
        self.run_lock: int | None = None  # `runner launch`'s hold on the run dir (`runner.rundir`), set by it
        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        # Anyone who reaches the socket can send: a frame larger than the largest legitimate message (a weight
        # version of this job's adapter) drops that peer's connection before it is buffered.
        self.control.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        self.weights = self.ctx.socket(zmq.PUB)
        self.weights.setsockopt(zmq.LINGER, 0)
        self.weights.setsockopt(zmq.SNDHWM, 16)
        self._secure_sockets()
        self.control_endpoint = _bind(self.control, config.coordinator.control)
        self.weights_endpoint = _bind(self.weights, config.coordinator.weights)
        self.slots_dir = control.create_slot_dir() if config.coordinator.shared_memory else None
        self.slots = control.SlotTransport(self.slots_dir) if self.slots_dir else None
        # Children (on this host by construction) join over a Unix socket in the slot directory: cheaper than TCP
        # loopback for the messages every version takes.
        self.local_endpoint = self._bind_local()
        self.workers: dict[str, WorkerRecord] = {}
        self.watchers: dict[str, Watcher] = {}
        self.latest: wire.WeightMessage | None = None  # the newest accepted version, verified on our own copy
        self.latest_at = 0.0  # when it was accepted
        # The newest version this job published (kept in the run dir across coordinator restarts): versions never go
        # backwards (welcome and _accept continue above it), even when the learner resumes from a checkpoint older
        # than the last version. Workers may not report a newer one (`_version_bound`).
        self.seen_version = _published_version(self.run_dir)
        self.reserved_version = self.seen_version  # versions up to this one may be fanned out (PUBLISHED_VERSION)
        self._next_beat = 0.0
        self.job = {
            "step": 0,
            "steps": config.learner.steps,
            "reward_mean": None,
            "tokens_per_s": None,
            "started": time.time(),
            "state": "running",
            "blas": blas or "bundled",
        }
        self.stop_reason: str | None = None
        self.exit_code = 0
        self.signals = 0
        self.http: StatusHTTP | None = None
        self.router = None  # uvicorn.Server of the [generation] front_port router, if any
        self.router_thread: threading.Thread | None = None
        self.serving_waiters: list[tuple[bytes, int]] = []  # (identity, version) told once every worker serves it
        self.grants: dict[str, tuple[str, str]] = {}  # name -> (secret, role) of the processes we start (`grant`)
        self._complained: set[bytes] = set()  # peers whose bad messages were logged (see `_complain`)
        self.own_key = ""  # our CURVE public key (z85), which our children connect with
        if config.security.curve_secret_key:
            from runner.keys import load_keypair

            self.own_key = load_keypair(config.security.curve_secret_key)[0].decode()
        self.handlers = {
            "hello": self._on_hello,
            "heartbeat": self._on_heartbeat,
            "ack": self._on_ack,
            "status": self._on_status,
            "get_latest": self._on_get_latest,
            "get_config": self._on_get_config,
            "weights_slot": self._on_weights_slot,
            "wait_serving": self._on_wait_serving,
            "progress": self._on_progress,
            "done": self._on_done,
        }

    @property
    def latest_version(self) -> int:
        return self.latest.version if self.latest else 0

    def _secure_sockets(self) -> None:
        sec = self.config.security
        if sec.curve_secret_key:
            from runner.keys import curve_server, load_keypair

            own_public = load_keypair(sec.curve_secret_key)[0]  # local children connect with the coordinator's key
            for s in (self.control, self.weights):
                curve_server(s, sec.curve_secret_key, sec.authorized_keys, also_allow=[own_public])

    def _bind_local(self) -> str | None:
        if self.slots_dir is None:
            return None
        try:
            return _bind(self.control, f"ipc://{self.slots_dir / 'control'}")
        except zmq.ZMQError as e:  # e.g. a path longer than a Unix socket address allows
            log.warning("local children will join over TCP: cannot bind a Unix socket in %s (%s)", self.slots_dir, e)
            return None

    def child_args(self) -> list[str]:
        """Arguments every local child needs: its config, and how to reach this coordinator."""
        sec = self.config.security
        args = ["--config", str(self.resolved_path), "--join", self.local_endpoint or self.control_endpoint]
        if sec.curve_secret_key:
            args += [
                "--key",
                str(Path(sec.curve_secret_key).resolve()),
                "--server-key",
                str(Path(sec.curve_public_key).resolve()),
            ]
        return args

    # ----- children --------------------------------------------------------------------------------------------
    def add_watcher(
        self, name: str, role: str, cmd: list[str], restart_cmd: list[str] | None = None, hosts: str = ""
    ) -> None:
        """Start and watch a local child `name`. `hosts`: a generation worker its process runs too (its record
        follows the child's restarts, and its failure restarts the child)."""
        log_path = self.run_dir / "logs" / f"{name}.log"
        # Its role secret in its environment only (a command line is visible to every user of the machine).
        env = {**(self.child_env or os.environ), control.ROLE_TOKEN_ENV: self.grant(name, role)}
        if hosts:
            env[control.HOSTED_TOKEN_ENV] = self.grant(hosts, "generate")
            self.workers[hosts] = WorkerRecord(name=hosts, role="generate", hosted_by=name)
        self.watchers[name] = Watcher(name, cmd, log_path, self.config, restart_cmd, env=env)
        self.workers[name] = WorkerRecord(name=name, role=role)
        self.watchers[name].start()
        self.workers[name].pid = self.watchers[name].proc.pid

    def _check_children(self, now: float) -> None:
        for name, w in self.watchers.items():
            rec = self.workers[name]
            hosted = [r for r in self.workers.values() if r.hosted_by == name]
            if w.restart_at is not None:
                if now >= w.restart_at and self.stop_reason is None:
                    w.restart_at = None
                    for r in (rec, *hosted):
                        r.restarts += 1
                        r.state, r.last_heartbeat, r.http_url = "starting", 0.0, ""
                    w.start()
                    rec.pid = w.proc.pid
                continue
            code = w.exit_code()
            if code is None:
                timeout = self.config.coordinator.heartbeat_timeout
                for r in (rec, *hosted):  # a worker run by the child's process fails it with itself
                    if r.state == "failed" and r is rec:  # it said so itself (e.g. its engine thread died)
                        log.warning("%s reports itself failed; killing it for a restart", name)
                        w.signal(signal.SIGKILL)
                        break
                    if r.state == "failed":  # the child checkpoints and exits (the learner), then both restart
                        log.warning("%s reports itself failed; stopping %s for a restart of both", r.name, name)
                        r.state = "stopping"
                        w.signal(signal.SIGTERM)
                        break
                    if r.state in LIVE_STATES and r.last_heartbeat and now - r.last_heartbeat > timeout:
                        log.warning("%s missed heartbeats for %.0fs; killing %s", r.name, now - r.last_heartbeat, name)
                        w.signal(signal.SIGKILL)
                        break
                continue
            for r in hosted:  # its process is gone: routing and wait_serving leave it until it says hello again
                ended = w.stopping or self.stop_reason is not None or rec.state == "done"
                r.state, r.http_url = ("stopped" if ended else "failed"), ""
            if rec.role == "learner" and code == 0 and rec.state == "done":
                continue
            if w.stopping or self.stop_reason is not None:
                rec.state = "stopped"
                continue
            # (An exited child with a restart planned, or past the flapping limit, never gets here: see above.)
            rec.state, rec.http_url = "failed", ""
            if code == control.EXIT_FATAL:  # a restart would fail the same way; the reason ends its log
                self.fail(
                    f"worker {name} stopped the job (exit code {code}); last lines of {w.log_path}:\n{w.last_lines()}"
                )
                continue
            if w.schedule_restart(now):
                log.warning(
                    "%s exited with code %s; restarting in %.1fs (restart %d within %.0fs)",
                    name,
                    code,
                    w.restart_at - now,
                    len(w.restart_times),
                    w.window,
                )
            else:
                self.fail(
                    f"worker {name} exited {len(w.restart_times) + 1} times within {w.window:.0f}s "
                    f"(last exit code {code}); stopping the job. Last lines of {w.log_path}:\n{w.last_lines()}"
                )

    def fail(self, reason: str) -> None:
        if self.stop_reason is None:
            log.error(reason)
            self.stop_reason, self.exit_code = reason, 1

    # ----- control messages ------------------------------------------------------------------------------------
    def _reply(self, identity: bytes, msg: dict) -> None:
        """Send one control message; one that cannot be sent (e.g. over MAX_BYTES) is logged and answered with a
        short `rejected` instead: a reply never raises."""
        if msg["type"] == "rejected" and len(msg["reason"]) > 1000:
            msg = {"type": "rejected", "reason": msg["reason"][:1000] + "..."}
        try:
            data = messages.pack(msg)
        except messages.MessageError as e:
            log.error("could not send a %r reply to %s: %s", msg["type"], self._describe(identity), e)
            data = messages.pack({"type": "rejected", "reason": f"the {msg['type']!r} reply could not be sent"})
        self.control.send_multipart([identity, CONTROL, data])

    def _handle(self, frames: list) -> None:
        """Dispatch one message from the control socket. Nothing a peer sends can end the coordinator: a handler
        that fails is logged once with the peer and answered `rejected` (handlers check before they change
        anything, so the worker table, the latest version and the children stay as they were)."""
        identity = bytes(frames[0])
        try:
            self._dispatch(identity, frames)
        except Refused as e:
            self._complain(identity, logging.WARNING, f"refused a message: {e}")
            self._reply(identity, {"type": "rejected", "reason": str(e)})
        except Exception as e:
            self._complain(identity, logging.ERROR, f"a message failed: {type(e).__name__}: {e}")
            self._reply(identity, {"type": "rejected", "reason": f"the coordinator could not handle it ({e!r})"})

    def _complain(self, identity: bytes, level: int, text: str) -> None:
        """Log what went wrong with a peer's message, once per peer (later ones at DEBUG: a peer cannot flood the
        log), cut to one short line."""
        if identity not in self._complained:
            if len(self._complained) > 4096:
                self._complained.clear()
            self._complained.add(identity)
            text += " (more from this peer are logged at DEBUG)"
        else:
            level = logging.DEBUG
        log.log(level, "%s: %s", self._describe(identity), text if len(text) < 500 else text[:500] + "...")

    def _dispatch(self, identity: bytes, frames: list) -> None:
        kind = bytes(frames[1]) if len(frames) > 1 else b""
        if kind == WEIGHTS:
            self._learner(identity, "a weight message")
            self._accept(identity, lambda: wire.decode(frames[2:]), None)
            return
        if kind != CONTROL or len(frames) != 3:
            self._complain(identity, logging.WARNING, "dropped a control message with unknown framing")
            return
        try:
            msg = messages.unpack(frames[2])
        except messages.MessageError as e:
            self._complain(identity, logging.WARNING, f"dropped a malformed control message: {e}")
            if e.type == "weights_slot":  # the learner waits for an answer to every version it offers
                self._reply(identity, {"type": "rejected", "reason": str(e)})
            return
        handler = self.handlers.get(msg["type"])
        if handler is None:
            self._complain(identity, logging.WARNING, f"dropped a {msg['type']!r} message: nothing sends us one")
            return
        handler(identity, msg, _curve_key(frames[1]))

    # ----- who may send what (see the Security section of the README) ------------------------------------------
    def grant(self, name: str, role: str, token: str | None = None) -> str:
        """A secret (`token`, or a new one) that lets the process holding it say hello as `name` in `role`
        ("learner" or "generate"), and only it: how the coordinator's own children get their role (in their
        environment), and how a test or benchmark plays the learner. A name with a grant is taken by no one else."""
        token = token or secrets.token_hex(16)
        self.grants[name] = (token, role)
        return token

    def _credentials(self, key: str) -> frozenset[str]:
        """The roles ("worker", "learner", "observer") a peer has before any secret: without CURVE (loopback only)
        a worker's; under CURVE those of its key's place in the authorized-keys directory (the coordinator's own
        key, which its children hold, a worker's: they take their role from their secret)."""
        if not self.config.security.curve_secret_key or key == self.own_key:
            return frozenset({"worker", "observer"})
        from runner.keys import key_roles

        return key_roles(Path(self.config.security.authorized_keys)).get(key.encode(), frozenset()) | {"observer"}

    def _describe(self, identity: bytes) -> str:
        rec = self._peer(identity)
        return f"peer {identity.hex()}" + (f" ({rec.name})" if rec else " (no hello)")

    def _version_bound(self) -> int:
        """The newest version a worker may report: one this job published. (`published_version` is durable before
        any worker can hold a version, so a worker rejoining a restarted coordinator never serves a newer one; a
        newer one would raise the floor every later version must exceed, and so stop the learner.)"""
        return max(self.latest_version, self.seen_version)

    def _sender(self, msg: dict, key: str) -> WorkerRecord:
        """The record of the process a message naming a worker comes from: the one that said hello under that name,
        proven by its token (and its pid and CURVE key, when given). Raises Refused otherwise."""
        rec = self.workers.get(msg["name"])
        if (
            rec is None
            or not rec.token
            or not hmac.compare_digest(msg.get("token", "").encode(), rec.token.encode())
            or msg.get("pid", rec.pid) != rec.pid
            or key != rec.curve_key
        ):
            raise Refused(
                f"a {msg['type']!r} naming {msg['name']!r} counts only from the process that said hello under that "
                "name (its token, pid and key)"
            )
        return rec

    def _peer(self, identity: bytes, role: str | None = None) -> WorkerRecord | None:
        """The record (of `role`, if given) whose hello, or named get_latest, came last from this socket. A scan of
        the table, which is bounded (MAX_REMOTE_WORKERS): only messages that do not name their sender need it."""
        return next(
            (r for r in self.workers.values() if r.identity == identity and (role is None or r.role == role)), None
        )

    def _learner(self, identity: bytes, what: str) -> WorkerRecord:
        rec = self._peer(identity, "learner")
        if rec is None:
            raise Refused(f"{what} is accepted only from the learner (the socket that said hello as the learner)")
        return rec

    def _gone(self, rec: WorkerRecord, token: str, key: str) -> bool:
        """Whether a new hello may take `rec`'s name: the same process again (its token), a record whose process is
        gone (failed, stopped, lost, done; on this host, its pid gone), or, under CURVE, the same key (its holder
        restarted its worker)."""
        if rec.token and hmac.compare_digest(token.encode(), rec.token.encode()):
            return True
        if not rec.token or rec.state in ("failed", "stopped", "lost", "done"):
            return True
        if key:
            return key == rec.curve_key
        return rec.host == socket.gethostname() and not control.process_running(rec.pid)

    def _on_hello(self, identity: bytes, msg: dict, key: str) -> None:
        name, token, rec = msg["name"], msg.get("token", ""), self.workers.get(msg["name"])
        if not token:
            raise Refused("hello needs a token (the secret that proves later messages naming this worker are its)")
        if name in self.grants:
            granted, role = self.grants[name]
            if not hmac.compare_digest(token.encode(), granted.encode()):
                raise Refused(f"{name!r} is reserved for a process this coordinator started (hello needs its secret)")
        else:
            role = msg.get("role", "generate")
            need = "learner" if role == "learner" else "worker"
            if need not in self._credentials(key):
                raise Refused(f"saying hello as role {role!r} needs a {need} key (authorized_keys/{need}s/)")
            api_token = self.config.security.api_token
            if not key and api_token:  # no CURVE: the API token, which the learner sends to its URL, is the credential
                proof = control.hello_proof(api_token, name, token)
                if not hmac.compare_digest(msg.get("proof", "").encode(), proof.encode()):
                    raise Refused(
                        "a worker's hello on this job needs the job's API token (runner worker generate "
                        "--api-token-file PATH, or RUNNER_API_TOKEN)"
                    )
            if rec is not None and not self._gone(rec, token, key):
                raise Refused(
                    f"{name!r} is live (pid {rec.pid} on {rec.host}): a second hello under a live name is refused "
                    "until the first is gone"
                )
        if (version := msg.get("version", 0)) > self._version_bound():
            raise Refused(
                f"version {version} is newer than any this job published ({self._version_bound()}): "
                "a worker of another job? restart it"
            )
        if rec is None and not self._room_for(name):  # (may forget the oldest lost row to make room)
            raise Refused(f"{MAX_REMOTE_WORKERS} remote workers are live: no room for another")
        if rec is None:  # a remote worker joining
            rec = self.workers[name] = WorkerRecord(name=name, role=role, local=False)
        rec.identity, rec.token, rec.curve_key, rec.beat_identity = identity, token, key, b""
        rec.pid, rec.host = msg.get("pid", 0), msg.get("host", "")
        rec.capabilities = msg.get("capabilities", {})
        # A remote worker rejoining a (restarted) coordinator says what it serves; a new process says nothing.
        rec.state, rec.last_heartbeat = msg.get("state", "loading"), time.time()
        rec.version, rec.http_url = msg.get("version", rec.version), msg.get("http_url", rec.http_url)
        log.info("%s (%s) said hello from %s pid %d", rec.name, rec.role, rec.host, rec.pid)
        welcome = {
            "type": "welcome",
            "base_model_id": self.base_model_id,
            "latest_version": max(self.latest_version, self.seen_version),
            "weights_endpoint": self.weights_endpoint,
            "weights_slots": control.advertise_slot_dir(self.slots_dir),
            "supervised": rec.local,  # our child: it exits when we go silent
        }
        self._reply(identity, welcome)

    def _on_heartbeat(self, identity: bytes, msg: dict, key: str) -> None:
        try:
            rec = self._sender(msg, key)
        except Refused:
            # A worker of a coordinator that ran before us, or a child of one (another token), or a stranger: say
            # hello again (such a child exits instead, so two learners never share a run dir). Nothing changes.
            self._reply(identity, {"type": "heartbeat", "name": "coordinator", "rejoin": True})
            return
        if msg.get("version", 0) > self._version_bound():
            raise Refused(f"version {msg['version']} is newer than any this job published ({self._version_bound()})")
        if rec.state in ("failed", "stopped"):
            return
        if rec.beat_identity != identity:  # a new heartbeat socket: it hears from us at once, not an interval later
            self._reply(identity, {"type": "heartbeat", "name": "coordinator"})
        rec.last_heartbeat, rec.beat_identity = time.time(), identity
        rec.state, rec.version = msg.get("state", rec.state), msg.get("version", rec.version)
        rec.engine_steps = msg.get("engine_steps", rec.engine_steps)
        rec.http_url = msg.get("http_url") or rec.http_url
        self._heal(rec)

    def _heal(self, rec: WorkerRecord) -> None:
        """A serving worker whose heartbeat reports a version older than the latest missed one (a dropped PUB
        message, a slot notice lost): send it the latest now, once per version. Not before one heartbeat interval
        has passed since the version was accepted: until then it is most likely still installing it."""
        latest = self.latest
        if (
            latest is None
            or rec.role != "generate"
            or rec.state != "serving"
            or rec.version >= latest.version
            or rec.resent_version >= latest.version
            or time.time() - self.latest_at < self.config.coordinator.heartbeat_interval
        ):
            return
        log.warning("%s serves version %d, the latest is %d: sending it again", rec.name, rec.version, latest.version)
        rec.resent_version = latest.version
        self.control.send_multipart([rec.identity, WEIGHTS, *latest.frames])

    def _beat(self, now: float) -> None:
        """Paranoid Pirate, coordinator side: a beat every heartbeat interval to the socket each worker heartbeats
        from, so that a worker knows this coordinator is alive (a child of ours exits when the beats stop)."""
        if now < self._next_beat:
            return
        self._next_beat = now + self.config.coordinator.heartbeat_interval
        beat = [CONTROL, messages.pack({"type": "heartbeat", "name": "coordinator"})]
        for rec in list(self.workers.values()):
            if rec.beat_identity:
                self.control.send_multipart([rec.beat_identity, *beat])  # ROUTER drops it if the peer is gone

    def _on_ack(self, identity: bytes, msg: dict, key: str) -> None:
        rec = self._sender(msg, key)
        if rec.role == "learner":
            raise Refused("acks come from generation workers, not the learner")
        if msg["version"] > self._version_bound():
            raise Refused(f"version {msg['version']} is newer than any this job published ({self._version_bound()})")
        rec.version = max(rec.version, msg["version"])
        rec.state, rec.http_url = msg.get("state") or rec.state, msg.get("http_url") or rec.http_url
        rec.last_heartbeat = time.time()

    def _on_get_latest(self, identity: bytes, msg: dict, key: str) -> None:
        if "name" in msg:  # a worker subscribing: it says how it takes new versions
            rec = self._sender(msg, key)
            rec.identity = identity
            rec.weights_via = "slots" if msg.get("slots") else "pub"
        elif self._peer(identity) is None:
            raise Refused("get_latest is answered only to a worker that said hello")
        if self.latest is None:
            self._reply(identity, {"type": "latest", "version": 0})
        else:
            self.control.send_multipart([identity, WEIGHTS, *self.latest.frames])

    def _on_get_config(self, identity: bytes, msg: dict, key: str) -> None:
        if self._peer(identity) is None:
            raise Refused("get_config is answered only to a worker that said hello")
        # Secrets redacted: a worker on another host brings the API token itself (--api-token-file, RUNNER_API_TOKEN).
        self._reply(identity, {"type": "config", "toml": config_toml(self.config)})

    def _on_status(self, identity: bytes, msg: dict, key: str) -> None:
        self._reply(identity, {"type": "status", **self.status()})

    def _on_wait_serving(self, identity: bytes, msg: dict, key: str) -> None:
        """Reply 'serving' once every serving generation worker (and at least one) has `version` or newer."""
        self._learner(identity, "wait_serving")
        self.serving_waiters.append((identity, msg["version"]))

    def _answer_waiters(self) -> None:
        oldest = self.oldest_serving_version()
        if oldest is None or not self.serving_waiters:
            return
        done = [(i, v) for i, v in self.serving_waiters if oldest >= v]
        self.serving_waiters = [w for w in self.serving_waiters if w not in done]
        for identity, _ in done:
            self._reply(identity, {"type": "serving", "version": oldest})

    def oldest_serving_version(self) -> int | None:
        serving = [w.version for w in self.workers.values() if w.role == "generate" and w.state == "serving"]
        return min(serving) if serving else None

    def _on_progress(self, identity: bytes, msg: dict, key: str) -> None:
        if self._sender(msg, key).role != "learner":
            raise Refused("progress comes only from the learner")
        metrics = msg.get("metrics", {})
        if "eval_reward" in metrics:  # an evaluation row (workers/learner/evaluation.py), not a step
            self.job["eval"] = {k: v for k, v in metrics.items() if k.startswith("eval_") or k in ("step", "version")}
            print(f"eval at step {metrics.get('step')}: {eval_summary(metrics)}", flush=True)
            return
        self.job.update(
            {
                k: metrics.get(k)
                for k in (
                    *("step", "reward_mean", "tokens_per_s", "loss", "kl", "staleness", "staleness_mean"),
                    *("sampler_kl", "wait_s", "train_s", "publish_s", "step_s", "gen_busy"),
                )
                if k in metrics
            }
        )
        self._print_progress(metrics)

    def _on_done(self, identity: bytes, msg: dict, key: str) -> None:
        rec = self._sender(msg, key)
        if rec.role != "learner":
            raise Refused("done comes only from the learner")
        rec.state = "done"
        self.job["state"] = "done"
        log.info("the learner finished the job")

    # ----- weight versions -------------------------------------------------------------------------------------
    def _on_weights_slot(self, identity: bytes, msg: dict, key: str) -> None:
        """A version the learner wrote into a shared-memory slot: read from a private copy, so what is verified is
        what is kept; same-host workers get the notice and read the slot themselves."""
        self._learner(identity, "a weights_slot notice")
        if self.slots is None:
            self._reply(identity, {"type": "rejected", "reason": "this coordinator does not use shared-memory slots"})
            return
        self._accept(identity, lambda: self.slots.read(msg, copy=True), msg)

    def _accept(self, identity: bytes, read, notice: dict | None) -> None:
        """Take the version `read()` returns as the latest if it is intact, for this job's model and newer; fan it
        out; tell the sender either way."""
        try:
            message = read()
            if message.header["base_model_id"] != self.base_model_id:
                raise wire.WireError(f"base model id {message.header['base_model_id']!r} is not this job's")
            if message.version <= max(self.latest_version, self.seen_version):
                newest = max(self.latest_version, self.seen_version)
                raise wire.WireError(f"version {message.version} is not newer than {newest}")
        except wire.WireError as e:
            log.warning("rejected a weight version: %s", e)
            self._reply(identity, {"type": "rejected", "reason": str(e)})
            return
        # Durable BEFORE any worker can hold it: a coordinator restarted after a kill (or an OS crash) at any point
        # of the fan-out continues above every version a worker may serve, so a number never names two adapters.
        if message.version > self.reserved_version:
            try:
                write_atomic(self.run_dir / PUBLISHED_VERSION, f"{message.version + VERSION_RESERVE - 1}\n")
            except OSError as e:
                log.error("rejected weight version %d: cannot record it in the run dir: %s", message.version, e)
                self._reply(identity, {"type": "rejected", "reason": f"cannot record version {message.version}: {e}"})
                return
            self.reserved_version = message.version + VERSION_RESERVE - 1
        self.latest, self.latest_at = message, time.time()
        self.weights.send_multipart(message.frames)  # other hosts (received zmq.Frames go by reference)
        same_host = [CONTROL, messages.pack(notice)] if notice else [WEIGHTS, *message.frames]
        for w in self.workers.values():
            if w.weights_via == "slots" and w.identity:
                self.control.send_multipart([w.identity, *same_host])
        self._reply(identity, {"type": "published", "version": message.version})

    # ----- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        """The job and the worker table, always small enough for one control message (`messages.MAX_BYTES`):
        strings cut, large capabilities left out, and rows beyond what fits dropped from the end (the local
        children come first) with `workers_omitted` saying how many."""
        now = time.time()
        job = {
            **self.job,
            "uptime": round(now - self.job["started"], 1),
            "latest_version": self.latest_version,
            "oldest_serving_version": self.oldest_serving_version(),
        }
        rows = [_bounded_row(w.row(now)) for w in list(self.workers.values())]
        room = messages.MAX_BYTES - 4096 - len(msgpack.packb(job, default=str))
        for i, row in enumerate(rows):
            room -= len(msgpack.packb(row, default=str))
            if room < 0:
                job["workers_omitted"] = len(rows) - i
                rows = rows[:i]
                break
        return {"job": job, "workers": rows}

    def prometheus(self) -> str:
        s = self.status()
        lines = [
            "# HELP runner_job_step Learner optimizer steps done.",
            "# TYPE runner_job_step gauge",
            f"runner_job_step {s['job']['step'] or 0}",
            "# HELP runner_latest_adapter_version Newest adapter version published.",
            "# TYPE runner_latest_adapter_version gauge",
            f"runner_latest_adapter_version {self.latest_version}",
            "# HELP runner_worker_restarts_total Restarts per worker.",
            "# TYPE runner_worker_restarts_total counter",
        ]
        lines += [f"runner_worker_restarts_total{{worker={_label(w['name'])}}} {w['restarts']}" for w in s["workers"]]
        lines += [
            "# HELP runner_worker_version Adapter version each worker serves.",
            "# TYPE runner_worker_version gauge",
        ]
        lines += [f"runner_worker_version{{worker={_label(w['name'])}}} {w['version']}" for w in s["workers"]]
        if s["job"]["reward_mean"] is not None:
            lines += [
                "# HELP runner_reward_mean Mean reward of the last step.",
                "# TYPE runner_reward_mean gauge",
                f"runner_reward_mean {s['job']['reward_mean']}",
            ]
        return "\n".join(lines) + "\n"

    def _print_progress(self, m: dict) -> None:
        gens = " ".join(f"{w.name}:v{w.version}" for w in self.workers.values() if w.role == "generate")

        def fmt(key, spec):
            return "-" if m.get(key) is None else format(m[key], spec)

        print(
            f"step {m.get('step', '?')}/{self.config.learner.steps}  reward {fmt('reward_mean', '.3f')}  "
            f"loss {fmt('loss', '.4f')}  kl {fmt('kl', '.4f')}  tok/s {fmt('tokens_per_s', '.0f')}  "
            f"v{m.get('version', '?')}  staleness {m.get('staleness', '-')}  [{gens}]"
            + (f"  (after a {m['warmup_s']:.1f}s warm-up: kernels compile at first use)" if "warmup_s" in m else ""),
            flush=True,
        )

    def start_router(self) -> None:
        """[generation] front_port: one OpenAI endpoint that routes to every serving generation worker."""
        from runner.router import create_router, start_router

        gen = self.config.generation
        # list() of a dict view is atomic under the GIL; rows are built from that snapshot.
        app = create_router(
            lambda: [w.row(time.time()) for w in list(self.workers.values())], api_token=self.config.security.api_token
        )
        self.router, self.router_thread, port = start_router(app, gen.host, gen.front_port)
        self.job["router_url"] = f"http://{gen.host}:{port}/v1"

    def _drop_lost_remotes(self, now: float) -> None:
        """Remote workers have no process to watch: one whose heartbeats stop leaves routing and wait_serving
        (it is not restarted; its next heartbeat or hello brings it back). A row that stays lost (or failed) for
        LOST_ROW_TIMEOUTS heartbeat timeouts is removed: a worker restarted under a new name (launchd's default is
        host and pid) must not grow the table without bound."""
        timeout = self.config.coordinator.heartbeat_timeout
        for rec in list(self.workers.values()):
            if rec.local:
                continue
            silent = now - (rec.last_heartbeat or now)
            if rec.state in LIVE_STATES and rec.last_heartbeat and silent > timeout:
                log.warning("remote worker %s missed heartbeats for %.0fs; dropping it", rec.name, silent)
                rec.state, rec.http_url = "lost", ""
            elif rec.state not in LIVE_STATES and silent > LOST_ROW_TIMEOUTS * timeout:
                log.info("forgetting remote worker %s (%s for %.0fs)", rec.name, rec.state, silent)
                del self.workers[rec.name]

    def _room_for(self, name: str) -> bool:
        """Whether the table can take a row for `name`: it has one, or it holds fewer than MAX_REMOTE_WORKERS remote
        rows, or the oldest remote row that is not live can make way."""
        remote = [w for w in self.workers.values() if not w.local]
        if name in self.workers or len(remote) < MAX_REMOTE_WORKERS:
            return True
        gone = [w for w in remote if w.state not in LIVE_STATES]
        if not gone:
            return False
        oldest = min(gone, key=lambda w: w.last_heartbeat)
        log.info("forgetting remote worker %s (%s) to make room for %s", oldest.name, oldest.state, name)
        del self.workers[oldest.name]
        return True

    def start_http(self) -> None:
        port = self.config.coordinator.status_port
        host = self.config.generation.host
        self.http = StatusHTTP((host, port), _status_handler(self))
        threading.Thread(target=self.http.serve_forever, name="status-http", daemon=True).start()
        self.job["status_url"] = f"http://{host}:{self.http.server_address[1]}/status"

    # ----- main loop -------------------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.info("stopping: %s", reason)

    def run(self) -> int:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        while True:
            for sock, _ in poller.poll(100):
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._answer_waiters()
            now = time.time()
            self._beat(now)
            self._check_children(now)
            self._drop_lost_remotes(now)
            learner = self.workers.get("learner")
            if learner is not None and learner.state == "done" and self.watchers["learner"].exit_code() is not None:
                self.request_stop("the job is complete")
            if self.stop_reason is not None:
                return self.shutdown()

    def shutdown(self) -> int:
        """SIGTERM to every child at once (the learner checkpoints its last completed step and abandons in-flight
        rollouts; workers cancel requests whose client went away), then, `[coordinator] stop_grace` seconds after the
        stop began, SIGKILL to every child's process group: one bound for the whole shutdown. A second signal skips
        the wait (see `launch`)."""
        deadline = time.time() + self.config.coordinator.stop_grace
        for w in self.watchers.values():
            w.stopping = True
            w.restart_at = None
            w.signal(signal.SIGTERM)
        while any(w.exit_code() is None for w in self.watchers.values()) and time.time() < deadline:
            if self.signals >= 2:
                break
            self.control.poll(50)  # keep answering the learner (its last publish, its final progress)
            self._drain_control()
            self._beat(time.time())  # and beating: a child finishing its last step must not think us gone
        for name, w in self.watchers.items():
            if w.exit_code() is None:
                log.warning(
                    "%s did not stop within stop_grace = %gs; killing it", name, self.config.coordinator.stop_grace
                )
            # The whole group even if the child itself exited: nothing it started (e.g. a learner's ranks) survives.
            w.kill_group()
            for rec in self.workers.values():
                if name in (rec.name, rec.hosted_by):
                    rec.state = "stopped"
        for rec in self.workers.values():
            if not rec.local and rec.identity:
                self._reply(rec.identity, {"type": "stop"})
        if self.router is not None:  # last, so clients get 503 + Retry-After while the workers stop
            self.router.should_exit = True
            self.router_thread.join(10)
        if self.http:
            self.http.shutdown()
        self.control.close()
        self.weights.close()
        if self.slots_dir:
            shutil.rmtree(self.slots_dir, ignore_errors=True)
        if self.config.security.curve_secret_key:
            from runner.keys import stop_authenticator

            stop_authenticator(self.ctx)
        return self.exit_code

    def _drain_control(self) -> None:
        self._beat(time.time())  # children that are stopping still hear us, so they do not exit as orphans
        while True:
            try:
                self._handle(self.control.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return


def _bounded_row(row: dict) -> dict:
    """A status row with its strings cut to STATUS_FIELD_CHARS and capabilities over STATUS_CAPABILITIES_BYTES left
    out (a remote worker chooses them)."""
    row = {k: v[:STATUS_FIELD_CHARS] if isinstance(v, str) else v for k, v in row.items()}
    if len(msgpack.packb(row.get("capabilities") or {}, default=str)) > STATUS_CAPABILITIES_BYTES:
        row["capabilities"] = {"omitted": f"more than {STATUS_CAPABILITIES_BYTES} bytes"}
    return row


def _label(value: str) -> str:
    """A Prometheus label value, quoted and escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Refused(Exception):
    """A peer sent what its role or identity does not allow; the reason goes back to it in `rejected`."""


def _curve_key(frame) -> str:
    """The CURVE public key (z85) a received frame came with: its ZAP User-Id ("" without CURVE)."""
    try:
        return frame.get("User-Id") or ""
    except (AttributeError, zmq.ZMQError):  # bytes, or a connection without ZAP metadata
        return ""


def _published_version(run_dir: Path) -> int:
    """A version at or above every one a coordinator of this run dir published (0 if none, or if the file is
    unreadable)."""
    try:
        return int((run_dir / PUBLISHED_VERSION).read_text())
    except (OSError, ValueError):
        return 0


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; port 0 means a free port (handy for tests and for several jobs on one machine)."""
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _child_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def create_coordinator(config: Config, config_path: Path | None = None, lock: bool = False) -> Coordinator:
    """Check security, prepare the model if needed, write RUN/config.resolved.toml, bind the sockets. `config_path`
    is where the job's config came from (only reported). `lock` (`runner launch`): take the run dir's lock once every
    check has passed and before anything is written into it; the coordinator's `run_lock` holds it."""
    from runner.keys import require_security

    gen = config.generation
    if gen.front_port and gen.port and gen.port <= gen.front_port < gen.port + gen.workers:
        raise ConfigError(
            f"generation.front_port {gen.front_port} is one of the workers' ports "
            f"{gen.port}..{gen.port + gen.workers - 1}; pick another"
        )
    http = f"tcp://{gen.host}:{gen.port}"  # the workers' HTTP API (and the front router) is exposed as well
    require_security(
        [config.coordinator.control, config.coordinator.weights, http],
        config.security.curve_secret_key,
        config.security.api_token,
        authorized_keys=config.security.authorized_keys,
    )
    config.logging.require_packages()
    # A local directory or a hub id (downloaded now, once, into the hub cache), checked before anything is written.
    # Every child resolves the name itself (a hub id stays an id in the resolved config) and compares what it
    # resolved, by content, with this id.
    model_dir = None if config.model.prepare else resolve_model(config.model.path, "[model] path")
    blas = blas_library(config.coordinator.blas)
    run_lock = lock_run_dir(Path(config.checkpoint.dir).resolve()) if lock else None
    try:
        resolved, resume = resolve(config)
        _prepare_model(resolved)
        model_path = model_dir or resolved.model.path
        base_model_id = model_id(model_path)
        path = write_resolved(resolved, Path(resolved.checkpoint.dir) / "config.resolved.toml")
        log.info("job config %s resolved into %s", config_path or "(given)", path)
        if blas:
            log.info("MLX children start with %s preloaded ([coordinator] blas)", blas)
        max_message_bytes = control.weights_max_bytes(model_path, resolved.lora)
        coord = Coordinator(resolved, path, base_model_id, resume, blas, max_message_bytes=max_message_bytes)
    except BaseException:
        if run_lock is not None:
            os.close(run_lock)
        raise
    coord.run_lock = run_lock
    return coord


def resolve(config: Config) -> tuple[Config, str]:
    """The config every child starts from: absolute model path and run dir (so no working directory matters) and no
    `checkpoint.resume`, which is returned apart (checked) because only the learner's first start uses it."""
    run_dir = Path(config.checkpoint.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = ""
    if config.checkpoint.resume:
        resume = str(Path(config.checkpoint.resume).resolve())
        if not (Path(resume) / "state.json").is_file() or not (Path(resume) / "adapters.safetensors").is_file():
            raise ConfigError(
                f"checkpoint.resume = {resume!r} is not a checkpoint directory; expected one with "
                f"state.json and adapters.safetensors (e.g. {run_dir}/checkpoints/step_000010)"
            )
    data = config.to_dict()
    if config.model.prepare or is_local(config.model.path):  # else a Hugging Face repo id, kept as it is
        data["model"]["path"] = str(Path(config.model.path).expanduser().resolve())
    data["checkpoint"].update(dir=str(run_dir), resume="")
    return build_config(data, where="resolved config"), resume


def _prepare_model(config: Config) -> None:
    model_path = Path(config.model.path)
    if not config.model.prepare or (model_path / "config.json").exists():
        return
    print(f"preparing the {config.model.prepare} model in {model_path} (first run only)", flush=True)
    subprocess.run(
        _child_cmd("runner.cli", "models", "prepare", config.model.prepare, "--out", str(model_path)), check=True
    )


def colocated(config: Config) -> bool:
    """Whether the learner's process runs gen-0 ([generation] colocate; a single learner process only)."""
    return config.generation.colocate and config.generation.workers > 0 and not config.learner.hosts


def add_generation_workers(coord: Coordinator, count: int) -> None:
    gen = coord.config.generation
    for i in range(1 if colocated(coord.config) else 0, count):
        port = str(gen.port + i if gen.port else 0)
        args = ["--name", f"gen-{i}", "--host", gen.host, "--port", port]
        coord.add_watcher(f"gen-{i}", "generate", _child_cmd("workers.generation.worker", *coord.child_args(), *args))


def add_learner(coord: Coordinator) -> None:
    """The learner process (running gen-0 too when colocated); its first start resumes from `coord.resume` if set,
    a restart from the newest checkpoint of the run dir."""
    serve, gen = [], coord.config.generation
    if colocated(coord.config):
        serve = ["--serve", "gen-0", "--serve-host", gen.host, "--serve-port", str(gen.port)]
    first = learner_command(coord, [*serve, *(["--resume", coord.resume] if coord.resume else [])])
    hosts = "gen-0" if serve else ""
    coord.add_watcher("learner", "learner", first, restart_cmd=learner_command(coord, serve), hosts=hosts)


def learner_command(coord: Coordinator, extra: list[str]) -> list[str]:
    """The learner process. With `[learner] hosts`, a wrapper (`workers.learner.distributed launch`) starts one rank
    per host (mlx.launch over ssh for other machines) and forwards SIGTERM to rank 0, the only rank that talks to
    this coordinator. It imports MLX, not us."""
    cmd = _child_cmd("workers.learner.main", *coord.child_args(), "--name", "learner", *extra)
    lc = coord.config.learner
    if not lc.hosts:
        return cmd
    ring = ["--hosts", ",".join(lc.hosts), "--port", str(lc.ring_port), "--workdir", str(coord.run_dir / "ring")]
    return _child_cmd("workers.learner.distributed", "launch", *ring, "--", *cmd)


def launch(config: Config, config_path: Path | None = None) -> int:
    """`runner launch`: prepare what is missing, start the pool, supervise it until the job ends. The run dir is
    locked for the whole time (`runner.rundir`): a second launch on it fails at once, before writing anything."""
    coord = create_coordinator(config, config_path, lock=True)
    try:
        return _supervise(coord)
    finally:
        os.close(coord.run_lock)


def _supervise(coord: Coordinator) -> int:
    config = coord.config
    coord.child_env.update(job_environment(coord.run_dir))  # children check that this launch still holds the lock
    (coord.run_dir / "logs").mkdir(exist_ok=True)
    file_log = logging.FileHandler(coord.run_dir / "logs" / "coordinator.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    coord.start_http()
    if config.generation.front_port:
        coord.start_router()
        print(f"OpenAI endpoint for all generation workers: {coord.job['router_url']}", flush=True)
    add_generation_workers(coord, config.generation.workers)
    add_learner(coord)
    print(
        f"job started: run dir {coord.run_dir}, control {coord.control_endpoint} (`runner status --coordinator "
        f"{coord.control_endpoint}`), status {coord.job['status_url']}, logs in {coord.run_dir / 'logs'}",
        flush=True,
    )

    def on_signal(signum, frame):
        coord.signals += 1
        if coord.signals == 1:
            print(f"\n{signal.Signals(signum).name}: stopping after a final checkpoint (again to force)", flush=True)
            coord.request_stop(f"received {signal.Signals(signum).name}")
        else:
            for w in coord.watchers.values():
                w.signal(signal.SIGKILL)
            os._exit(130)

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    code = coord.run()
    print(f"job {'finished' if code == 0 else 'failed'}: {coord.stop_reason}", flush=True)
    return code
