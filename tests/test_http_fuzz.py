"""Fuzzing the generation worker's HTTP API with hypothesis: random and adversarial bodies (random JSON, wrong types,
huge, negative, NaN and infinite numbers, lone surrogates, long strings, nested junk, streaming on and off) posted to
/v1/completions, /v1/chat/completions and /generate of one real server over the tiny model. No body may get a 5xx
(nor, when streamed, a server error event), and afterwards the engine is alive, holds no request and serves a normal
one. Each test prints how many examples it ran (`-s` or `-rA` shows it)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from conftest import live_server, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.webserver import MAX_BODY_BYTES
from workers.generation.server import MAX_PROMPT_CHARS, load_engine

TIMEOUT = 30.0
MAX_TOKENS_LIMIT = 8  # bounds the work of every accepted request; above it is a 400
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/generate")
FIELDS = [
    "prompt",
    "messages",
    "model",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "stream",
    "logprobs",
    "top_logprobs",
    "echo",
    "prompt_token_ids",
    "content",  # put into the first message (see shaped_bodies)
]
FUZZ_SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# Values that broke or could break a server: out of every range, of every wrong type, text that is not Unicode.
ODD_NUMBERS = st.sampled_from(
    [0, -1, 1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**40, 1e308, -1e308, 5e-324, 1e-300, -0.0, 0.5]
    + [float("nan"), float("inf"), float("-inf")]
)
ODD_TEXT = st.sampled_from(
    ["", "\ud800", "a\udfffb", "\ud83d", "\x00", "😀", "</s>", "<|im_end|>", "hello " * 20_000]
    + ["x" * (MAX_PROMPT_CHARS + 1)]
)
TEXT = st.text(max_size=24) | ODD_TEXT
SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | ODD_NUMBERS | TEXT
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | TEXT, inner, max_size=5),
    max_leaves=16,
)


TOKEN_IDS = st.lists(st.integers(0, 511), min_size=1, max_size=16)
VALID_TEXT = st.text(min_size=1, max_size=24) | st.sampled_from(["😀 ok", "</s>", "<|im_end|>", "\x00", "hi " * 300])
SAMPLING = {
    "model": st.just("tiny"),
    "n": st.integers(1, 3),
    "max_tokens": st.integers(1, MAX_TOKENS_LIMIT),
    "temperature": st.floats(0, 2) | st.sampled_from([1e-300, 5e-324, 1e-6]),
    "top_p": st.floats(0, 1, exclude_min=True) | st.sampled_from([1e-300, 5e-324, 1e-7]),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=8), max_size=4),
    "seed": st.integers(0, 2**63 - 1),
    "stream": st.booleans(),
}
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]),
        "content": VALID_TEXT
        | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": VALID_TEXT}), max_size=3),
    }
)
# Bodies each endpoint should accept (or refuse only for a reason of the model's, such as a chat template refusing
# an order of roles): the starting point that adversarial values are put into.
VALID_BODIES = {
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": VALID_TEXT | TOKEN_IDS | st.lists(VALID_TEXT, min_size=1, max_size=1)},
        optional={**SAMPLING, "logprobs": st.integers(0, 20), "echo": st.booleans()},
    ),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(MESSAGE, min_size=1, max_size=4)},
        optional={
            **SAMPLING,
            "max_completion_tokens": st.integers(1, MAX_TOKENS_LIMIT),
            "logprobs": st.booleans(),
            "top_logprobs": st.integers(0, 20),
        },
    ),
    "/generate": st.fixed_dictionaries(
        {"prompt": st.fixed_dictionaries({"prompt_token_ids": TOKEN_IDS}) | VALID_TEXT},
        optional={**SAMPLING, "stream": st.just(False), "logprobs": st.integers(0, 20)},
    ),
}
ADVERSARIAL = st.one_of(
    ODD_NUMBERS,
    ODD_NUMBERS,
    ODD_TEXT,
    ODD_TEXT,
    JSON,
    st.lists(st.integers(-(2**64), 2**64) | ODD_NUMBERS, max_size=8),  # token ids out of range, of the wrong type
    st.fixed_dictionaries({"prompt_token_ids": st.lists(st.integers(-(2**64), 2**64), max_size=4)}),
    st.lists(st.fixed_dictionaries({"role": JSON, "content": JSON}), max_size=2),  # messages of junk
    st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": ODD_TEXT | JSON}), min_size=1, max_size=2),
    st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": ODD_TEXT | JSON}), min_size=1, max_size=2),
)


# Numbers at and past the edges of what some field takes.
EDGE_NUMBERS = st.sampled_from(
    [-1, 0, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), 10**6, 1e-300, 5e-324, -1e-300, 2.5]
    + [float("nan"), float("inf"), float("-inf")]
)
NUMERIC_FIELDS = [
    "n",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "logprobs",
    "top_logprobs",
]


@st.composite
def shaped_bodies(draw, path: str) -> dict:
    """A valid body of `path` with one numeric field at or past an edge, or with up to three fields (its own or any
    other) set to adversarial values."""
    body = draw(VALID_BODIES[path])
    if draw(st.booleans()):
        body[draw(st.sampled_from(NUMERIC_FIELDS))] = draw(EDGE_NUMBERS)
        return body
    for _ in range(draw(st.integers(1, 3))):
        body[draw(st.sampled_from(sorted(body)) | st.sampled_from(FIELDS))] = draw(ADVERSARIAL)
    if "content" in body and isinstance(body.get("messages"), list) and body["messages"]:
        body["messages"][0] = {"role": "user", "content": body.pop("content")}
    return body


@pytest.fixture(scope="module")
def server(tiny_model: Path):
    engine = load_engine(tiny_model, max_batch=8)
    with live_server(engine, max_tokens_default=4, max_tokens_limit=MAX_TOKENS_LIMIT) as srv:
        yield srv


@pytest.fixture(scope="module")
def client():
    with httpx.Client(timeout=TIMEOUT) as c:
        yield c


def post(client: httpx.Client, url: str, body: object) -> httpx.Response:
    """POST `body` as JSON the way a careless client could write it: NaN and Infinity as bare words, lone surrogates
    as \\u escapes; bytes go as they are."""
    content = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    return client.post(url, content=content, headers={"content-type": "application/json"})


def check_answer(r: httpx.Response, body: object) -> None:
    """No 5xx; a 4xx in OpenAI's error shape; a stream without a server error event."""
    shown = repr(body)[:300]
    assert r.status_code < 500, f"{r.status_code} for {shown}: {r.text[:300]}"
    if r.status_code >= 400:
        error = r.json()["error"]
        assert isinstance(error["message"], str) and error["type"] == "invalid_request_error" or r.status_code == 404
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert "server_error" not in r.text and r.text.endswith("data: [DONE]\n\n"), f"{shown}: {r.text[-300:]}"


def check_still_serving(server, client: httpx.Client) -> None:
    engine = server.engine
    assert not engine.failed and engine._thread.is_alive()
    wait_for(lambda: engine.stalled_seconds() == 0, TIMEOUT, "every fuzzed request to be released")
    assert client.get(f"{server.base}/health").status_code == 200
    r = client.post(f"{server.v1}/completions", json={"prompt": "What is 2+3?", "max_tokens": 3})
    assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) >= 1


def test_random_bodies_never_get_a_5xx(server, client, request) -> None:
    """Random JSON documents (and raw bytes) to each endpoint."""
    count = 0

    @settings(max_examples=250, **FUZZ_SETTINGS)
    @given(path=st.sampled_from(ENDPOINTS), body=JSON | st.binary(max_size=64))
    def run(path: str, body: object) -> None:
        nonlocal count
        count += 1
        check_answer(post(client, server.base + path, body), body)

    run()
    print(f"\nhttp fuzz, random bodies: {count} examples")
    request.node.user_properties.append(("examples", count))
    check_still_serving(server, client)


def test_adversarial_fields_never_get_a_5xx(server, client, request) -> None:
    """Bodies of the endpoints' own shape whose every field is a plausible value or an adversarial one, streamed
    and not, so that many reach the engine."""
    count = 0

    @settings(max_examples=350, **FUZZ_SETTINGS)
    @given(data=st.data())
    def run(data) -> None:
        nonlocal count
        count += 1
        path = data.draw(st.sampled_from(ENDPOINTS))
        body = data.draw(shaped_bodies(path))
        check_answer(post(client, server.base + path, body), body)

    run()
    print(f"\nhttp fuzz, adversarial fields: {count} examples")
    request.node.user_properties.append(("examples", count))
    check_still_serving(server, client)


def test_a_body_over_the_limit_is_a_413(server, client) -> None:
    """A body larger than MAX_BODY_BYTES, declared (Content-Length) or chunked (no length: refused once what was read
    passes the limit, so the app never holds more than that), is a 413 in OpenAI's shape; the server serves on."""
    chunk = b" " * 2**20

    def chunks():  # a JSON document of spaces, twice the limit, sent chunked
        for _ in range(2 * MAX_BODY_BYTES // len(chunk)):
            yield chunk

    for content in (b" " * (MAX_BODY_BYTES + 1), chunks()):
        r = client.post(f"{server.v1}/completions", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text[:300]
        assert "larger than" in r.json()["error"]["message"]
    check_still_serving(server, client)
