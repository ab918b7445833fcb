"""A live coordinator under attack on its control socket: one real generation worker child, a granted learner that
published version 1, and an honest remote-style worker. Strangers and peers in the wrong role send every message
type of `runner.messages` with random and adversarial field values, raw garbage frames and wrong framing (a
hypothesis harness), and a handful of known attacks one by one. After each, the coordinator still answers, and the
worker table (names, roles, pids, identities, tokens, states), the latest version and the child's pid are as they
were."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from helpers import poll
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner import messages, wire
from runner.config import build_config
from runner.control import CONTROL, WEIGHTS, ControlClient, Publisher
from runner.coordinator import add_generation_workers, create_coordinator
from runner.status import fetch_status

FUZZ_EXAMPLES = 300
CONTROL_RE = re.compile(r"control (tcp://\S+)")


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fuzz-run")
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "lora": {"rank": 4, "keys": ["self_attn.q_proj"]},
            "generation": {"workers": 1, "port": 0},
            "checkpoint": {"dir": str(run_dir)},
            "coordinator": {
                "control": "tcp://127.0.0.1:0",
                "weights": "tcp://127.0.0.1:0",
                "heartbeat_timeout": 60.0,
                "shared_memory": False,
            },
        }
    )
    coord = create_coordinator(config, run_dir / "job.toml")
    add_generation_workers(coord, 1)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    learner = ControlClient(coord.control_endpoint, "learner-t", "learner", token=coord.grant("learner-t", "learner"))
    worker = ControlClient(coord.control_endpoint, "remote-w", "generate")
    try:
        publisher = Publisher(learner, learner.hello(), {})
        learner.start_heartbeats()
        worker.hello()
        worker.start_heartbeats()
        poll(lambda: coord.workers["gen-0"].state == "serving", 120, "gen-0 serving")
        publisher.publish(1, 1, tensors(0.0))  # the latest version the attacks must not move
        yield {"coord": coord, "learner": learner, "worker": worker}
    finally:
        learner.close()
        worker.close()
        coord.request_stop("test over")
        thread.join(60)
        assert not thread.is_alive()
        assert all(w.exit_code() is not None for w in coord.watchers.values())


def tensors(value: float) -> list:
    """A small adapter in wire form (its layout is not gen-0's, which drops it: only the coordinator's latest counts
    here)."""
    return [("x", "float32", (4, 4), memoryview(np.full((4, 4), value, np.float32)))]


def snapshot(coord) -> dict:
    rows = {
        name: (r.role, r.pid, r.identity, r.token, r.curve_key, r.local, r.state, r.version, r.http_url)
        for name, r in list(coord.workers.items())
    }
    return {
        "rows": rows,
        "latest": coord.latest_version,
        "floor": coord.seen_version,  # every later version must exceed it: raising it would stop the learner
        "children": {n: w.proc.pid for n, w in coord.watchers.items()},
        "running": all(w.exit_code() is None for w in coord.watchers.values()),
        "stop": coord.stop_reason,
    }


class Peer:
    """A raw DEALER on the control socket: sends anything, then asks for status on the same socket, which the
    coordinator answers only after everything sent before it (one pipe is handled in order)."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def message(self, msg) -> None:
        self.send(CONTROL, msgpack.packb(msg, use_bin_type=True))

    def settle(self, timeout: float = 10.0) -> list[dict]:
        """Status round trip; returns the control replies that came before it (the coordinator is up)."""
        self.message({"type": "status"})
        replies, deadline = [], time.monotonic() + timeout
        while self.sock.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            frames = self.sock.recv_multipart()
            if frames[0] != CONTROL:
                replies.append({"type": "W"})
                continue
            reply = messages.unpack(frames[1])
            if reply["type"] == "status":
                return replies
            replies.append(reply)
        raise AssertionError("the coordinator did not answer status")

    def close(self) -> None:
        self.sock.close()


def refused(live, msg: dict, sender: Peer | None = None) -> list[dict]:
    """Send `msg` (a stranger's unless `sender`), check that nothing changed; return the replies."""
    coord = live["coord"]
    before = snapshot(coord)
    peer = sender or Peer(coord.control_endpoint)
    try:
        peer.message(msg)
        replies = peer.settle()
    finally:
        if sender is None:
            peer.close()
    assert snapshot(coord) == before
    return replies


def reasons(replies: list[dict]) -> str:
    return " | ".join(r.get("reason", r["type"]) for r in replies)


# ---------------------------------------------------------------------------------------- known attacks, one by one


@pytest.mark.parametrize("with_pid", [False, True])
def test_a_strangers_failed_heartbeat_changes_nothing(live, with_pid):
    coord = live["coord"]
    msg = {"type": "heartbeat", "name": "gen-0", "state": "failed"}
    if with_pid:
        msg["pid"] = coord.workers["gen-0"].pid
    replies = refused(live, msg)
    assert replies == [{"type": "heartbeat", "name": "coordinator", "rejoin": True}]
    time.sleep(0.3)  # a loop turn of the coordinator: it would SIGKILL gen-0 now, had it believed the beat
    assert coord.workers["gen-0"].state == "serving" and coord.watchers["gen-0"].exit_code() is None


def test_children_get_their_role_secret_in_the_environment_only(live):
    coord = live["coord"]
    secret, _ = coord.grants["gen-0"]
    pid = coord.watchers["gen-0"].proc.pid
    assert coord.workers["gen-0"].token == secret  # its hello carried it
    if Path("/proc").is_dir():  # what every user of the machine sees (ps)
        assert secret not in Path(f"/proc/{pid}/cmdline").read_text()
    assert secret not in " ".join(coord.watchers["gen-0"].cmd)
    assert secret not in str(coord.status())  # nor in status, which every peer may read


def test_hello_under_a_live_name_is_refused(live):
    replies = refused(live, {"type": "hello", "name": "remote-w", "token": "mine-now", "pid": 1})
    assert "second hello under a live name is refused" in reasons(replies)
    replies = refused(live, {"type": "hello", "name": "gen-0", "token": "mine-now"})
    assert "reserved for a process this coordinator started" in reasons(replies)
    replies = refused(live, {"type": "hello", "name": "someone", "role": "learner", "token": "x"})
    assert "needs a learner key" in reasons(replies)
    ahead = {"type": "hello", "name": "ahead", "token": "x", "version": live["coord"].latest_version + 1}
    assert "newer than any this job published" in reasons(refused(live, ahead))
    # `runner worker generate` under a live name stops at once with one line (a supervisor would retry it).
    cmd = [sys.executable, "-m", "runner.cli", "worker", "generate", "--join", live["coord"].control_endpoint]
    worker = subprocess.run([*cmd, "--name", "remote-w", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2 and "refused hello as 'remote-w'" in worker.stderr, worker.stderr[-2000:]
    assert "Traceback" not in worker.stderr
    # A worker restarted under the same name (launchd): once its old process is gone, the new one may say hello.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    coord, peer = live["coord"], Peer(live["coord"].control_endpoint)
    try:
        for token, pid in (("first", int(gone.stdout)), ("second", os.getpid())):
            hello = {"type": "hello", "name": "restarted-w", "token": token, "pid": pid, "host": socket.gethostname()}
            peer.message(hello)
            assert [r["type"] for r in peer.settle()] == ["welcome"]
            assert coord.workers["restarted-w"].pid == pid
    finally:
        peer.close()


def test_learner_messages_from_others_are_refused(live):
    coord, learner, worker = live["coord"], live["learner"], live["worker"]
    frames = wire.encode(2, 2, coord.base_model_id, {}, tensors(1.0))
    slot = {"type": "weights_slot", "slot": 2, "version": 2, "nbytes": 100}
    attacks = [
        {"type": "progress", "name": "learner-t", "metrics": {"step": 99}},
        {"type": "progress", "name": "learner-t", "metrics": {"step": 99}, "token": "guess"},
        {"type": "done", "name": "learner-t"},
        {"type": "wait_serving", "version": 1},
        slot,
    ]
    peer = Peer(coord.control_endpoint)  # a stranger, then the honest worker's own hello socket (wrong role)
    try:
        for sender in (peer, None):
            for msg in attacks:
                if sender is None:  # the worker names itself, with its own token: still not the learner
                    msg = {**msg, "name": worker.name, "token": worker.token} if "name" in msg else msg
                    with worker._lock:
                        before = snapshot(coord)
                        worker.send(msg)
                        reply = worker.wait_for(("rejected",), timeout=10)[1]
                    assert snapshot(coord) == before
                    assert "only from the learner" in reply["reason"], reply
                else:
                    assert "learner" in reasons(refused(live, msg, peer))
        before = snapshot(coord)
        peer.send(WEIGHTS, *[bytes(f) for f in frames])
        assert "only from the learner" in reasons(peer.settle())
        assert snapshot(coord) == before
    finally:
        peer.close()
    assert coord.job["step"] != 99 and coord.job["state"] == "running"
    # Nor may the learner act as a worker: an ack from it, with its own token, is refused.
    before = snapshot(coord)
    assert learner.request({"type": "ack", "name": learner.name, "version": 1}, ("rejected",), timeout=10)
    assert snapshot(coord) == before
    # The learner itself may: the same progress from it counts.
    learner.send({"type": "progress", "name": learner.name, "metrics": {"step": 7, "loss": 0.5}})
    poll(lambda: coord.job["step"] == 7, 10, "the learner's progress")


def test_bad_metrics_and_oversize_replies_change_nothing(live):
    coord, learner = live["coord"], live["learner"]
    # The crash of issue 23: a string where the progress line formats a number, even from the learner itself.
    bad = msgpack.packb(
        {"type": "progress", "name": learner.name, "token": learner.token, "metrics": {"reward_mean": "x"}}
    )
    before = snapshot(coord)
    learner.sock.send_multipart([CONTROL, bad])
    learner.send({"type": "status"})
    learner.wait_for(("status",), timeout=10)
    assert snapshot(coord) == before and coord.job["reward_mean"] != "x"
    # An unknown field named by nearly 1 MiB: its reason would quote it whole, over MAX_BYTES; answered short.
    replies = refused(live, {"type": "weights_slot", "slot": 0, "version": 1, "x" * (messages.MAX_BYTES - 200): 1})
    assert len(replies) == 1 and "unknown field" in replies[0]["reason"] and len(replies[0]["reason"]) < 2000


# ---------------------------------------------------------------------------------------- the fuzz harness

NAMES = ["gen-0", "learner-t", "remote-w", "coordinator", "", "x" * 129, "../etc", "fresh-1"]
ANY = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
ADVERSARIAL = {
    "name": st.sampled_from(NAMES) | st.text(max_size=20),
    "version": st.sampled_from([0, 1, 2, 10**6, 2**53 - 1, 2**53, -1]) | ANY,
    "pid": st.sampled_from([0, 1, os.getpid(), 2**31]) | ANY,
    "state": st.sampled_from(["failed", "serving", "stopped", "done", "lost"]) | ANY,
    "token": st.sampled_from(["", "guess", "0" * 32, "t" * 129]) | ANY,
    "http_url": st.sampled_from(["http://evil:1", "file:///etc/passwd", "http://" + "a" * 3000]) | ANY,
    "metrics": st.dictionaries(st.sampled_from(["step", "loss", "reward_mean", "eval_reward", "x"]), ANY) | ANY,
    "slot": st.integers(-1, 5) | ANY,
}


@st.composite
def control_message(draw):
    kind = draw(st.sampled_from(sorted(messages.MESSAGES)))
    fields = messages.MESSAGES[kind]
    msg = {"type": kind}
    for field in fields:
        if draw(st.booleans()):
            msg[field] = draw(ADVERSARIAL.get(field, ANY))
    if draw(st.integers(0, 9)) == 0:
        msg[draw(st.text(max_size=8))] = draw(ANY)  # an unknown field
    return msg


FRAMES = st.one_of(
    control_message().map(lambda m: [CONTROL, msgpack.packb(m, use_bin_type=True, unicode_errors="surrogatepass")]),
    st.lists(st.binary(max_size=64), min_size=1, max_size=4),  # garbage and wrong framing
    st.tuples(st.sampled_from([CONTROL, WEIGHTS, b"", b"X"]), st.binary(max_size=256)).map(list),
    st.just("valid-weights"),  # a whole, valid version 2 from someone who is not the learner
)


def test_fuzzed_messages_from_strangers_and_wrong_roles_change_nothing(live, request, caplog):
    coord, worker = live["coord"], live["worker"]
    stranger = Peer(coord.control_endpoint)
    valid = [bytes(f) for f in wire.encode(2, 2, coord.base_model_id, {}, tensors(1.0))]
    fuzzed = {"examples": 0, "messages": 0}
    before = snapshot(coord)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(batch=st.lists(FRAMES, min_size=1, max_size=3), as_worker=st.booleans())
    def attack(batch, as_worker):
        fuzzed["examples"] += 1
        for frames in batch:
            frames = [WEIGHTS, *valid] if frames == "valid-weights" else frames
            fuzzed["messages"] += 1
            if as_worker:  # the honest worker's hello socket: a peer in the worker role, not the learner
                with worker._lock:
                    worker.sock.send_multipart(frames)
            else:
                stranger.send(*frames)
        if as_worker:
            worker.request({"type": "status"}, ("status",), timeout=10)
            worker._inbox.clear()
        else:
            stranger.settle()
        after = snapshot(coord)
        new = set(after["rows"]) - set(before["rows"])
        assert {n: r for n, r in after["rows"].items() if n not in new} == before["rows"]
        assert all(messages.NAME.fullmatch(n) and n not in before["rows"] for n in new)  # a fresh worker said hello
        assert {k: v for k, v in after.items() if k != "rows"} == {k: v for k, v in before.items() if k != "rows"}

    try:
        attack()
    finally:
        stranger.close()
        print(f"\nfuzzed the live coordinator with {fuzzed['examples']} examples ({fuzzed['messages']} messages)")
        request.node.user_properties.append(("examples", fuzzed["examples"]))
    assert fuzzed["examples"] >= FUZZ_EXAMPLES // 2
    # Hundreds of bad messages from two peers: logged once per peer, not once per message.
    noisy = [r for r in caplog.records if r.name == "runner.coordinator" and r.levelno >= logging.WARNING]
    assert 1 <= sum("peer" in r.getMessage() for r in noisy) <= 2, [r.getMessage() for r in noisy]
    assert coord.latest_version == 1


# ---------------------------------------------------------------------------------------- a real launch, attacked


@pytest.mark.slow
def test_a_launched_job_attacked_mid_run_finishes_untouched(tiny_model, tmp_path):
    """`runner launch` of a short quickstart; at step 2 a stranger sends each known attack (failed heartbeats for
    both children with and without their pids, hellos under their names, the learner's progress with a string metric,
    done, weights as frames and as a slot notice, a reply-quoting field of nearly 1 MiB). The children keep their
    pids and restart counts, and the job finishes every step with versions in order."""
    text = (Path(__file__).parent.parent / "configs" / "quickstart.toml").read_text()
    config = tmp_path / "job.toml"
    config.write_text(text.replace('path = "models/tiny"', f'path = "{tiny_model}"'))
    sets = ["learner.steps=8", "coordinator.heartbeat_timeout=20.0", "generation.port=0"]
    sets += ['coordinator.control="tcp://127.0.0.1:0"', 'coordinator.weights="tcp://127.0.0.1:0"']
    args = [sys.executable, "-m", "runner.cli", "launch", str(config), *(x for s in sets for x in ("--set", s))]
    job = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in job.stdout), daemon=True)
    reader.start()
    try:
        endpoint = poll(lambda: next((m.group(1) for m in map(CONTROL_RE.search, lines) if m), None), 120, "control")
        poll(lambda: (fetch_status(endpoint)["job"]["step"] or 0) >= 2, 120, "step 2")
        before = {w["name"]: (w["pid"], w["restarts"]) for w in fetch_status(endpoint)["workers"]}
        peer = Peer(endpoint)
        try:
            for name, (pid, _) in before.items():
                peer.message({"type": "heartbeat", "name": name, "state": "failed"})
                peer.message({"type": "heartbeat", "name": name, "state": "failed", "pid": pid, "token": "x"})
                peer.message({"type": "hello", "name": name, "token": "mine", "pid": os.getpid()})
            peer.message({"type": "progress", "name": "learner", "metrics": {"reward_mean": "x", "step": 99}})
            peer.message({"type": "done", "name": "learner", "token": "guess"})
            peer.message({"type": "weights_slot", "slot": 0, "version": 10**6, "nbytes": 64})
            peer.message({"type": "weights_slot", "x" * (messages.MAX_BYTES - 200): 1})
            peer.send(WEIGHTS, *[bytes(f) for f in wire.encode(10**6, 0, "any", {}, tensors(1.0))])
            replies = peer.settle()
        finally:
            peer.close()
        # Each answered with its rule (the bad metrics are dropped at unpack, the heartbeats told to say hello).
        said = reasons(replies)
        for rule in ("reserved for a process this coordinator started", "'done' naming 'learner' counts only from"):
            assert rule in said
        assert said.count("only from the learner") == 2 and "unknown field" in said
        assert replies.count({"type": "heartbeat", "name": "coordinator", "rejoin": True}) == 2 * len(before)
        time.sleep(1.0)  # a few coordinator loop turns: a believed "failed" would have killed a child by now
        after = {w["name"]: (w["pid"], w["restarts"]) for w in fetch_status(endpoint)["workers"]}
        assert after == before
        assert job.wait(300) == 0, "\n".join(lines[-40:])
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(30)
        reader.join(10)
    output = "\n".join(lines)
    assert "step 8/8" in output and "job finished" in output
    rows = [json.loads(line) for line in (tmp_path / "runs" / "quickstart" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["version"] for r in rows] == sorted({r["version"] for r in rows})
