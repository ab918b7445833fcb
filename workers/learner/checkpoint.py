"""Checkpoints and the metrics log of a run directory.

    RUN_DIR/checkpoints/step_000010/adapters.safetensors    mlx-lm format: mlx_lm.load(model, adapter_path=<dir>)
    RUN_DIR/checkpoints/step_000010/adapter_config.json
    RUN_DIR/checkpoints/step_000010/optimizer.safetensors   tree_flatten(optimizer.state)
    RUN_DIR/checkpoints/step_000010/ref_ema.safetensors     only when learner.ref_ema < 1
    RUN_DIR/checkpoints/step_000010/state.json              step, version, rng, source, metrics, config (secrets
                                                            redacted), base_model_id, time
    RUN_DIR/checkpoints/latest                              names the newest complete checkpoint dir
    RUN_DIR/metrics.jsonl                                   one JSON object per step

A checkpoint directory is written whole in a temp dir and renamed into place; its files, the directory and the rename
are fsynced; only then is `latest` replaced atomically (and fsynced), so a crash, of the process or of the OS, leaves
either the previous or the new checkpoint, never a half one. Still, `find_latest` validates what it picks (a disk can
fill, someone can copy a dir by hand) and falls back to the newest loadable checkpoint. It only reads: a broken
checkpoint is reported and left for a person to inspect. When there are checkpoints and none is loadable,
`CheckpointError` names each and why: the learner stops instead of starting over (which would redo the run from step
0 on top of its history).

This module knows the files, not the trainer: `Trainer.save_checkpoint` / `Trainer.restore` say what goes in them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from runner.config import redact
from runner.files import fsync_dir, write_atomic
from workers.lora import LoraSpec, save_adapter

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
STATE = "state.json"
FAILURE = "learner_failure.json"  # the last failure of training: step, input (the source's position), error
REQUIRED = ("adapters.safetensors", "adapter_config.json", "optimizer.safetensors", STATE)
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _bytes_safetensors(tensors: dict[str, mx.array]) -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.safetensors")
        mx.save_safetensors(path, tensors)
        with open(path, "rb") as f:
            return f.read()


def save_checkpoint(
    run_dir: str | Path,
    model: nn.Module,
    spec: LoraSpec,
    state: dict,
    arrays: dict[str, dict[str, mx.array]],
    keep_last: int = 3,
) -> Path:
    """Write RUN_DIR/checkpoints/step_NNNNNN (NNNNNN = state["step"]) atomically: the model's adapter, `state` as
    state.json and each of `arrays` as NAME.safetensors; point `latest` at it and prune to the last `keep_last`."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    extra = {f"{name}.safetensors": _bytes_safetensors(tensors) for name, tensors in arrays.items()}
    if state.get("config"):  # checkpoints are shared: no secret of the job's config goes with them
        state = {**state, "config": redact(state["config"])}
    extra[STATE] = json.dumps(state, indent=1).encode()
    target = root / checkpoint_name(state["step"])
    _remove_leftovers(root)
    save_adapter(target, model, spec, extra_files=extra)
    _fsync_tree(target)  # before `latest` may name it
    write_atomic(root / LATEST, target.name + "\n")
    _prune(root, keep_last, keep=target)
    log.info("checkpoint %s written", target)
    return target


def _fsync_tree(directory: Path) -> None:
    """Flush a checkpoint directory's files, the directory, and its parent (the rename that put it there)."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(directory)
    fsync_dir(directory.parent)


def _remove_leftovers(root: Path) -> None:
    """Temp dirs of a save that was killed midway ('.step_000010.abc123', '.step_000010.old'): only this learner
    writes here, so any that exist now are garbage."""
    for p in root.iterdir():
        if p.name.startswith(".step_") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    dirs = _step_dirs(root)
    for _, p in dirs[: max(0, len(dirs) - keep_last)]:
        if p != keep:
            shutil.rmtree(p, ignore_errors=True)


def _safetensors_complete(path: Path) -> bool:
    """Header parses and the file is as long as the header says (catches truncation without reading the data)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n <= 0 or 8 + n > size:
                return False
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return 8 + n + end <= size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def check_checkpoint(path: str | Path) -> str | None:
    """None if `path` is a complete, loadable checkpoint dir; otherwise why not."""
    path = Path(path)
    if not path.is_dir():
        return "not a directory"
    for name in REQUIRED:
        if not (path / name).is_file():
            return f"missing {name}"
    try:
        state = json.loads((path / STATE).read_text())
        json.loads((path / "adapter_config.json").read_text())
        int(state["step"]), int(state["version"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable metadata ({e.__class__.__name__}: {e})"
    for name in ("adapters.safetensors", "optimizer.safetensors"):
        if not _safetensors_complete(path / name):
            return f"{name} is truncated or corrupt"
    if (path / "ref_ema.safetensors").exists() and not _safetensors_complete(path / "ref_ema.safetensors"):
        return "ref_ema.safetensors is truncated or corrupt"
    return None


class CheckpointError(RuntimeError):
    """A run directory has checkpoints and none can be resumed from; the message names each and why."""


def candidates(run_dir: str | Path) -> list[Path]:
    """The checkpoints to try, best first: the one `latest` names (after a resume from an older checkpoint, newer
    dirs of the abandoned run may exist), then every step dir, newest first."""
    root = Path(run_dir) / CHECKPOINTS
    try:
        named = (root / LATEST).read_text().strip()
    except OSError:
        named = ""
    found = [root / named] if named else []
    return found + [path for _, path in reversed(_step_dirs(root)) if path not in found]


def find_latest(run_dir: str | Path, load: Callable[[Path], Any] | None = None) -> Path | None:
    """The checkpoint to resume from: the first of `candidates` that is complete and, with `load`, that `load(path)`
    takes without raising (e.g. restores a trainer). None when there is no checkpoint at all; CheckpointError naming
    each and why when there are some and none qualifies. Broken checkpoints are skipped with a warning and left in
    place."""
    problems = []
    for path in candidates(run_dir):
        try:
            problem = check_checkpoint(path) if _STEP_DIR.match(path.name) else "not a checkpoint name"
            if problem:
                raise ValueError(problem)
            if load is not None:
                load(path)
            return path
        except Exception as e:  # incomplete, or complete but unloadable (bad data, another model's): the next
            log.warning("skipping checkpoint %s: %s", path, e)
            problems.append(f"{path}: {e}")
    if problems:
        raise CheckpointError(
            f"no checkpoint of {run_dir} can be resumed from, so the learner stops rather than start over:\n  "
            + "\n  ".join(problems)
            + "\nmove the broken ones aside (or the whole checkpoints directory, to start over) and launch again"
        )
    return None


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint dir: {"state": state.json, "adapter": tensors, "optimizer": flat state,
    "ema": tensors|None}."""
    path = Path(path)
    problem = check_checkpoint(path)
    if problem:
        raise ValueError(f"{path} is not a usable checkpoint: {problem}")
    ema_path = path / "ref_ema.safetensors"
    return {
        "state": json.loads((path / STATE).read_text()),
        "adapter": mx.load(str(path / "adapters.safetensors")),
        "optimizer": mx.load(str(path / "optimizer.safetensors")),
        "ema": mx.load(str(ema_path)) if ema_path.exists() else None,
    }


def failed_again(run_dir: str | Path, step: int, source_state: dict, error: BaseException) -> str | None:
    """Record that step `step` failed on the input at `source_state` with `error` (RUN_DIR/learner_failure.json);
    when the failure recorded before was the same step, input and kind of error, return why the job should stop:
    a restart would only repeat it."""
    path = Path(run_dir) / FAILURE
    now = {
        "step": step,
        "source": json.loads(json.dumps(source_state)),
        "error": type(error).__name__,
        "message": str(error)[:2000],
    }
    try:
        before = json.loads(path.read_text())
    except (OSError, ValueError):
        before = None
    if isinstance(before, dict) and all(before.get(k) == now[k] for k in ("step", "source", "error")):
        where = json.dumps(now["source"])
        return f"step {step} failed twice on the same input (source {where}): {now['error']}: {now['message']}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(now) + "\n")
    return None


# ----------------------------------------------------------------------------------------------------------
# metrics.jsonl
# ----------------------------------------------------------------------------------------------------------


def append_metrics(run_dir: str | Path, metrics: dict) -> None:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = dict(metrics, time=time.time())
    with open(run_dir / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return out


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Keep only the lines of steps <= `step` (called when resuming from that step, so replayed steps are not
    logged twice). Malformed lines (cut by a crash) go too."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    keep = [json.dumps(m) for m in read_metrics(run_dir) if isinstance(m.get("step"), int) and m["step"] <= step]
    write_atomic(path, "".join(line + "\n" for line in keep))
