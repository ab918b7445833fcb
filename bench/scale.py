"""Weight fan-out time to 1, 2, 4 and 8 local generation workers.

For each worker count: a real coordinator process and that many real generation-worker processes; the learner side
(this process) publishes the same adapter >= 30 times and measures from publish() until the coordinator's
`wait_serving` reply says every worker acked the version (the measurement of `bench/weights.py`, whose pieces this
reuses: model directory, adapter, coordinator script, timing loop). Printed with the ratio to one worker.

The coordinator fans out one small notice per worker (shared memory, the default) or one message on the PUB socket
(`--transport socket`); what grows with the worker count is each worker's copy, checksum and install, and the acks.
Workers run in parallel only up to the number of cores, so on a 2-core machine expect roughly linear growth past 2
workers: a measurement of this machine, not of the design.

    python bench/scale.py [--pushes 30] [--counts 1 2 4 8] [--shape smollm2|14b] [--transport shm|socket]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python bench/scale.py` and `-m bench.scale` alike

from weights import SHAPES, run_shape  # noqa: E402  (bench/weights.py)


def measure(shape: str, transport: str, counts: list[int], pushes: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            where = Path(tmp) / f"workers-{n}"  # run_shape makes its model and run directories in here
            where.mkdir()
            row = run_shape(shape, transport, pushes, n, where)
            row["workers"] = n
            rows.append(row)
            print(f"  {n} worker(s): p50 {row['p50']:.2f} ms  p95 {row['p95']:.2f} ms", flush=True)
    return rows


def table(rows: list[dict], shape: str, pushes: int) -> str:
    first = rows[0]
    head = (
        f"weight fan-out over {first['transport']}, {shape} adapter ({first['tensors']} tensors, "
        f"{first['mbytes']:.1f} MB), {pushes} pushes "
        f"per row, {os.cpu_count()} cores\n(publish -> coordinator accepted and fanned out; publish -> every "
        f"worker acked, via wait_serving)\n"
    )
    lines = [f"{'workers':>7} {'accepted p50':>12} {'serving p50 ms':>14} {'p95 ms':>8} {'p50 x1':>7} {'p95 x1':>7}"]
    for r in rows:
        lines.append(
            f"{r['workers']:>7} {r['accepted_p50']:>12.2f} {r['p50']:>14.2f} {r['p95']:>8.2f} "
            f"{r['p50'] / first['p50']:>7.2f} {r['p95'] / first['p95']:>7.2f}"
        )
    return head + "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pushes", type=int, default=30, help="measured pushes per worker count (after 5 warm-ups)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--shape", choices=list(SHAPES), default="smollm2")
    p.add_argument("--transport", choices=["shm", "socket"], default="shm")
    args = p.parse_args()
    if args.pushes < 30:
        p.error("--pushes must be at least 30 for a meaningful p95")
    rows = measure(args.shape, args.transport, args.counts, args.pushes)
    print("\n" + table(rows, args.shape, args.pushes))


if __name__ == "__main__":
    main()
