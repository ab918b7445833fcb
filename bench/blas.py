"""MLX's bundled BLAS vs an optimized one preloaded (`[coordinator] blas`), on this machine.

    python bench/blas.py [--steps 20] [--skip-quickstart] [--library PATH]

1. A float32 1024x1024 matmul, in two fresh processes (MLX as installed, and with the library in LD_PRELOAD, the
   environment `runner launch` gives its MLX children): GFLOP/s = 2 * 1024^3 / best time of `--reps` runs.
2. The quickstart (`bench/rl.py`'s runner row: async_depth 1, one generation worker) for `--steps` steps with
   `--set coordinator.blas=bundled` and with `coordinator.blas=<library>`: seconds per step (steps 2..N) and the
   learner's train seconds per step.
Linux only; the library defaults to Debian's libopenblas0-pthread. The machine may be shared: compare the two rows
of one run, not runs of different times.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rl import run_runner, say  # noqa: E402  (bench/ is this script's directory)

from runner.blas import OPTIMIZED_BLAS, child_environment  # noqa: E402

MATMUL = """
import sys, time, mlx.core as mx
n, reps = 1024, int(sys.argv[1])
a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
mx.eval(a @ b)
best = float("inf")
for _ in range(reps):
    tic = time.perf_counter()
    mx.eval(a @ b)
    best = min(best, time.perf_counter() - tic)
print(2 * n**3 / best / 1e9)
"""


def matmul_gflops(library: str | None, reps: int) -> float:
    env = {**child_environment(library), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", MATMUL, str(reps)], env=env, capture_output=True, text=True, check=True, timeout=600
    )
    return float(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10, help="matmuls timed per process (the best counts)")
    ap.add_argument("--library", default=next((p for p in OPTIMIZED_BLAS if Path(p).is_file()), None))
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds one runner launch may take")
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux") or not args.library:
        ap.error("needs Linux and an optimized BLAS (apt-get install libopenblas0-pthread, or --library PATH)")
    say(f"{os.cpu_count()} cores; load average at start {os.getloadavg()[0]:.2f}; library {args.library}")
    bundled, preloaded = matmul_gflops(None, args.reps), matmul_gflops(args.library, args.reps)
    rows = [
        f"float32 1024x1024 matmul: bundled {bundled:.1f} GFLOP/s, preloaded {preloaded:.1f} GFLOP/s "
        f"(x{preloaded / bundled:.1f})"
    ]
    if not args.skip_quickstart:
        with tempfile.TemporaryDirectory(prefix="bench-blas-") as tmp:
            work = Path(tmp)
            model = work / "tiny"
            subprocess.run(
                [sys.executable, "-m", "runner.cli", "models", "prepare", "tiny", "--out", str(model)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            runs = {}
            for name, setting in (("bundled", "bundled"), ("preloaded", args.library)):
                extra = (f'coordinator.blas="{setting}"',)
                runs[name] = run_runner(model, work, args.steps, 1, 1, args.timeout, extra, tag=name)
            for name, row in runs.items():
                if "error" in row:
                    rows.append(f"quickstart, {name}: failed ({row['error']})")
                else:
                    rows.append(
                        f"quickstart, {name}: {row['s_step']:.3f} s/step (train {row['train']:.3f} s, rollouts "
                        f"{row['rollout']:.3f} s), final reward {row['reward']:.3f}"
                    )
    say(f"load average at end {os.getloadavg()[0]:.2f}")
    for line in rows:
        say(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
