"""Where a served token's time goes: `runner serve` under C closed-loop clients, its two processes (the engine's and
the HTTP front's) sampled with py-spy, and each process's samples summed by thread and by the part of the code on
the stack.

    python bench/serve_profile.py [--model DIR] [--clients 32] [--seconds 6] [--rate 200]

Needs py-spy (`pip install py-spy`; it reads the processes' memory, so it runs as root or with ptrace allowed). The
load is bench/serve.py's (same prompts, 64 tokens, temperature 1). Samples are taken of running threads only (idle
waits left out), so a thread's share is how busy it kept its process; the part of the code is the deepest frame on
the stack that matches one of PARTS.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import serve

# Named parts of the stack, deepest match wins: ours, mlx-lm's batch generator, the HTTP stack.
PARTS = (
    "_sampled_logprobs",
    "_finish",
    "_admit",
    "_insert",
    "_drain_inbox",
    "_apply_pending_adapter",
    "_refresh_gauges",
    "_flush",
    "_sink",
    "GenerationBatch.next",
    "GenerationBatch._step",
    "PromptProcessingBatch.prompt",
    "BatchKVCache.filter",
    "uvicorn",
    "starlette",
    "fastapi",
    "pydantic",
    "_encode",
    "_response",
    "_wait",
    "_deliver",
)


def summarize(path: Path) -> str:
    """py-spy's raw (collapsed) stacks: share of samples per thread, per (thread, part) and per leaf frame."""
    threads, parts, leaves, total = collections.Counter(), collections.Counter(), collections.Counter(), 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n, frames = int(count), stack.split(";")
        total += n
        thread = frames[0][:40]  # "thread (TID): NAME"
        threads[thread] += n
        leaves[(thread, frames[-1][:100])] += n
        part = next((p for f in reversed(frames[1:]) for p in PARTS if p in f), "other")
        parts[(thread, part)] += n
    if not total:
        return f"{path.name}: no samples"
    out = [f"{path.name}: {total} samples"]
    out += [f"  thread {t:40s} {n / total:6.1%}" for t, n in threads.most_common()]
    out += ["  by part of the code:"] + [f"    {t:40s} {p:30s} {n / total:6.1%}" for (t, p), n in parts.most_common(15)]
    out += ["  by leaf frame:"] + [f"    {t:40s} {f:100s} {n / total:6.1%}" for (t, f), n in leaves.most_common(12)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="MLX model directory (default: the tiny model, prepared into a temp dir)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0, help="how long py-spy samples")
    ap.add_argument("--rate", type=int, default=200, help="samples per second")
    args = ap.parse_args(argv)
    if shutil.which("py-spy") is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-serve-profile-") as tmp:
        model = serve.prepare_model(args.model, Path(tmp))
        with serve.runner_server(model) as root:
            serve.warm_up(root, 64)
            engine = subprocess.check_output(["pgrep", "-f", f"runner.cli serve --model {model}"]).split()[0].decode()
            front = subprocess.check_output(["pgrep", "-P", engine, "-f", "workers.generation.front"]).split()[0]
            deadline = time.monotonic() + args.seconds + 3
            results: list[serve.Result] = []

            def load() -> None:
                while time.monotonic() < deadline:
                    results.append(serve.http_load(root, args.clients, 2, 64, 1.0))

            loader = threading.Thread(target=load)
            loader.start()
            time.sleep(1)
            records = {name: Path(tmp) / f"{name}.txt" for name in ("engine", "front")}
            samplers = [
                subprocess.Popen(
                    ["py-spy", "record", "-r", str(args.rate), "-d", str(int(args.seconds)), "-f", "raw"]
                    + ["-o", str(records[name]), "-p", str(pid), "--threads", "--nonblocking"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name, pid in (("engine", engine), ("front", front.decode()))
            ]
            for sampler in samplers:
                sampler.wait()
            loader.join()
        tokens, seconds = sum(r.tokens for r in results), sum(r.seconds for r in results)
        print(f"{args.clients} clients: {tokens / seconds:.0f} tok/s while sampled; {args.rate} samples/s per process")
        for name, path in records.items():
            print(f"\n[{name} process] " + (summarize(path) if path.exists() else "py-spy recorded nothing"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
