"""SmolLM2-135M-Instruct learns on the arithmetic dataset task (configs/smollm2_arithmetic.toml), in a real launch.

A few steps of the shipped config on four training problems, with a higher learning rate so the reward moves within
CI's time: the mean reward of the last steps is above that of the first ones. bench/learn.py measures the real thing
(held-out accuracy over a longer run).

The same job, colocated ([generation] colocate = true: the learner's process runs gen-0 over its own weights), shows
that the machine holds the base weights once: the job's peak PSS (summed over its processes, sampled while it runs)
minus the float32 weights stays under MEMORY_BOUND, less than one more copy of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_launch import QUICK, Job, metrics

from workers.gguf import prepare_smollm2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.learn import PeakRss  # noqa: E402

pytestmark = pytest.mark.slow

REPO = Path(__file__).parent.parent
STEPS = 10
# Problems SmolLM2 answered right 1-3 times in 8 samples at temperature 0.7 (12 tokens): groups differ, so GRPO
# has a signal from the first step, and there is room above.
PROBLEMS = [(24, 26), (19, 8), (31, 47), (20, 12)]
# What the job may hold beside one float32 copy of the base weights (0.54 GB): the coordinator, the HTTP front, the
# learner's activations, gradients and optimizer state, the engine's KV cache, the Python interpreters. Two copies
# (gen-0 in a process of its own, bench/learn.py's batch) measured 1.4 GB over one copy, colocated 0.66 GB.
MEMORY_BOUND = 0.75 * 2**30
FLOAT32_WEIGHTS = 134_515_008 * 4  # SmolLM2-135M's parameters (the config dequantizes them to float32)


def test_smollm2_reward_rises_on_arithmetic(tmp_path: Path) -> None:
    model = prepare_smollm2(tmp_path / "smollm2")
    train = tmp_path / "train.jsonl"
    train.write_text(
        "".join(json.dumps({"prompt": f"What is {a}+{b}?", "answer": str(a + b)}) + "\n" for a, b in PROBLEMS)
    )
    sets = [s for s in QUICK if not s.startswith("learner.steps")] + [
        f"learner.steps={STEPS}",
        f"model.path={json.dumps(str(model))}",
        f"source.path={json.dumps(str(train))}",
        'eval.path=""',
        "learner.batch_size=2",
        "learner.max_tokens=12",
        "learner.learning_rate=5e-4",
        "lora.num_layers=8",  # the shape this short, high-learning-rate check was tuned on (16 blocks swing at 5e-4)
        "checkpoint.interval=100",
        "generation.colocate=true",
    ]
    job = Job(REPO / "configs" / "smollm2_arithmetic.toml", sets, tmp_path)
    memory = PeakRss(job.proc.pid)
    try:
        assert job.finish(900) == 0, job.output[-3000:]
    finally:
        memory.stop()
    held = {k: f"{v / 2**30:.2f} GB" for k, v in memory.pss_by_role.items()}
    assert memory.peak_pss - FLOAT32_WEIGHTS < MEMORY_BOUND, f"peak PSS {memory.peak_pss / 2**30:.2f} GB: {held}"
    steps = [r for r in metrics(tmp_path / "runs" / "smollm2_arithmetic") if "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["reward_errors"] == 0 for r in steps)
    first = sum(r["reward_mean"] for r in steps[:3]) / 3
    last = sum(r["reward_mean"] for r in steps[-3:]) / 3
    assert last > first + 0.1, f"reward did not rise: {[round(r['reward_mean'], 3) for r in steps]}"
