"""`runner launch` end to end, with real processes and the tiny model: the job completes, survives kill -9 of a
generation worker and of the learner, stops within the flapping limit when a worker can never start, and exits 0
after a final checkpoint on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx_lm
import pytest
from helpers import poll

from runner.control import process_running
from runner.status import fetch_status

pytestmark = pytest.mark.slow

QUICK = [
    "learner.steps=14",
    "checkpoint.interval=3",
    'coordinator.control="tcp://127.0.0.1:0"',
    'coordinator.weights="tcp://127.0.0.1:0"',
    "coordinator.heartbeat_timeout=20.0",
    "generation.port=0",
]


class Job:
    """A `runner launch` subprocess whose output is collected by a reader thread."""

    def __init__(self, config: Path, sets: list[str], cwd: Path, extra: list[str] = (), env: dict | None = None):
        args = [sys.executable, "-m", "runner.cli", "launch", str(config), *extra]
        for s in sets:
            args += ["--set", s]
        env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(
            args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.output)
            if m:
                return m
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {pattern!r} within {timeout}s; output:\n{self.output[-3000:]}")

    def finish(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(30)
        self.reader.join(10)
        return code

    def control(self) -> str:
        return self.wait_for(r"control (tcp://\S+)", 120).group(1)


@pytest.fixture
def job_dir(tmp_path, tiny_model):
    config = tmp_path / "job.toml"
    text = (Path(__file__).parent.parent / "configs" / "quickstart.toml").read_text()
    text = text.replace('path = "models/tiny"', f'path = "{tiny_model}"')
    config.write_text(text)
    return tmp_path, config


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_loadable_checkpoint(run_dir: Path, tiny_model: Path) -> int:
    latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    mlx_lm.load(str(tiny_model), adapter_path=str(latest))
    return json.loads((latest / "state.json").read_text())["step"]


def worker_pid(control: str, name: str, not_pid: int = 0) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for w in fetch_status(control)["workers"]:
            if w["name"] == name and w["pid"] and w["pid"] != not_pid and w["state"] in ("serving", "training"):
                return w["pid"]
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached a running state")


def wait_step(control: str, step: int, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (fetch_status(control)["job"]["step"] or 0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"the job never reached step {step}")


def child_pids(control: str) -> list[int]:
    """The pids of the job's processes, as `runner status` reports them."""
    return [w["pid"] for w in fetch_status(control)["workers"] if w["pid"]]


def stop_within_grace(job: Job, control: str, grace: float) -> float:
    """SIGTERM the launch; it must exit 0 within `grace` seconds (the job's [coordinator] stop_grace) with every
    child gone, none of them SIGKILLed. Returns the seconds the stop took."""
    pids = child_pids(control)
    assert pids, "no child process to stop"
    tic = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)
    try:
        code = job.proc.wait(grace)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"runner launch still running {grace}s after SIGTERM:\n{job.output[-3000:]}") from None
    took = time.monotonic() - tic
    job.finish(10)
    assert code == 0, job.output[-3000:]
    assert [pid for pid in pids if process_running(pid)] == [], "a process of the job outlived it"
    assert "did not stop within stop_grace" not in job.output  # each child reacted to SIGTERM on its own
    return took


def active_sequences(control: str) -> float:
    """Sequences in gen-0's running batch (its /metrics), 0 if it does not answer yet."""
    import httpx

    url = next((w["http_url"] for w in fetch_status(control)["workers"] if w["name"] == "gen-0"), "")
    if not url:
        return 0
    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return 0
    return float(re.search(r"^runner_active_sequences (\S+)", text, re.M).group(1))


def test_quickstart_completes_and_reward_rises(job_dir, tiny_model):
    cwd, config = job_dir
    job = Job(config, [s for s in QUICK if not s.startswith("learner.steps")] + ["learner.steps=40"], cwd)
    assert job.finish(900) == 0, job.output[-3000:]
    run_dir = cwd / "runs" / "quickstart"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    assert last > first + 0.05, f"reward did not rise: first 10 {first:.3f}, last 10 {last:.3f}"
    assert "step 40/40" in job.output and "job finished" in job.output
    assert assert_loadable_checkpoint(run_dir, tiny_model) == 40
    # The kernels were warmed before the first step, and the first step's line (and row alone) says how long it took.
    assert rows[0]["warmup_s"] >= 0 and not any("warmup_s" in r for r in rows[1:])
    step1 = next(line for line in job.output.splitlines() if line.startswith("step 1/40"))
    assert "s warm-up: kernels compile at first use)" in step1
    assert "warmed up the engine in" in (run_dir / "logs" / "gen-0.log").read_text()
    assert "warmed up the training step in" in (run_dir / "logs" / "learner.log").read_text()


@pytest.mark.parametrize(
    ("victim", "colocate"), [("gen-0", False), ("learner", False), ("learner", True)], ids=["gen-0", "learner", "both"]
)
def test_kill_9_worker_mid_run_recovers(job_dir, tiny_model, victim, colocate):
    """SIGKILL of a child mid-run: it comes back as a new process and the job completes. Colocated, the learner's
    process runs gen-0 too: both come back in the new process."""
    cwd, config = job_dir
    job = Job(config, [*QUICK, f"generation.colocate={str(colocate).lower()}"], cwd)
    try:
        control = job.control()
        wait_step(control, 4)
        pid = worker_pid(control, victim)
        os.kill(pid, signal.SIGKILL)
        # It comes back as a new process, and the job goes on to the end (read from the log once it has: a fast
        # machine finishes the remaining steps before a status poll could see the new process).
        assert job.finish(600) == 0, job.output[-3000:]
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    run_dir = cwd / "runs" / "quickstart"
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text()
    started = re.findall(rf"started {victim} \(pid (\d+)\)", coordinator_log)
    assert len(started) == 2 and int(started[0]) == pid != int(started[1]), started
    if colocate:  # gen-0 said hello from each learner process, and never had one of its own
        assert re.findall(r"gen-0 \(generate\) said hello from \S+ pid (\d+)", coordinator_log) == started
        assert "started gen-0" not in coordinator_log
    rows = metrics(run_dir)
    versions = [r["version"] for r in rows]
    assert versions == sorted(versions) and len(set(versions)) == len(versions), versions
    assert [r["step"] for r in rows] == list(range(1, 15))
    assert assert_loadable_checkpoint(run_dir, tiny_model) == 14
    assert re.search(
        rf"{victim} exited with code -9; restarting",
        (run_dir / "logs" / "coordinator.log").read_text()
        if (run_dir / "logs" / "coordinator.log").exists()
        else job.output,
    )


def test_worker_that_always_crashes_stops_the_job(job_dir, tmp_path, tiny_model):
    cwd, config = job_dir
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for f in tiny_model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"\0" * (tiny_model / "model.safetensors").stat().st_size)
    job = Job(
        config, QUICK + [f'model.path="{broken}"', "coordinator.restart_attempts=2", "coordinator.retry_in=0.1"], cwd
    )
    code = job.finish(300)
    assert code == 1, job.output[-3000:]
    m = re.search(r"worker (gen-0|learner) exited 3 times within 60s", job.output)
    assert m, job.output[-3000:]
    assert "Last lines of" in job.output
    assert "Invalid json header" in job.output.split("Last lines of", 1)[1]  # the crash's own error line


def test_sigterm_exits_0_after_final_checkpoint(job_dir, tiny_model):
    cwd, config = job_dir
    job = Job(config, [s for s in QUICK if not s.startswith("learner.steps")] + ["learner.steps=500"], cwd)
    control = job.control()
    wait_step(control, 2)
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish(300) == 0, job.output[-3000:]
    run_dir = cwd / "runs" / "quickstart"
    last_step = metrics(run_dir)[-1]["step"]
    assert 2 <= last_step < 500
    assert assert_loadable_checkpoint(run_dir, tiny_model) == last_step  # the final checkpoint is the last step


def test_sigterm_during_the_first_steps_rollouts_stops_within_the_grace(job_dir, tiny_model):
    """Long completions (max_tokens 1500 on the tiny model): SIGTERM while the first step's rollouts run. The learner
    abandons them at once, the worker cancels them, and the launch exits 0 within [coordinator] stop_grace with no
    checkpoint (no step was completed) and no process left."""
    cwd, config = job_dir
    sets = [s for s in QUICK if not s.startswith("learner.steps")] + ["learner.steps=3", "learner.max_tokens=1500"]
    job = Job(config, sets + ["coordinator.stop_grace=20"], cwd)
    try:
        control = job.control()
        poll(lambda: active_sequences(control) > 0, 180, "the first step's rollouts")
        assert (fetch_status(control)["job"]["step"] or 0) == 0
        took = stop_within_grace(job, control, 20)
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait(30)
    run_dir = cwd / "runs" / "quickstart"
    assert not (run_dir / "checkpoints" / "latest").exists()
    learner_log = (run_dir / "logs" / "learner.log").read_text()
    # (Waiting for step 1's rollouts, or, with async_depth = 1, to start step 2's while step 1's run.)
    assert re.search(
        r"stopped while waiting (for|to start) the rollouts of step [12]; stopping at step 0", learner_log
    ), learner_log[-3000:]
    print(f"stopped in {took:.1f}s")


def test_engine_thread_death_restarts_the_worker(job_dir, tmp_path, tiny_model):
    """A bad request to gen-0 while the learner's rollouts run gets a 400 and gen-0 keeps its pid. Then its engine
    thread dies on a real MLX error (the RUNNER_TEST_ENGINE_FAULT hook): the worker reports itself failed, and the
    learner's process that runs it (colocated) checkpoints and exits; the coordinator restarts it. Then
    the new gen-0's engine hangs in a step (the hook's "hang"): with no progress for [generation] stall_timeout while
    it has requests, it is reported failed and restarted too. A new gen-0 serves, and the job completes."""
    cwd, config = job_dir
    fault = tmp_path / "engine-fault"
    sets = [*QUICK, "generation.stall_timeout=5", "generation.colocate=true"]
    job = Job(config, sets, cwd, env={"RUNNER_TEST_ENGINE_FAULT": str(fault)})
    try:
        control = job.control()
        wait_step(control, 2)
        pid = worker_pid(control, "gen-0")
        url = next(w["http_url"] for w in fetch_status(control)["workers"] if w["name"] == "gen-0")
        bad = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "seed": -1}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "seed", bad.text
        wait_step(control, 3)
        assert worker_pid(control, "gen-0") == pid

        def engine_steps() -> int:  # its heartbeats (one a heartbeat interval) carry the engine's progress
            return next(w["engine_steps"] for w in fetch_status(control)["workers"] if w["name"] == "gen-0")

        poll(engine_steps, 10, "a heartbeat of gen-0 reporting engine steps")
        fault.touch()
        pid = worker_pid(control, "gen-0", not_pid=pid)  # a new process, serving
        assert not fault.exists()  # taken by the old gen-0 alone
        (tmp_path / "fault.tmp").write_text("hang")
        (tmp_path / "fault.tmp").replace(fault)  # at once: an empty fault file means a crash
        worker_pid(control, "gen-0", not_pid=pid)
        assert not fault.exists()
        assert job.finish(600) == 0, job.output[-3000:]
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait(30)
    run_dir = cwd / "runs" / "quickstart"
    gen_log = (run_dir / "logs" / "learner.log").read_text()
    assert "engine thread failed" in gen_log
    assert "the engine has made no progress for" in gen_log
    assert len(re.findall(r"gen-0 exited with code -?\d+; restarting|gen-0 reports itself failed", job.output)) >= 2
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 15))
    assert assert_loadable_checkpoint(run_dir, tiny_model) == 14


def _free_port_pair() -> int:
    """A port p with p and p + 1 free on 127.0.0.1 (ring rank i listens on ring_port + i)."""
    import socket

    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue
    raise RuntimeError("no two consecutive free ports")


def test_two_learner_ranks_train_and_stop_on_sigterm(job_dir, tiny_model):
    """`[learner] hosts` with two local ranks: the job trains (metrics reduced over both ranks, rank 0 alone
    writing), and SIGTERM stops both ranks after a final checkpoint."""
    cwd, config = job_dir
    sets = QUICK + ['learner.hosts=["localhost", "localhost"]', f"learner.ring_port={_free_port_pair()}"]
    job = Job(config, sets, cwd)
    try:
        wait_step(job.control(), 3)
        job.proc.send_signal(signal.SIGTERM)
        assert job.finish(180) == 0, job.output[-3000:]
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
    run_dir = cwd / "runs" / "quickstart"
    rows = metrics(run_dir)
    assert len(rows) >= 3 and all(r["ranks"] == 2 for r in rows)
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "forwarding signal 15 to rank 0" in log and "rank 1: stopped at step" in log, log[-3000:]
    assert assert_loadable_checkpoint(run_dir, tiny_model) == rows[-1]["step"]


def test_resume_from_a_named_checkpoint(job_dir, tiny_model):
    """`--resume DIR` continues from that checkpoint: the steps after it are redone and logged once."""
    cwd, config = job_dir
    sets = [s for s in QUICK if not s.startswith(("learner.steps", "checkpoint.interval"))]
    sets += ["checkpoint.interval=2", "checkpoint.keep_last=5"]
    assert Job(config, sets + ["learner.steps=4"], cwd).finish(300) == 0
    run_dir = cwd / "runs" / "quickstart"
    step2 = run_dir / "checkpoints" / "step_000002"
    job = Job(config, sets + ["learner.steps=5"], cwd, extra=["--resume", str(step2)])
    assert job.finish(300) == 0, job.output[-3000:]
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4, 5]
    assert f"resumed from {step2} at step 2" in (run_dir / "logs" / "learner.log").read_text()
    assert assert_loadable_checkpoint(run_dir, tiny_model) == 5
    bad = Job(config, sets, cwd, extra=["--resume", str(run_dir)])  # a run dir, not a checkpoint
    assert bad.finish(60) == 2 and "is not a checkpoint directory" in bad.output


def test_children_start_from_the_resolved_config_and_only_the_first_learner_resumes(tmp_path, tiny_model):
    """The coordinator writes RUN/config.resolved.toml (absolute paths, no resume) and starts children with --config;
    the learner's first start gets --resume CHECKPOINT, a restart does not (it resumes from its run dir's newest)."""
    from runner.config import build_config, load_config
    from runner.coordinator import add_learner, create_coordinator

    checkpoint = tmp_path / "step_000002"
    checkpoint.mkdir()
    (checkpoint / "state.json").write_text("{}")
    (checkpoint / "adapters.safetensors").write_bytes(b"")
    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "checkpoint": {"dir": str(tmp_path / "run"), "resume": str(checkpoint)},
            "coordinator": {"control": "tcp://127.0.0.1:0", "weights": "tcp://127.0.0.1:0", "shared_memory": False},
        }
    )
    coord = create_coordinator(config)
    try:
        add_learner(coord)
        learner = coord.watchers["learner"]
        first, restart = learner.proc.args, learner.cmd
        assert first[first.index("--resume") + 1] == str(checkpoint.resolve()) and "--resume" not in restart
        assert first[first.index("--config") + 1] == str(tmp_path / "run" / "config.resolved.toml")
        resolved = load_config(tmp_path / "run" / "config.resolved.toml")
        assert resolved.checkpoint.resume == "" and resolved.model.path == str(tiny_model.resolve())
    finally:
        for watcher in coord.watchers.values():
            watcher.signal(signal.SIGKILL)
            watcher.proc.wait(30)
        coord.shutdown()


def test_a_child_that_ignores_sigterm_is_killed_with_its_group_at_the_grace(tmp_path, tiny_model):
    """[coordinator] stop_grace bounds the whole stop: a child that ignores SIGTERM (as a learner deep in a long step
    would, for a while) and a process it started are SIGKILLed together when the grace runs out; one that obeys
    stops at once."""
    from runner.config import build_config
    from runner.coordinator import create_coordinator

    config = build_config(
        {
            "model": {"path": str(tiny_model)},
            "checkpoint": {"dir": str(tmp_path / "run")},
            "coordinator": {"control": "tcp://127.0.0.1:0", "weights": "tcp://127.0.0.1:0", "stop_grace": 3.0},
        }
    )
    coord = create_coordinator(config)
    grandchild = tmp_path / "grandchild.pid"
    stubborn = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"open({str(grandchild)!r}, 'w').write(str(p.pid)); time.sleep(600)"
    )
    coord.add_watcher("stubborn", "learner", [sys.executable, "-c", stubborn])
    coord.add_watcher("obedient", "generate", [sys.executable, "-c", "import time; time.sleep(600)"])
    poll(lambda: grandchild.exists() and grandchild.read_text(), 30, "the grandchild")
    pids = [coord.watchers[n].proc.pid for n in ("stubborn", "obedient")] + [int(grandchild.read_text())]
    coord.request_stop("test")
    tic = time.monotonic()
    assert coord.shutdown() == 0
    took = time.monotonic() - tic
    assert 3.0 <= took < 20, took  # the grace, then the kill (20: the default stop_grace, the bound stated)
    assert coord.watchers["obedient"].proc.returncode == -signal.SIGTERM
    assert coord.watchers["stubborn"].proc.returncode == -signal.SIGKILL
    poll(lambda: not any(process_running(p) for p in pids), 10, "the grandchild to be reaped")
