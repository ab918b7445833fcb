"""Liveness and one job per run directory, with real `runner launch` processes: a job with a 6 s heartbeat interval
trains without its children declaring it silent, a second launch on the same run directory is refused at once with
the holder's pid, a child of a launch that no longer holds the lock exits, and a follower rank blocked in a
collective exits when rank 0 is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import poll
from test_distributed import _env, free_port_pair, ring  # noqa: F401 -- ring: skip where the backend cannot run
from test_launch import Job, metrics

from runner.control import EXIT_ORPHANED
from runner.rundir import JOB_ENV, LOCK_FILE, check_job, lock_run_dir
from workers.learner import distributed as dist

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


def test_slow_heartbeats_and_a_second_launch_on_the_run_dir(tmp_path, tiny_model):
    config = tmp_path / "job.toml"
    text = (REPO / "configs" / "quickstart.toml").read_text().replace('path = "models/tiny"', f'path = "{tiny_model}"')
    config.write_text(text)
    sets = [
        "learner.steps=6",
        "checkpoint.interval=3",
        'coordinator.control="tcp://127.0.0.1:0"',
        'coordinator.weights="tcp://127.0.0.1:0"',
        "coordinator.heartbeat_interval=6.0",
        "coordinator.heartbeat_timeout=15.0",
        "generation.port=0",
    ]
    job = Job(config, sets, tmp_path)
    try:
        job.control()  # the job is up: its run dir is locked
        second = subprocess.run(
            [sys.executable, "-m", "runner.cli", "launch", str(config), *[a for s in sets for a in ("--set", s)]],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 2, second.stderr
        errors = [line for line in second.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and f"pid {job.proc.pid}" in errors[0], second.stderr
        assert job.finish(300) == 0, job.output[-3000:]
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    run_dir = tmp_path / "runs" / "quickstart"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    assert "silent" not in learner_log and "restarting" not in job.output, learner_log[-3000:]
    assert lock_run_dir(run_dir) >= 0  # released when the launch exited


def test_a_child_exits_once_its_launch_no_longer_holds_the_run_dir(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; from runner.rundir import lock_run_dir; lock_run_dir({str(tmp_path)!r});"
            " print('locked', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        ours = {JOB_ENV: f"{holder.pid}:{tmp_path / LOCK_FILE}"}
        assert check_job(ours) is None
        assert "another" in check_job({JOB_ENV: f"1:{tmp_path / LOCK_FILE}"})  # held, but by another launch
    finally:
        holder.kill()
        holder.wait(10)
    assert "no longer holds" in check_job(ours)
    # A learner started by that launch writes nothing and exits as an orphan.
    child = subprocess.run(
        [sys.executable, "-m", "workers.learner.main", "--config", str(tmp_path / "none.toml"), "--join", "ipc:///x"],
        env={**os.environ, **ours},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == EXIT_ORPHANED and "no longer holds" in child.stderr, child.stderr[-2000:]


# Rank 0 hands out its beat address and sleeps; rank 1 watches it and blocks in a collective rank 0 never joins.
FOLLOWER_SCRIPT = """
import threading, time
from workers.learner import distributed as dist
group = dist.init()
if dist.is_writer(group):
    dist.broadcast_json(dist.rank0_beats(group), group)
    print("rank 0 up", flush=True)
    time.sleep(120)
else:
    dist.watch_rank0(dist.broadcast_json(None, group), 2.0, threading.Event())
    print("rank 1 waiting", flush=True)
    dist.broadcast_json(None, group)
"""


@pytest.mark.usefixtures("ring")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "silent"])
def test_a_follower_blocked_in_a_collective_exits_when_rank_0_dies_or_goes_silent(tmp_path, sig):
    """Killed, rank 0's sockets close (the ring itself may fail the collective first); stopped (a hung process, or
    a host gone from the network) they stay open and only its silence tells: the follower exits either way."""
    port = free_port_pair()
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in (port, port + 1)]))
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FOLLOWER_SCRIPT],
            stdin=subprocess.DEVNULL,
            stdout=open(logs[r], "w"),
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_env(**dist.local_rank_env(r, hostfile)),
            start_new_session=True,
        )
        for r in range(2)
    ]
    try:
        poll(lambda: "rank 1 waiting" in logs[1].read_text() or procs[1].poll() is not None, 120, "rank 1 to block")
        assert "rank 1 waiting" in logs[1].read_text(), logs[1].read_text()[-2000:]
        procs[0].send_signal(sig)
        tic = time.monotonic()
        code = procs[1].wait(30)
        took = time.monotonic() - tic
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
    out = logs[1].read_text()
    print(f"the follower exited {took:.1f}s after rank 0 got {sig.name}, exit code {code}")
    assert code != 0, out[-2000:]
    if sig == signal.SIGSTOP:
        assert code == EXIT_ORPHANED and "exiting, as this rank follows it" in out, out[-2000:]
