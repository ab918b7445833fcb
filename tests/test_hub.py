"""Models named by Hugging Face id: resolved through huggingface_hub's cache as mlx-lm does, offline from a
prepared cache directory (HF_HOME, HF_HUB_OFFLINE=1), and a one-line error for an id that is not there. Also
`[model] dtype`: dequantize and cast at load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from runner.control import model_id
from runner.hub import MODEL_FILE_PATTERNS

ROOT = Path(__file__).parent.parent
REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_fetches_the_files_mlx_lm_fetches():
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    assert MODEL_FILE_PATTERNS == DEFAULT_ALLOW_PATTERNS


@pytest.fixture(scope="module")
def hub_home(tmp_path_factory, tiny_model) -> Path:
    """An HF_HOME whose hub cache holds the tiny model as `org/tiny`, in huggingface_hub's layout."""
    home = tmp_path_factory.mktemp("hf_home")
    repo = home / "hub" / "models--org--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return home


def offline_env(home: Path) -> dict:
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def runner_cli(*args: str, env: dict, cwd: Path, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    tic = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "runner.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    return r, time.monotonic() - tic


def job_config(tmp_path: Path, model: str, steps: int = 3) -> Path:
    text = (ROOT / "configs" / "quickstart.toml").read_text()
    text = text.replace('path = "models/tiny"', f'path = "{model}"').replace('prepare = "tiny"', 'prepare = ""')
    text = text.replace("steps = 40", f"steps = {steps}").replace('dir = "runs/quickstart"', 'dir = "run"')
    config = tmp_path / "job.toml"
    config.write_text(text)
    return config


@pytest.mark.slow
def test_launch_with_a_hub_id_offline_from_the_cache(tmp_path, hub_home, tiny_model):
    config = job_config(tmp_path, "org/tiny")
    sets = ['coordinator.control="tcp://127.0.0.1:0"', 'coordinator.weights="tcp://127.0.0.1:0"']
    r, _ = runner_cli(
        "launch",
        str(config),
        *[a for s in sets for a in ("--set", s)],
        env=offline_env(hub_home),
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 3/3" in r.stdout and "job finished" in r.stdout
    run = tmp_path / "run"
    # Every child got the id, not a path, and resolved it itself; what they compared is the content.
    assert json.dumps("org/tiny") in (run / "config.resolved.toml").read_text()
    assert (
        f"resolved to {hub_home / 'hub' / 'models--org--tiny' / 'snapshots' / REVISION}"
        in (run / "logs" / "gen-0.log").read_text()
    )
    assert model_id(hub_home / "hub" / "models--org--tiny" / "snapshots" / REVISION) == model_id(tiny_model)


@pytest.mark.parametrize("command", ["launch", "serve"])
def test_a_missing_id_offline_fails_at_once_with_one_line(tmp_path, hub_home, command):
    if command == "launch":
        args = ["launch", str(job_config(tmp_path, "org/missing"))]
        label = "[model] path"
    else:
        args, label = ["serve", "--model", "org/missing"], "--model"
    r, took = runner_cli(*args, env=offline_env(hub_home), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"runner: error: {label} org/missing is not in the Hugging Face cache {hub_home / 'hub'} and HF_HUB_OFFLINE "
        "is set: fetch it with `hf download org/missing` (or `huggingface-cli download org/missing`) where the hub "
        "is reachable"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was written
    print(f"{command}: refused in {took:.2f}s (process start included)")


def test_a_path_that_is_no_model_and_no_id_is_named(tmp_path, hub_home):
    r, _ = runner_cli(
        "launch", str(job_config(tmp_path, str(tmp_path / "nowhere"))), env=offline_env(hub_home), cwd=tmp_path
    )
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        f"runner: error: [model] path {tmp_path / 'nowhere'} is not a model directory; expected a local directory "
        "with config.json (`runner models prepare` writes one) or a Hugging Face repo id"
    ]


def quantized_copy(tiny_model: Path, out: Path) -> Path:
    """The tiny model quantized to 4 bits (group 32) by mlx-lm's own converter."""
    from mlx_lm import convert

    convert(str(tiny_model), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_dequantizes_and_casts_at_load(tmp_path, tiny_model, dtype):
    from workers.models import load_model

    quantized = quantized_copy(tiny_model, tmp_path / "q4")
    q_model, *_ = load_model(quantized)
    assert any(isinstance(m, nn.QuantizedLinear) for m in q_model.modules())
    model, _, _, path = load_model(quantized, dtype)
    assert path == quantized
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())
    dtypes = {v.dtype for _, v in tree_flatten(model.parameters())}
    assert dtypes == {getattr(mx, dtype)}
    tokens = mx.array([[1, 5, 9, 42, 100, 7]])
    expected, got = q_model(tokens).astype(mx.float32), model(tokens).astype(mx.float32)
    tol = 1e-4 if dtype == "float32" else 5e-2 * float(mx.abs(expected).max())
    assert float(mx.abs(expected - got).max()) < tol


def test_auto_keeps_the_weights_as_stored(tmp_path, tiny_model):
    from workers.models import load_model

    model, *_ = load_model(quantized_copy(tiny_model, tmp_path / "q4"), "auto")
    assert any(isinstance(m, nn.QuantizedLinear) for m in model.modules())
