"""Chaos: a quickstart (tiny model, 200 steps) during which a random process of the job is SIGKILLed every few seconds.

A kill falls due every `--every` seconds, and is made once the job is up again and has written a newer checkpoint
than at the previous kill (so that kills faster than the job recovers cannot stall it: the job must finish). Where in
the checkpoint interval it lands is drawn: after 0..interval-1 more steps, then at a moment of the next step aimed
from the previous step's timings (its `wait_s`, `train_s`, `publish_s` in metrics.jsonl): anywhere in the step,
mid-step (while the learner trains) or mid-publish (while the new version goes out to the coordinator and the
workers). Targets: the coordinator (`runner launch` itself), gen-0 and the learner. A killed child is restarted by the
coordinator (its restart policy); a killed coordinator is started again the way launchd would (KeepAlive): the same
`runner launch` command on the same config, which takes the run dir's lock (the kernel released the killed one's) and
resumes the job from its newest checkpoint, while the killed coordinator's children exit on their own.

Reported: steps completed, kills per target and per moment, restarts (by the coordinator, and launches by us), steps
redone after restarts (progress lines the learner printed beyond one per step), whether versions stayed monotonic
(metrics.jsonl; each worker process's served version as sampled from the status; the versions each coordinator
reported, and where a restarted coordinator's first version was not above the last one before the kill), whether
metrics.jsonl has exactly one row per step 1..N, whether the final adapter loads (`runner adapters show` on the run,
then mlx-lm with that adapter), and whether any process of the job outlived it. Any of these failing fails the run
(exit 1, naming the checks that failed).

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


MOMENTS = ("anytime", "mid-step", "mid-publish")


class Steps:
    """metrics.jsonl as the learner appends it: when each new row was first seen, and its timings."""

    def __init__(self, path: Path):
        self.path, self.size, self.rows, self.last_seen = path, 0, 0, 0.0
        self.last: dict = {}

    def poll(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size == self.size:
            return
        if size < self.size:  # a resumed learner cut it back to its checkpoint
            self.size = 0
        with open(self.path) as f:
            f.seek(self.size)
            lines = f.read().splitlines(keepends=True)
        for line in lines:
            if not line.endswith("\n"):
                break
            self.size += len(line)
            self.rows += 1
            self.last_seen = time.monotonic()
            try:
                self.last = json.loads(line)
            except ValueError:
                pass

    def moment(self, kind: str, rng: random.Random) -> float:
        """When, after the newest row, the next step will be at `kind` (from the newest row's timings)."""
        wait, train = self.last.get("wait_s") or 0.0, self.last.get("train_s") or 0.0
        publish = self.last.get("publish_s") or 0.0
        if kind == "mid-step":
            return self.last_seen + wait + rng.uniform(0.1, 0.9) * train
        if kind == "mid-publish":
            return self.last_seen + wait + train + rng.uniform(0.1, 0.9) * publish
        return self.last_seen + rng.uniform(0, self.last.get("step_s") or 0.5)


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
    moments = dict.fromkeys(MOMENTS, 0)
    launches = 1
    launch = Launch(cmd, work, work / "launch.log")
    pids: set[int] = {launch.proc.pid}
    served: dict[int, list[int]] = {}  # generation worker pid -> versions it served, in sampling order
    steps = Steps(run_dir / "metrics.jsonl")
    step = 0
    status = None
    running: dict[str, int] = {}
    checkpoint_at_kill = -1
    next_kill = None  # when the next kill falls due (then it waits for the gate: a newer checkpoint)
    plan = None  # (moment, rows to wait for) once due and gated
    kill_at = None  # the aimed moment, once those rows are there
    chaos_started = None
    next_status = 0.0
    deadline = time.monotonic() + args.timeout
    while True:
        now = time.monotonic()
        if now > deadline:
            launch.proc.kill()
            raise SystemExit(f"the job did not finish within {args.timeout}s; see {work}")
        code = launch.proc.poll()
        if code is not None:
            if code == 0:
                break
            raise SystemExit(f"runner launch exited {code}; see {work / 'launch.log'}")
        steps.poll()
        if now >= next_status:  # the status every 0.25 s; the loop itself runs every 10 ms to aim kills
            next_status = now + 0.25
            status = None
            if launch.control:
                try:
                    status = fetch_status(launch.control, timeout=2)
                except Exception:  # a coordinator starting or just killed: sample again
                    status = None
            if status:
                step = max(step, status["job"]["step"] or 0)
                running = {w["name"]: w["pid"] for w in status["workers"] if w["pid"] and process_running(w["pid"])}
                for w in status["workers"]:
                    if w["pid"]:
                        pids.add(w["pid"])
                    if w["role"] == "generate" and w["pid"] and w["state"] == "serving":
                        served.setdefault(w["pid"], []).append(w["version"])
                if chaos_started is None and (status["job"]["step"] or 0) >= 1:
                    chaos_started = now
                    next_kill = now + rng.uniform(*args.every)
        # Due, and a newer checkpoint than at the previous kill exists (else kills faster than the job recovers would
        # stall it forever; this way the job must finish): plan where in the interval the kill lands.
        if (
            plan is None
            and next_kill is not None
            and now >= next_kill
            and newest_checkpoint(run_dir) > checkpoint_at_kill
        ):
            plan = (rng.choice(MOMENTS), steps.rows + rng.randrange(args.interval))
        if plan is not None and kill_at is None and steps.rows >= plan[1]:
            kill_at = steps.moment(plan[0], rng)
        if kill_at is not None and now >= kill_at:
            if step < args.steps - 1 and status is not None:
                candidates = [t for t in targets if t == "coordinator" or t in running]
                target = rng.choice(candidates)
                if target == "coordinator":
                    launch.proc.kill()
                    launch.proc.wait()
                    print(f"  step {step}: killed the coordinator ({plan[0]}); launching again", flush=True)
                    launch = Launch(cmd, work, work / "launch.log")  # launchd's KeepAlive: the same command
                    pids.add(launch.proc.pid)
                    launches += 1
                    status = None
                else:
                    try:
                        os.kill(running[target], signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    print(f"  step {step}: killed {target} (pid {running[target]}, {plan[0]})", flush=True)
                kills[target] += 1
                moments[plan[0]] += 1
            checkpoint_at_kill = newest_checkpoint(run_dir)
            next_kill, plan, kill_at = time.monotonic() + rng.uniform(*args.every), None, None
        time.sleep(0.01)
    took = time.monotonic() - (chaos_started or time.monotonic())
    return report(args, work, run_dir, kills, moments, launches, served, pids, took)


def report(args, work: Path, run_dir: Path, kills, moments, launches, served, pids, took) -> dict:
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
        "kills aimed at": moments,
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
    failed = failures(result, args.steps)
    if failed:
        print(f"FAILED: {'; '.join(failed)}")
    sys.exit(1 if failed else 0)


def failures(result: dict, steps: int) -> list[str]:
    """The checks a chaos run must pass, by name, that it did not."""
    checks = {
        f"steps completed = {steps}": result["steps completed"] == steps,
        "one metrics row per step 1..N": result["metrics rows = 1..N"],
        "metrics versions strictly increasing": result["metrics versions strictly increasing"],
        "served versions monotonic per worker": result["served versions monotonic per worker"],
        "versions increasing within each coordinator": result["versions increasing within each coordinator"],
        "no version drop across coordinator restarts": not result["version drops across coordinator restarts"],
        "final adapter loads": result["final adapter loads"],
        "no process left": not result["processes left"],
    }
    return [name for name, ok in checks.items() if not ok]


if __name__ == "__main__":
    main()
