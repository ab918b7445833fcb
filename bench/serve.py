"""Generation throughput: `runner serve` vs `mlx_lm.server` vs the bare mlx-lm `BatchGenerator` (no HTTP).

    python bench/serve.py                      # the tiny model, prepared into a temp dir
    python bench/serve.py --model DIR --max-tokens 64 --clients 1,8,32

Each HTTP server runs as its own subprocess on a free loopback port; C clients (asyncio + httpx, one event loop in
this process) each send completion requests back to back, all with the same prompts, max_tokens and temperature
1.0. Tokens/s counts the completion tokens the server reports in `usage` (an HTTP server stops early at EOS, so the
counted tokens are what was generated), over the wall time of the whole run. The bare-engine column drives
mlx-lm's `BatchGenerator` in this process with C sequences at a time, EOS disabled: the ceiling for an engine
built on it. A last row runs `runner serve` with a rank-8 q/v LoRA adapter (written with `save_adapter`) against
the same load at the largest client count.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

PROMPTS = [
    "What is 2+3?",
    "The cat and the dog went out to look at the sun.",
    "Hello world. What is 17+4? 17 + 4 =",
    "Red green blue yellow. Name another colour:",
    "Write one more line: the moon, the star, the",
    "Question: what is the sum of 12 and 30? Answer:",
]
START_TIMEOUT = 180.0
REQUEST_TIMEOUT = 600.0


@dataclass
class Result:
    tokens: int
    seconds: float
    requests: int
    errors: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


# ------------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line:
                return line
    raise RuntimeError(f"server printed nothing within {timeout}s (exit code {proc.poll()})")


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} during startup")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} not healthy within {timeout}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@contextlib.contextmanager
def runner_server(model: Path, adapter: Path | None = None) -> Iterator[str]:
    """`runner serve` on a kernel-chosen port; yields the root URL (it prints 'serving ... on http://h:p/v1')."""
    cmd = [sys.executable, "-m", "runner.cli", "serve", "--model", str(model), "--port", "0"]
    if adapter:
        cmd += ["--adapter", str(adapter)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(proc, START_TIMEOUT)
        root = line.split(" on ", 1)[1].split()[0].removesuffix("/v1")
        _wait_healthy(f"{root}/health", proc, START_TIMEOUT)
        yield root
    finally:
        _stop(proc)


@contextlib.contextmanager
def mlx_lm_server(model: Path, max_tokens: int) -> Iterator[str]:
    """`python -m mlx_lm server` with its defaults (decode concurrency 32, prompt concurrency 8, like ours)."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--max-tokens",
        str(max_tokens),
        "--log-level",
        "WARNING",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        root = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{root}/health", proc, START_TIMEOUT)
        yield root
    finally:
        _stop(proc)


# ---------------------------------------------------------------------------------------------- load
async def _client(
    http: httpx.AsyncClient,
    url: str,
    worker: int,
    requests: int,
    max_tokens: int,
    temperature: float,
    totals: list[int],
) -> None:
    for i in range(requests):
        body = {"prompt": PROMPTS[(worker + i) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": temperature}
        for _attempt in range(10):
            # mlx_lm.server (http.server, listen backlog 5) resets some of 32 simultaneous connects: retry those.
            try:
                r = await http.post(url, json=body)
            except httpx.TransportError:
                totals[1] += 1
                await asyncio.sleep(0.05)
                continue
            if r.status_code == 200:
                totals[0] += r.json()["usage"]["completion_tokens"]
                break
            totals[1] += 1
            await asyncio.sleep(0.05)


async def _load(root: str, clients: int, requests_per_client: int, max_tokens: int, temperature: float) -> Result:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=limits) as http:
        totals = [0, 0]
        url = f"{root}/v1/completions"
        tic = time.perf_counter()
        await asyncio.gather(
            *(_client(http, url, w, requests_per_client, max_tokens, temperature, totals) for w in range(clients))
        )
        elapsed = time.perf_counter() - tic
    return Result(totals[0], elapsed, clients * requests_per_client, totals[1])


def http_load(root: str, clients: int, requests_per_client: int, max_tokens: int, temperature: float) -> Result:
    return asyncio.run(_load(root, clients, requests_per_client, max_tokens, temperature))


def warm_up(root: str, max_tokens: int) -> None:
    """Compile and fill caches outside the timed runs (first requests pay one-time costs in both servers)."""
    http_load(root, 8, 2, max_tokens, 1.0)


class BareEngine:
    """mlx-lm's BatchGenerator in this process: `clients` sequences at a time, exactly max_tokens each (EOS
    disabled), no HTTP and no per-token bookkeeping: the ceiling for an engine built on it."""

    def __init__(self, model_dir: Path, temperature: float):
        from mlx_lm import load
        from mlx_lm.sample_utils import make_sampler

        self.model, tokenizer = load(str(model_dir))
        self.sampler = make_sampler(temp=temperature)
        self.prompts = [tokenizer.encode(p) for p in PROMPTS]

    def run(self, clients: int, requests_per_client: int, max_tokens: int) -> Result:
        import mlx.core as mx
        from mlx_lm.generate import BatchGenerator

        gen = BatchGenerator(
            self.model, completion_batch_size=max(clients, 1), prefill_batch_size=8, sampler=self.sampler
        )
        tokens = 0
        tic = time.perf_counter()
        for r in range(requests_per_client):
            gen.insert(
                [self.prompts[(w + r) % len(self.prompts)] for w in range(clients)], max_tokens=[max_tokens] * clients
            )
            live = clients
            while live:
                for resp in gen.next_generated():
                    tokens += 1
                    live -= resp.finish_reason is not None
        mx.synchronize()
        elapsed = time.perf_counter() - tic
        gen.close()
        return Result(tokens, elapsed, clients * requests_per_client)


# --------------------------------------------------------------------------------------------- setup
def prepare_model(model: str | None, workdir: Path) -> Path:
    if model:
        return Path(model)
    from workers.models import prepare_tiny

    return prepare_tiny(workdir / "tiny")


def write_adapter(model_dir: Path, out: Path, rank: int = 8) -> Path:
    """A random rank-8 q/v adapter (non-zero lora_b, so it really runs) in mlx-lm's format."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load

    from workers.lora import LoraSpec, apply_lora, lora_tensors, save_adapter, set_lora

    model, _ = load(str(model_dir))
    spec = LoraSpec(rank=rank, keys=["self_attn.q_proj", "self_attn.v_proj"])
    apply_lora(model, spec)
    rng = np.random.default_rng(0)
    set_lora(
        model, {k: mx.array(rng.normal(size=v.shape).astype(np.float32) * 0.02) for k, v in lora_tensors(model).items()}
    )
    return save_adapter(out, model, spec)


def requests_for(clients: int, scale: float) -> int:
    """Requests per client: enough that each level runs a few seconds on the tiny model (24, 10 and 6 for 1, 8
    and 32 clients)."""
    return max(2, int(round(scale * max(6, 24 / clients**0.4))))


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="MLX model directory (default: the tiny model, prepared into a temp dir)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--repeats", type=int, default=3, help="runs per cell, interleaved; the table shows the median")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the number of requests per level")
    p.add_argument("--skip-mlx-lm", action="store_true")
    p.add_argument("--skip-lora", action="store_true")
    p.add_argument("--json", help="also write every run's numbers here")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.clients.split(",")]
    temperature = 1.0

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp, contextlib.ExitStack() as servers:
        model = prepare_model(args.model, Path(tmp))
        # All servers stay up for the whole run (idle ones cost nothing) so their runs can be interleaved: on a
        # shared or thermally throttled machine, slow periods then hit every column alike.
        modes = {"runner": servers.enter_context(runner_server(model))}
        if not args.skip_mlx_lm:
            modes["mlx_lm"] = servers.enter_context(mlx_lm_server(model, args.max_tokens))
        if not args.skip_lora:
            adapter = write_adapter(model, Path(tmp) / "adapter")
            modes["runner_lora"] = servers.enter_context(runner_server(model, adapter))
        for root in modes.values():
            warm_up(root, args.max_tokens)
        bare = BareEngine(model, temperature)
        bare.run(8, 1, args.max_tokens)  # warm-up

        runs: dict[str, dict[int, list[Result]]] = {m: {c: [] for c in levels} for m in [*modes, "bare"]}
        for c in levels:
            per_client = requests_for(c, args.scale)
            for _ in range(args.repeats):
                for name, root in modes.items():
                    runs[name][c].append(http_load(root, c, per_client, args.max_tokens, temperature))
                    report(name, c, runs[name][c][-1])
                runs["bare"][c].append(bare.run(c, per_client, args.max_tokens))
                report("bare", c, runs["bare"][c][-1])

    print()
    print("Medians (tok/s), and medians of back-to-back ratios:")
    print(table(runs, levels))
    print()
    print("Best run of each cell (the least-disturbed runs on a shared machine):")
    print(table(runs, levels, stat=best_tok_s))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {m: {c: [vars(r) | {"tok_s": r.tok_s} for r in rs] for c, rs in v.items()} for m, v in runs.items()},
                indent=2,
            )
        )
    return 0


def median_tok_s(results: list[Result]) -> float:
    return statistics.median(r.tok_s for r in results) if results else 0.0


def best_tok_s(results: list[Result]) -> float:
    return max((r.tok_s for r in results), default=0.0)


def paired_ratio(a: list[Result], b: list[Result]) -> float:
    """Median over repeats of a/b, each pair measured back to back: steadier than a ratio of medians when the
    machine's speed drifts between repeats."""
    ratios = [x.tok_s / y.tok_s for x, y in zip(a, b) if y.tok_s]
    return statistics.median(ratios) if ratios else 0.0


def report(name: str, clients: int, r: Result) -> None:
    print(
        f"{name:<12} {clients:>3} clients: {r.tok_s:8.1f} tok/s  ({r.tokens} tokens, {r.requests} requests, "
        f"{r.seconds:.2f} s, {r.errors} retried)",
        flush=True,
    )


def table(runs: dict[str, dict[int, list[Result]]], levels: list[int], stat=None) -> str:
    """tok/s per cell by `stat` (default: median, with ratios as medians of back-to-back pairs; otherwise the
    ratios are of the `stat` values)."""

    def cell(x: float, spec: str = ".0f", suffix: str = "") -> str:
        return f"{format(x, spec)}{suffix}" if x else "-"

    def value(rs: list[Result]) -> float:
        return (stat or median_tok_s)(rs)

    def ratio(a: list[Result], b: list[Result]) -> float:
        if stat is None:
            return paired_ratio(a, b)
        return value(a) / value(b) if a and b and value(b) else 0.0

    lines = [
        "| clients | runner tok/s | mlx_lm.server tok/s | bare tok/s | runner/mlx_lm | runner/bare |",
        "|--------:|-------------:|--------------------:|-----------:|--------------:|------------:|",
    ]
    for c in levels:
        ours, theirs, bare = runs["runner"][c], runs.get("mlx_lm", {}).get(c, []), runs["bare"][c]
        lines.append(
            f"| {c} | {cell(value(ours))} | {cell(value(theirs) if theirs else 0)} | {cell(value(bare))} | "
            f"{cell(ratio(ours, theirs), '.2f', 'x')} | {cell(ratio(ours, bare), '.0%')} |"
        )
    for c in levels if "runner_lora" in runs else ():
        lora, off = runs["runner_lora"][c], runs["runner"][c]
        lines.append(
            f"| {c}, LoRA r8 q+v on | {cell(value(lora))} | - | - | - | LoRA on/off {cell(ratio(lora, off), '.0%')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
