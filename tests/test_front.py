"""A generation worker's HTTP front runs in a process of its own (workers/generation/front.py): `runner serve` is two
processes that answer as one, each ends when the other dies, and the engine's side of their pipe takes a bad message
without harm."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

import httpx
import msgpack
import pytest
import zmq
from helpers import poll

from workers.generation.engine import SamplingParams
from workers.generation.front import EngineService

START_TIMEOUT = 120.0


def _front_pid(parent: int) -> int:
    """The pid of `parent`'s child that runs the front."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == parent and b"workers.generation.front" in cmdline:
            return int(entry)
    return 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not yet reaped by its parent) is gone too
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def serve(tiny_model):
    """`runner serve` on the tiny model: (process, root URL); killed at the end, its front too."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "serve", "--model", str(tiny_model), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    front = 0
    try:
        ready, _, _ = select.select([proc.stdout], [], [], START_TIMEOUT)
        assert ready, "runner serve printed nothing"
        line = proc.stdout.readline()
        assert " on http://" in line, line
        front = _front_pid(proc.pid)
        yield proc, line.split(" on ", 1)[1].split()[0].removesuffix("/v1"), front
    finally:
        for pid in (proc.pid, front):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_is_two_processes_that_answer_as_one_and_end_together(serve):
    proc, root, front = serve
    assert front and front != proc.pid
    body = {"prompt": "Hello", "max_tokens": 5, "n": 2, "logprobs": 2}
    r = httpx.post(f"{root}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [len(c["token_ids"]) for c in choices] == [5, 5]  # the engine's tokens came through the front
    assert all(len(c["token_logprobs"]) == 5 and len(c["logprobs"]["top_logprobs"]) == 5 for c in choices)
    metrics = httpx.get(f"{root}/metrics", timeout=10).text  # the engine's counters, asked for over the pipe
    assert "runner_generation_tokens_total 10" in metrics
    assert httpx.get(f"{root}/health", timeout=10).json()["status"] == "ok"
    # The engine's process dies without a word: its front does not outlive it.
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    poll(lambda: not _alive(front), 15, "the front to exit after its engine's process died")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_exits_when_its_front_dies(serve):
    proc, root, front = serve
    os.kill(front, signal.SIGKILL)
    assert proc.wait(15) == 1  # reported, not left serving nothing


def test_the_engine_side_of_the_pipe_survives_bad_messages(tiny_engine):
    """Garbage, wrong shapes and refused requests from the front each get an answer or a log line; the service goes
    on serving the next good request."""
    engine = tiny_engine.start()
    service = EngineService(engine)
    ctx = zmq.Context.instance()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(f"ipc://{service.dir}/requests")
    pull.connect(f"ipc://{service.dir}/events")
    events: list = []

    def events_until(predicate, what):
        def ready():
            while pull.poll(0):
                events.extend(msgpack.unpackb(pull.recv(), strict_map_key=False)[1])
            return predicate()

        return poll(ready, 30, what)

    params = list(SamplingParams(max_tokens=3).__dict__.values())

    def connected() -> bool:  # events sent before our PULL socket is connected are dropped (never blocking)
        push.send(msgpack.packb(["query", 0, "health"]))
        return pull.poll(100) and any(e[:2] == ["reply", 0] for e in msgpack.unpackb(pull.recv())[1])

    try:
        poll(connected, 30, "the events pipe connected")
        push.send(b"\xc1 not msgpack")
        push.send(msgpack.packb(["no-such-op", 1]))
        push.send(msgpack.packb(["submit", 2, [1, 2], "not params", 1, False]))
        push.send(msgpack.packb(["submit", 3, [10**9], params, 1, False]))  # a token id outside the vocabulary
        push.send(msgpack.packb(["submit", 4, [5, 6, 7], params, 2, False]))
        events_until(lambda: sum(e[0] == "done" and e[1] == 4 for e in events) == 2, "request 4's two completions")
        errors = {e[1]: e for e in events if e[0] == "error"}
        assert errors[2][3] == 400 and "sampling parameters" in errors[2][2]
        assert errors[3][3] == 400 and "token ids" in errors[3][2]
        done = [e for e in events if e[0] == "done"]
        assert all(len(e[3]) == 3 and len(e[4]) == 3 and len(e[6]) == 3 for e in done)
        push.send(msgpack.packb(["query", 5, "health"]))
        events_until(lambda: any(e[0] == "reply" and e[1] == 5 for e in events), "the health reply")
        reply = next(e for e in events if e[0] == "reply")
        assert reply[2] == {"failed": False, "version": 0}
    finally:
        push.close(0)
        pull.close(0)
        service.close()
    assert not os.path.exists(service.dir)


def test_a_front_that_stops_reading_never_blocks_the_model_thread(tiny_engine):
    """Events to a front that is gone are dropped (the worker restarts it) instead of blocking generation."""
    engine = tiny_engine.start()
    service = EngineService(engine)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(f"ipc://{service.dir}/requests")  # nobody ever connects to the events side
    try:
        params = list(SamplingParams(max_tokens=2).__dict__.values())
        steps = engine.steps
        for rid in range(20):
            push.send(msgpack.packb(["submit", rid, [5, 6], params, 1, False]))
        poll(lambda: engine.stats.requests_total >= 20 and engine.steps > steps, 30, "the engine to take the work")
        deadline = time.monotonic() + 30
        while engine.stats.active_sequences or engine.stats.queued_requests:
            assert time.monotonic() < deadline, "the engine stalled on a front that does not read"
            time.sleep(0.05)
    finally:
        push.close(0)
        service.close()
