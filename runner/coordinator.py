"""The coordinator: `runner launch` starts the generation workers and the learner as child processes, routes control
messages and weight versions between them over ZeroMQ, restarts what fails, and reports status. No MLX here.

Shape (after circus): the Coordinator is the arbiter; one `Watcher` per local child process owns its command, log
file and restart policy (exponential backoff, and a flapping limit of `restart_attempts` within `restart_window`
seconds past which the job stops with the reason). Remote generation workers (`runner worker generate --join`)
appear in the same worker table without a watcher: if they die they are dropped, not restarted.

Sockets: control ROUTER (hello, heartbeat, ack, status, get_latest, progress, done; weight versions from the learner,
as frames or as shared-memory slot notices) and weights PUB (fan-out of every new version to workers on other hosts;
same-host workers get slot notices, or frames, on the control socket: see `runner.slots`). The coordinator keeps the
latest weight message so a worker that starts, restarts or joins late gets it (`get_latest`) before it reports
ready.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import tenacity
import zmq

from runner import slots, wire
from runner.config import Config, ConfigError
from runner.control import CONTROL, WEIGHTS, model_id

log = logging.getLogger(__name__)

SLOT_COPY_DELAY = 1.0  # at most this many seconds before the coordinator copies a slot version, idle or not
LIVE_STATES = ("starting", "loading", "catching_up", "serving", "training")


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
    capabilities: dict = field(default_factory=dict)
    identity: bytes = b""
    weights_via: str = ""  # "slots" (same-host shared memory) or "pub" (the weights PUB socket)

    def row(self, now: float) -> dict:
        d = asdict(self)
        d.pop("identity")
        d["heartbeat_age"] = round(now - self.last_heartbeat, 2) if self.last_heartbeat else None
        return d


class Watcher:
    """One supervised local child process and its restart policy."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, config: Config):
        self.name, self.cmd, self.log_path = name, cmd, log_path
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
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("started %s (pid %d)", self.name, self.proc.pid)

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

    def last_lines(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class StatusHTTP(ThreadingHTTPServer):
    daemon_threads = True


def _status_handler(coordinator: Coordinator):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
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
    def __init__(self, config: Config, config_path: Path, run_dir: Path, base_model_id: str, job_info: dict):
        self.config, self.config_path, self.run_dir = config, config_path, run_dir
        self.base_model_id = base_model_id
        self.job_info = job_info  # what a joining worker needs: model path, LoRA spec, generation settings
        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.ROUTER)
        self.control.setsockopt(zmq.LINGER, 0)
        self.weights = self.ctx.socket(zmq.PUB)
        self.weights.setsockopt(zmq.LINGER, 0)
        self.weights.setsockopt(zmq.SNDHWM, 16)
        self._secure_sockets()
        self.control_endpoint = _bind(self.control, config.coordinator.control)
        self.weights_endpoint = _bind(self.weights, config.coordinator.weights)
        self.job_info["weights_endpoint"] = self.weights_endpoint
        self.slots_dir = slots.create_dir() if config.coordinator.shared_memory else None
        self.slots = slots.SlotReader(self.slots_dir) if self.slots_dir else None
        self.job_info["weights_slots"] = slots.advertise(self.slots_dir)
        # Children (on this host by construction) join over a Unix socket in the same directory: every version
        # crosses the control socket four times, and this is ~0.2 ms a version faster than TCP loopback.
        self.local_endpoint = self._bind_local()
        self.workers: dict[str, WorkerRecord] = {}
        self.watchers: dict[str, Watcher] = {}
        self.latest: list | None = None  # frames of the newest verified weight message, for late joiners
        self.latest_version = 0
        self.accepted_version = 0  # newest version fanned out (a slot version is verified and kept just after)
        self.unkept_slot: tuple[bytes, dict, memoryview, float] | None = None
        self.job = {
            "step": 0,
            "steps": config.learner.steps,
            "reward_mean": None,
            "tokens_per_s": None,
            "version": 0,
            "started": time.time(),
            "state": "running",
        }
        self.stop_reason: str | None = None
        self.exit_code = 0
        self.signals = 0
        self.http: StatusHTTP | None = None
        self.router = None  # uvicorn.Server of the [generation] front_port router, if any
        self.router_thread: threading.Thread | None = None
        self.serving_waiters: list[tuple[bytes, int]] = []  # (identity, version) told once every worker serves it

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
        """Arguments every local child needs to reach this coordinator."""
        sec = self.config.security
        args = ["--join", self.local_endpoint or self.control_endpoint]
        if sec.curve_secret_key:
            args += [
                "--key",
                str(Path(sec.curve_secret_key).resolve()),
                "--server-key",
                str(Path(sec.curve_public_key).resolve()),
            ]
        return args

    # ----- children --------------------------------------------------------------------------------------------
    def add_watcher(self, name: str, role: str, cmd: list[str]) -> None:
        self.watchers[name] = Watcher(name, cmd, self.run_dir / "logs" / f"{name}.log", self.config)
        self.workers[name] = WorkerRecord(name=name, role=role)
        self.watchers[name].start()
        self.workers[name].pid = self.watchers[name].proc.pid

    def _check_children(self, now: float) -> None:
        for name, w in self.watchers.items():
            rec = self.workers[name]
            if w.restart_at is not None:
                if now >= w.restart_at and self.stop_reason is None:
                    w.restart_at = None
                    rec.restarts += 1
                    rec.state, rec.last_heartbeat, rec.http_url = "starting", 0.0, ""
                    w.start()
                    rec.pid = w.proc.pid
                continue
            code = w.exit_code()
            if code is None:
                if (
                    rec.state in LIVE_STATES
                    and rec.last_heartbeat
                    and now - rec.last_heartbeat > self.config.coordinator.heartbeat_timeout
                ):
                    log.warning("%s missed heartbeats for %.0fs; killing it", name, now - rec.last_heartbeat)
                    w.signal(signal.SIGKILL)
                continue
            if rec.role == "learner" and code == 0 and rec.state == "done":
                continue
            if w.stopping or self.stop_reason is not None:
                rec.state = "stopped"
                continue
            if rec.state == "failed":
                continue
            rec.state, rec.http_url = "failed", ""
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
        self.control.send_multipart([identity, CONTROL, wire.pack_control(msg)])

    def _handle(self, frames: list) -> None:
        identity, kind = bytes(frames[0]), bytes(frames[1]) if len(frames) > 1 else b""
        if kind == WEIGHTS:
            self._handle_weights(identity, frames[2:])
            return
        if kind != CONTROL or len(frames) != 3:
            log.warning("dropped a control message with unknown framing")
            return
        try:
            msg = wire.unpack_control(frames[2])
        except wire.WireError as e:
            log.warning("dropped a malformed control message: %s", e)
            return
        handler = getattr(self, f"_on_{msg['type']}", None)
        if handler is None:
            log.warning("dropped a control message of unknown type %r", msg["type"])
            return
        try:
            handler(identity, msg)
        except (KeyError, TypeError, ValueError) as e:
            log.warning("dropped a bad %r message: %s", msg["type"], e)

    def _record(self, msg: dict) -> WorkerRecord:
        name = str(msg["name"])
        if name not in self.workers:  # a remote worker joining
            self.workers[name] = WorkerRecord(name=name, role=str(msg.get("role", "generate")), local=False)
        return self.workers[name]

    def _on_hello(self, identity: bytes, msg: dict) -> None:
        rec = self._record(msg)
        rec.identity, rec.pid, rec.host = identity, int(msg.get("pid", 0)), str(msg.get("host", ""))
        rec.capabilities = dict(msg.get("capabilities") or {})
        rec.state, rec.last_heartbeat = "loading", time.time()
        log.info("%s (%s) said hello from %s pid %d", rec.name, rec.role, rec.host, rec.pid)
        self._reply(
            identity,
            {
                "type": "welcome",
                "latest_version": self.accepted_version,
                "base_model_id": self.base_model_id,
                **self.job_info,
            },
        )
        if rec.role == "learner":  # --resume applies to the first start; a restarted learner takes the newest
            self.job_info["config"]["checkpoint"]["resume"] = ""

    def _on_heartbeat(self, identity: bytes, msg: dict) -> None:
        rec = self.workers.get(str(msg["name"]))
        if rec is None or rec.state in ("failed", "stopped"):
            return
        rec.last_heartbeat = time.time()
        if "state" in msg:
            rec.state = str(msg["state"])
        if "version" in msg:
            rec.version = int(msg["version"])
        if msg.get("http_url"):
            rec.http_url = str(msg["http_url"])

    def _on_ack(self, identity: bytes, msg: dict) -> None:
        rec = self._record(msg)
        rec.version = max(rec.version, int(msg["version"]))
        if msg.get("state"):
            rec.state = str(msg["state"])
        if msg.get("http_url"):
            rec.http_url = str(msg["http_url"])
        rec.last_heartbeat = time.time()

    def _on_get_latest(self, identity: bytes, msg: dict) -> None:
        if "name" in msg:  # a worker subscribing: it says how it takes new versions
            rec = self._record(msg)
            rec.identity, rec.weights_via = identity, "slots" if msg.get("slots") else "pub"
        self._keep_slot_copy()  # a version fanned out before this worker subscribed must reach it now
        if self.latest is None:
            self._reply(identity, {"type": "latest", "version": 0})
        else:
            self.control.send_multipart([identity, WEIGHTS, *self.latest], copy=False)

    def _on_status(self, identity: bytes, msg: dict) -> None:
        self._reply(identity, {"type": "status", **self.status()})

    def _on_wait_serving(self, identity: bytes, msg: dict) -> None:
        """Reply 'serving' once every serving generation worker (and at least one) has `version` or newer."""
        self.serving_waiters.append((identity, int(msg["version"])))

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

    def _on_progress(self, identity: bytes, msg: dict) -> None:
        metrics = dict(msg.get("metrics") or {})
        self.job.update(
            {
                k: metrics.get(k)
                for k in ("step", "reward_mean", "tokens_per_s", "loss", "kl", "staleness")
                if k in metrics
            }
        )
        self._print_progress(metrics)

    def _on_done(self, identity: bytes, msg: dict) -> None:
        rec = self._record(msg)
        rec.state = "done"
        self.job["state"] = "done"
        log.info("the learner finished the job")

    def _check_new(self, version: int, base_model_id: str) -> None:
        if base_model_id != self.base_model_id:
            raise wire.WireError(f"base model id {base_model_id!r} is not this job's {self.base_model_id!r}")
        if version <= self.accepted_version:
            raise wire.WireError(f"version {version} is not newer than {self.accepted_version}")

    def _slot_workers(self) -> list[WorkerRecord]:
        return [w for w in self.workers.values() if w.weights_via == "slots" and w.identity]

    def _handle_weights(self, identity: bytes, frames: list) -> None:
        """A version uploaded as frames (a learner on another host)."""
        try:
            message = wire.decode(frames)
            self._check_new(message.version, message.base_model_id)
        except wire.WireError as e:
            log.warning("rejected a weight message: %s", e)
            self._reply(identity, {"type": "rejected", "reason": str(e)})
            return
        for w in self._slot_workers():  # same-host workers do not subscribe to the PUB socket
            self.control.send_multipart([w.identity, WEIGHTS, *frames], copy=False)
        self._accept(identity, message.version)
        self.unkept_slot = None  # superseded
        self._store(message.version, list(frames))

    def _on_weights_slot(self, identity: bytes, msg: dict) -> None:
        """A version the learner wrote into a shared-memory slot. The header is checked and the notice passed on to
        the same-host workers at once (each verifies its own copy); the coordinator's own verified copy, kept as the
        latest, is made later (`_keep_slot_copy`), so it does not compete with them for the CPU."""
        try:
            if self.slots is None:
                raise wire.WireError("this coordinator does not use shared-memory slots")
            segment = self.slots.segment(msg)
            # Header fields only: enough to route it. Each worker decodes and verifies the whole message itself, and
            # so does `_keep_slot_copy` before this version becomes the latest.
            header = wire.segment_header(segment)
            slots.check_notice(msg, header["version"])
            self._check_new(header["version"], header["base_model_id"])
        except wire.WireError as e:
            log.warning("rejected a weight slot notice: %s", e)
            self._reply(identity, {"type": "rejected", "reason": str(e)})
            return
        notice = wire.pack_control(msg)
        for w in self._slot_workers():
            self.control.send_multipart([w.identity, CONTROL, notice])
        self._accept(identity, msg["version"])
        # An older version not yet copied is superseded: only the newest is kept, but no later than its due time.
        due = self.unkept_slot[3] if self.unkept_slot else time.monotonic() + SLOT_COPY_DELAY
        self.unkept_slot = (identity, msg, segment, due)

    def _keep_slot_copy(self, force: bool = True) -> None:
        """Copy and verify the newest accepted slot version and store it as the latest: when the coordinator is idle
        (not while the workers are taking the version), when it is due, or at once when a worker asks for the
        latest. The learner only rewrites a slot SLOTS versions later, and the newest version is never that old."""
        if self.unkept_slot is None:
            return
        identity, notice, segment, due = self.unkept_slot
        if not force and time.monotonic() < due:
            return
        self.unkept_slot = None
        try:
            message = wire.decode_segment(bytearray(segment))
            slots.check_notice(notice, message.version)
        except wire.WireError as e:
            log.error(
                "adapter version %s failed the coordinator's check of its slot copy; the latest stays version %d: %s",
                notice["version"],
                self.latest_version,
                e,
            )
            self._reply(identity, {"type": "rejected", "reason": f"version {notice['version']}: {e}"})
            return
        self._store(message.version, [zmq.Frame(f) for f in message.frames])  # views of this private copy

    def _accept(self, identity: bytes, version: int) -> None:
        self.accepted_version = version
        self.job["version"] = version
        self._reply(identity, {"type": "published", "version": version})

    def _store(self, version: int, frames: list[zmq.Frame]) -> None:
        # zmq.Frames, sent again and again by reference: a buffer would be wrapped anew at every send (~10x slower
        # for a 120-tensor message).
        self.latest = frames
        self.latest_version = version
        self.weights.send_multipart(self.latest, copy=False)

    # ----- status ----------------------------------------------------------------------------------------------
    def status(self) -> dict:
        now = time.time()
        return {
            "job": {
                **self.job,
                "uptime": round(now - self.job["started"], 1),
                "latest_version": self.accepted_version,
                "oldest_serving_version": self.oldest_serving_version(),
            },
            "workers": [w.row(now) for w in self.workers.values()],
        }

    def prometheus(self) -> str:
        s = self.status()
        lines = [
            "# HELP runner_job_step Learner optimizer steps done.",
            "# TYPE runner_job_step gauge",
            f"runner_job_step {s['job']['step'] or 0}",
            "# HELP runner_latest_adapter_version Newest adapter version published.",
            "# TYPE runner_latest_adapter_version gauge",
            f"runner_latest_adapter_version {self.accepted_version}",
            "# HELP runner_worker_restarts_total Restarts per worker.",
            "# TYPE runner_worker_restarts_total counter",
        ]
        lines += [f'runner_worker_restarts_total{{worker="{w["name"]}"}} {w["restarts"]}' for w in s["workers"]]
        lines += [
            "# HELP runner_worker_version Adapter version each worker serves.",
            "# TYPE runner_worker_version gauge",
        ]
        lines += [f'runner_worker_version{{worker="{w["name"]}"}} {w["version"]}' for w in s["workers"]]
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
            f"v{m.get('version', '?')}  staleness {m.get('staleness', '-')}  [{gens}]",
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
        (it is not restarted; its next heartbeat or hello brings it back)."""
        timeout = self.config.coordinator.heartbeat_timeout
        for rec in list(self.workers.values()):
            if not rec.local and rec.state in LIVE_STATES and rec.last_heartbeat and now - rec.last_heartbeat > timeout:
                log.warning(
                    "remote worker %s missed heartbeats for %.0fs; dropping it", rec.name, now - rec.last_heartbeat
                )
                rec.state, rec.http_url = "lost", ""

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
            events = poller.poll(10 if self.unkept_slot else 100)
            for sock, _ in events:
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._handle(frames)
            self._answer_waiters()
            self._keep_slot_copy(force=not events)  # idle now, or due
            now = time.time()
            self._check_children(now)
            self._drop_lost_remotes(now)
            learner = self.workers.get("learner")
            if learner is not None and learner.state == "done" and self.watchers["learner"].exit_code() is not None:
                self.request_stop("the job is complete")
            if self.stop_reason is not None:
                return self.shutdown()

    def shutdown(self) -> int:
        """Stop in order: the learner first (it writes a final checkpoint), then the generation workers."""
        order = [n for n in self.watchers if self.workers[n].role == "learner"] + [
            n for n in self.watchers if self.workers[n].role != "learner"
        ]
        for name in order:
            w = self.watchers[name]
            w.stopping = True
            w.restart_at = None
            w.signal(signal.SIGTERM)
            deadline = time.time() + (120 if self.workers[name].role == "learner" else 30)
            while w.exit_code() is None and time.time() < deadline and self.signals < 2:
                time.sleep(0.05)
                self._drain_control()
            if w.exit_code() is None:
                log.warning("%s did not stop in time; killing it", name)
                w.signal(signal.SIGKILL)
                w.proc.wait(10)
            self.workers[name].state = "stopped"
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
        while True:
            try:
                self._handle(self.control.recv_multipart(zmq.NOBLOCK, copy=False))
            except zmq.Again:
                return


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; port 0 means a free port (handy for tests and for several jobs on one machine)."""
    if endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def _child_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def create_coordinator(config: Config, config_path: Path) -> Coordinator:
    """Check security, prepare the model if needed, bind the sockets."""
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
    run_dir = Path(config.checkpoint.dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    model_path = Path(config.model.path).resolve()
    if not (model_path / "config.json").exists():
        if not config.model.prepare:
            raise FileNotFoundError(
                f"model directory {model_path} does not exist; prepare it with "
                f"`runner models prepare` or set [model] prepare"
            )
        print(f"preparing the {config.model.prepare} model in {model_path} (first run only)", flush=True)
        subprocess.run(
            _child_cmd("runner.cli", "models", "prepare", config.model.prepare, "--out", str(model_path)), check=True
        )
    # Children get the config with absolute paths, so their working directory never matters.
    resolved = config.to_dict()
    resolved["model"]["path"], resolved["checkpoint"]["dir"] = str(model_path), str(run_dir)
    if config.checkpoint.resume:
        resume = Path(config.checkpoint.resume).resolve()
        if not (resume / "state.json").is_file() or not (resume / "adapters.safetensors").is_file():
            raise ConfigError(
                f"checkpoint.resume = {str(resume)!r} is not a checkpoint directory; expected one with "
                f"state.json and adapters.safetensors (e.g. {run_dir}/checkpoints/step_000010)"
            )
        resolved["checkpoint"]["resume"] = str(resume)
    job_info = {"model_path": str(model_path), "model_name": model_path.name, "config": resolved}
    return Coordinator(config, config_path, run_dir, model_id(model_path), job_info)


def add_generation_workers(coord: Coordinator, count: int) -> None:
    gen = coord.config.generation
    for i in range(count):
        port = gen.port + i if gen.port else 0
        coord.add_watcher(
            f"gen-{i}",
            "generate",
            _child_cmd(
                "workers.generation.worker",
                *coord.child_args(),
                "--name",
                f"gen-{i}",
                "--host",
                gen.host,
                "--port",
                str(port),
            ),
        )


def learner_command(coord: Coordinator) -> list[str]:
    """The learner process. With `[learner] hosts`, a wrapper (`workers.learner.distributed launch`) starts one rank
    per host (mlx.launch over ssh for other machines) and forwards SIGTERM to rank 0, the only rank that talks to
    this coordinator. It imports MLX, not us."""
    cmd = _child_cmd("workers.learner.main", *coord.child_args(), "--name", "learner")
    lc = coord.config.learner
    if not lc.hosts:
        return cmd
    return _child_cmd(
        "workers.learner.distributed",
        "launch",
        "--hosts",
        ",".join(lc.hosts),
        "--port",
        str(lc.ring_port),
        "--workdir",
        str(coord.run_dir / "ring"),
        "--",
        *cmd,
    )


def launch(config: Config, config_path: Path) -> int:
    """`runner launch`: prepare what is missing, start the pool, supervise it until the job ends."""
    coord = create_coordinator(config, config_path)
    (coord.run_dir / "logs").mkdir(exist_ok=True)
    file_log = logging.FileHandler(coord.run_dir / "logs" / "coordinator.log")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(file_log)
    coord.start_http()
    if config.generation.front_port:
        coord.start_router()
        print(f"OpenAI endpoint for all generation workers: {coord.job['router_url']}", flush=True)
    add_generation_workers(coord, config.generation.workers)
    coord.add_watcher("learner", "learner", learner_command(coord))
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
