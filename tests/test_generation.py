"""The generation worker end to end: engine + OpenAI-compatible HTTP server on loopback, driven by real clients.

Every server here is a real uvicorn on 127.0.0.1 with a kernel-chosen port (see conftest.live_server); every wait is
a poll with a deadline; every client call has a timeout.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import mlx.core as mx
import numpy as np
import openai
import pytest
from conftest import live_server, wait_for

from workers.generation.engine import SamplingParams
from workers.generation.server import load_engine

TIMEOUT = 30.0  # per HTTP call
PROMPTS = [
    "What is 2+3?",
    "The cat and the dog",
    "Hello world. What is 17+4? 17 + 4 =",
    "Red green blue",
]


# --------------------------------------------------------------------------------------------------- helpers
def eos_ids(engine) -> set[int]:
    return set(engine.eos_ids)


def check_length(token_ids: list[int], finish: str, max_tokens: int, eos: set[int]) -> None:
    """'length' means exactly max_tokens tokens; 'stop' means the last one is an EOS and no more than max_tokens."""
    assert finish in ("length", "stop"), finish
    if finish == "length":
        assert len(token_ids) == max_tokens
    else:
        assert 1 <= len(token_ids) <= max_tokens and token_ids[-1] in eos


def post(http: httpx.Client, url: str, body, **kw) -> httpx.Response:
    """POST JSON through the session's pooled client (safe to share between threads), with a timeout."""
    return http.post(url, json=body, timeout=kw.pop("timeout", TIMEOUT), **kw)


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def teacher_forced_logprobs(model, prompt: list[int], completion: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One full forward pass over prompt + completion: (argmax, log-prob of each completion token)."""
    seq = mx.array(prompt + completion[:-1])[None]
    lp = log_softmax(model(seq)[0, len(prompt) - 1 :].astype(mx.float32))
    chosen = mx.take_along_axis(lp, mx.array(completion)[:, None], axis=1)[:, 0]
    return np.array(mx.argmax(lp, axis=-1)), np.array(chosen)


@pytest.fixture(scope="module")
def base(tiny_model: Path):
    """One shared server over the plain tiny model for the tests that only read from it."""
    engine = load_engine(tiny_model, max_batch=32)
    with live_server(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base.v1, api_key="x", timeout=TIMEOUT, max_retries=0)


# --------------------------------------------------------------------------------------------- OpenAI client
def test_openai_completions_n_logprobs_usage(base, client) -> None:
    eos = eos_ids(base.engine)
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], n=4, max_tokens=12, temperature=1.0, logprobs=2)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    total = 0
    for c in r.choices:
        ids = c.model_extra["token_ids"]
        check_length(ids, c.finish_reason, 12, eos)
        assert len(c.logprobs.token_logprobs) == len(ids) == len(c.logprobs.tokens) == len(c.logprobs.top_logprobs)
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
        assert c.model_extra["token_logprobs"] == c.logprobs.token_logprobs
        for top in c.logprobs.top_logprobs:
            assert 1 <= len(top) <= 2 and all(v <= 0 for v in top.values())  # two ids may decode to one string
        total += len(ids)
    assert r.usage.completion_tokens == total
    assert r.usage.prompt_tokens == len(base.engine.tokenizer.encode(PROMPTS[0]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + total
    assert r.model_extra["policy_version"] == 0


def test_openai_chat_n_logprobs(base, client) -> None:
    eos = eos_ids(base.engine)
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "What is 2+3?"}],
        n=4,
        max_tokens=10,
        logprobs=True,
        top_logprobs=2,
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    total = 0
    for c in r.choices:
        ids = c.model_extra["token_ids"]
        check_length(ids, c.finish_reason, 10, eos)
        assert c.message.role == "assistant" and isinstance(c.message.content, str)
        assert len(c.logprobs.content) == len(ids)
        for item, lp in zip(c.logprobs.content, c.model_extra["token_logprobs"]):
            assert item.logprob == lp <= 0
            assert 1 <= len(item.top_logprobs) <= 2
        total += len(ids)
    assert r.usage.completion_tokens == total
    # The rendered prompt's ids, as vLLM sends them (verifiers trains on them): the chat template's own.
    template = base.engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True
    )
    assert r.model_extra["prompt_token_ids"] == list(template)
    assert r.usage.prompt_tokens == len(template)


def test_openai_streaming(base, client) -> None:
    # Completions: the streamed pieces of each choice assemble into text, and each choice ends with a finish_reason.
    stream = client.completions.create(model="tiny", prompt=PROMPTS[1], n=2, max_tokens=16, stream=True)
    texts, finish = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert set(finish) == {0, 1} and set(finish.values()) <= {"length", "stop"}
    assert all(isinstance(t, str) for t in texts.values())
    assert any(texts.values())

    # Greedy is deterministic: the streamed text equals the non-streamed one.
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=20, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    pieces, last = [], None
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            pieces.append(c.text or "")
            last = c.finish_reason or last
    assert "".join(pieces) == whole.text and last == whole.finish_reason

    # Seeded sampling is deterministic per choice (seed + index), so a streamed request reproduces the non-streamed
    # one; with this seed one choice ends on EOS, whose special-token text must not leak into the stream.
    kw = dict(model="tiny", prompt="The cat", n=8, max_tokens=24, seed=15)
    whole = client.completions.create(**kw).choices
    assert any(c.finish_reason == "stop" for c in whole), "pick a seed where a choice ends on EOS"
    texts, finish = {}, {}
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.text or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert texts == {c.index: c.text for c in whole}
    assert finish == {c.index: c.finish_reason for c in whole}

    # Chat: role first, content deltas, finish_reason at the end.
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0, stream=True
    )
    content, reasons = "", []
    for chunk in chat:
        for c in chunk.choices:
            content += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12, temperature=0
    )
    assert content == whole.choices[0].message.content


# ---------------------------------------------------------------------------------------- sampling correctness
def test_greedy_tokens_and_logprobs_match_full_forward(base, tiny_model: Path, http: httpx.Client) -> None:
    """Greedy requests of different prompt lengths run concurrently (so they share batched, padded decode steps);
    each must equal an argmax decode of the model, and each returned log-prob must equal log_softmax of a full
    forward pass at that position."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model))
    max_tokens = 24
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [
            pool.submit(
                post,
                http,
                f"{base.v1}/completions",
                {"prompt": p, "max_tokens": max_tokens, "temperature": 0, "n": 2 if i == 0 else 1},
            )
            for i, p in enumerate(PROMPTS)
        ]
        results = [f.result().json() for f in futures]
    for prompt, r in zip(PROMPTS, results):
        prompt_ids = tokenizer.encode(prompt)
        for choice in r["choices"]:
            ids, lps = choice["token_ids"], choice["token_logprobs"]
            argmax, expected = teacher_forced_logprobs(model, prompt_ids, ids)
            assert ids == argmax.tolist(), f"greedy ids differ from argmax for {prompt!r}"
            np.testing.assert_allclose(lps, expected, atol=1e-4, rtol=0)

    # And mlx-lm's own single-sequence generate agrees on the tokens.
    reference = [
        resp.token
        for resp in mlx_lm.stream_generate(model, tokenizer, tokenizer.encode(PROMPTS[2]), max_tokens=max_tokens)
    ]
    assert results[2]["choices"][0]["token_ids"][: len(reference)] == reference


def sampling_distribution(
    model, prompt: list[int], completion: list[int], temp: float, top_p: float, edge: float = 0.0
) -> np.ndarray:
    """NumPy, from one full forward: at each completion position, the log-probs [V] of softmax(logits / temp)
    restricted to (and renormalised over) the top_p nucleus of the temperature-1 distribution, i.e. the smallest
    set of most likely tokens whose mass reaches top_p (-inf outside it). `edge` moves the threshold to top_p + edge:
    where the mass reaches top_p within float32 rounding, the engine's float32 sums may keep one token more or less."""
    seq = mx.array(prompt + completion[:-1])[None]
    logits = np.array(model(seq)[0, len(prompt) - 1 :].astype(mx.float32)).astype(np.float64)
    out = []
    for row in logits:
        p1 = np.exp(row - row.max())
        p1 /= p1.sum()
        keep = np.ones_like(p1, dtype=bool)
        if top_p < 1:
            order = np.argsort(-p1)
            mass_before = np.cumsum(p1[order]) - p1[order]
            keep = np.zeros_like(keep)
            keep[order[mass_before < top_p + edge]] = True
        z = np.where(keep, row / temp, -np.inf)
        out.append(z - z.max() - np.log(np.exp(z - z.max()).sum()))
    return np.array(out)


@pytest.mark.parametrize(("temp", "top_p"), [(0.7, 1.0), (1.6, 1.0), (0.8, 0.9), (1.0, 0.7), (0.5, 0.01)])
@pytest.mark.parametrize("seeded", [False, True])
def test_sampled_logprobs_are_of_the_sampling_distribution(base, tiny_model: Path, http, temp, top_p, seeded):
    """At temperature T with top_p, each reported log-prob is that of the distribution the token was drawn from:
    log_softmax(logits / T) over the top_p nucleus (what the learner's importance weights need). Seeded requests
    take the engine's own sampler, unseeded ones mlx-lm's; both are checked. The top alternatives come from the
    same distribution."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(tiny_model))
    prompt_ids = tokenizer.encode(PROMPTS[1])
    body = {
        "prompt": {"prompt_token_ids": prompt_ids},
        "max_tokens": 16,
        "temperature": temp,
        "top_p": top_p,
        "n": 3,
        "logprobs": 2,
    }
    if seeded:
        body["seed"] = 5
    r = post(http, f"{base.base}/generate", body).json()

    def agrees(dist: np.ndarray, token: int, sampled: dict, alternatives: dict) -> bool:
        return (
            sampled == {str(token): pytest.approx(dist[token], abs=1e-4)}
            and np.isfinite(dist[token])  # a sampled token is always inside the nucleus
            # The two most likely tokens, less any outside the nucleus (probability 0: never sampled).
            and len(alternatives) == min(2, int(np.isfinite(dist).sum()))
            and all(v == pytest.approx(dist[int(k)], abs=1e-4) for k, v in alternatives.items())
        )

    for ids, positions in zip(r["token_ids"], r["logprobs"]):
        # The exact nucleus, and the two a float32 sum could give where the mass reaches top_p within its rounding.
        dists = [sampling_distribution(model, prompt_ids, ids, temp, top_p, edge) for edge in (0.0, -1e-5, 1e-5)]
        for t, (token, (sampled, alternatives)) in enumerate(zip(ids, positions)):
            assert any(agrees(d[t], token, sampled, alternatives) for d in dists), (t, token, sampled, alternatives)
    if top_p < 0.05:  # a one-token nucleus: every token is the argmax, and certain under the sampling distribution
        assert all(next(iter(p[0].values())) == 0.0 for c in r["logprobs"] for p in c)
    if temp != 1.0:  # and these are not the temperature-1 numbers any more
        ids = r["token_ids"][0]
        _, t1 = teacher_forced_logprobs(model, prompt_ids, ids)
        reported = [next(iter(p[0].values())) for p in r["logprobs"][0]]
        assert np.abs(np.array(reported) - t1).max() > 1e-2


def test_32_concurrent_requests_share_the_batch(base, http: httpx.Client) -> None:
    eos = eos_ids(base.engine)
    before = base.metrics()
    max_tokens = [8 + 2 * i for i in range(32)]
    peak = [0.0]
    done = threading.Event()

    def watch() -> None:  # the running batch's size, sampled while the requests are in flight
        while not done.wait(0.02):
            peak[0] = max(peak[0], base.metrics(http)["runner_active_sequences"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with cf.ThreadPoolExecutor(32) as pool:
            futures = [
                pool.submit(
                    post,
                    http,
                    f"{base.v1}/completions",
                    {"prompt": PROMPTS[i % 4], "max_tokens": m, "temperature": 1.0},
                )
                for i, m in enumerate(max_tokens)
            ]
            results = [f.result() for f in futures]
    finally:
        done.set()
        watcher.join(TIMEOUT)
    tokens = 0
    for m, r in zip(max_tokens, results):
        assert r.status_code == 200, r.text
        c = r.json()["choices"][0]
        check_length(c["token_ids"], c["finish_reason"], m, eos)
        tokens += len(c["token_ids"])
    after = base.metrics()
    steps = after["runner_decode_steps_total"] - before["runner_decode_steps_total"]
    assert after["runner_generation_tokens_total"] - before["runner_generation_tokens_total"] == tokens
    assert steps < tokens / 4, f"{steps} decode steps for {tokens} tokens: the batch was not shared"
    assert peak[0] > 1


# ------------------------------------------------------------------------------------------ adapter switches
def _version_adapters(engine, versions: int, seed: int = 0) -> tuple[dict[int, dict], dict[int, int]]:
    """Adapters whose version can be read off every greedy token: version v makes the model emit token T_v whatever
    the context.

    The last block's MLP base weights are replaced (test-only model) so that its intermediate activations sum to
    |x|^2 = d for the RMS-normalised input x: channel 2i computes silu(x_i)*x_i, channel 2i+1 silu(-x_i)*(-x_i), and
    x^2 sigmoid(x) + x^2 sigmoid(-x) = x^2. Its down_proj base is zero; version v's down_proj LoRA reads that constant
    (lora_a = 1/d) and writes a large multiple of T_v's embedding row into the residual stream, so with tied
    embeddings the logit of T_v dominates at every position. Every other adapter tensor gets version-specific
    noise (layer 0) or zeros (layer 1, where noise would break the constant), so each install replaces them all."""
    from workers.lora import lora_layout

    model = engine.model
    mlp = model.layers[-1].mlp
    hidden = model.args.hidden_size
    inter = mlp.gate_proj.linear.weight.shape[0]
    assert inter >= 2 * hidden
    g = np.zeros((inter, hidden), np.float32)
    for i in range(hidden):
        g[2 * i, i], g[2 * i + 1, i] = 1.0, -1.0
    mlp.gate_proj.linear.weight = mx.array(g)
    mlp.up_proj.linear.weight = mx.array(g)
    mlp.down_proj.linear.weight = mx.zeros_like(mlp.down_proj.linear.weight)

    emb = np.array(model.model.embed_tokens.weight)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    forbidden = eos_ids(engine) | {0, 1, 2}
    targets = {v: t for v, t in enumerate(t for t in range(100, 500, 37) if t not in forbidden) if v < versions}
    rng = np.random.default_rng(seed)
    last = f"model.layers.{len(model.layers) - 1}."
    adapters = {}
    for v, target in targets.items():
        tensors = {}
        for name, (shape, _) in lora_layout(model).items():
            noise = rng.normal(size=shape).astype(np.float32) * 0.05
            tensors[name] = mx.zeros(shape) if name.startswith(last) else mx.array(noise)
        a = np.zeros(tensors[f"{last}mlp.down_proj.lora_a"].shape, np.float32)
        a[:, 0] = 1.0 / hidden
        b = np.zeros(tensors[f"{last}mlp.down_proj.lora_b"].shape, np.float32)
        b[0] = unit[target] * 500.0
        tensors[f"{last}mlp.down_proj.lora_a"], tensors[f"{last}mlp.down_proj.lora_b"] = mx.array(a), mx.array(b)
        adapters[v] = tensors
    return adapters, targets


def test_adapter_switch_under_load_is_atomic(lora_engine, serve, http: httpx.Client) -> None:
    """Install versions 1, 2, 3 while 12 greedy requests decode. Each token's content reveals which adapter computed
    it (see _version_adapters), so the test checks that every token claims exactly the version that computed it:
    a step computed with a half-installed adapter, or with one version but labelled with another (the off-by-one
    the pipelined BatchGenerator invites), yields a token that differs from T_label. All sequences of a step run
    in one forward pass, so a step that mixed versions would show up as such a mismatch too."""
    from workers.lora import set_lora

    engine = lora_engine
    adapters, targets = _version_adapters(engine, versions=4)
    set_lora(engine.model, adapters[0])  # version 0 is live from the start
    mx.eval(engine.model.parameters())
    # The construction works on arbitrary context before relying on it:
    for v in (0, 3):
        set_lora(engine.model, adapters[v])
        ctx = mx.array(np.random.default_rng(v).integers(3, 500, size=(2, 40)))
        assert (mx.argmax(engine.model(ctx), axis=-1) == targets[v]).all().item()
    set_lora(engine.model, adapters[0])
    mx.eval(engine.model.parameters())

    srv = serve(engine)
    max_tokens = 240
    bodies = [
        {"prompt": PROMPTS[i % 4] + " x" * i, "max_tokens": max_tokens, "temperature": 0, "n": 2 if i % 5 == 0 else 1}
        for i in range(12)
    ]
    total = sum(b["n"] for b in bodies) * max_tokens
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(post, http, f"{srv.v1}/completions", b) for b in bodies]
        start = engine.stats.generation_tokens_total
        for v, fraction in ((1, 0.1), (2, 0.35), (3, 0.6)):
            wait_for(
                lambda fraction=fraction: engine.stats.generation_tokens_total - start >= fraction * total,
                TIMEOUT,
                f"{fraction:.0%} of the tokens before installing version {v}",
                interval=0.002,
            )
            assert engine.install_adapter(v, adapters[v]).wait(TIMEOUT)
            assert engine.version == v
        results = [f.result().json() for f in futures]

    seen = set()
    for r in results:
        versions_of_request = []
        for c in r["choices"]:
            ids, versions = c["token_ids"], c["policy_versions"]
            assert c["finish_reason"] == "length" and len(ids) == len(versions) == max_tokens
            assert versions == sorted(versions), "policy versions went backwards"
            wrong = [(i, t, v) for i, (t, v) in enumerate(zip(ids, versions)) if t != targets[v]]
            assert not wrong, f"tokens not computed by the version they claim (pos, token, version): {wrong[:5]}"
            versions_of_request += versions
            seen.add(tuple(sorted(set(versions))))
        assert r["policy_version"] == min(versions_of_request)
    assert (0, 1, 2, 3) in seen, f"no request spanned every switch: {seen}"
    assert engine.stats.adapter_switches_total == 3


def test_fused_lora_forward_matches_mlx_lm(lora_engine) -> None:
    """The engine runs LoRA layers through one addmm; the function must stay mlx-lm's LoRALinear."""
    from mlx_lm.tuner.lora import LoRALinear

    from workers.generation.engine import FusedLoRALinear
    from workers.lora import lora_layout, set_lora

    model = lora_engine.model
    fused = [m for _, m in model.named_modules() if type(m) is FusedLoRALinear]
    assert len(fused) == len(lora_layout(model)) // 2  # every wrapped projection (lora_a + lora_b each)
    rng = np.random.default_rng(3)
    set_lora(
        model,
        {k: mx.array(rng.normal(size=shape).astype(np.float32) * 0.1) for k, (shape, _) in lora_layout(model).items()},
    )
    tokens = mx.array(rng.integers(3, 500, size=(2, 24)))
    ours = model(tokens)
    try:
        for m in fused:
            m.__class__ = LoRALinear
        reference = model(tokens)
    finally:
        for m in fused:
            m.__class__ = FusedLoRALinear
    assert mx.abs(ours - reference).max().item() < 1e-4
    set_lora(model, {k: mx.zeros(shape) for k, (shape, _) in lora_layout(model).items()})
    assert mx.abs(model(tokens) - ours).max().item() > 1e-2, "the random adapter should change the logits"


# ------------------------------------------------------------------------------------------------- Atropos
def test_generate_matches_atropos_vllm_parsing(base, http: httpx.Client) -> None:
    prompt_ids = base.engine.tokenizer.encode(PROMPTS[0])
    body = {
        "prompt": {"prompt_token_ids": prompt_ids},
        "logprobs": 0,
        "n": 3,
        "max_tokens": 10,
        "temperature": 1.0,
        "top_p": 1.0,
        "stop": ["User:", "Human:"],
    }
    r = post(http, f"{base.base}/generate", body)
    assert r.status_code == 200, r.text
    results = r.json()
    # Atropos' VLLMServer._tokens_and_logprobs_completion_wrapper, verbatim in effect:
    out_tokens, out_logprobs, reasons = [], [], []
    for output_token_logprobs, finish_reason in zip(results["logprobs"], results["finish_reasons"]):
        out_logprobs.append([list(item[0].values())[0] for item in output_token_logprobs])
        out_tokens.append([int(list(item[0].keys())[0]) for item in output_token_logprobs])
        reasons.append(finish_reason)
    assert len(out_tokens) == len(reasons) == 3
    assert out_tokens == results["token_ids"]
    for ids, lps, reason in zip(out_tokens, out_logprobs, reasons):
        assert reason in ("length", "stop") and 1 <= len(ids) <= 10
        assert all(isinstance(lp, float) and lp <= 0 for lp in lps) and len(lps) == len(ids)
    assert results["prompt_token_ids"] == prompt_ids


# ----------------------------------------------------------------------------------------------- bad inputs
def _is_openai_error(r: httpx.Response) -> bool:
    err = r.json().get("error")
    return isinstance(err, dict) and isinstance(err.get("message"), str) and "type" in err and "code" in err


BAD_COMPLETIONS = {
    "not json": b"{not json",
    "a list body": b"[1, 2]",
    "a string body": b'"prompt"',
    "no prompt": {"max_tokens": 4},
    "unknown model": {"model": "gpt-5", "prompt": "hi"},
    "negative max_tokens": {"prompt": "hi", "max_tokens": -1},
    "zero max_tokens": {"prompt": "hi", "max_tokens": 0},
    "huge max_tokens": {"prompt": "hi", "max_tokens": 10**9},
    "string n": {"prompt": "hi", "n": "2"},
    "list temperature": {"prompt": "hi", "temperature": [1]},
    "bool max_tokens": {"prompt": "hi", "max_tokens": True},
    "n=0": {"prompt": "hi", "n": 0},
    "huge n": {"prompt": "hi", "n": 100000},
    "top_p 0": {"prompt": "hi", "top_p": 0},
    "empty stop": {"prompt": "hi", "stop": [""]},
    "negative temperature": {"prompt": "hi", "temperature": -1},
    "token id out of vocab": {"prompt": [1, 2, 10**6]},
    "negative token id": {"prompt": [-5]},
    "empty prompt": {"prompt": ""},
    "logprobs too many": {"prompt": "hi", "logprobs": 1000},
    # Each of these once reached the engine: a negative seed (mx.random.key(-1) raised and ended the engine
    # thread), a lone surrogate (a 500 from the tokenizer), NaN and infinity (Python's JSON reader takes them).
    "negative seed": {"prompt": "hi", "seed": -1},
    "seed past 2**63": {"prompt": "hi", "seed": 2**64},
    "lone surrogate in the prompt": b'{"prompt": "a\\ud800b"}',
    "lone surrogate in a stop string": b'{"prompt": "hi", "stop": ["\\udfff"]}',
    "lone surrogate in the model name": b'{"prompt": "hi", "model": "\\ud83d"}',
    "NaN temperature": b'{"prompt": "hi", "temperature": NaN}',
    "infinite top_p": b'{"prompt": "hi", "top_p": Infinity}',
    "too many stop strings": {"prompt": "hi", "stop": [str(i) for i in range(17)]},
    "a stop string too long": {"prompt": "hi", "stop": "x" * 257},
    "prompt list of two strings": {"prompt": ["a", "b"]},
    "prompt of more characters than the context holds": {"prompt": "hello " * 20_000},  # refused untokenized
}
BAD_CHAT = {
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "wizard", "content": "hi"}]},
    "content not text": {"messages": [{"role": "user", "content": 5}]},
    "top_logprobs without logprobs": {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
    "lone surrogate in a content part": b'{"messages": [{"role": "user", "content": [{"type": "text", '
    b'"text": "\\ud800"}]}]}',
    "image content part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    "messages of more characters than the context holds": {"messages": [{"role": "user", "content": "hi " * 40_000}]},
}


def test_bad_inputs_get_4xx_in_openai_shape(base, http: httpx.Client) -> None:
    statuses = {}
    with httpx.Client(timeout=TIMEOUT) as c:
        cases = [(f"{base.v1}/completions", k, v) for k, v in BAD_COMPLETIONS.items()]
        cases += [(f"{base.v1}/chat/completions", k, v) for k, v in BAD_CHAT.items()]
        cases += [
            (f"{base.base}/generate", "generate without prompt", {"n": 1}),
            (f"{base.base}/generate", "generate stream", {"prompt": {"prompt_token_ids": [1]}, "stream": True}),
            (f"{base.base}/generate", "generate negative token id", {"prompt": {"prompt_token_ids": [-1]}}),
            (f"{base.base}/generate", "generate token id out of vocab", {"prompt": {"prompt_token_ids": [10**6]}}),
            (f"{base.base}/generate", "generate lone surrogate", b'{"prompt": "\\udc00"}'),
        ]
        too_long = "hello world " * 2000  # far more tokens than the 2048-token context
        cases += [(f"{base.v1}/completions", "prompt longer than the context", {"prompt": too_long})]
        for url, name, body in cases:
            if isinstance(body, bytes):
                r = c.post(url, content=body, headers={"content-type": "application/json"})
            else:
                r = c.post(url, json=body)
            statuses[name] = r.status_code
            assert 400 <= r.status_code < 500, f"{name}: {r.status_code} {r.text}"
            assert _is_openai_error(r), f"{name}: {r.text}"
        assert statuses["unknown model"] == 404
        assert c.get(f"{base.base}/no/such/route").status_code == 404
        assert c.get(f"{base.v1}/completions").status_code == 405
        # Still serving normally afterwards.
        r = c.post(f"{base.v1}/completions", json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        # Null, as OpenAI takes it, is the default.
        nulls = dict.fromkeys(["n", "temperature", "top_p", "stream", "seed", "stop", "logprobs", "echo", "model"])
        r = c.post(f"{base.v1}/completions", json={"prompt": "hi", "max_tokens": 3, **nulls})
        assert r.status_code == 200 and len(r.json()["choices"]) == 1, r.text
    assert not base.engine.failed


def test_a_fault_of_the_server_is_a_500_in_openai_shape(base, http: httpx.Client) -> None:
    """A route that raises (standing in for a bug of ours) answers 500 in OpenAI's error shape; the server goes on."""

    async def broken() -> None:
        raise RuntimeError("a bug")

    base.server.app.add_api_route("/test/broken", broken, methods=["POST"])
    with httpx.Client(timeout=TIMEOUT) as c:  # its own: uvicorn closes the connection after an unhandled error
        r = c.post(f"{base.base}/test/broken")
    assert r.status_code == 500 and _is_openai_error(r) and r.json()["error"]["type"] == "server_error", r.text
    assert post(http, f"{base.v1}/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_tiny_temperature_and_top_p_sample_the_top_token(base, http: httpx.Client) -> None:
    """A temperature too small for float32 (1/T overflows) is greedy, and a top_p too small is the top token alone:
    the same tokens as temperature 0, with finite log-probs (NaN would make the response unencodable)."""
    body = {"prompt": PROMPTS[1], "max_tokens": 6, "logprobs": 1}
    greedy = post(http, f"{base.v1}/completions", {**body, "temperature": 0}).json()["choices"][0]
    for odd in ({"temperature": 1e-300}, {"temperature": 0.7, "top_p": 1e-300}):
        r = post(http, f"{base.v1}/completions", {**body, **odd})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["token_ids"] == greedy["token_ids"], odd
        assert all(np.isfinite(choice["token_logprobs"])), odd


async def _submit_failing(engine) -> list[tuple]:
    """Two requests straight to the engine, past the HTTP checks: their first events."""
    loop = asyncio.get_running_loop()
    prompt = engine.tokenizer.encode(PROMPTS[2])
    refused_seed = engine.submit(prompt, SamplingParams(max_tokens=8, seed=-1), loop=loop)
    broken_top = engine.submit(prompt, SamplingParams(max_tokens=8, top_logprobs="2"), loop=loop)
    return [await asyncio.wait_for(req.events.get(), TIMEOUT) for req in (refused_seed, broken_top)]


def test_a_request_failing_inside_the_engine_fails_alone(base, http: httpx.Client) -> None:
    """While good requests decode, two requests fail inside the engine: one whose seed mx.random.key refuses (the
    seed -1 that used to end the engine thread) as it is started, with a 400; one whose top_logprobs is not a number
    mid-batch, as its first token is booked, with a 500. The good requests complete in full, the engine thread
    lives on, and every request is released."""
    engine = base.engine
    body = {"prompt": PROMPTS[0], "max_tokens": 600, "temperature": 0}  # greedy: no EOS for 1800 tokens
    with cf.ThreadPoolExecutor(4) as pool:
        good = [pool.submit(post, http, f"{base.v1}/completions", body) for _ in range(4)]
        wait_for(lambda: engine.stats.active_sequences == 4, TIMEOUT, "the good requests to decode", 0.01)
        refused, broken = asyncio.run(_submit_failing(engine))
        results = [f.result() for f in good]
    assert refused[0] == "error" and refused[2] == 400 and "parameters were refused" in refused[1], refused
    assert broken[0] == "error" and broken[2] == 500, broken
    for r in results:
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 600
    assert len({tuple(r.json()["choices"][0]["token_ids"]) for r in results}) == 1  # greedy: all the same
    assert not engine.failed and engine._thread.is_alive()
    wait_for(lambda: engine.stalled_seconds() == 0, TIMEOUT, "every request to be released")
    assert post(http, f"{base.v1}/completions", {"prompt": "hi", "max_tokens": 3}).status_code == 200


def test_bearer_token_required_when_set(tiny_engine, serve, http: httpx.Client) -> None:
    srv = serve(tiny_engine, api_token="s3cret")
    with httpx.Client(timeout=TIMEOUT) as c:
        body = {"prompt": "hi", "max_tokens": 2}
        r = c.post(f"{srv.v1}/completions", json=body)
        assert r.status_code == 401 and _is_openai_error(r)
        assert c.post(f"{srv.v1}/completions", json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get(f"{srv.base}/health").status_code == 200  # load balancers probe without credentials
        ok = c.post(f"{srv.v1}/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_queue_overload_gets_429_with_retry_after(tiny_model: Path, serve, http: httpx.Client) -> None:
    srv = serve(load_engine(tiny_model, max_queue=2))
    body = {"prompt": "What is 2+3?", "max_tokens": 200, "temperature": 0}
    with cf.ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda _: post(http, f"{srv.v1}/completions", body), range(16)))
    rejected = [r for r in responses if r.status_code == 429]
    assert rejected and all(r.status_code in (200, 429) for r in responses)
    assert all(r.headers.get("retry-after") and _is_openai_error(r) for r in rejected)
    assert post(http, f"{srv.v1}/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_a_dead_engine_thread_makes_health_fail(tiny_model: Path, serve, http: httpx.Client, tmp_path, monkeypatch):
    """The engine thread dies on a real MLX error (the RUNNER_TEST_ENGINE_FAULT hook): /health answers 503
    "failed" (a worker then reports itself failed and exits to be restarted) and requests get 503, not a hang."""
    fault = tmp_path / "engine-fault"
    monkeypatch.setenv("RUNNER_TEST_ENGINE_FAULT", str(fault))
    srv = serve(load_engine(tiny_model))
    assert post(http, f"{srv.v1}/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert not srv.engine.failed
    fault.touch()
    wait_for(lambda: http.get(f"{srv.base}/health").status_code == 503, TIMEOUT, "/health to fail")
    assert http.get(f"{srv.base}/health").json()["status"] == "failed" and srv.engine.failed and not fault.exists()
    r = post(http, f"{srv.v1}/completions", {"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 503 and _is_openai_error(r)


def test_a_hung_engine_counts_as_failed(tiny_model: Path, serve, http: httpx.Client, tmp_path, monkeypatch):
    """The engine hangs in a step with a request in its batch (the RUNNER_TEST_ENGINE_FAULT hook's "hang"): past its
    stall_timeout it counts as failed, and /health answers 503 "failed" (a worker then reports itself failed and is
    restarted)."""
    fault = tmp_path / "engine-fault"
    monkeypatch.setenv("RUNNER_TEST_ENGINE_FAULT", str(fault))
    srv = serve(load_engine(tiny_model, stall_timeout=1.0))
    assert post(http, f"{srv.v1}/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200
    steps = srv.engine.steps
    (tmp_path / "fault.tmp").write_text("hang")
    (tmp_path / "fault.tmp").replace(fault)  # at once: an empty fault file means a crash
    srv.engine.submit(srv.engine.tokenizer.encode(PROMPTS[0]), SamplingParams(max_tokens=1800, temperature=0))
    wait_for(lambda: http.get(f"{srv.base}/health").status_code == 503, TIMEOUT, "/health to fail")
    assert http.get(f"{srv.base}/health").json()["status"] == "failed" and not fault.exists()
    assert "no progress" in srv.engine.failure and srv.engine.steps - steps < 1800


# ------------------------------------------------------------------------------------------ disconnections
def test_client_disconnect_frees_slots(tiny_engine, serve) -> None:
    """Greedy decoding of this prompt runs for more than 1800 tokens without an EOS (checked by the non-stream
    request finishing on 'length' if it ran to the end), so only a working cancel ends it early."""
    srv = serve(tiny_engine)
    max_tokens = 1800
    body = {"prompt": PROMPTS[0], "max_tokens": max_tokens, "temperature": 0}

    def idle_after(start_tokens: float) -> float:
        wait_for(lambda: srv.metrics()["runner_active_sequences"] == 0, TIMEOUT, "the slots to be freed", 0.02)
        return srv.metrics()["runner_generation_tokens_total"] - start_tokens

    # Streaming: read a few chunks, then drop the connection.
    start = srv.metrics()["runner_generation_tokens_total"]
    with httpx.Client(timeout=TIMEOUT) as c:
        with c.stream("POST", f"{srv.v1}/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks >= 3:
                    break
    generated = idle_after(start)
    assert generated < max_tokens / 2, f"{generated} tokens generated after the client left"

    # Non-streaming: the client closes its connection once the request runs (not after a fixed client timeout,
    # which assumed how fast the server generates), and the server notices.
    start = srv.metrics()["runner_generation_tokens_total"]
    payload = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        wait_for(lambda: srv.metrics()["runner_active_sequences"] == 1, TIMEOUT, "the request to run", 0.02)
    generated = idle_after(start)
    assert generated < max_tokens / 2, f"{generated} tokens generated after the client left"


def test_cancelled_requests_release_their_queue_slots(tiny_model: Path, serve, http: httpx.Client) -> None:
    """With room for 2 outstanding requests and one long request running, clients that give up while their
    request still waits for admission to the busy batch must each free their place again; a leak would turn the
    later ones, and the final request, into 429s. (admit_wait_steps is huge so that they really wait; a request
    cancelled after admission is the disconnect test's case.)"""
    srv = serve(load_engine(tiny_model, max_queue=2, admit_wait_steps=10**9))
    before = srv.metrics()["runner_requests_total"]
    long_body = {"prompt": PROMPTS[0], "max_tokens": 1800, "temperature": 0, "stream": True}
    with httpx.Client(timeout=TIMEOUT) as c, c.stream("POST", f"{srv.v1}/completions", json=long_body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # keep a reference: a discarded httpx line iterator closes the connection
        next(lines)  # the batch is busy from here on
        for _ in range(5):
            # Each client leaves once its request waits for admission (seen in the queue depth), not after a
            # fixed client timeout that may fire before the server has even read the request.
            short = {"prompt": "hi", "max_tokens": 500, "stream": True}
            with c.stream("POST", f"{srv.v1}/completions", json=short) as waiting:
                assert waiting.status_code != 429, "a cancelled request kept its queue slot"
                wait_for(lambda: srv.metrics()["runner_queue_depth"] == 1, TIMEOUT, "the request to be queued")
            assert srv.metrics()["runner_active_sequences"] == 1, "the long request should still be running"
            wait_for(
                lambda: srv.metrics()["runner_active_sequences"] <= 1 and srv.metrics()["runner_queue_depth"] == 0,
                TIMEOUT,
                "the cancelled request to leave",
            )
        assert srv.metrics()["runner_requests_total"] - before == 6, "the server should have seen the requests"
    # (After the stream is closed: with this admission rule a new request would wait for the long one to end.)
    wait_for(lambda: srv.metrics()["runner_active_sequences"] == 0, TIMEOUT, "the stream's slot to be freed")
    assert post(http, f"{srv.v1}/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------------------- `runner serve` process
def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
        if proc.poll() is not None:
            break
    raise AssertionError(
        f"`runner serve` printed nothing within {timeout}s (exit {proc.poll()}): "
        f"{proc.stderr.read() if proc.poll() is not None else ''}"
    )


def _random_adapter(tiny_model: Path, out: Path) -> Path:
    """A rank-8 q/v adapter with non-zero lora_b, written with our save_adapter."""
    import mlx_lm

    from workers.lora import LoraSpec, apply_lora, lora_tensors, save_adapter, set_lora

    model, _ = mlx_lm.load(str(tiny_model))
    spec = LoraSpec(rank=8, keys=["self_attn.q_proj", "self_attn.v_proj"])
    apply_lora(model, spec)
    rng = np.random.default_rng(7)
    set_lora(
        model, {k: mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.3) for k, v in lora_tensors(model).items()}
    )
    return save_adapter(out, model, spec)


def test_runner_serve_with_saved_adapter_matches_mlx_lm(tiny_model: Path, tmp_path: Path, http: httpx.Client) -> None:
    """`runner serve --port 0 --adapter DIR` reports its port, serves greedy tokens equal to mlx_lm.load(...,
    adapter_path=DIR) + generate, and exits 0 on SIGTERM."""
    import mlx_lm

    adapter = _random_adapter(tiny_model, tmp_path / "adapter")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "runner.cli",
            "serve",
            "--model",
            str(tiny_model),
            "--adapter",
            str(adapter),
            "--port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The reference, computed while the server starts up.
        prompt = PROMPTS[0]
        model, tokenizer = mlx_lm.load(str(tiny_model), adapter_path=str(adapter))
        expected = [r.token for r in mlx_lm.stream_generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=16)]
        base_model, _ = mlx_lm.load(str(tiny_model))
        base_tokens = [
            r.token for r in mlx_lm.stream_generate(base_model, tokenizer, tokenizer.encode(prompt), max_tokens=16)
        ]
        assert base_tokens != expected, "the adapter should change the output, or this test proves nothing"

        line = _read_line(proc, 60)
        assert line.startswith("serving ") and " on http://127.0.0.1:" in line, line
        v1 = line.split(" on ", 1)[1].split()[0]
        root = v1.removesuffix("/v1")
        wait_for(lambda: http.get(f"{root}/health", timeout=2).status_code == 200, 30, "/health")
        r = post(http, f"{v1}/completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"][: len(expected)] == expected
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


@pytest.mark.parametrize("source", ["file", "environment"])
def test_runner_serve_on_every_interface_requires_its_token(
    tiny_model: Path, http: httpx.Client, tmp_path: Path, source: str
) -> None:
    """`runner serve --host 0.0.0.0` with a token from `--api-token-file` or RUNNER_API_TOKEN (the token is what
    allows the open bind) serves only requests that carry it; /health stays open."""
    command = ["serve", "--model", str(tiny_model), "--host", "0.0.0.0", "--port", "0"]
    env = {k: v for k, v in os.environ.items() if k != "RUNNER_API_TOKEN"}
    if source == "file":
        token_file = tmp_path / "api-token"
        token_file.write_text("s3cret\n")
        token_file.chmod(0o600)
        command += ["--api-token-file", str(token_file)]
    else:
        env["RUNNER_API_TOKEN"] = "s3cret"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = _read_line(proc, 60)
        assert line.startswith("serving ") and " on http://0.0.0.0:" in line, line
        port = int(line.split(" on http://0.0.0.0:", 1)[1].split("/", 1)[0])
        root = f"http://127.0.0.1:{port}"
        wait_for(lambda: http.get(f"{root}/health", timeout=2).status_code == 200, 30, "/health")
        body = {"prompt": "hi", "max_tokens": 2}
        refused = post(http, f"{root}/v1/completions", body)
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        r = http.post(f"{root}/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"}, timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()


def test_install_adapter_checks_before_it_changes_anything(lora_engine) -> None:
    """A bad adapter (stale version, wrong dtype or shape, missing tensor) raises and changes nothing; a good one
    goes live and is acked once."""
    from workers.lora import lora_tensors

    engine = lora_engine.start()
    acked = []
    engine.on_version = acked.append
    good = {k: mx.zeros(v.shape, v.dtype) for k, v in lora_tensors(engine.model).items()}
    name = next(iter(good))
    bad_sets = [
        {**good, name: good[name].astype(mx.float16)},
        {**good, name: mx.zeros((1, *good[name].shape), good[name].dtype)},
        {k: v for k, v in good.items() if k != name},
    ]
    for bad in bad_sets:
        with pytest.raises(ValueError, match="adapter tensor"):
            engine.install_adapter(1, bad)
    assert engine.version == engine.newest_version == 0 and acked == []
    applied = engine.install_adapter(1, good)
    assert applied.wait(TIMEOUT) and engine.version == 1 and acked == [1]
    with pytest.raises(ValueError, match="not newer"):
        engine.install_adapter(1, good)
    assert engine.version == 1 and acked == [1]
