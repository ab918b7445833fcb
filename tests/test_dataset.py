"""The dataset task (workers/learner/sources/dataset.py, rewards.py): built-in rewards, scoring with failures and
timeouts, loading JSONL and `datasets` sets, bad input caught before anything starts, prompt order and exact resume
over a real generation server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from runner.config import ConfigError, SourceConfig, build_config
from workers.learner.rewards import Rewards, exact_answer, length_penalty, load_reward, numeric_answer
from workers.learner.sources.dataset import (
    DatasetTask,
    check_dataset_config,
    check_prompts_fit,
    load_examples,
    make_dataset_task,
)

REPO = Path(__file__).parent.parent
EXAMPLE = REPO / "examples" / "tiny_arith"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def dataset_config(tmp_path: Path, **source) -> dict:
    train = write_jsonl(
        tmp_path / "train.jsonl", [{"prompt": f"What is {i}+1?", "answer": str(i + 1)} for i in range(10)]
    )
    return {"source": {"type": "dataset", "path": str(train), **source}}


# ----- built-in rewards ----------------------------------------------------------------------------------------


def test_exact_and_numeric_answer():
    assert exact_answer(completion=" 19\n", answer="19") == 1.0
    assert exact_answer(completion="19.", answer="19") == 0.0
    assert exact_answer(completion="19", answer=None) == 0.0
    assert numeric_answer(completion="12 + 7 = 19", answer="19") == 1.0
    assert numeric_answer(completion="it is 19, not 18", answer=19) == 0.0  # the last number counts
    assert numeric_answer(completion="total: 1,234.0 apples", answer="1234") == 1.0
    assert numeric_answer(completion="-3.5", answer=-3.5) == 1.0
    assert numeric_answer(completion="no number", answer="3") == 0.0
    assert numeric_answer(completion="3", answer=None) == 0.0


def test_regex_format_and_length_penalty_read_their_keys():
    fmt = load_reward("regex_format", SourceConfig(format_pattern=r"^\s*\d+\s*$"))
    assert fmt(completion=" 42 ", answer=None) == 1.0 and fmt(completion="42 apples", answer=None) == 0.0
    penalty = load_reward("length_penalty", SourceConfig(length_limit=10))
    assert penalty(completion="12345", answer=None) == -0.5
    assert penalty(completion="x" * 50, answer=None) == -1.0 == length_penalty("x" * 11, limit=10)


# ----- scoring -------------------------------------------------------------------------------------------------


def raises(completion, **_):
    raise RuntimeError("broken reward")


def hangs(completion, **_):
    time.sleep(60)  # abandoned in its daemon thread
    return 1.0


def not_a_number(completion, **_):
    return float("nan") if completion == "a" else "text"


async def async_len(completion, **_):
    await asyncio.sleep(0.01)
    return len(completion)


def test_failing_and_hanging_rewards_score_0_are_counted_and_the_rest_is_weighted(caplog):
    items = [{"completion": c, "answer": None, "prompt": "p", "example": {}} for c in ("a", "bb", "ccc")]
    rewards = Rewards(["len", "raises", "hangs", "nan"], [async_len, raises, hangs, not_a_number], [2.0, 1, 1, 1], 0.5)
    tic = time.monotonic()
    scored = rewards.score(items)
    assert time.monotonic() - tic < 30  # the hanging calls were given up on, not waited for
    assert scored.totals == [2.0, 4.0, 6.0]
    assert scored.parts[1] == [2.0, 0.0, 0.0, 0.0]
    assert scored.errors == 3 * 3
    text = caplog.text
    assert "reward raises failed on 3 of 3" in text and "broken reward" in text
    assert "reward hangs failed on 3 of 3" in text and "no answer within 0.5s" in text
    assert "reward nan failed on 3 of 3" in text


def test_reward_by_file_path_and_by_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def bonus(completion, answer, prompt, example):\n    return example['w']\n"
    )
    by_file = load_reward(f"{tmp_path / 'my_rewards.py'}:bonus", SourceConfig())
    assert by_file(completion="", answer=None, prompt="", example={"w": 0.25}) == 0.25
    monkeypatch.chdir(tmp_path)  # "module:function" imports from the working directory, as the learner does
    assert load_reward("my_rewards:bonus", SourceConfig())(completion="", answer=None, prompt="", example={"w": 1})


@pytest.mark.parametrize(
    "name, message",
    [
        ("nope", "unknown reward 'nope'; expected a built-in"),
        ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
        ("json:no_such_function", "'json' has no function 'no_such_function'"),
        ("/no/such/file.py:f", "cannot import '/no/such/file.py'"),
        ("regex_format", "needs source.format_pattern"),
    ],
)
def test_bad_reward_names_are_clear_errors(name, message):
    with pytest.raises(ConfigError, match=message):
        load_reward(name, SourceConfig())


# ----- loading and bad input -----------------------------------------------------------------------------------


def test_jsonl_rows_are_validated_with_line_numbers(tmp_path):
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(str(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, "{nope"])), "train")
    with pytest.raises(ConfigError, match=r"row 2: needs 'prompt' \(a string\) or 'messages'"):
        load_examples(str(write_jsonl(tmp_path / "bad2.jsonl", [{"prompt": "a"}, {"question": "b"}])), "train")
    with pytest.raises(ConfigError, match="no examples"):
        load_examples(str(write_jsonl(tmp_path / "empty.jsonl", [])), "train")
    with pytest.raises(ConfigError, match="no such file"):
        load_examples(str(tmp_path / "missing.jsonl"), "train")
    rows = load_examples(
        str(write_jsonl(tmp_path / "ok.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])), "x"
    )
    assert rows == [{"messages": [{"role": "user", "content": "hi"}]}]


def test_a_local_datasets_directory_and_a_saved_dataset_load_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = [{"prompt": f"q{i}", "answer": str(i), "level": i % 3} for i in range(6)]
    data = tmp_path / "parquet_set"
    data.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(data / "test.parquet"))  # a split named by its file
    assert load_examples(str(data), "test") == rows
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4])}).save_to_disk(str(saved))
    assert load_examples(str(saved), "train") == rows[:4]
    with pytest.raises(ConfigError, match="cannot load split 'nope'"):
        load_examples(str(saved), "nope")
    with pytest.raises(ConfigError, match="cannot load split"):
        load_examples("no-such-org/no-such-dataset-xyz", "train")


def test_config_level_checks(tmp_path):
    with pytest.raises(ConfigError, match="'source.reward_weights' has 1 entries for 2 rewards"):
        build_config(dataset_config(tmp_path, rewards=["exact_answer", "numeric_answer"], reward_weights=[1.0]))
    with pytest.raises(ConfigError, match="'source.path' is empty"):
        build_config({"source": {"type": "dataset"}})
    with pytest.raises(ConfigError, match=r"\[eval\] needs source.type"):
        build_config({"eval": {"path": "x.jsonl"}})
    with pytest.raises(ConfigError, match="needs eval.temperature > 0"):
        build_config({**dataset_config(tmp_path), "eval": {"path": "x.jsonl", "pass_k": 4}})
    with pytest.raises(ConfigError, match="eval.path = .*no such file"):
        check_dataset_config(build_config({**dataset_config(tmp_path), "eval": {"path": str(tmp_path / "x.jsonl")}}))
    check_dataset_config(build_config({**dataset_config(tmp_path), "eval": {"path": str(tmp_path / "train.jsonl")}}))


def test_runner_check_and_launch_reject_bad_input_before_starting_anything(tmp_path):
    config = tmp_path / "job.toml"
    config.write_text(f'[source]\ntype = "dataset"\npath = "{tmp_path / "missing.jsonl"}"\n')
    for command in ("check", "launch"):
        r = subprocess.run(
            [sys.executable, "-m", "runner.cli", command, str(config)], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 2 and "missing.jsonl': no such file" in r.stderr, r.stderr
    assert not (tmp_path / "runs").exists()
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", "check", str(REPO / "configs" / "dataset.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr


# ----- prompts -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    return load_tokenizer(tiny_model)


def test_prompt_order_covers_each_epoch_once_and_is_a_function_of_the_index(tmp_path, tokenizer):
    config = build_config(dataset_config(tmp_path))
    task = make_dataset_task(config, tokenizer)
    n = len(task.rows)
    epochs = [[task.row_index(e * n + i) for i in range(n)] for e in range(3)]
    assert all(sorted(order) == list(range(n)) for order in epochs)
    assert epochs[0] != epochs[1]  # shuffled anew each epoch
    again = make_dataset_task(config, tokenizer)
    assert [again.prompt(i).ids for i in (25, 3, 17)] == [task.prompt(i).ids for i in (25, 3, 17)]
    plain = make_dataset_task(build_config(dataset_config(tmp_path, shuffle=False, chat_template=False)), tokenizer)
    assert [plain.row_index(i) for i in range(12)] == list(range(10)) + [0, 1]
    assert tokenizer.decode(plain.prompt(3).ids) == "What is 3+1?"
    assert "<|im_start|>assistant" in tokenizer.decode(task.prompt(3).ids)


def test_resume_continues_at_the_exact_next_prompt(tmp_path, tokenizer, tiny_engine, serve):
    """A source restored from another's state sends the prompts the first would have sent next."""
    from workers.learner.sources.builtin import BuiltinSource

    server = serve(tiny_engine)
    task = make_dataset_task(build_config(dataset_config(tmp_path, rewards=["numeric_answer"])), tokenizer)

    def source() -> BuiltinSource:
        return BuiltinSource(task, lambda: [server.base], group_size=2, batch_size=3, max_tokens=4, depth=1)

    def prompts(batch) -> list[list[int]]:
        return [[t for t, m in zip(g[0].tokens, g[0].mask) if not m] for g in batch.groups]

    first = source()
    for step in (1, 2):  # 6 prompts of 10: the next batch crosses into the second epoch
        first.next_batch(step)
    state = json.loads(json.dumps(first.state()))
    uninterrupted = [first.next_batch(step) for step in (3, 4)]
    first.close()
    resumed = source()
    resumed.load_state(state)
    again = [resumed.next_batch(step) for step in (3, 4)]
    resumed.close()
    assert state["position"] == 6
    assert [prompts(b) for b in again] == [prompts(b) for b in uninterrupted]
    assert [b.info["metrics"]["prompt_index"] for b in again] == [6, 9]
    expected = [task.prompt(i).ids for i in range(6, 12)]
    assert [p for b in again for p in prompts(b)] == expected
    assert all(b.info["metrics"]["reward_errors"] == 0 for b in again)


def test_dataset_task_needs_a_chat_template_when_asked(tmp_path, tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="has no chat template"):
        DatasetTask(NoTemplate(), [{"prompt": "x"}], Rewards([], [], [], 1.0))


def test_evaluation_row_counts_correct_examples_with_pass_at_k(tmp_path, tokenizer, tiny_engine, serve):
    """Accuracy is per example, by the first reward function against the threshold; metadata reaches it."""
    from workers.learner.evaluation import make_evaluator
    from workers.learner.tracking import JsonlSink

    server = serve(tiny_engine)
    (tmp_path / "meta_rewards.py").write_text("def odd(example, **_):\n    return float(example['level'] % 2)\n")
    held_out = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": f"q{i}", "level": i} for i in range(8)])
    config = build_config(
        {
            **dataset_config(tmp_path, rewards=[f"{tmp_path / 'meta_rewards.py'}:odd", "exact_answer"]),
            "learner": {"max_tokens": 4, "batch_size": 3},
            "eval": {"path": str(held_out), "limit": 6, "pass_k": 2, "temperature": 1.0, "threshold": 0.5},
            "checkpoint": {"dir": str(tmp_path / "run")},
        }
    )
    rows = []
    sink = JsonlSink(tmp_path / "run")
    evaluator = make_evaluator(
        config, lambda: [server.base], tokenizer, threading.Event(), lambda: 7, rows.append, sink.write
    )
    evaluator.step_done(5, 7)  # every = 0: only at the end
    evaluator.finish(5, 7)
    evaluator.close()
    assert len(rows) == 1
    row = rows[0]
    assert (row["step"], row["eval_examples"], row["eval_reward_errors"]) == (5, 6, 0)
    assert row["eval_accuracy"] == row["eval_pass_at_k"] == 0.5  # levels 1, 3, 5 of 0..5
    assert row["eval_reward"] == 0.5  # odd scores 1 on half the completions; exact_answer has no answer: 0
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {
        **row,
        "time": pytest.approx(time.time(), abs=600),
    }


def test_report_keeps_eval_rows_apart_from_the_steps_they_share(tmp_path):
    from runner.report import read_metrics, write_report

    rows = [
        {"step": 1, "version": 1, "reward_mean": 0.1},
        {"step": 2, "version": 2, "eval_reward": 0.3, "eval_accuracy": 0.25, "eval_examples": 4},
        {"step": 2, "version": 2, "reward_mean": 0.2},
    ]
    write_jsonl(tmp_path / "metrics.jsonl", rows)
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["reward_mean"] for r in m.records] == [0.1, 0.2] and m.problems == []
    assert [e["eval_accuracy"] for e in m.evals] == [0.25]
    md = write_report(tmp_path)
    assert (md.parent / "eval.png").stat().st_size > 0
    assert "| eval at step 2 | reward 0.3, accuracy 0.25 (4 examples) |" in md.read_text()
    assert json.loads((md.parent / "summary.json").read_text())["evals"][0]["eval_reward"] == 0.3


def test_a_hub_dataset_id_loads_offline_from_the_hub_cache(tmp_path):
    """HF_HOME's hub cache holds the dataset repo's files (as a download leaves them): the id loads offline."""
    snapshot = tmp_path / "hf" / "hub" / "datasets--acme--tiny-arith" / "snapshots" / "abc123"
    (snapshot / "data").mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    (snapshot / "data" / "train.jsonl").write_text((EXAMPLE / "train.jsonl").read_text())
    code = (
        "from workers.learner.sources.dataset import load_examples; from runner.config import ConfigError\n"
        "print(len(load_examples('acme/tiny-arith', 'train')))\n"
        "try:\n    load_examples('acme/missing', 'train')\nexcept ConfigError as e:\n    print(e)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "96"
    assert lines[1].startswith("source.path = 'acme/missing': cannot load split 'train'")


# ----- prompts longer than the context -------------------------------------------------------------------------

LONG_PROMPT = "count the apples " * 300  # ~2700 tokens with the tiny tokenizer: past its context of 2048


def test_runner_check_refuses_a_prompt_too_long_for_the_context_by_row(tmp_path, tiny_model):
    rows = [{"prompt": "What is 1+1?", "answer": "2"}] * 2 + [{"prompt": LONG_PROMPT, "answer": "x"}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    config = tmp_path / "job.toml"
    text = f'[model]\npath = "{tiny_model}"\n[source]\ntype = "dataset"\npath = "{train}"\n[learner]\nmax_tokens = 16\n'
    config.write_text(text)
    r = subprocess.run([sys.executable, "-m", "runner.cli", "check", str(config)], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "1 prompt(s) longer than 2032 tokens" in r.stderr and "row 3 (" in r.stderr, r.stderr
    write_jsonl(train, rows[:2])
    check_prompts_fit(
        build_config({"model": {"path": str(tiny_model)}, "source": {"type": "dataset", "path": str(train)}})
    )


def test_a_prompt_the_worker_refuses_is_skipped_and_counted(tmp_path, tokenizer, tiny_engine, serve, caplog):
    """A row too long for the context gets a 400 from the worker: its group is left out, logged with its row and
    counted in the step's metrics; a batch refused whole is replaced by the next; refusals without end stop."""
    from workers.learner.sources.builtin import BuiltinSource

    server = serve(tiny_engine)
    rows = [{"prompt": "What is 1+1?", "answer": "2"}, {"prompt": LONG_PROMPT, "answer": "x"}] * 2
    config = build_config(dataset_config(tmp_path, shuffle=False, rewards=["numeric_answer"]))
    task = DatasetTask(tokenizer, rows, Rewards.from_config(config.source), shuffle=False)
    source = BuiltinSource(task, lambda: [server.base], group_size=2, batch_size=2, max_tokens=4)
    try:
        batch = source.next_batch(1)
        assert len(batch.groups) == 1 and batch.info["metrics"]["refused_prompts"] == 1
        assert "prompt 1 (row 2) skipped" in caplog.text and "exceeds the model's context" in caplog.text
        assert source.state()["position"] == 2
    finally:
        source.close()
    task = DatasetTask(tokenizer, rows[1:2], Rewards.from_config(config.source), shuffle=False)
    source = BuiltinSource(task, lambda: [server.base], group_size=2, batch_size=2, max_tokens=4)
    source.MAX_REFUSED = 4
    try:
        with pytest.raises(RuntimeError, match="refused 4 prompts in a row"):
            source.next_batch(1)
    finally:
        source.close()
