"""`runner launch` of the dataset task (configs/dataset.toml, the tiny model): two weighted rewards make the reward
rise, eval rows arrive at the configured interval and reach `runner status` and `runner report`, failing and hanging
reward functions are counted while the job completes, and a relaunch resumes at the next prompt."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_launch import QUICK, Job, metrics

from runner.status import fetch_status, format_table

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent


@pytest.fixture
def dataset_job(tmp_path, tiny_model):
    text = (REPO / "configs" / "dataset.toml").read_text()
    text = text.replace('path = "models/tiny"', f'path = "{tiny_model}"')
    text = text.replace('"examples/', f'"{REPO}/examples/')  # the job runs in tmp_path
    config = tmp_path / "dataset.toml"
    config.write_text(text)
    return tmp_path, config


def sets(steps: int, *more: str) -> list[str]:
    return [s for s in QUICK if not s.startswith("learner.steps")] + [f"learner.steps={steps}", *more]


def test_two_weighted_rewards_train_and_evals_arrive_at_the_interval(dataset_job):
    cwd, config = dataset_job
    # 30 steps: the reward takes off after 8-15 steps (the async pipeline makes the exact step vary from run to run).
    job = Job(config, sets(30, "eval.every=10", "eval.at_start=true", "checkpoint.interval=10"), cwd)
    control = job.control()
    deadline = time.monotonic() + 300
    status = {}
    while time.monotonic() < deadline and job.proc.poll() is None:  # the first eval reaches `runner status`
        status = fetch_status(control)
        if status["job"].get("eval"):
            break
        time.sleep(0.2)
    assert status["job"].get("eval"), job.output[-3000:]
    assert "last eval: step " in format_table(status)
    assert job.finish(900) == 0, job.output[-3000:]
    run_dir = cwd / "runs" / "dataset"
    rows = metrics(run_dir)
    steps = [r for r in rows if "eval_reward" not in r]
    evals = [r for r in rows if "eval_reward" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert [r["step"] for r in evals] == [0, 10, 20, 30]
    assert all(r["eval_examples"] == 24 and 0 <= r["eval_accuracy"] <= 1 for r in evals)
    assert all(r["version"] >= r["step"] for r in evals)  # evaluated at the version published at that step
    assert all(r["reward_errors"] == 0 for r in steps)
    first = sum(r["reward_mean"] for r in steps[:5]) / 5
    last = sum(r["reward_mean"] for r in steps[-5:]) / 5
    assert last > first + 0.05, f"reward did not rise: first 5 {first:.3f}, last 5 {last:.3f}"
    assert "eval at step 10: reward" in job.output
    r = subprocess.run([sys.executable, "-m", "runner.cli", "report", str(run_dir)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (run_dir / "report" / "eval.png").stat().st_size > 0
    assert "eval at step 30" in (run_dir / "report" / "report.md").read_text()


def test_raising_and_hanging_rewards_are_counted_and_the_job_completes(dataset_job):
    cwd, config = dataset_job
    (cwd / "bad_rewards.py").write_text(
        "import time\n\n"
        "def raises(completion, **_):\n    raise RuntimeError('this reward is broken')\n\n"
        "def hangs(completion, **_):\n    time.sleep(120)\n    return 1.0\n"
    )
    rewards = '["numeric_answer", "bad_rewards.py:raises", "bad_rewards.py:hangs"]'
    more = (f"source.rewards={rewards}", "source.reward_weights=[1.0, 1.0, 1.0]", "source.reward_timeout=0.5")
    job = Job(config, sets(3, *more, 'eval.path=""', "learner.batch_size=2", "learner.group_size=4"), cwd)
    assert job.finish(600) == 0, job.output[-3000:]
    rows = metrics(cwd / "runs" / "dataset")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["reward_errors"] for r in rows] == [16, 16, 16]  # 2 prompts x 4 completions x 2 bad functions
    log = (cwd / "runs" / "dataset" / "logs" / "learner.log").read_text()
    assert "reward bad_rewards.py:raises failed on 8 of 8" in log and "this reward is broken" in log
    assert "reward bad_rewards.py:hangs failed on 8 of 8" in log and "no answer within 0.5s" in log


def test_a_relaunch_resumes_at_the_next_prompt(dataset_job):
    cwd, config = dataset_job
    common = ('eval.path=""', "checkpoint.interval=2")
    assert Job(config, sets(2, *common), cwd).finish(600) == 0
    job = Job(config, sets(3, *common), cwd)
    assert job.finish(600) == 0, job.output[-3000:]
    run_dir = cwd / "runs" / "dataset"
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["prompt_index"] for r in rows] == [0, 4, 8]  # batch_size 4: step 3 starts at prompt 8, not 0
    assert "at step 2" in (run_dir / "logs" / "learner.log").read_text()
