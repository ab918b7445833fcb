"""The Atropos source: a real `run-api` server (from `atroposlib`) fed by a minimal environment written here, and
the trainer learning from the batches it serves (masks, scores, advantages, inference_logprobs honoured).

atroposlib's own dependency list is heavy (wandb, datasets, torch extras...), but its API server needs only
fastapi, uvicorn and pydantic: install it with `pip install --no-deps atroposlib`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import poll

from runner.config import LearnerConfig
from workers.learner.sources.atropos import AtroposSource, scored_data_to_group
from workers.learner.sources.base import Batch, UnversionedSample, require_versions
from workers.learner.trainer import Trainer, prepare_batch
from workers.lora import LoraSpec

GROUP = 4
GROUPS_PER_BATCH = 2
SPEC = LoraSpec(rank=4, keys=["self_attn.q_proj", "self_attn.v_proj"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def atropos_api():
    pytest.importorskip(
        "atroposlib.api.server", reason="atroposlib is not installed (pip install --no-deps atroposlib)"
    )
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "atroposlib.cli.run_api", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"run-api exited: {proc.stderr.read()[-2000:]}")
        try:
            return httpx.get(f"{url}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        poll(up, 30, "run-api to answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stderr.close()


def make_group(tokenizer, index: int, with_advantages: bool) -> dict:
    """One ScoredData the way an Atropos env built on ManagedServer sends it: masks -100 on the prompt and the token
    id where trained, inference_logprobs 1.0 on the prompt, a score per completion, optional per-token advantages;
    and the policy version the worker's reply said (version 0), per sample or for the group."""
    rng = np.random.default_rng(index)
    prompt = list(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Count to {index + 3}."}], add_generation_prompt=True
        )
    )
    tokens, masks, lps, scores, advs = [], [], [], [], []
    digits = {tokenizer.encode(str(d))[0] for d in range(10)}
    for j in range(GROUP):
        completion = rng.integers(3, 500, int(rng.integers(3, 9))).tolist()
        if j % 2 == 0:
            completion[:2] = [tokenizer.encode("7")[0], tokenizer.encode("8")[0]]
        score = sum(t in digits for t in completion) / len(completion)
        tokens.append(prompt + completion)
        masks.append([-100] * len(prompt) + completion)
        lps.append([1.0] * len(prompt) + (-rng.random(len(completion)) * 4).tolist())
        scores.append(score)
    if with_advantages:
        centred = np.asarray(scores) - np.mean(scores)
        advs = [[float(a)] * len(t) for a, t in zip(centred, tokens)]
    return {
        "tokens": tokens,
        "masks": masks,
        "scores": scores,
        "inference_logprobs": lps,
        "advantages": advs if with_advantages else None,
        "overrides": [{"policy_version": 0}] * GROUP if index % 2 else None,
        "group_overrides": None if index % 2 else {"policy_version": 0},
    }


class MinimalEnv(threading.Thread):
    """Registers once the trainer has started (the API refuses envs before its first GET /batch), then posts
    scored groups."""

    def __init__(self, url: str, groups: list[dict]):
        super().__init__(daemon=True)
        self.url, self.groups = url, groups
        self.error: BaseException | None = None
        self.env_id = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=10) as c:

                def registered():
                    r = c.post(
                        f"{self.url}/register-env",
                        json={"max_token_length": 512, "desired_name": "digits", "weight": 1.0, "group_size": GROUP},
                    ).json()
                    return r if r.get("status") == "success" else None

                self.env_id = poll(registered, 30, "the trainer to start")["env_id"]
                for g in self.groups:
                    r = c.post(f"{self.url}/scored_data", json=dict(g, env_id=self.env_id))
                    r.raise_for_status()
        except BaseException as e:  # surfaced by the test
            self.error = e


def test_scored_data_conversion():
    item = {
        "tokens": [[5, 6, 7, 8], [5, 6, 9]],
        "masks": [[-100, -100, 7, 8], [-100, -100, 9]],
        "scores": [1.0, 0.0],
        "advantages": [[0.5] * 4, [-0.5] * 3],
        "inference_logprobs": [[1.0, 1.0, -0.1, -0.2], [1.0, 1.0, -0.3]],
    }
    group = scored_data_to_group(item)
    assert [s.mask for s in group] == [[0, 0, 1, 1], [0, 0, 1]]
    assert [s.advantage for s in group] == [0.5, -0.5]
    arr = prepare_batch(Batch([group]))
    assert arr["mask"].tolist() == [[0, 1, 1], [0, 1, 0]]
    assert arr["sampler_valid"].tolist() == arr["mask"].tolist()  # 1.0 placeholders never count as log-probs
    assert arr["advantages"].tolist() == [0.5, -0.5]
    no_adv = scored_data_to_group(dict(item, advantages=None))
    assert prepare_batch(Batch([no_adv]))["advantages"].tolist() == pytest.approx([1.0, -1.0], abs=1e-5)
    # The sampling policy's version: per sample, else the group's; none at all is refused by the staleness check.
    versioned = dict(item, overrides=[{"policy_version": 4}, {}], group_overrides={"policy_version": 3})
    assert [s.version for s in scored_data_to_group(versioned)] == [4, 3]
    assert [s.version for s in group] == [None, None]
    with pytest.raises(UnversionedSample, match="group 0, sample 0"):
        require_versions(Batch([group]))


def test_trainer_trains_on_run_api_batches(atropos_api, tiny_model):
    trainer = Trainer.load(
        tiny_model, LearnerConfig(learning_rate=5e-3, group_size=GROUP, batch_size=GROUPS_PER_BATCH), SPEC
    )
    tok = trainer.tokenizer
    groups = [make_group(tok, i, with_advantages=i % 2 == 0) for i in range(2 * GROUPS_PER_BATCH)]
    source = AtroposSource(
        atropos_api,
        batch_size=GROUP * GROUPS_PER_BATCH,
        max_token_len=512,
        starting_step=0,
        num_steps=2,
        wait_timeout=60,
    )
    env = MinimalEnv(atropos_api, groups)
    env.start()
    before = {k: np.array(v) for k, v in trainer.lora_tensors().items()}
    metrics = []
    try:
        for step in (1, 2):
            batch = source.next_batch(step)
            assert env.error is None, env.error
            assert [len(g) for g in batch.groups] == [GROUP] * GROUPS_PER_BATCH
            arr = prepare_batch(batch)
            # masks honoured: only completion tokens train; placeholders are not sampler log-probs
            sent = {tuple(t): (m, s) for g in groups for t, m, s in zip(g["tokens"], g["masks"], g["scores"])}
            for s in batch.samples:
                m, score = sent[tuple(s.tokens)]
                assert s.mask == [int(v != -100) for v in m] and s.reward == score
            assert arr["sampler_valid"].sum() == arr["mask"].sum()
            # advantages honoured where the env sent them
            for g in batch.groups:
                src = next(x for x in groups if x["tokens"][0] == g[0].tokens)
                if src["advantages"] is not None:
                    assert [s.advantage for s in g] == pytest.approx([a[0] for a in src["advantages"]])
            metrics.append(trainer.step(batch))
    finally:
        env.join(10)
        source.close()
    assert env.error is None
    assert trainer.step_count == 2 and source.state() == {"type": "atropos", "steps_done": 2}
    assert all(np.isfinite(m["loss"]) and m["trained_tokens"] > 0 for m in metrics)
    after = trainer.lora_tensors()
    assert max(float(np.abs(np.array(after[k]) - before[k]).max()) for k in before) > 0
    status = httpx.get(f"{atropos_api}/status", timeout=5).json()
    assert status["current_step"] == 2 and status["queue_size"] == 0


def test_atropos_source_fetches_the_next_batch_while_the_learner_trains(atropos_api, tiny_model):
    """async_depth 1: once next_batch(1) has returned, batch 2 is fetched from the API with no further call (in the
    background, while the learner would train), next_batch(2) returns it, and batch 3 is fetched the same way."""
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(tiny_model)
    groups = [make_group(tok, i, with_advantages=False) for i in range(3 * GROUPS_PER_BATCH)]
    stop = threading.Event()
    source = AtroposSource(
        atropos_api, batch_size=GROUP * GROUPS_PER_BATCH, max_token_len=512, wait_timeout=60, depth=1, stop=stop
    )
    env = MinimalEnv(atropos_api, groups)
    env.start()

    def fetched() -> bool:
        return len(source._ahead) == 1 and source._ahead[0].done()

    try:
        first = source.next_batch(1)
        poll(fetched, 30, "batch 2 to be fetched unasked")
        prefetched = source._ahead[0].result()["batch"]
        second = source.next_batch(2)
        poll(fetched, 30, "batch 3 to be fetched unasked")
    finally:
        stop.set()
        env.join(10)
        source.close()
    assert env.error is None
    got = [tuple(s.tokens) for b in (first, second) for s in b.samples]
    sent = {tuple(t) for g in groups for t in g["tokens"]}
    assert len(got) == 2 * GROUP * GROUPS_PER_BATCH and len(set(got)) == len(got) and set(got) <= sent
    assert [tuple(s.tokens) for s in second.samples] == [tuple(t) for item in prefetched for t in item["tokens"]]
    assert source.state() == {"type": "atropos", "steps_done": 2}  # batch 3 was fetched, not trained


def test_atropos_source_registers_at_resume_step(atropos_api):
    source = AtroposSource(atropos_api, batch_size=GROUP, starting_step=0, wait_timeout=0.3)
    source.load_state({"type": "atropos", "steps_done": 7})
    try:
        with pytest.raises(TimeoutError):
            source.next_batch(8)  # registers (at step 7), then no env ever posts
    finally:
        source.close()
    assert httpx.get(f"{atropos_api}/status", timeout=5).json()["current_step"] == 7


def test_sigterm_during_an_atropos_wait_stops_the_launch_within_the_grace(atropos_api, tmp_path, tiny_model):
    """`runner launch` with an Atropos source no environment feeds: the learner polls /batch forever. SIGTERM: the
    launch exits 0 within [coordinator] stop_grace and no process of the job is left."""
    from test_launch import QUICK, Job, stop_within_grace

    config = tmp_path / "job.toml"
    text = (Path(__file__).parent.parent / "configs" / "quickstart.toml").read_text()
    config.write_text(text.replace('path = "models/tiny"', f'path = "{tiny_model}"'))
    sets = QUICK + ['source.type="atropos"', f'source.url="{atropos_api}"', "coordinator.stop_grace=20"]
    job = Job(config, sets, tmp_path)
    learner_log = tmp_path / "runs" / "quickstart" / "logs" / "learner.log"
    try:
        control = job.control()
        poll(lambda: learner_log.exists() and "registered with Atropos" in learner_log.read_text(), 180, "registration")
        took = stop_within_grace(job, control, 20)
    finally:
        if job.proc.poll() is None:
            job.proc.kill()
            job.proc.wait(30)
    assert "stopped while waiting for an Atropos batch" in learner_log.read_text()
    print(f"stopped in {took:.1f}s")
