"""A CURVE-secured coordinator: its own local workers join, a remote-style worker with an authorized key joins and
serves, a stranger's key gets nothing (no welcome, no weights), the HTTP API wants the bearer token, and an open
non-loopback bind is refused before anything starts."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import httpx
import pytest
from helpers import poll

from runner.config import ConfigError, build_config
from runner.control import ControlClient, CoordinatorGone, HelloRefused
from runner.coordinator import add_generation_workers, create_coordinator

TOKEN = "s3cret-token"


@pytest.fixture
def secure_job(tiny_model, tmp_path, keys):
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "lora": {"rank": 4},
            "generation": {"workers": 1, "port": 0},
            "checkpoint": {"dir": str(tmp_path / "run")},
            "coordinator": {"control": "tcp://127.0.0.1:0", "weights": "tcp://127.0.0.1:0", "heartbeat_timeout": 3.0},
            "security": {
                "curve_secret_key": str(keys["server_secret"]),
                "curve_public_key": str(keys["server_public"]),
                "authorized_keys": str(keys["authorized"]),
                "api_token": TOKEN,
            },
        }
    )
    coord = create_coordinator(config, tmp_path / "job.toml")
    add_generation_workers(coord, 1)
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    procs = []
    try:
        yield coord, procs
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        coord.request_stop("test over")
        thread.join(60)
        assert not thread.is_alive()


def status(client):
    return client.request({"type": "status"}, ("status",), timeout=10)[1]


def test_curve_admits_known_keys_only(secure_job, keys, tiny_model, caplog):
    coord, procs = secure_job
    admin = ControlClient(
        coord.control_endpoint,
        "admin",
        "cli",
        curve={"secret": keys["worker_secret"], "server_public": keys["server_public"]},
    )
    try:
        # The coordinator's own child (which uses the coordinator's key) joins and serves.
        poll(
            lambda: any(w["name"] == "gen-0" and w["state"] == "serving" for w in status(admin)["workers"]),
            120,
            "gen-0 serving",
        )
        # A worker started by hand with an authorized key joins like a remote Mac would.
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "runner.cli",
                    "worker",
                    "generate",
                    "--join",
                    coord.control_endpoint,
                    "--key",
                    str(keys["worker_secret"]),
                    "--server-key",
                    str(keys["server_public"]),
                    "--name",
                    "remote-1",
                    "--port",
                    "0",
                ],
                env={**os.environ, "RUNNER_API_TOKEN": TOKEN},  # the coordinator never sends the token
            )
        )
        remote = poll(
            lambda: next(
                (w for w in status(admin)["workers"] if w["name"] == "remote-1" and w["state"] == "serving"), None
            ),
            120,
            "remote-1 serving",
        )
        assert remote["local"] is False
        # Its HTTP API requires the bearer token.
        url = remote["http_url"]
        assert (
            httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30).status_code == 401
        )
        ok = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": "hi", "max_tokens": 2},
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        )
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["token_ids"]) == 2
        # The coordinator never sends the token: a worker that brings none stops before it loads anything.
        no_token = subprocess.run(
            [sys.executable, "-m", "runner.cli", "worker", "generate", "--join", coord.control_endpoint]
            + ["--key", str(keys["worker_secret"]), "--server-key", str(keys["server_public"]), "--name", "remote-2"],
            env={k: v for k, v in os.environ.items() if k != "RUNNER_API_TOKEN"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert no_token.returncode == 2, no_token.stderr[-3000:]
        assert "requires its [security] api_token, which the coordinator never sends" in no_token.stderr
        assert TOKEN not in no_token.stdout + no_token.stderr
        # A remote worker that dies is not restarted (nobody watches its process) but leaves routing.
        procs[-1].kill()
        procs[-1].wait(30)
        lost = poll(
            lambda: next(
                (w for w in status(admin)["workers"] if w["name"] == "remote-1" and w["state"] == "lost"), None
            ),
            30,
            "remote-1 lost",
        )
        assert lost["http_url"] == ""
        assert coord.oldest_serving_version() is not None  # gen-0 still serves; the job goes on
    finally:
        admin.close()

    # Roles come from where a key sits in authorized_keys: a worker's key may not join as the learner, an
    # observer's (authorized_keys/observers/) reads status and may not join at all; a learner's may.
    def client(name, role, secret):
        return ControlClient(
            coord.control_endpoint, name, role, curve={"secret": secret, "server_public": keys["server_public"]}
        )

    for name, role, secret, rule in [
        ("fake-learner", "learner", keys["worker_secret"], "needs a learner key"),
        ("watcher", "generate", keys["observer_secret"], "needs a worker key"),
    ]:
        peer = client(name, role, secret)
        try:
            with pytest.raises(HelloRefused, match=rule):
                peer.hello(timeout=10)
            assert status(peer)["job"]["state"] == "running"  # every admitted key may read status
        finally:
            peer.close()
    learner = client("remote-learner", "learner", keys["learner_secret"])
    try:
        assert learner.hello(timeout=10)["supervised"] is False
        assert coord.workers["remote-learner"].role == "learner"
    finally:
        learner.close()

    # A stranger's key: the handshake fails, so no welcome, no status, and no weights ever arrive.
    stranger = ControlClient(
        coord.control_endpoint,
        "stranger",
        "generate",
        curve={"secret": keys["stranger_secret"], "server_public": keys["server_public"]},
    )
    sub = stranger.subscribe_weights(coord.weights_endpoint)
    try:
        with pytest.raises(CoordinatorGone):
            stranger.request({"type": "hello", "name": "stranger", "role": "generate"}, ("welcome",), timeout=3)
        assert not sub.poll(500)
        assert "stranger" not in [w["name"] for w in coord.status()["workers"]]
        assert "refused CURVE client" in caplog.text
    finally:
        sub.close()
        stranger.close()
    # And a client without CURVE at all is ignored too.
    plain = ControlClient(coord.control_endpoint, "plain", "cli")
    try:
        with pytest.raises(CoordinatorGone):
            plain.request({"type": "status"}, ("status",), timeout=2)
    finally:
        plain.close()


def test_open_non_loopback_bind_is_refused(tiny_model, tmp_path):
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "checkpoint": {"dir": str(tmp_path / "run")},
            "coordinator": {"control": "tcp://0.0.0.0:0", "weights": "tcp://127.0.0.1:0"},
        }
    )
    with pytest.raises(ConfigError, match="0.0.0.0"):
        create_coordinator(config, tmp_path / "job.toml")
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--host", "127.0.0.1"], "is a loopback address, unreachable from the coordinator at 192.0.2.1"),
        (["--host", "0.0.0.0", "--advertise-url", "http://0.0.0.0:8000"], "is a wildcard address"),
        (["--host", "0.0.0.0", "--advertise-url", "localhost:8000"], "is not an http(s)://HOST[:PORT] URL"),
    ],
)
def test_a_worker_refuses_to_advertise_an_address_the_coordinator_cannot_reach(flags, reason):
    """Refused at start, in one line, before it connects or loads anything (192.0.2.1 is TEST-NET: nobody there)."""
    cmd = [sys.executable, "-m", "runner.cli", "worker", "generate", "--join", "tcp://192.0.2.1:5555", *flags]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and reason in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
