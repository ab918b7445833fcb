"""The weight plane end to end: a coordinator, two real generation-worker processes, and this test process as the
learner side publishing versions, over both transports: same-host shared-memory slots (the default) and frames over
ZeroMQ (what a learner and workers on other hosts use)."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import threading

import httpx
import mlx.core as mx
import mlx_lm
import msgpack
import numpy as np
import pytest
import zmq
from helpers import poll

from runner import wire
from runner.config import build_config, load_config
from runner.control import CONTROL, ControlClient, Publisher, SlotTransport, WeightReceiver
from runner.coordinator import add_generation_workers, create_coordinator
from workers.generation.engine import verified_copy
from workers.generation.server import load_engine
from workers.learner.trainer import host_buffers
from workers.lora import LoraSpec, apply_lora, lora_layout, set_lora

SPEC = LoraSpec(rank=4, scale=20.0, keys=["self_attn.q_proj", "self_attn.v_proj"])
PROMPT = [1, 282, 280, 201, 263, 262]


def write_adapter(slots: SlotTransport, version: int, step: int, base: str, config: dict, tensors: dict) -> dict:
    """Write a version into a slot as the learner's Publisher does; returns its notice (not sent)."""
    return slots.write(version, step, base, config, host_buffers(tensors))


def encode_adapter(version: int, step: int, base: str, config: dict, tensors: dict) -> list:
    """The frames of one version, as the learner's Publisher sends them from another host."""
    return wire.encode(version, step, base, config, host_buffers(tensors))


def random_adapter(layout: dict, seed: int) -> dict[str, mx.array]:
    rng = np.random.default_rng(seed)
    return {name: mx.array(rng.normal(0, 0.5, size=shape).astype(np.float32)) for name, (shape, _) in layout.items()}


@pytest.fixture(scope="module", params=["shm", "socket"])
def job(request, tiny_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "lora": {"rank": SPEC.rank, "scale": SPEC.scale, "keys": SPEC.keys},
            "generation": {"workers": 2, "port": 0},
            "checkpoint": {"dir": str(run_dir)},
            "coordinator": {
                "control": "tcp://127.0.0.1:0",
                "weights": "tcp://127.0.0.1:0",
                "heartbeat_timeout": 30.0,
                "shared_memory": request.param == "shm",
            },
        }
    )
    coord = create_coordinator(config, run_dir / "job.toml")
    coord.start_http()
    add_generation_workers(coord, 2)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    # Same host: the workers (and this learner, as a child would) join over a Unix socket when slots are used.
    joined = coord.local_endpoint or coord.control_endpoint
    assert joined.startswith("ipc://" if request.param == "shm" else "tcp://")
    assert all(w.cmd[w.cmd.index("--join") + 1] == joined for w in coord.watchers.values())
    # This test plays the learner: the coordinator grants it the learner's role secret, as it does its own child.
    client = ControlClient(joined, "test-learner", role="learner", token=coord.grant("test-learner", "learner"))
    publisher = Publisher(client, client.hello(), {})  # the learner's own publishing path
    assert isinstance(publisher.transport, SlotTransport) == (request.param == "shm")
    try:
        yield coord, client, publisher
    finally:
        client.close()
        coord.request_stop("test over")
        thread.join(60)
        assert not thread.is_alive()
        for w in coord.watchers.values():
            assert w.exit_code() is not None, f"{w.name} still running"


def status(client):
    return client.request({"type": "status"}, ("status",), timeout=10)[1]


def serving(client, version=None):
    workers = [w for w in status(client)["workers"] if w["role"] == "generate"]
    ok = len(workers) == 2 and all(
        w["state"] == "serving" and (version is None or w["version"] == version) for w in workers
    )
    return workers if ok else None


def greedy(url: str, n_tokens: int = 8) -> tuple[list[int], int]:
    r = httpx.post(
        f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": n_tokens, "temperature": 0}, timeout=30
    )
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["token_ids"], body["policy_version"]


def reference_greedy(model, n_tokens: int = 8) -> list[int]:
    tokens = list(PROMPT)
    for _ in range(n_tokens):
        tokens.append(int(mx.argmax(model(mx.array(tokens)[None])[0, -1]).item()))
    return tokens[len(PROMPT) :]


def publish(job, version, tensors) -> str:
    try:
        job[2].publish(version, version, host_buffers(tensors))
    except RuntimeError:
        return "rejected"
    return "published"


def test_versions_reach_both_workers_and_change_output(job, tiny_model):
    coord, client, _ = job
    poll(lambda: serving(client), 120, "two serving workers")
    model, _ = mlx_lm.load(str(tiny_model))
    apply_lora(model, SPEC)
    layout = lora_layout(model)
    outputs = []
    for version in range(1, 6):
        tensors = random_adapter(layout, seed=version)
        assert publish(job, version, tensors) == "published"
        workers = poll(lambda version=version: serving(client, version), 60, f"both workers on version {version}")
        set_lora(model, tensors)
        expected = reference_greedy(model)
        for w in workers:
            tokens, served_version = greedy(w["http_url"])
            assert served_version == version
            assert tokens == expected, f"{w['name']} does not serve version {version}"
        outputs.append(tuple(expected))
    assert len(set(outputs)) > 1, "the adapter versions did not change the output at all"
    job_status = status(client)["job"]
    assert job_status["latest_version"] == 5 and job_status["oldest_serving_version"] == 5


def test_stale_and_malformed_uploads_are_rejected_and_workers_keep_serving(job):
    coord, client, _ = job
    workers = poll(lambda: serving(client), 120, "two serving workers")
    version = status(client)["job"]["latest_version"]
    rng = np.random.default_rng(0)
    # A stale version, a wrong base model, then 1,000 garbage uploads: all refused, nobody crashes.
    layout = {"x": ((2, 2), "float32")}
    assert publish(job, max(version, 1), random_adapter(layout, 0)) == "rejected"
    client.send_weights(encode_adapter(version + 1, 0, "not-this-model", {}, random_adapter(layout, 0)))
    assert client.wait_for(("published", "rejected"), timeout=30)[1]["type"] == "rejected"
    for i in range(1000):
        frames = [rng.bytes(int(rng.integers(0, 64)))] + [rng.bytes(8) for _ in range(i % 3)]
        client.send_weights(frames)
    for _ in range(1000):
        assert client.wait_for(("published", "rejected"), timeout=30)[1]["type"] == "rejected"
    assert status(client)["job"]["latest_version"] == version
    for w in workers:
        tokens, served = greedy(w["http_url"])
        assert served == version and len(tokens) == 8


def test_malformed_control_messages_are_dropped_and_everyone_keeps_serving(job):
    """1,000 malformed control messages (garbage, unknown types, missing or mistyped fields, bad framing) from a
    stranger on the control socket: each is dropped, nothing changes, and the workers keep serving."""
    coord, client, _ = job
    workers = poll(lambda: serving(client), 120, "two serving workers")
    version = status(client)["job"]["latest_version"]
    rng = np.random.default_rng(7)
    bad = [
        msgpack.packb({"type": "nope"}),
        msgpack.packb({"type": "heartbeat"}),
        msgpack.packb({"type": "ack", "name": "gen-0", "version": "7"}),
        msgpack.packb({"type": "ack", "name": "gen-0", "version": True}),
        msgpack.packb({"type": "hello", "name": 5}),
        msgpack.packb({"type": "get_latest", "slots": "yes"}),
        msgpack.packb({"type": "wait_serving"}),
        msgpack.packb({"type": "progress", "name": "learner", "metrics": [1]}),
        msgpack.packb({"type": "status", "extra": 1}),
        msgpack.packb([1, 2]),
    ]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(coord.control_endpoint)
    try:
        for i in range(1000):
            if i % 4 == 0:
                sock.send_multipart([CONTROL, rng.bytes(int(rng.integers(0, 64)))])
            elif i % 4 == 1:
                sock.send_multipart([b"X", bad[i % len(bad)]] if i % 8 == 1 else [CONTROL, bad[0], bad[1]])
            else:
                sock.send_multipart([CONTROL, bad[i % len(bad)]])
        assert not sock.poll(500), "the coordinator answered a malformed message"
    finally:
        sock.close()
    after = status(client)
    assert after["job"]["latest_version"] == version
    rows = {w["name"]: w for w in after["workers"]}
    for w in workers:
        assert rows[w["name"]]["version"] == version and rows[w["name"]]["state"] == "serving"
        tokens, served = greedy(w["http_url"])
        assert served == version and len(tokens) == 8


def test_restarted_worker_catches_up_before_serving(job):
    coord, client, _ = job
    poll(lambda: serving(client), 120, "two serving workers")
    version = status(client)["job"]["latest_version"]
    victim = coord.watchers["gen-1"]
    old_pid = victim.proc.pid
    victim.signal(9)
    restarted = poll(
        lambda: next(
            (
                w
                for w in status(client)["workers"]
                if w["name"] == "gen-1" and w["pid"] != old_pid and w["restarts"] >= 1
            ),
            None,
        ),
        60,
        "gen-1 restarted",
    )
    # From the moment it accepts HTTP traffic it must already serve the latest version.
    url = poll(
        lambda: next(
            (
                w["http_url"]
                for w in status(client)["workers"]
                if w["name"] == "gen-1" and w["http_url"] and w["pid"] == restarted["pid"]
            ),
            None,
        ),
        120,
        "gen-1 back on HTTP",
    )
    tokens, served = greedy(url)
    assert served == version
    health = httpx.get(f"{url}/health", timeout=10).json()
    assert health["adapter_version"] == version


def shm_only(job):
    if not isinstance(job[2].transport, SlotTransport):
        pytest.skip("shared-memory transport only")


def tiny_layout(tiny_model) -> dict:
    model, _ = mlx_lm.load(str(tiny_model))
    apply_lora(model, SPEC)
    return lora_layout(model)


def flip_first_tensor_byte(path) -> None:
    """Corrupt a slot in place (same file, as a torn write would): its header still routes, its checksum fails."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
        view = memoryview(mapped)
        first = next(a for a in wire.decode_segment(view, verify=False).tensors.values() if a.size)
        first.reshape(-1).view(np.uint8)[0] ^= 1
        del first
        view.release()


def test_corrupt_slot_is_rejected_by_the_coordinator_and_workers_keep_serving(job, tiny_model):
    """A slot whose tensors do not match its checksum: the coordinator verifies its own copy before it accepts a
    version, so it tells the learner, keeps its latest, and fans nothing out; the workers keep serving."""
    shm_only(job)
    coord, client, publisher = job
    workers = poll(lambda: serving(client), 120, "two serving workers")
    version = status(client)["job"]["latest_version"]
    layout = tiny_layout(tiny_model)
    notice = write_adapter(publisher.transport, version + 1, 0, publisher.base_model_id, {}, random_adapter(layout, 99))
    flip_first_tensor_byte(coord.slots_dir / f"slot-{notice['slot']}")
    client.send(notice)
    reply = client.wait_for(("published", "rejected"), timeout=30)[1]
    assert reply["type"] == "rejected" and "checksum mismatch" in reply["reason"]
    assert status(client)["job"]["latest_version"] == version
    for w in workers:
        assert greedy(w["http_url"])[1] == version
    assert status(client)["job"]["oldest_serving_version"] == version
    # The next good version goes through as usual.
    assert publish(job, version + 2, random_adapter(layout, 100)) == "published"
    poll(lambda: serving(client, version + 2), 60, f"both workers on version {version + 2}")


def test_malformed_slot_notices_are_rejected_and_workers_keep_serving(job, tiny_model):
    shm_only(job)
    coord, client, publisher = job
    workers = poll(lambda: serving(client), 120, "two serving workers")
    version = status(client)["job"]["latest_version"]
    good = write_adapter(
        publisher.transport, version + 1, 0, publisher.base_model_id, {}, random_adapter(tiny_layout(tiny_model), 5)
    )
    path = coord.slots_dir / f"slot-{good['slot']}"
    rng = np.random.default_rng(2)
    for i in range(1000):
        notice, kind = dict(good), i % 8
        if kind == 0:
            notice["slot"] = int(rng.integers(-5, 50)) if i % 16 else "0"
        elif kind == 1:
            notice["nbytes"] += int(rng.integers(1, 100))
        elif kind == 2:
            notice["version"] = version  # not newer
        elif kind == 3:
            notice["version"] = version + 2  # not what the slot holds
        elif kind == 4:
            del notice["nbytes"]
        elif kind == 5:
            notice["nbytes"] = 0.5
        elif kind == 6:  # garbage over the slot's first bytes (its header length and header)
            with open(path, "r+b") as f:
                f.write(rng.bytes(int(rng.integers(1, 64))))
        else:
            notice["version"] = True
        client.sock.send_multipart([CONTROL, msgpack.packb(notice)])  # as is: `client.send` refuses bad fields
        assert client.wait_for(("published", "rejected"), timeout=30)[1]["type"] == "rejected", notice
    assert status(client)["job"]["latest_version"] == version
    for w in workers:
        tokens, served = greedy(w["http_url"])
        assert served == version and len(tokens) == 8


def test_receiver_drops_malformed_slot_segments(tiny_model, tmp_path):
    """1,000 malformed segments announced to a worker's receiver: each is dropped, the version stays."""
    engine = load_engine(tiny_model, lora_spec=SPEC).start()
    try:
        writer, receiver = SlotTransport(tmp_path), WeightReceiver(engine, "base-x", SlotTransport(tmp_path))
        good = random_adapter(lora_layout(engine.model), 1)
        rng = np.random.default_rng(4)
        for i in range(1000):
            kind = i % 4
            notice = write_adapter(writer, 1, 1, "base-x" if kind != 3 else "base-y", {}, good)
            path = tmp_path / f"slot-{notice['slot']}"
            if kind == 0:  # a byte of the tensors flipped
                flip_first_tensor_byte(path)
            elif kind == 1:  # garbage header length
                with open(path, "r+b") as f:
                    f.write(rng.bytes(8))
            elif kind == 2:
                notice["nbytes"] -= 1
            assert receiver.offer(notice=notice) is None
        assert receiver.rejected == 1000 and engine.newest_version == 0
        notice = write_adapter(writer, 2, 2, "base-x", {}, good)
        applied = receiver.offer(notice=notice)
        assert applied is not None and applied.wait(10) and engine.version == 2
        assert receiver.offer(notice=notice) is None  # stale now
    finally:
        engine.stop()


def test_receiver_drops_malformed_messages_over_a_real_socket(tiny_model):
    """1,000 malformed weight messages arrive on a worker's SUB socket: each is dropped, the version stays."""
    engine = load_engine(tiny_model, lora_spec=SPEC).start()
    ctx = zmq.Context.instance()
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    try:
        port = pub.bind_to_random_port("tcp://127.0.0.1")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(f"tcp://127.0.0.1:{port}")
        receiver = WeightReceiver(engine, "base-x")
        layout = lora_layout(engine.model)
        good = encode_adapter(1, 1, "base-x", {}, random_adapter(layout, 1))
        # Wait for the subscription to be live (PUB drops messages sent before it is).
        poll(lambda: (pub.send(b"probe"), sub.poll(50))[1], 10, "subscription")
        sub.recv_multipart()
        rng = np.random.default_rng(1)
        bad = []
        (message,) = good
        for i in range(1000):
            frame, kind = bytearray(message), i % 5
            if kind == 0:
                frame[8:72] = rng.bytes(64)  # garbage header
                frames = [frame]
            elif kind == 1:
                frames = [frame[:8]]  # only the header length
            elif kind == 2:
                frames = [frame[: len(frame) // 2]]  # truncated
            elif kind == 3:
                frame[-1] ^= 1  # a tensor byte: the checksum fails
                frames = [frame]
            else:
                frames = [frame, b"extra"]  # a protocol 4 message is one frame
            bad.append(frames)
        for frames in bad:  # one at a time: PUB silently drops what is past its high-water mark
            pub.send_multipart(frames)
            assert sub.poll(5000)
            assert receiver.offer(sub.recv_multipart(copy=False)) is None
        assert receiver.rejected == 1000 and engine.version == 0
        pub.send_multipart(good)
        assert sub.poll(5000)
        applied = receiver.offer(sub.recv_multipart(copy=False))
        assert applied is not None and applied.wait(10) and engine.version == 1
        # Replaying the same version is stale now.
        assert receiver.offer(good) is None
    finally:
        pub.close()
        sub.close()
        engine.stop()


def test_status_cli_and_http(job):
    coord, client, _ = job
    poll(lambda: serving(client), 120, "two serving workers")
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "status", "--coordinator", coord.control_endpoint, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    rows = {w["name"]: w for w in status["workers"]}
    assert {"gen-0", "gen-1"} <= set(rows)
    for name in ("gen-0", "gen-1"):
        assert rows[name]["state"] == "serving" and rows[name]["pid"] > 0 and rows[name]["heartbeat_age"] is not None
        assert "openai" in rows[name]["capabilities"]["api"] and rows[name]["capabilities"]["device"]
        assert rows[name]["weights_via"] == ("slots" if coord.slots_dir else "pub")
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "status", "--coordinator", coord.control_endpoint],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "gen-0" in r.stdout and "serving" in r.stdout and "HEARTBEAT" in r.stdout
    url = coord.job["status_url"]
    assert httpx.get(url, timeout=10).json()["job"]["latest_version"] == status["job"]["latest_version"]
    metrics = httpx.get(url.replace("/status", "/metrics"), timeout=10).text
    assert 'runner_worker_version{worker="gen-0"}' in metrics and "runner_latest_adapter_version" in metrics
    # No coordinator at that address: a clear error, not a hang.
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "status", "--coordinator", "tcp://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1 and "no coordinator answered" in r.stderr


def test_verified_copy_of_a_segment_equals_that_of_frames(tmp_path):
    """A version through a shared-memory segment and through frames gives the same MLX arrays, dtypes and shapes,
    for every wire dtype, a scalar and an empty tensor; a flipped byte fails the check of the copy."""
    rng = np.random.default_rng(6)
    tensors = {
        "f32": mx.array(rng.standard_normal((7, 5)).astype(np.float32)),
        "f16": mx.array(rng.standard_normal((3, 9)).astype(np.float16)),
        "bf16": mx.array(rng.standard_normal((4, 4)).astype(np.float32)).astype(mx.bfloat16),
        "i8": mx.array(rng.integers(-128, 127, size=13).astype(np.int8)),
        "u32": mx.array(np.arange(6, dtype=np.uint32).reshape(2, 3)),
        "scalar": mx.array(np.float32(2.5)),
        "empty": mx.zeros((0, 4)),
    }
    writer, reader = SlotTransport(tmp_path), SlotTransport(tmp_path)
    notice = write_adapter(writer, 1, 1, "base-x", {}, tensors)
    from_segment = verified_copy(wire.decode_segment(reader.segment(notice), verify=False))
    from_frames = verified_copy(wire.decode(encode_adapter(1, 1, "base-x", {}, tensors), verify=False))
    for name, t in tensors.items():
        for copy in (from_segment[name], from_frames[name]):
            assert copy.dtype == t.dtype and copy.shape == t.shape and mx.array_equal(copy, t).item(), name
    flip_first_tensor_byte(tmp_path / f"slot-{notice['slot']}")
    with pytest.raises(wire.WireError, match="checksum mismatch"):
        verified_copy(wire.decode_segment(reader.segment(notice), verify=False))


def test_children_start_from_the_resolved_config_and_remote_workers_can_ask_for_it(job, tiny_model):
    """`RUN/config.resolved.toml` is what every local child gets with --config; `get_config` returns the same text
    for a worker joining from another host, and `welcome` carries runtime facts only."""
    coord, client, _ = job
    resolved = coord.run_dir / "config.resolved.toml"
    for w in coord.watchers.values():
        assert w.cmd[w.cmd.index("--config") + 1] == str(resolved)
    config = load_config(resolved)
    assert config.model.path == str(tiny_model.resolve()) and config.checkpoint.dir == str(coord.run_dir)
    assert config.checkpoint.resume == ""
    reply = client.request({"type": "get_config"}, ("config",), timeout=10)[1]
    assert reply["toml"] == resolved.read_text()
    welcome = ControlClient(coord.local_endpoint or coord.control_endpoint, "probe", role="cli")
    try:
        assert set(welcome.hello()) == {
            "type",
            "base_model_id",
            "latest_version",
            "weights_endpoint",
            "weights_slots",
            "supervised",
        }
    finally:
        welcome.close()


def test_a_restarted_coordinator_continues_above_the_newest_published_version(job, tiny_model):
    """The newest published version is kept in the run dir, so a coordinator started again on it (after a crash,
    before any worker is back) tells the learner to continue above it: versions never go backwards."""
    coord, client, _ = job
    version = status(client)["job"]["latest_version"]
    assert publish(job, version + 1, random_adapter(tiny_layout(tiny_model), 7)) == "published"
    reserved = int((coord.run_dir / "published_version").read_text())  # numbers are reserved a few at a time
    assert reserved >= version + 1
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "checkpoint": {"dir": str(coord.run_dir)},
            "coordinator": {"control": "tcp://127.0.0.1:0", "weights": "tcp://127.0.0.1:0", "shared_memory": False},
        }
    )
    again = create_coordinator(config, coord.run_dir / "job.toml")
    try:
        thread = threading.Thread(target=again.run, daemon=True)
        thread.start()
        probe = ControlClient(again.control_endpoint, "probe", role="cli")
        try:
            assert probe.hello()["latest_version"] == reserved
        finally:
            probe.close()
    finally:
        again.request_stop("test over")
        thread.join(30)
    assert not thread.is_alive()
