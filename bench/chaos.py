"""Chaos: a quickstart (tiny model, 200 steps) during which a random process of the job is SIGKILLed every few seconds.

A kill falls due every `--every` seconds, and is made once the job is up again and has written a newer checkpoint
than at the previous kill (so that kills faster than the job recovers cannot stall it: the job must finish), up to
`--jitter` seconds after that checkpoint (so that a kill lands within a checkpoint interval and costs steps).
Targets: the coordinator (`runner launch` itself), gen-0 and the learner. A killed child is restarted by the
coordinator (its restart policy); a killed coordinator is started again the way launchd would (KeepAlive): the same
`runner launch` command on the same config, which resumes the job from its newest checkpoint, while the killed
coordinator's children exit on their own once it has gone silent. The job must finish.

Reported: steps completed, kills per target, restarts (by the coordinator, and launches by us), steps redone after
restarts (progress lines the learner printed beyond one per step), whether versions stayed monotonic (metrics.jsonl;
each worker process's served version as sampled from the status; the versions each coordinator reported, and where a
restarted coordinator's first version was not above the last one before the kill),
whether the final adapter loads (`runner adapters show` on the run, then mlx-lm with that adapter), and whether any
process of the job outlived it.

    python bench/chaos.py [--steps 200] [--every 5 15] [--no-coordinator] [--seed 0] [--dir DIR] [--interval 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.control import process_running  # noqa: E402
from runner.status import fetch_status  # noqa: E402


class Launch:
    """One `runner launch` process; its output is collected by a reader thread."""

    def __init__(self, cmd: list[str], cwd: Path, log_path: Path):
        self.out = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.control = ""
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.out.write(line)
            self.out.flush()
            self.lines.append(line)
            m = re.search(r"control (tcp://\S+)", line)
            if m:
                self.control = m.group(1)


def newest_checkpoint(run_dir: Path) -> int:
    try:
        return int((run_dir / "checkpoints" / "latest").read_text().strip().rsplit("_", 1)[1])
    except (OSError, ValueError, IndexError):
        return 0


def run(args: argparse.Namespace, work: Path) -> dict:
    config = work / "job.toml"
    text = (ROOT / "configs" / "quickstart.toml").read_text()
    config.write_text(text.replace('path = "models/tiny"', f'path = "{work / "models" / "tiny"}"'))
    sets = [
        f"learner.steps={args.steps}",
        f"checkpoint.interval={args.interval}",
        'coordinator.control="tcp://127.0.0.1:0"',
        'coordinator.weights="tcp://127.0.0.1:0"',
        "generation.port=0",
    ]
    cmd = [sys.executable, "-m", "runner.cli", "launch", str(config)]
    for s in sets:
        cmd += ["--set", s]
    run_dir = work / "runs" / "quickstart"
    rng = random.Random(args.seed)
    targets = ["gen-0", "learner"] + ([] if args.no_coordinator else ["coordinator"])
    kills = dict.fromkeys(targets, 0)
    launches = 1
    launch = Launch(cmd, work, work / "launch.log")
    pids: set[int] = {launch.proc.pid}
    served: dict[int, list[int]] = {}  # generation worker pid -> versions it served, in sampling order
    step = 0
    checkpoint_at_kill = -1
    gate_opened = None  # when a newer checkpoint than at the last kill was first seen
    chaos_started = None
    next_kill = None
    deadline = time.monotonic() + args.timeout
    while True:
        if time.monotonic() > deadline:
            launch.proc.kill()
            raise SystemExit(f"the job did not finish within {args.timeout}s; see {work}")
        code = launch.proc.poll()
        if code is not None:
            if code == 0:
                break
            raise SystemExit(f"runner launch exited {code}; see {work / 'launch.log'}")
        status = None
        if launch.control:
            try:
                status = fetch_status(launch.control, timeout=2)
            except Exception:  # a coordinator starting or just killed: sample again
                status = None
        if status:
            step = max(step, status["job"]["step"] or 0)
            for w in status["workers"]:
                if w["pid"]:
                    pids.add(w["pid"])
                if w["role"] == "generate" and w["pid"] and w["state"] == "serving":
                    served.setdefault(w["pid"], []).append(w["version"])
            if chaos_started is None and (status["job"]["step"] or 0) >= 1:
                chaos_started = time.monotonic()
                next_kill = chaos_started + rng.uniform(*args.every)
        # A kill falls due every few seconds; it is made once the coordinator answers (a job that is up) and a newer
        # checkpoint exists than at the previous kill (else kills faster than the job recovers would stall it
        # forever; this way the job must finish), on a target drawn among those running then.
        checkpoint = newest_checkpoint(run_dir)
        if checkpoint > checkpoint_at_kill and gate_opened is None and next_kill is not None:
            # Not at once: somewhere in the next checkpoint interval, so that a kill can cost steps to redo.
            gate_opened = time.monotonic()
            next_kill = max(next_kill, gate_opened + rng.uniform(0, args.jitter))
        if (
            next_kill is not None
            and time.monotonic() >= next_kill
            and status
            and checkpoint > checkpoint_at_kill
            and step < args.steps - 1
        ):
            next_kill = time.monotonic() + rng.uniform(*args.every)
            checkpoint_at_kill, gate_opened = checkpoint, None
            running = {w["name"]: w["pid"] for w in status["workers"] if w["pid"] and process_running(w["pid"])}
            candidates = [t for t in targets if t == "coordinator" or t in running]
            target = rng.choice(candidates) if candidates else None
            if target == "coordinator":
                launch.proc.kill()
                launch.proc.wait()
                print(f"  step {step}: killed the coordinator; launching again", flush=True)
                launch = Launch(cmd, work, work / "launch.log")  # launchd's KeepAlive: the same command
                pids.add(launch.proc.pid)
                launches += 1
            elif target is not None:
                os.kill(running[target], signal.SIGKILL)
                print(f"  step {step}: killed {target} (pid {running[target]})", flush=True)
            if target is not None:
                kills[target] += 1
        time.sleep(0.25)
    took = time.monotonic() - (chaos_started or time.monotonic())
    return report(args, work, run_dir, kills, launches, served, pids, took)


def report(args, work: Path, run_dir: Path, kills, launches, served, pids, took) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    learner_log = (run_dir / "logs" / "learner.log").read_text(errors="replace")
    progress = re.findall(r"^step (\d+)/\d+ .* v(\d+) ", learner_log, re.M)
    coordinator_log = (run_dir / "logs" / "coordinator.log").read_text(errors="replace")
    # The coordinator prints one progress line per step: its versions, one list per coordinator (launch).
    launch_log = (work / "launch.log").read_text(errors="replace")
    lives = [
        [int(v) for v in re.findall(r"^step \d+/\d+ .* v(\d+)  staleness", life, re.M)]
        for life in launch_log.split("job started:")[1:]
    ]
    lives = [life for life in lives if life]
    restarts = [(a[-1], b[0]) for a, b in zip(lives, lives[1:]) if b[0] <= a[-1]]
    metrics_versions = [r["version"] for r in rows]
    shown = subprocess.run(
        [sys.executable, "-m", "runner.cli", "adapters", "show", str(run_dir)], capture_output=True, text=True
    )
    loads = shown.returncode == 0
    if loads:
        import mlx_lm

        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        try:
            mlx_lm.load(str(work / "models" / "tiny"), adapter_path=str(latest))
        except Exception as e:  # reported, not raised: the table says what failed
            print(f"the final adapter does not load: {e}")
            loads = False
    # Children of a killed coordinator exit within its heartbeat timeout; give them that long before calling them
    # survivors.
    deadline = time.monotonic() + 15
    while any(process_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return {
        "steps": args.steps,
        "steps completed": rows[-1]["step"] if rows else 0,
        "metrics rows = 1..N": [r["step"] for r in rows] == list(range(1, args.steps + 1)),
        "chaos seconds": round(took, 1),
        "kills": kills,
        "restarts by the coordinator": len(re.findall(r"; restarting in", coordinator_log)),
        "coordinator launches": launches,
        "steps redone after restarts": len(progress) - len({int(s) for s, _ in progress}),
        "metrics versions strictly increasing": all(a < b for a, b in zip(metrics_versions, metrics_versions[1:])),
        "served versions monotonic per worker": all(all(a <= b for a, b in zip(v, v[1:])) for v in served.values()),
        "versions increasing within each coordinator": all(all(a < b for a, b in zip(v, v[1:])) for v in lives),
        "version drops across coordinator restarts": restarts,
        "final adapter loads": loads,
        "processes left": [p for p in pids if process_running(p)],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=float, nargs=2, default=[5.0, 15.0], help="seconds between kills (uniform)")
    p.add_argument("--interval", type=int, default=5, help="checkpoint interval (steps)")
    p.add_argument("--jitter", type=float, default=4.0, help="a due kill waits up to this long after a checkpoint")
    p.add_argument("--no-coordinator", action="store_true", help="kill only the children, never `runner launch`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--dir", type=Path, help="work directory (default: a temporary one, removed afterwards)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    ok = result["steps completed"] == args.steps and result["final adapter loads"] and not result["processes left"]
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
