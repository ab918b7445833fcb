"""A generation worker's HTTP front, in a process of its own beside the engine's.

Why a process: on an accelerator a decode step costs the GPU little, and the Python around it is what a token waits
for. The HTTP side (parsing, validation, tokenizing, JSON) living in the engine's process would take the one GIL from
the model thread for every request; in its own process it runs beside it on another core, and the model thread keeps
only its own per-token work. The front is the same FastAPI `Server`, over a `RemoteEngine` that stands in for the
engine; the engine's process runs an `EngineService` for it.

The two talk over two ZeroMQ sockets on ipc paths in a private (0700) directory the engine's process creates, so no
other user's process can reach them. Messages are msgpack:
- front -> engine (PULL there): ["submit", rid, prompt_ids, params, n, stream], ["cancel", rid], ["query", rid,
  "health" | "metrics"], ["listening", port];
- engine -> front (PUSH there): [adapter_version, events], events gathered over one turn of the model thread's loop:
  ["token", rid, index, token_id] (streamed requests), ["done", rid, index, token_ids, logprobs, top_logprobs,
  versions, finish_reason], ["error", rid, message, http_status], ["reply", rid, value].
The front exits when the engine's process is gone (its parent changes); the worker restarts a front that dies.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import astuple
from pathlib import Path

import msgpack
import zmq
import zmq.asyncio

from workers.generation.engine import (
    Engine,
    EngineStopped,
    Overloaded,
    Request,
    SamplingParams,
)
from workers.generation.server import Server, engine_answer, load_engine, run_http

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 2**20  # a prompt of the HTTP layer's most token ids fits many times over
START_TIMEOUT = 120.0  # seconds for the front to import, load its tokenizer and bind its port


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


class EngineService:
    """The engine's side: takes requests from the front (a thread of its own, blocked in a receive) and sends their
    events back, gathered per turn of the model thread (`Engine.on_iteration`)."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.dir = tempfile.mkdtemp(prefix="runner-front-")  # mode 0700
        ctx = zmq.Context.instance()
        self._requests = ctx.socket(zmq.PULL)
        self._requests.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.bind(f"ipc://{self.dir}/requests")
        self._events = ctx.socket(zmq.PUSH)
        self._events.setsockopt(zmq.LINGER, 0)
        self._events.bind(f"ipc://{self.dir}/events")
        self._send_lock = threading.Lock()  # the model thread and the request thread both send
        self._outbox: list[list] = []  # filled and emptied by the model thread only
        self._live: dict[int, Request] = {}
        self.port: int | None = None
        self.listening = threading.Event()
        self._stop = threading.Event()
        engine.on_iteration = self._flush
        self._thread = threading.Thread(target=self._receive, name="front-requests", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.engine.on_iteration = None
        self._requests.close()
        with self._send_lock:
            self._events.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ----- the request thread --------------------------------------------------------------------------------
    def _receive(self) -> None:
        while not self._stop.is_set():
            if not self._requests.poll(200):
                continue
            try:
                message = _unpack(self._requests.recv())
            except Exception as e:  # a message this side cannot read: nothing to answer, nothing changes
                log.error("unreadable message from the HTTP front: %s", e)
                continue
            try:
                self._handle(message)
            except Exception as e:  # one bad message fails alone
                log.exception("message from the HTTP front failed")
                if isinstance(message, list) and len(message) > 1 and isinstance(message[1], int):
                    self._send([["error", message[1], f"the engine could not take this request ({e})", 500]])

    def _handle(self, message: list) -> None:
        kind = message[0]
        if kind == "submit":
            _, rid, prompt_ids, params, n, stream = message
            try:
                req = self.engine.submit(prompt_ids, _sampling_params(params), n, stream, sink=self._sink(rid))
            except Overloaded as e:
                self._send([["error", rid, str(e), 429]])
            except EngineStopped as e:
                self._send([["error", rid, str(e), 503]])
            except (ValueError, TypeError) as e:
                self._send([["error", rid, str(e), 400]])
            else:
                self._live[rid] = req
                if req.released:  # over already (the model thread's sink may have run before the line above)
                    self._live.pop(rid, None)
        elif kind == "cancel":
            req = self._live.pop(message[1], None)
            if req is not None:
                self.engine.cancel(req)
        elif kind == "query":
            _, rid, what = message
            self._send([["reply", rid, engine_answer(self.engine, what)]])
        elif kind == "listening":
            self.port = int(message[1])
            self.listening.set()
        else:
            raise ValueError(f"unknown message {kind!r}")

    # ----- the model thread ----------------------------------------------------------------------------------
    def _sink(self, rid: int):
        def sink(req: Request, event: tuple) -> None:
            kind = event[0]
            if kind == "token":
                self._outbox.append(["token", rid, event[1], event[2]])
            elif kind == "done":
                c = req.completions[event[1]]
                top = [list(d.items()) for d in c.top_logprobs]
                self._outbox.append(["done", rid, c.index, c.token_ids, c.logprobs, top, c.versions, c.finish_reason])
            else:
                self._outbox.append(["error", rid, event[1], event[2]])
            if req.released:
                self._live.pop(rid, None)

        return sink

    def _flush(self) -> None:
        if self._outbox:
            events, self._outbox = self._outbox, []
            self._send(events)

    def _send(self, events: list) -> None:
        with self._send_lock:
            if self._events.closed:
                return
            try:  # never block the model thread: a front that is gone is restarted with its requests lost anyway
                self._events.send(_pack([self.engine.version, events]), zmq.NOBLOCK)
            except zmq.Again:
                log.warning("the HTTP front is not reading; %d event(s) dropped", len(events))


def _sampling_params(fields: list) -> SamplingParams:
    """SamplingParams from its fields in order (the front sends `astuple`), each of its type or ValueError."""
    try:
        max_tokens, temperature, top_p, stop, seed, top_logprobs = fields
        return SamplingParams(
            max_tokens=int(max_tokens),
            temperature=float(temperature),
            top_p=float(top_p),
            stop=tuple(str(x) for x in stop),
            seed=None if seed is None else int(seed),
            top_logprobs=int(top_logprobs),
        )
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"sampling parameters {fields!r:.200} are not (max_tokens, temperature, top_p, stop, seed, "
            f"top_logprobs): {e}"
        ) from None


class RemoteEngine:
    """What `Server` needs of an engine, in the front's process: submit, cancel, the tokenizer, the version."""

    def __init__(self, socket_dir: str, tokenizer, context_length: int):
        self.tokenizer = tokenizer
        self.eos_ids = sorted(tokenizer.eos_token_ids)
        self.context_length = context_length
        self.version = 0
        self._dir = socket_dir
        self._ids = itertools.count(1)
        self._live: dict[int, Request] = {}
        self._rids: dict[int, int] = {}  # id(request) -> rid
        self._replies: dict[int, asyncio.Future] = {}
        self._requests = zmq.Context.instance().socket(zmq.PUSH)
        self._requests.setsockopt(zmq.LINGER, 0)
        self._requests.connect(f"ipc://{socket_dir}/requests")
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        """Start reading events (in the HTTP server's running event loop)."""
        events = zmq.asyncio.Context.instance().socket(zmq.PULL)
        events.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        events.connect(f"ipc://{self._dir}/events")
        self._reader = asyncio.get_running_loop().create_task(self._read(events))

    def send(self, message: list) -> None:
        try:
            self._requests.send(_pack(message), zmq.NOBLOCK)
        except zmq.Again:
            raise EngineStopped("the engine is not taking requests") from None

    def submit(self, prompt_ids, params: SamplingParams, n=1, stream=False, loop=None) -> Request:
        if not prompt_ids:
            raise ValueError("the prompt is empty; expected at least one token")
        rid = next(self._ids)
        req = Request(prompt_ids=list(prompt_ids), params=params, n=n, stream=stream, loop=loop)
        self.send(["submit", rid, req.prompt_ids, list(astuple(params)), n, stream])
        self._live[rid], self._rids[id(req)] = req, rid
        return req

    def cancel(self, req: Request) -> None:
        rid = self._rids.pop(id(req), None)
        if rid is not None and self._live.pop(rid, None) is not None:
            req.cancelled = True
            self.send(["cancel", rid])

    async def query(self, what: str, timeout: float = 10.0):
        rid = next(self._ids)
        self._replies[rid] = future = asyncio.get_running_loop().create_future()
        try:
            self.send(["query", rid, what])
            return await asyncio.wait_for(future, timeout)
        finally:
            self._replies.pop(rid, None)

    async def _read(self, events) -> None:
        while True:
            version, batch = _unpack(await events.recv())
            self.version = version
            for event in batch:
                try:
                    self._deliver(event)
                except Exception:  # one bad event fails alone
                    log.exception("event from the engine could not be delivered: %r", event[:2])

    def _deliver(self, event: list) -> None:
        kind, rid = event[0], event[1]
        if kind == "reply":
            future = self._replies.get(rid)
            if future is not None and not future.done():
                future.set_result(event[2])
            return
        req = self._live.get(rid)
        if req is None:  # cancelled meanwhile
            return
        if kind == "token":
            req.completions[event[2]].token_ids.append(event[3])
            req.events.put_nowait(("token", event[2], event[3]))
        elif kind == "done":
            _, _, index, token_ids, logprobs, top, versions, finish = event
            c = req.completions[index]
            c.token_ids, c.logprobs, c.versions, c.finish_reason = token_ids, logprobs, versions, finish
            c.top_logprobs = [dict(pairs) for pairs in top]
            req.events.put_nowait(("done", index))
            if all(x.finish_reason is not None for x in req.completions):
                self._forget(rid, req)
        else:
            req.events.put_nowait(("error", event[2], event[3]))
            self._forget(rid, req)

    def _forget(self, rid: int, req: Request) -> None:
        self._live.pop(rid, None)
        self._rids.pop(id(req), None)


# ----- the engine's process: start and watch the front ---------------------------------------------------------
class Front:
    """The front process and the engine's service for it. `port`: where it serves HTTP."""

    def __init__(self, service: EngineService, proc: subprocess.Popen, port: int):
        self.service, self.proc, self.port = service, proc, port

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.service.close()


def start_front(
    engine: Engine,
    model_name: str,
    host: str,
    port: int,
    *,
    api_token: str = "",
    max_tokens_default: int = 64,
    max_tokens_limit: int = 4096,
) -> Front:
    """Start the HTTP front for `engine` (loaded from a directory: the front loads its tokenizer from there) and wait
    until it accepts connections. The API token goes in the environment, never on a command line."""
    service = EngineService(engine)
    env = dict(os.environ, RUNNER_API_TOKEN=api_token)
    argv = [
        sys.executable,
        "-m",
        "workers.generation.front",
        "--sockets",
        service.dir,
        "--model",
        str(engine.model_dir),
        "--model-name",
        model_name,
        "--host",
        host,
        "--port",
        str(port),
        "--context-length",
        str(engine.context_length),
        "--max-tokens",
        str(max_tokens_default),
        "--max-tokens-limit",
        str(max_tokens_limit),
    ]
    proc = subprocess.Popen(argv, env=env)
    deadline = time.monotonic() + START_TIMEOUT
    while not service.listening.wait(0.1):
        if proc.poll() is not None or time.monotonic() > deadline:
            Front(service, proc, 0).stop()
            raise RuntimeError(f"the HTTP front did not start on {host}:{port} (exit code {proc.poll()})")
    return Front(service, proc, service.port)


def serve_standalone(args) -> int:
    """`runner serve`: one generation worker with no coordinator, its HTTP front in a process of its own."""
    engine = load_engine(args.model, args.adapter, max_batch=args.max_batch, max_queue=args.max_queue).start()
    engine.warm_up()
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    name = Path(args.model).name
    front = start_front(engine, name, args.host, args.port, api_token=args.api_token)
    try:
        print(f"serving {name} on http://{args.host}:{front.port}/v1 (adapter version {engine.version})", flush=True)
        while not stopping.wait(0.2):
            if not front.alive():
                log.error("the HTTP front exited (code %s)", front.proc.returncode)
                return 1
            if failure := engine.failure:
                log.error("%s; exiting", failure)
                return 1
    finally:
        front.stop()
        engine.stop()
    return 0


# ----- the front's process -------------------------------------------------------------------------------------
def _exit_cleanly_on_sigterm() -> None:
    """Make SIGTERM a clean exit (code 0, after our `finally` blocks). uvicorn shuts down gracefully on SIGTERM and
    then re-raises the signal to the previous handler; with the default one the process dies by the signal (exit
    -15) before the engine is stopped. Raising SystemExit(0) instead unwinds normally, also when SIGTERM arrives
    before uvicorn has installed its own handler."""

    def on_sigterm(signum, frame):
        raise SystemExit(0)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_sigterm)


def _exit_with_parent() -> None:
    """End this process at once when the engine's process is gone: no request in flight can finish without it, and
    a graceful HTTP shutdown would wait on them (a worker that loses its coordinator exits without stopping us)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.1)
        log.error("the engine's process (pid %d) is gone; exiting", parent)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a generation worker's HTTP front (started by the worker)")
    p.add_argument("--sockets", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--model-name", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--context-length", type=int, required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-tokens-limit", type=int, default=4096)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _exit_with_parent()
    _exit_cleanly_on_sigterm()
    from mlx_lm.utils import load_tokenizer

    eos = json.loads((Path(args.model) / "config.json").read_text()).get("eos_token_id")
    tokenizer = load_tokenizer(Path(args.model), eos_token_ids=eos)
    engine = RemoteEngine(args.sockets, tokenizer, args.context_length)
    server = Server(
        engine,
        args.model_name,
        max_tokens_default=args.max_tokens,
        max_tokens_limit=args.max_tokens_limit,
        api_token=os.environ.get("RUNNER_API_TOKEN", ""),
    )

    def started(uv) -> None:
        engine.start()
        engine.send(["listening", uv.servers[0].sockets[0].getsockname()[1]])

    run_http(server, args.host, args.port, on_started=started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
