"""Run data that survives a small /dev/shm and broken checkpoints, end to end with `runner launch` and the tiny
model: a job in a private 4 MiB /dev/shm (a mount namespace of its own) sends its adapter versions over the socket
once shared memory is short, and completes; with every checkpoint's adapter then cut one byte short, the relaunched
job stops with an error naming each checkpoint and why, and metrics.jsonl keeps its rows."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from test_launch import Job, metrics

from workers.learner import checkpoint as ck

pytestmark = pytest.mark.slow

SETS = [
    "learner.steps=4",
    "checkpoint.interval=2",
    "checkpoint.keep_last=5",
    "lora.rank=192",  # 1.5 MiB a version: without the check, the third would not fit (SIGBUS)
    'coordinator.control="tcp://127.0.0.1:0"',
    'coordinator.weights="tcp://127.0.0.1:0"',
    "coordinator.heartbeat_timeout=20.0",
    "generation.port=0",
]
SMALL_SHM = "mount -t tmpfs -o size=4m tmpfs /dev/shm"


def can_mount_a_private_shm() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", SMALL_SHM], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class SmallShmJob(Job):
    """`runner launch` in a mount namespace of its own whose /dev/shm is a 4 MiB tmpfs."""

    def __init__(self, config: Path, sets: list[str], cwd: Path):
        launch = [sys.executable, "-m", "runner.cli", "launch", str(config)] + [a for s in sets for a in ("--set", s)]
        shell = f"{SMALL_SHM} && exec {shlex.join(launch)}"
        self.proc = subprocess.Popen(
            ["unshare", "-m", "sh", "-c", shell], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()


@pytest.fixture(scope="module")
def small_shm_run(tmp_path_factory, tiny_model):
    """A finished 4-step job launched in a private 4 MiB /dev/shm: (its directory, the config, the launch output)."""
    if not can_mount_a_private_shm():
        pytest.skip("needs root to mount a private tmpfs on /dev/shm (unshare -m)")
    cwd = tmp_path_factory.mktemp("shm")
    config = cwd / "job.toml"
    text = (Path(__file__).parent.parent / "configs" / "quickstart.toml").read_text()
    config.write_text(text.replace('path = "models/tiny"', f'path = "{tiny_model}"'))
    job = SmallShmJob(config, SETS, cwd)
    code = job.finish(300)
    assert code == 0, job.output[-3000:]
    return cwd, config, job.output


def test_a_4_mib_dev_shm_still_runs_the_job_over_the_socket(small_shm_run):
    cwd, _, _ = small_shm_run
    run_dir = cwd / "runs" / "quickstart"
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3, 4]
    log = (run_dir / "logs" / "learner.log").read_text()
    assert "MiB free; a version needs" in log and "go over the control socket from now on" in log, log[-3000:]
    assert log.count("go over the control socket") == 1  # said once; the later versions went as frames
    assert "/dev/shm" in log


def test_corrupt_checkpoints_stop_the_job_and_keep_metrics(small_shm_run):
    cwd, config, _ = small_shm_run
    run_dir = cwd / "runs" / "quickstart"
    steps = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert steps == ["step_000002", "step_000004"]
    for name in steps:  # every adapter one byte short
        adapter = run_dir / "checkpoints" / name / "adapters.safetensors"
        adapter.write_bytes(adapter.read_bytes()[:-1])
    rows = (run_dir / "metrics.jsonl").read_text()
    job = Job(config, [s for s in SETS if not s.startswith("learner.steps")] + ["learner.steps=6"], cwd)
    assert job.finish(300) == 1, job.output[-3000:]
    out = job.output
    assert "worker learner stopped the job (exit code 4)" in out and "restarting" not in out, out[-3000:]
    assert "can be resumed from" in out
    for name in steps:
        assert f"{name}: adapters.safetensors is truncated or corrupt" in out, out[-3000:]
    assert (run_dir / "metrics.jsonl").read_text() == rows  # not a byte lost, none added
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == steps  # left for a person to inspect


def test_the_same_failure_on_the_same_input_twice_is_a_reason_to_stop(tmp_path):
    def fail(message: str) -> ValueError:
        return ValueError(message)

    where = {"type": "builtin", "task": "dataset", "position": 8}
    assert ck.failed_again(tmp_path, 3, where, fail("prompt too long")) is None  # the first time: restart
    assert json.loads((tmp_path / ck.FAILURE).read_text())["step"] == 3
    assert ck.failed_again(tmp_path, 3, {**where, "position": 12}, fail("prompt too long")) is None  # other input
    assert ck.failed_again(tmp_path, 3, {**where, "position": 12}, KeyError("x")) is None  # another failure
    why = ck.failed_again(tmp_path, 3, {**where, "position": 12}, KeyError("x"))
    assert why is not None and why.startswith("step 3 failed twice on the same input") and "KeyError" in why


def test_a_dataset_of_prompts_too_long_stops_the_job_with_the_reason(tmp_path):
    """The model is prepared by the launch, so `runner check` cannot measure the prompts: the worker refuses each
    (400), the learner skips them, and when nothing but refusals comes it fails; failing again the same way at the
    same step and input after its restart, it stops the job with the reason instead of going round."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"{i} " + "count the apples " * 300}) + "\n" for i in range(3)))
    config = tmp_path / "job.toml"
    text = (Path(__file__).parent.parent / "configs" / "quickstart.toml").read_text()
    config.write_text(text.replace('path = "models/tiny"', f'path = "{tmp_path / "tiny"}"'))
    sets = [s for s in SETS if not s.startswith("lora.rank")]
    sets += ['source.type="dataset"', f'source.path="{train}"', 'source.rewards=["numeric_answer"]']
    job = Job(config, sets, tmp_path)
    assert job.finish(300) == 1, job.output[-3000:]
    out = job.output
    assert "worker learner stopped the job (exit code 4)" in out, out[-3000:]
    assert "step 1 failed twice on the same input" in out and "refused 256 prompts in a row" in out, out[-3000:]
    assert "exceeds the model's context" in out
    assert out.count("learner exited with code") == 1  # one restart, then the stop
    log = (tmp_path / "runs" / "quickstart" / "logs" / "learner.log").read_text()
    assert "(row 3) skipped" in log
