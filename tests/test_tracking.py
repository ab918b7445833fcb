"""Tracking: a real `runner launch` sends every metrics row to W&B (offline) and TensorBoard as well as metrics.jsonl,
read back from W&B's run file and TensorBoard's event files; a missing tracker package fails the launch at start;
a resumed learner's TensorBoard points replace the redone steps; a broken tracker does not stop the rows.

The same launch has `[security] api_token` set: afterwards no file of its run directory but the 0600 resolved config
holds the token (checkpoints, W&B, TensorBoard, logs, `runner report`), and no command line of any process did while
it ran."""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runner import cli
from runner.config import build_config

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

REPO = Path(__file__).parent.parent
TRACKED = ["reward_mean", "loss", "kl", "tokens_per_s", "train_s"]


def quick_config(tmp_path: Path, tiny_model: Path) -> Path:
    text = (REPO / "configs" / "quickstart.toml").read_text().replace('path = "models/tiny"', f'path = "{tiny_model}"')
    config = tmp_path / "job.toml"
    config.write_text(text)
    return config


def wandb_history(run_file: Path) -> dict[int, dict]:
    """{step: logged values} from a W&B run file (.wandb: a LevelDB-style log of protobuf Records, 32 KiB blocks
    after a 7-byte header; the pure-Python reader left the wandb package, so it is read here)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, pending, rows = run_file.read_bytes(), 7, 32768, b"", {}
    assert data[:4] == b":W&B", f"{run_file} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                rows[row["step"]] = row  # the row's own step (W&B's call counter `_step` differs once evals log)
    return rows


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} in the order TensorBoard reads them (a step written twice shows twice)."""
    acc = event_accumulator.EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def command_lines() -> dict[int, bytes]:
    """{pid: command line} of every process on this machine, as `ps` shows them (from /proc where there is one)."""
    proc = Path("/proc")
    if not proc.is_dir():
        out = subprocess.run(["ps", "-ww", "-Ao", "pid=,args="], capture_output=True, check=True).stdout
        return {int(pid): args for pid, _, args in (line.strip().partition(b" ") for line in out.splitlines())}
    lines = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                lines[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:  # gone meanwhile
                pass
    return lines


@pytest.fixture(scope="module")
def tracked_job(tmp_path_factory, tiny_model):
    """A 4-step launch with W&B (offline) and TensorBoard, and an API token in its config file. While it runs, the
    command line of every process on the machine is sampled: those that name the job's directory (the launch and
    its children) are kept, and any that holds the token is a leak."""
    tmp_path = tmp_path_factory.mktemp("tracked")
    token = f"tok-{secrets.token_hex(16)}"
    config = quick_config(tmp_path, tiny_model)
    config.write_text(config.read_text() + f'\n[security]\napi_token = "{token}"\n')
    sets = [
        "learner.steps=4",
        "checkpoint.interval=2",
        'coordinator.control="tcp://127.0.0.1:0"',
        'coordinator.weights="tcp://127.0.0.1:0"',
        'logging.wandb_project="runner-test"',
        'logging.wandb_mode="offline"',
        "logging.tensorboard=true",
    ]
    args = [sys.executable, "-m", "runner.cli", "launch", str(config)] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "RUNNER_API_TOKEN"}
    job_processes: dict[int, bytes] = {}
    leaks: list[bytes] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for pid, line in command_lines().items():
                if token.encode() in line:
                    leaks.append(line)
                if str(tmp_path).encode() in line:
                    job_processes[pid] = line
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    finally:
        done.set()
        sampler.join(30)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        "run_dir": tmp_path / "runs" / "quickstart",
        "token": token,
        "output": result.stdout + result.stderr,
        "job_processes": job_processes,
        "leaks": leaks,
    }


@pytest.mark.slow
def test_launch_logs_every_metrics_row_to_wandb_offline_and_tensorboard(tracked_job):
    run_dir = tracked_job["run_dir"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    assert run_file.name == f"run-{(run_dir / 'wandb-run-id').read_text().strip()}.wandb"
    history = wandb_history(run_file)
    assert sorted(history) == [1, 2, 3, 4]
    for r in rows:
        for key in TRACKED:
            assert history[r["step"]][key] == pytest.approx(r[key], rel=1e-9), (key, r["step"])

    scalars = tensorboard_scalars(run_dir / "tensorboard")
    for key in TRACKED:
        expected = [(r["step"], pytest.approx(r[key], rel=1e-5)) for r in rows]  # float32 in event files
        assert scalars[key] == expected, key


@pytest.mark.slow
def test_the_api_token_is_in_no_file_of_the_run_but_its_0600_config_and_in_no_command_line(tracked_job):
    from runner.report import write_report

    run_dir, token = tracked_job["run_dir"], tracked_job["token"].encode()
    write_report(run_dir)  # `runner report` writes into RUN/report
    resolved = run_dir / "config.resolved.toml"
    assert resolved.stat().st_mode & 0o777 == 0o600
    assert token in resolved.read_bytes()  # the job ran with the token: its learner was let in by the workers
    files = [p for p in run_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    kinds = {p.relative_to(run_dir).parts[0] for p in files}
    assert {"checkpoints", "logs", "wandb", "tensorboard", "report", "metrics.jsonl"} <= kinds, kinds
    leaked = [str(p.relative_to(run_dir)) for p in files if p != resolved and token in p.read_bytes()]
    assert leaked == []
    for state in run_dir.glob("checkpoints/step_*/state.json"):
        assert json.loads(state.read_text())["config"]["security"]["api_token"] == "<redacted>"
    assert token.decode() not in tracked_job["output"]

    lines = tracked_job["job_processes"].values()
    for module in (b"runner.cli launch", b"workers.generation.worker", b"workers.learner.main"):
        assert any(module in line for line in lines), (module, list(lines))  # every kind of job process was seen
    assert tracked_job["leaks"] == []


def test_a_missing_tracker_package_fails_the_launch_at_start(tmp_path, tiny_model, monkeypatch, capsys):
    config = quick_config(tmp_path, tiny_model)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "wandb", None)  # what find_spec reports for a package that is not installed
    code = cli.main(["launch", str(config), "--set", 'logging.wandb_project="p"'])
    assert code == 2
    err = capsys.readouterr().err
    assert "logging.wandb_project is set but the wandb package is not installed" in err
    created = [p.name for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert not created  # nothing was started or written


def tracking_config(run_dir: Path, **logging) -> object:
    return build_config({"checkpoint": {"dir": str(run_dir)}, "logging": logging})


def test_a_resumed_learner_replaces_the_redone_steps_in_tensorboard(tmp_path):
    from workers.learner.tracking import make_sink

    run_dir = tmp_path / "run"
    first = make_sink(tracking_config(run_dir, tensorboard=True))
    for step in (1, 2, 3):
        first.write({"step": step, "reward_mean": step / 10, "staleness": None})
    first.close()
    resumed = make_sink(tracking_config(run_dir, tensorboard=True))  # resumed from the checkpoint of step 1
    for step in (2, 3, 4):
        resumed.write({"step": step, "reward_mean": 1 + step / 10, "staleness": None})
    resumed.close()
    steps = [(1, 0.1), (2, 1.2), (3, 1.3), (4, 1.4)]  # the first writer's steps 2 and 3 are purged, not doubled
    assert tensorboard_scalars(run_dir / "tensorboard") == {"reward_mean": [(s, pytest.approx(v)) for s, v in steps]}


def test_a_failing_tracker_does_not_stop_the_metrics_rows(tmp_path, caplog):
    from workers.learner.tracking import make_sink

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "tensorboard").write_text("a file where the event directory should be")
    sink = make_sink(tracking_config(run_dir, tensorboard=True))
    sink.write({"step": 1, "reward_mean": 0.5})
    sink.close()
    assert [json.loads(line)["reward_mean"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0.5]
    assert "TensorBoardSink could not log step 1" in caplog.text


def test_a_restarted_learner_continues_the_same_wandb_run(tmp_path, monkeypatch):
    from workers.learner.tracking import make_sink

    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "run"
    for steps in ((1, 2), (2, 3)):  # the second learner resumed from step 1
        sink = make_sink(tracking_config(run_dir, wandb_project="p", wandb_mode="offline"))
        for step in steps:
            sink.write({"step": step, "reward_mean": step / 10})
        sink.close()
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{run_id}.wandb"] * 2  # one run, two offline pieces for `wandb sync`
    assert sorted(wandb_history(files[1])) == [2, 3]
