"""Shared fixtures: the tiny model directory, and real HTTP generation servers on loopback.

- `tiny_model` (session): `prepare_tiny` run once; deterministic, so every test sees the same weights and tokenizer.
- `tiny_engine` / `lora_engine`: unstarted `Engine`s over it (the latter with rank-4 LoRA on every attention and MLP
  projection), stopped at teardown.
- `serve(engine, **server_kwargs) -> LiveServer`: a real uvicorn on 127.0.0.1 with a kernel-chosen port, stopped
  (server thread joined, engine stopped) at the end of the test. `live_server` is the same as a context manager,
  for module-scoped fixtures.
- Fuzz tests record how many examples they ran (`user_properties` "examples"); the run's summary lists them.
- `http` (session): one pooled httpx client; `wait_for(predicate, timeout, what)`: poll with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from helpers import ALL_PROJECTIONS  # noqa: E402  (tests/ is on sys.path)
from helpers import poll as wait_for  # noqa: E402

# Float32 matmuls are exact float32 on MLX's CPU and Metal backends; on CUDA MLX runs them in TF32 (10 mantissa
# bits) unless told otherwise. The tests that compare log-probs and gradients between two code paths check exactness,
# which is defined only in float32: run the suite (and the jobs it launches) without TF32, whatever the backend.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

START_TIMEOUT = 30.0  # seconds to wait for uvicorn to bind and /health to answer
STOP_TIMEOUT = 10.0
HTTP_TIMEOUT = 30.0  # default per-call timeout of the `http` client


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama (hidden 64, 2 layers, vocab 512, real BPE tokenizer), prepared once per session."""
    from workers.models import prepare_tiny

    return prepare_tiny(tmp_path_factory.mktemp("models") / "tiny")


@dataclass
class LiveServer:
    """A running uvicorn serving one engine; `base` is the root URL, `v1` the OpenAI base URL."""

    engine: object
    server: object
    uvicorn: object
    thread: threading.Thread
    port: int
    client: httpx.Client  # for metrics(); closed with the server

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def metrics(self, client: httpx.Client | None = None) -> dict[str, float]:
        """The /metrics samples as {name: value}."""
        text = (client or self.client).get(f"{self.base}/metrics", timeout=10).text
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def _healthy(client: httpx.Client, base: str, headers: dict) -> bool:
    try:
        return client.get(f"{base}/health", timeout=2, headers=headers).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def live_server(engine, model_name: str = "tiny", **server_kwargs) -> Iterator[LiveServer]:
    """Start `engine` (if not started) and serve it on 127.0.0.1:<free port> until the block exits; the server
    thread is joined and the engine stopped even when the block raises."""
    from runner.webserver import start_in_thread
    from workers.generation.server import Server

    engine.start()  # a no-op if it already runs
    server = Server(engine, model_name, **server_kwargs)
    # port=0: the kernel picks a free port at bind time, so parallel test runs never race for one.
    uv, thread, port = start_in_thread(server.app, "127.0.0.1", 0, name="uvicorn-test", start_timeout=START_TIMEOUT)
    client = httpx.Client(timeout=HTTP_TIMEOUT)  # one pooled client: a new one per poll costs ~20 ms
    try:
        live = LiveServer(engine, server, uv, thread, port, client)
        headers = {"Authorization": f"Bearer {server.api_token}"} if server.api_token else {}
        if server.ready:
            wait_for(lambda: _healthy(client, live.base, headers), START_TIMEOUT, "/health")
        yield live
    finally:
        client.close()
        uv.should_exit = True
        thread.join(STOP_TIMEOUT)
        engine.stop()
    # Only reached when the block succeeded: a hung shutdown must not mask the block's own failure.
    assert not thread.is_alive(), f"uvicorn did not stop within {STOP_TIMEOUT}s"


@pytest.fixture(name="live_server", scope="session")
def live_server_fixture():
    """The `live_server` context manager, for module-scoped fixtures that need their own server."""
    return live_server


@pytest.fixture
def serve():
    """Factory: `serve(engine, **server_kwargs) -> LiveServer`, stopped at the end of the test."""
    with contextlib.ExitStack() as stack:
        yield lambda engine, **kw: stack.enter_context(live_server(engine, **kw))


@pytest.fixture(scope="session")
def http() -> Iterator[httpx.Client]:
    """One pooled HTTP client for the session: creating a client per call costs more (TLS context setup) than a
    tiny-model request, and is CPU the server under test would otherwise get."""
    with httpx.Client(timeout=HTTP_TIMEOUT, limits=httpx.Limits(max_connections=128)) as client:
        yield client


@pytest.fixture
def tiny_engine(tiny_model: Path):
    """An unstarted engine over the plain tiny model (stopped at teardown even if never served)."""
    from workers.generation.server import load_engine

    engine = load_engine(tiny_model)
    yield engine
    engine.stop()


@pytest.fixture
def lora_engine(tiny_model: Path):
    """An unstarted engine over the tiny model with rank-4 LoRA (lora_b = 0) on every attention and MLP
    projection, ready for `install_adapter`."""
    from workers.generation.server import load_engine
    from workers.lora import LoraSpec

    engine = load_engine(tiny_model, lora_spec=LoraSpec(rank=4, keys=list(ALL_PROJECTIONS)))
    yield engine
    engine.stop()


@pytest.fixture
def keys(tmp_path: Path) -> dict:
    """CURVE key pairs for a coordinator, an authorized worker and a stranger, plus the authorized-keys directory."""
    from runner.keys import generate_keypair

    authorized = tmp_path / "authorized"
    authorized.mkdir()
    server_public, server_secret = generate_keypair(tmp_path / "keys", "coordinator")
    worker_public, worker_secret = generate_keypair(tmp_path / "keys", "worker")
    (authorized / "worker.key").write_bytes(worker_public.read_bytes())
    _, stranger_secret = generate_keypair(tmp_path / "keys", "stranger")
    # Keys laid out by role (`runner keys authorize`): a learner's and an observer's.
    learner_public, learner_secret = generate_keypair(tmp_path / "keys", "learner")
    observer_public, observer_secret = generate_keypair(tmp_path / "keys", "observer")
    for role, public in (("learners", learner_public), ("observers", observer_public)):
        (authorized / role).mkdir()
        (authorized / role / public.name).write_bytes(public.read_bytes())
    return {
        "server_public": server_public,
        "server_secret": server_secret,
        "authorized": authorized,
        "worker_secret": worker_secret,
        "stranger_secret": stranger_secret,
        "learner_secret": learner_secret,
        "observer_secret": observer_secret,
    }


_fuzz_counts: list[tuple[str, int]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call":
        _fuzz_counts.extend((report.nodeid, n) for key, n in report.user_properties if key == "examples")


def pytest_terminal_summary(terminalreporter) -> None:
    """The number of examples each fuzz test ran, in the summary even under -q (the tests' own prints are captured)."""
    for nodeid, n in _fuzz_counts:
        terminalreporter.write_line(f"fuzz: {nodeid} ran {n} examples")
