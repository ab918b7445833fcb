"""Bounds of a live coordinator, on real sockets: a frame over ZMQ_MAXMSGSIZE drops its sender's connection, remote
rows are capped and age out, the status reply fits one control message whatever the table holds, and the status
HTTP server wants the token, times idle connections out and answers 503 past its thread limit."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import msgpack
import pytest
import zmq
from helpers import poll
from zmq.utils.monitor import recv_monitor_message

from runner import messages
from runner.config import build_config
from runner.control import CONTROL, CONTROL_MAX_BYTES, hello_proof
from runner.coordinator import (
    MAX_REMOTE_WORKERS,
    STATUS_FIELD_CHARS,
    STATUS_HTTP_THREADS,
    STATUS_HTTP_TIMEOUT,
    WorkerRecord,
    create_coordinator,
)
from runner.status import fetch_status

TOKEN = "bounds-token"


def job_config(tiny_model, run_dir):
    return build_config(
        {
            "model": {"path": str(tiny_model)},
            "lora": {"rank": 4},
            "generation": {"workers": 0, "port": 0},
            "checkpoint": {"dir": str(run_dir)},
            "coordinator": {
                "control": "tcp://127.0.0.1:0",
                "weights": "tcp://127.0.0.1:0",
                "heartbeat_interval": 0.25,
                "heartbeat_timeout": 1.0,  # longer than saying all the hellos below (~0.1 s)
            },
            "security": {"api_token": TOKEN},
        }
    )


@pytest.fixture(scope="module")
def coordinator(tiny_model, tmp_path_factory):
    """A running coordinator with no children (remote peers only), its status HTTP server up."""
    run_dir = tmp_path_factory.mktemp("run")
    coord = create_coordinator(job_config(tiny_model, run_dir), run_dir / "job.toml")
    coord.start_http()
    thread = threading.Thread(target=coord.run, daemon=True)
    thread.start()
    try:
        yield coord
    finally:
        coord.request_stop("test over")
        thread.join(30)
        assert not thread.is_alive()


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def hello(endpoint: str, name: str, api_token: str | None = TOKEN) -> str:
    """Say hello as a remote generation worker on a socket of its own, proving it holds `api_token`; the reply's
    type."""
    s = dealer(endpoint)
    try:
        msg = {"type": "hello", "name": name, "role": "generate", "pid": os.getpid(), "host": "remote", "token": name}
        if api_token is not None:
            msg["proof"] = hello_proof(api_token, name, name)
        s.send_multipart([CONTROL, messages.pack(msg)])
        assert s.poll(10_000), f"no reply to hello {name!r}"
        return messages.unpack(s.recv_multipart()[1])["type"]
    finally:
        s.close()


def remote_rows(endpoint: str) -> list[dict]:
    return [w for w in fetch_status(endpoint, timeout=10)["workers"] if not w["local"]]


def test_a_frame_over_the_bound_drops_its_sender_and_changes_nothing(coordinator):
    before = fetch_status(coordinator.control_endpoint)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    monitor = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    s.connect(coordinator.control_endpoint)

    def next_event() -> int:
        assert monitor.poll(10_000), "no connection event within 10s"
        return recv_monitor_message(monitor)["event"]

    try:
        assert next_event() == zmq.EVENT_CONNECTED
        # The tiny model's adapter is far smaller than a control message: the bound is the control one.
        s.send_multipart([CONTROL, b"\0" * (CONTROL_MAX_BYTES + 1)])
        assert next_event() == zmq.EVENT_DISCONNECTED, "the coordinator kept a peer that sent an oversize frame"
    finally:
        s.disable_monitor()
        monitor.close()
        s.close()
    after = fetch_status(coordinator.control_endpoint)
    assert after["workers"] == before["workers"]
    assert after["job"]["latest_version"] == before["job"]["latest_version"]


def test_remote_rows_are_capped_and_age_out(coordinator):
    endpoint = coordinator.control_endpoint
    replies = [hello(endpoint, f"gen-remote-{i}") for i in range(MAX_REMOTE_WORKERS + 1)]
    assert replies[:MAX_REMOTE_WORKERS] == ["welcome"] * MAX_REMOTE_WORKERS
    assert replies[-1] == "rejected"  # the table is full of live rows
    assert len(remote_rows(endpoint)) == MAX_REMOTE_WORKERS
    # No heartbeats: lost after heartbeat_timeout, gone after LOST_ROW_TIMEOUTS of them.
    poll(lambda: not remote_rows(endpoint), 15, "lost remote rows to age out")
    assert hello(endpoint, "gen-after") == "welcome"


def test_the_status_reply_fits_one_message_whatever_the_table_holds(tiny_model, tmp_path):
    coord = create_coordinator(job_config(tiny_model, tmp_path / "run"), tmp_path / "job.toml")
    try:
        for i in range(5000):
            coord.workers[f"w{i}"] = WorkerRecord(
                name=f"w{i}-" + "n" * 2000,
                role="generate",
                local=False,
                host="h" * 5000,
                capabilities={"blob": "x" * 5000},
            )
        status = coord.status()
        packed = messages.pack({"type": "status", **status})  # raises if over MAX_BYTES
    finally:
        coord.shutdown()
    assert len(packed) <= messages.MAX_BYTES
    rows = status["workers"]
    assert 0 < len(rows) < 5000 and status["job"]["workers_omitted"] == 5000 - len(rows)
    assert all(len(r["name"]) <= STATUS_FIELD_CHARS and len(r["host"]) <= STATUS_FIELD_CHARS for r in rows)
    assert all("blob" not in r["capabilities"] for r in rows)
    assert len(msgpack.packb(rows[0])) < 2048


def test_status_http_wants_the_token_and_bounds_its_threads(coordinator):
    url = coordinator.job["status_url"]
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(url, headers=auth, timeout=10).json()["job"]["state"] == "running"
    host, port = url.split("//")[1].split("/")[0].split(":")
    idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(STATUS_HTTP_THREADS)]
    try:
        # Every thread is taken by a connection that sends nothing: the next one is told 503 at once.
        def busy() -> bool:
            with socket.create_connection((host, int(port)), timeout=10) as extra:
                return extra.recv(64).startswith(b"HTTP/1.0 503")

        poll(busy, 10, "a 503 from the status server with all its threads taken")
        tic = time.monotonic()
        for conn in idle:  # the server closes each idle connection after its timeout
            assert conn.recv(64) == b""
        assert time.monotonic() - tic < STATUS_HTTP_TIMEOUT + 5
    finally:
        for conn in idle:
            conn.close()
    poll(lambda: httpx.get(url, headers=auth, timeout=10).status_code == 200, 10, "the status server to recover")


def test_without_curve_a_worker_needs_the_api_token_to_say_hello(coordinator):
    """On loopback without CURVE, the job's API token (which the learner and the router send to a worker's URL) is
    what a worker the coordinator did not start must hold: without it, no row and no URL to send requests to."""
    endpoint = coordinator.control_endpoint
    assert hello(endpoint, "gen-no-proof", api_token=None) == "rejected"
    assert hello(endpoint, "gen-wrong-proof", api_token="not-the-token") == "rejected"
    names = {w["name"] for w in fetch_status(endpoint)["workers"]}
    assert not names & {"gen-no-proof", "gen-wrong-proof"}
    assert hello(endpoint, "gen-with-proof") == "welcome"
