"""`[source] type = "verifiers"`: a verifiers environment defined here (two model turns with a user turn between, its
rubric scoring the length of the answers) trains the tiny model through a real `runner launch`. Its rollouts go to the
generation workers' chat endpoint; the learner trains on the token ids, sampler log-probs and per-token versions the
workers returned."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from test_launch import QUICK, Job, metrics

pytest.importorskip("verifiers", reason="the verifiers package is not installed (pip install 'runner[verifiers]')")

pytestmark = pytest.mark.slow

ENVIRONMENT = """
import json

import verifiers as vf
from datasets import Dataset


class TwoTurns(vf.MultiTurnEnv):
    async def env_response(self, messages, state, **kwargs):
        return [{"role": "user", "content": "Say more."}]


def load_environment(**kwargs):
    dataset = Dataset.from_list([{"question": f"Write about the number {i}.", "answer": str(i)} for i in range(6)])

    def length(completion, state, **_):
        reward = min(1.0, sum(len(m["content"]) for m in completion if m["role"] == "assistant") / 80)
        first, second = (turn["tokens"] for turn in state["trajectory"])
        before = first["prompt_ids"] + first["completion_ids"]
        row = {
            "reward": reward,
            "extends": second["prompt_ids"][: len(before)] == before,
            "lengths": [len(first["completion_ids"]), len(second["completion_ids"])],
        }
        with open("scored.jsonl", "a") as f:  # what verifiers scored, for the test to compare with what was trained
            f.write(json.dumps(row) + "\\n")
        return reward

    return TwoTurns(dataset=dataset, rubric=vf.Rubric(funcs=[length]), max_turns=2)
"""

CONFIG = """
[model]
path = "{model}"

[lora]
rank = 4

[generation]
workers = 1

[learner]
group_size = 4
batch_size = 2
max_tokens = 12
learning_rate = 5e-4

[source]
type = "verifiers"
environment = "tiny_vf_env"

[checkpoint]
dir = "runs/verifiers"
"""


def test_a_verifiers_environment_trains_on_the_workers_tokens(tmp_path, tiny_model):
    (tmp_path / "tiny_vf_env.py").write_text(ENVIRONMENT)
    config = tmp_path / "verifiers.toml"
    config.write_text(CONFIG.format(model=tiny_model))
    sets = [s for s in QUICK if not s.startswith("learner.steps")] + ["learner.steps=3"]
    job = Job(config, sets, tmp_path)
    assert job.finish(600) == 0, job.output[-3000:]
    rows = metrics(tmp_path / "runs" / "verifiers")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["prompt_index"] for r in rows] == [0, 2, 4]
    scored = [json.loads(line) for line in (tmp_path / "scored.jsonl").read_text().splitlines()]
    # A rollout verifiers failed (the random model may answer nothing) is left out and counted, never restarting the
    # learner: every other rollout was scored exactly once.
    errors = sum(r["verifiers_errors"] for r in rows)
    assert len(scored) == 3 * 2 * 4 - errors, job.output[-3000:]
    assert sum(r["sequences"] for r in rows) == len(scored)
    assert "restarting" not in job.output
    # The rewards verifiers computed are the ones trained on, and its rubric's metric is recorded.
    assert sum(r["reward_mean"] * r["sequences"] for r in rows) == pytest.approx(sum(s["reward"] for s in scored))
    assert all(r["verifiers_length"] == pytest.approx(r["reward_mean"]) for r in rows)
    # Both model turns of a rollout are trained, the environment's turn between them not; when the chat template
    # renders the first turn back to other ids than the model sampled, the sample restarts at the second turn (its
    # prompt then holds the first, untrained). Each trained token carries the worker's log-prob (so the learner's own
    # log-prob of it is close: a missing or misaligned log-prob would be 0 or another token's, several nats off; at
    # step 1 both run version 0 and may agree exactly) and its version.
    expected = sum(sum(s["lengths"]) if s["extends"] else s["lengths"][1] for s in scored)
    assert sum(r["trained_tokens"] for r in rows) == expected
    assert sum(r["verifiers_restarts"] for r in rows) == sum(not s["extends"] for s in scored)
    assert all(0 <= r["sampler_diff"] < 0.05 for r in rows), [r["sampler_diff"] for r in rows]
    assert all(r["staleness_hist"] is not None and r["staleness"] is not None for r in rows)


def test_an_environment_that_does_not_load_stops_the_launch_before_anything_starts(tmp_path, tiny_model):
    config = tmp_path / "verifiers.toml"
    config.write_text(CONFIG.format(model=tiny_model).replace("tiny_vf_env", "no_such_env"))
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "launch", str(config)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "source.environment = 'no_such_env'" in r.stderr and "No module named 'no_such_env'" in r.stderr
    assert not (tmp_path / "runs").exists()
