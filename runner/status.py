"""`runner status`: ask a running coordinator for its worker table and job progress."""

from __future__ import annotations

import json
import sys
import time

from runner.control import ControlClient, CoordinatorGone


def fetch_status(endpoint: str, timeout: float = 5.0, curve: dict | None = None) -> dict:
    client = ControlClient(endpoint, name=f"status-{time.time_ns()}", role="cli", curve=curve)
    try:
        return client.request({"type": "status"}, ("status",), timeout=timeout)[1]
    finally:
        client.close()


def format_table(status: dict) -> str:
    job = status["job"]
    lines = [
        f"job: {job['state']}  step {job['step'] or 0}/{job['steps']}  reward {_num(job.get('reward_mean'), '.3f')}  "
        f"tok/s {_num(job.get('tokens_per_s'), '.0f')}  latest version {job['latest_version']}  "
        f"oldest serving {job['oldest_serving_version']}  uptime {job['uptime']}s  blas {job.get('blas', '-')}",
    ]
    if job.get("step_s") is not None:  # the last step: where its time went, how busy the workers were, staleness
        lines.append(
            f"last step: {_num(job.get('step_s'), '.2f')}s = wait {_num(job.get('wait_s'), '.2f')}s + train "
            f"{_num(job.get('train_s'), '.2f')}s + publish {_num(job.get('publish_s'), '.3f')}s  "
            f"workers busy {_pct(job.get('gen_busy'))}  staleness mean {_num(job.get('staleness_mean'), '.2f')} "
            f"max {_num(job.get('staleness'), 'd')}  sampler KL {_num(job.get('sampler_kl'), '.2e')}"
        )
    if job.get("eval"):
        lines.append(f"last eval: step {job['eval'].get('step')}  {eval_summary(job['eval'])}")
    lines += [
        "",
        f"{'WORKER':<20} {'ROLE':<9} {'STATE':<12} {'PID':>7} {'HOST':<16} {'VERSION':>7} {'RESTARTS':>8} "
        f"{'HEARTBEAT':>9}  URL",
    ]
    for w in status["workers"]:
        age = "-" if w["heartbeat_age"] is None else f"{w['heartbeat_age']:.1f}s"
        lines.append(
            f"{w['name']:<20} {w['role']:<9} {w['state']:<12} {w['pid']:>7} {w['host'][:16]:<16} "
            f"{w['version']:>7} {w['restarts']:>8} {age:>9}  {w['http_url']}"
        )
    return "\n".join(lines)


def eval_summary(row: dict) -> str:
    """One line for an eval row (workers/learner/evaluation.py)."""
    k = f"  pass@k {_pct(row['eval_pass_at_k'])}" if row.get("eval_pass_at_k") is not None else ""
    return (
        f"reward {_num(row.get('eval_reward'), '.3f')}  accuracy {_pct(row.get('eval_accuracy'))}{k}  "
        f"v{row.get('version', '?')}  {row.get('eval_examples', '?')} examples  {_num(row.get('eval_s'), '.1f')}s"
    )


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{value:.0%}"


def show_status(endpoint: str, as_json: bool = False, curve: dict | None = None) -> int:
    try:
        status = fetch_status(endpoint, curve=curve)
    except CoordinatorGone:
        print(f"runner: error: no coordinator answered at {endpoint}; is a job running?", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2) if as_json else format_table(status))
    return 0
