"""`runner report`: plots are valid PNGs, report.md's numbers equal values recomputed here from metrics.jsonl, bad
lines are reported by line number, missing metrics skip their plot with a note."""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from runner import report as R
from runner.adapters import Adapter, write_adapter

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def realistic_records(n: int = 40, seed: int = 0) -> list[dict]:
    """What the learner logs for a GRPO run whose reward climbs."""
    rng = random.Random(seed)
    t, out = 1_700_000_000.0, []
    for s in range(1, n + 1):
        seconds = 2.0 + rng.random()
        t += seconds + 0.3
        reward = min(1.0, 0.15 + 0.7 * s / n + rng.gauss(0, 0.05))
        out.append(
            {
                "step": s,
                "version": s,
                "reward_mean": reward,
                "reward_std": 0.2 + 0.1 * rng.random(),
                "loss": rng.gauss(0, 0.05),
                "kl": 0.002 * s * (1 + 0.1 * rng.random()),
                "clip_frac": 0.05 * rng.random(),
                "entropy": 2.0 - s / n,
                "grad_norm": 0.5 + rng.random(),
                "tokens_per_s": 1200 + rng.gauss(0, 80),
                "staleness": None if s == 1 else rng.choice([0, 1, 1, 2]),
                "seconds": seconds,
                # the learner process adds these (async pipeline observability)
                "wait_s": 0.1 * (s % 3),
                "train_s": seconds,
                "publish_s": 0.004,
                "step_s": seconds + 0.1 * (s % 3) + 0.004 + 0.02,
                "gen_busy": 0.5 + 0.01 * (s % 10),
                "staleness_hist": [3, 5 * (s % 2)],
                "staleness_mean": 5 * (s % 2) / (3 + 5 * (s % 2)),
                "sampler_kl": 1e-3 / s,
                "time": t,
            }
        )
    return out


def write_metrics(run: Path, records: list[dict], junk: dict[int, str] | None = None) -> list[str]:
    """metrics.jsonl with `junk` lines inserted before the given 0-based record positions; returns the lines."""
    lines = []
    for i, r in enumerate(records):
        if junk and i in junk:
            lines.append(junk[i])
        lines.append(json.dumps(r))
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return lines


def write_checkpoints(run: Path, records: list[dict], steps=(20, 30, 40)) -> None:
    rng = np.random.default_rng(0)
    for s in steps:
        d = run / "checkpoints" / f"step_{s:06d}"
        tensors = {
            f"model.layers.{i}.self_attn.q_proj.lora_{ab}": rng.normal(size=(64, 4) if ab == "a" else (4, 64)).astype(
                np.float32
            )
            for i in range(2)
            for ab in "ab"
        }
        config = {
            "fine_tune_type": "lora",
            "num_layers": 2,
            "lora_parameters": {"rank": 4, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]},
        }
        write_adapter(Adapter(config, tensors), d, "mlx")
        rec = next(r for r in records if r["step"] == s)
        (d / "state.json").write_text(json.dumps({"step": s, "version": s, "metrics": rec, "time": rec["time"]}))
        (d / "optimizer.safetensors").write_bytes(b"")
    (run / "checkpoints" / "latest").write_text(f"step_{steps[-1]:06d}\n")


def recompute(path: Path) -> dict:
    """The summary, computed independently from the raw file (valid object lines with an int step; last wins)."""
    by_step = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and type(r.get("step")) is int:
            by_step[r["step"]] = r
    recs = [by_step[s] for s in sorted(by_step)]

    def vals(k):
        return [r[k] for r in recs if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]

    reward = vals("reward_mean")
    best_i = int(np.argmax(reward))
    return {
        "records": len(recs),
        "first_step": recs[0]["step"],
        "last_step": recs[-1]["step"],
        "reward_first": reward[0],
        "reward_last": reward[-1],
        "reward_best": reward[best_i],
        "reward_best_step": [r["step"] for r in recs if "reward_mean" in r][best_i],
        "reward_mean_first": float(np.mean(reward[:10])),
        "reward_mean_last": float(np.mean(reward[-10:])),
        "loss_final": vals("loss")[-1],
        "kl_final": vals("kl")[-1],
        "tokens_per_s_mean": float(np.mean(vals("tokens_per_s"))),
        "staleness_max": max(vals("staleness")),
        "train_seconds": float(np.sum(vals("seconds"))),
        "wall_seconds": vals("time")[-1] - vals("time")[0],
        "last_version": vals("version")[-1],
    }


def table(md: str) -> dict[str, str]:
    """The Summary table of report.md as {metric: value}."""
    section = md.split("## Summary", 1)[1].split("##", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| (.+?) \| (.+?) \|$", section, re.M)}


def first_float(text: str) -> float:
    return float(re.match(r"[-+0-9.eE]+", text).group(0))


def check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    try:
        from PIL import Image
    except ImportError:
        return width, height
    with Image.open(path) as im:
        im.verify()  # checks the chunk structure and CRCs
    with Image.open(path) as im:
        im.load()
        assert im.size == (width, height)
        # a real chart, not a blank canvas: many distinct colours
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
    return width, height


@pytest.fixture()
def run(tmp_path) -> Path:
    records = realistic_records()
    records.append(dict(records[4], reward_mean=0.99, time=records[-1]["time"] + 1))  # step 5 re-logged: last wins
    junk = {7: '{"step": 8, "reward_mean": 0.3', 12: "", 20: "[1, 2, 3]", 25: '{"version": 3, "loss": 1.0}'}
    write_metrics(tmp_path / "run", records, junk)
    write_checkpoints(tmp_path / "run", records)
    return tmp_path / "run"


def test_report_numbers_match_jsonl(run):
    md_path = R.write_report(run)
    assert md_path == run / "report" / "report.md"
    md = md_path.read_text()
    want = recompute(run / "metrics.jsonl")
    got = table(md)

    assert (
        got["steps"] == f"{want['records']} (step {want['first_step']} to {want['last_step']})" == "40 (step 1 to 40)"
    )
    rows = {
        "first reward": "reward_first",
        "last reward": "reward_last",
        "best reward": "reward_best",
        "mean reward, first 10 steps": "reward_mean_first",
        "mean reward, last 10 steps": "reward_mean_last",
        "final loss": "loss_final",
        "final KL": "kl_final",
        "mean tokens/s": "tokens_per_s_mean",
        "max staleness": "staleness_max",
        "train time (sum of step seconds)": "train_seconds",
        "wall time (first to last step)": "wall_seconds",
        "last version": "last_version",
    }
    for row, key in rows.items():
        assert first_float(got[row]) == pytest.approx(want[key], rel=1e-5), row  # printed to 6 significant digits
    assert got["best reward"].endswith(f"(step {want['reward_best_step']})")
    assert want["reward_best"] == 0.99 and want["reward_best_step"] == 5  # the re-logged step 5 counts, once

    summary = json.loads((run / "report" / "summary.json").read_text())
    for key, value in want.items():
        assert summary[key] == pytest.approx(value, rel=1e-12), key  # full precision in summary.json

    # the malformed lines, by 1-based line number (junk precedes records 7, 20, 25; the blank line is ignored)
    problems = md.split("## Skipped or replaced lines", 1)[1]
    assert "- line 8: not valid JSON" in problems
    assert "- line 23: a JSON list, expected an object" in problems
    assert "- line 29: 'step' is None, expected an integer" in problems
    assert "step 5 logged again; keeping this later record" in problems

    # checkpoints with their metrics; the latest marked
    ck = md.split("## Checkpoints", 1)[1].split("##", 1)[0]
    rows = [row for row in ck.splitlines() if row.startswith("| step_")]
    assert [r.split(" | ")[0] for r in rows] == ["| step_000020", "| step_000030", "| step_000040"]
    assert rows[-1].endswith("| yes |") and not rows[0].endswith("| yes |")


def test_plots_are_valid_pngs(run, tmp_path):
    out = tmp_path / "elsewhere"
    R.write_report(run, out)
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted(
        ["reward.png", "loss.png", "kl.png", "tokens_per_s.png", "staleness.png", "overview.png"]
        + ["staleness_mean.png", "gen_busy.png", "sampler_kl.png", "time.png"]
    )
    for p in out.glob("*.png"):
        w, h = check_png(p)
        assert w >= 600 and h >= 400, p
    md = (out / "report.md").read_text()
    for n in names:
        assert f"]({n})" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # temp files renamed away


def test_missing_metrics_skip_their_plots_with_a_note(tmp_path):
    records = [{k: v for k, v in r.items() if k not in ("kl", "tokens_per_s")} for r in realistic_records(12)]
    write_metrics(tmp_path / "run", records)
    md = R.write_report(tmp_path / "run").read_text()
    assert not (tmp_path / "run" / "report" / "kl.png").exists()
    assert (tmp_path / "run" / "report" / "reward.png").exists()
    assert "`kl` has no numeric values in metrics.jsonl; kl plot skipped" in md
    assert "`tokens_per_s` has no numeric values" in md
    got = table(md)
    assert got["final KL"] == "-" and got["mean tokens/s"] == "-"
    assert got["mean reward, first 10 steps"] != "-"
    assert "## Checkpoints\n\n(none)" in md


def test_empty_and_missing_runs(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("garbage\n")
    md = R.write_report(tmp_path / "run").read_text()
    assert "(no plots)" in md and "- line 1: not valid JSON" in md
    with pytest.raises(FileNotFoundError, match="has no metrics.jsonl"):
        R.write_report(tmp_path / "nope")
    assert R.cmd_report(argparse.Namespace(run=str(tmp_path / "nope"), out=None)) == 2


def test_time_breakdown_staleness_histogram_and_sampler_kl(tmp_path):
    """The async pipeline's numbers: time parts as shares of the summed step wall time, the run's token-weighted
    staleness histogram (per-step histograms of different lengths summed) and its mean, mean busy fraction and
    sampler KL; a run without step_s (replay training) gets a note instead of the time plot."""
    records = realistic_records(12)
    records[3]["staleness_hist"] = [1, 2, 4]  # a step with tokens 2 versions behind
    write_metrics(tmp_path / "run", records)
    md = R.write_report(tmp_path / "run").read_text()
    s = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
    hist = [sum((r["staleness_hist"] + [0, 0])[i] for r in records) for i in range(3)]
    assert s["staleness_hist"] == hist and hist[2] == 4
    assert s["staleness_mean"] == pytest.approx((hist[1] + 2 * hist[2]) / sum(hist))
    total = sum(r["step_s"] for r in records)
    assert s["step_s_total"] == pytest.approx(total) and s["step_s_mean"] == pytest.approx(total / 12)
    assert s["gen_busy_mean"] == pytest.approx(np.mean([r["gen_busy"] for r in records]))
    assert s["sampler_kl_mean"] == pytest.approx(np.mean([r["sampler_kl"] for r in records]))
    got = table(md)
    shares = [100 * sum(r[k] for r in records) / total for k in ("wait_s", "train_s", "publish_s")]
    assert got["time waiting / training / publishing"] == " / ".join(f"{x:.0f}%" for x in shares)
    assert got["trained tokens by versions behind (0, 1, ...)"] == ", ".join(map(str, hist))
    check_png(tmp_path / "run" / "report" / "time.png")

    write_metrics(tmp_path / "replay", [{k: v for k, v in r.items() if k != "step_s"} for r in records])
    md = R.write_report(tmp_path / "replay").read_text()
    assert "`step_s` has no numeric values in metrics.jsonl; time plot skipped" in md
    assert not (tmp_path / "replay" / "report" / "time.png").exists()
