"""`[coordinator] blas`: the optimized BLAS preloaded into the coordinator's MLX children on Linux gives the same
results as MLX's bundled one (two real processes), reaches the job's children, and is never used on macOS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import poll

from runner.blas import OPTIMIZED_BLAS, blas_library, child_environment
from runner.config import ConfigError
from runner.status import fetch_status

ROOT = Path(__file__).parent.parent
INSTALLED = next((p for p in OPTIMIZED_BLAS if Path(p).is_file()), None)
MAPPED = os.path.realpath(INSTALLED) if INSTALLED else ""  # what /proc/PID/maps names (the symlink's target)
needs_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or INSTALLED is None, reason="no libopenblas0-pthread on this machine"
)


def test_never_on_macos_and_bundled_means_none(tmp_path):
    library = tmp_path / "libblas.so"
    library.write_bytes(b"")
    assert blas_library(str(library), platform="darwin") is None
    assert blas_library("auto", platform="darwin") is None
    assert blas_library("bundled", platform="linux", build="cpu") is None
    assert blas_library(str(library), platform="linux", build="cpu") == str(library)
    assert blas_library("auto", platform="linux", build="cpu") == INSTALLED
    with pytest.raises(ConfigError, match="is not a file"):
        blas_library(str(tmp_path / "missing.so"), platform="linux", build="cpu")
    # MLX's CUDA build runs its matmuls on the GPU: a CPU BLAS preloaded into it would only start idle threads.
    assert blas_library("auto", platform="linux", build="cuda") is None
    assert blas_library(str(library), platform="linux", build="cuda") is None


def test_the_installed_mlx_build_is_read_without_loading_mlx():
    code = "import sys; from runner.blas import mlx_build; print(mlx_build()); print('mlx.core' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False"
    import mlx.core as mx

    expected = "metal" if sys.platform == "darwin" else "cuda" if mx.cuda.is_available() else "cpu"
    assert out[0] == expected


def test_preload_goes_first_and_keeps_what_was_there(monkeypatch):
    monkeypatch.setenv("LD_PRELOAD", "/x/other.so")
    assert child_environment("/y/blas.so")["LD_PRELOAD"] == "/y/blas.so /x/other.so"
    assert child_environment(None)["LD_PRELOAD"] == "/x/other.so"


def test_the_children_split_the_cores_between_their_blas_threads(monkeypatch):
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert child_environment("/y/blas.so", processes=2)["OPENBLAS_NUM_THREADS"] == "4"
    assert child_environment("/y/blas.so", processes=16)["OPENBLAS_NUM_THREADS"] == "1"
    assert "OPENBLAS_NUM_THREADS" not in child_environment(None, processes=2)  # MLX's own BLAS: nothing to split
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's choice wins
    assert child_environment("/y/blas.so", processes=2)["OPENBLAS_NUM_THREADS"] == "3"


# A float32 matmul and a forward of the tiny model, written to argv[2]; prints whether the library argv[3] is mapped
# in (numpy brings an OpenBLAS of its own, so the check is by path).
PROBE = """
import sys, numpy as np, mlx.core as mx
from mlx_lm import load
rng = np.random.default_rng(0)
a, b = (mx.array(rng.standard_normal((512, 384), dtype=np.float32)) for _ in range(2))
model, _ = load(sys.argv[1])
logits = model(mx.array([[1, 5, 9, 42, 100, 7, 3, 200]]))
np.savez(sys.argv[2], matmul=np.array(a @ b.T), logits=np.array(logits.astype(mx.float32)))
print(sys.argv[3] in open("/proc/self/maps").read())
"""


@needs_openblas
def test_preloaded_blas_matches_the_bundled_one(tmp_path, tiny_model):
    results = {}
    for name, library in (("bundled", None), ("openblas", INSTALLED)):
        out = tmp_path / f"{name}.npz"
        env = {**child_environment(library), "PYTHONPATH": str(ROOT)}
        r = subprocess.run(
            [sys.executable, "-c", PROBE, str(tiny_model), str(out), MAPPED],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip() == str(library is not None)  # the preload really took (and only there)
        results[name] = np.load(out)
    for key in ("matmul", "logits"):
        np.testing.assert_allclose(results["openblas"][key], results["bundled"][key], rtol=1e-4, atol=1e-4)


@needs_openblas
@pytest.mark.slow
def test_launch_preloads_it_into_every_mlx_child_and_reports_it(tmp_path, tiny_model):
    from test_hub import job_config
    from test_launch import Job

    config = job_config(tmp_path, str(tiny_model), steps=500)
    sets = ['coordinator.control="tcp://127.0.0.1:0"', 'coordinator.weights="tcp://127.0.0.1:0"']
    job = Job(config, sets, tmp_path)
    try:
        control = job.control()
        status = poll(lambda: (s := fetch_status(control))["job"]["step"] and s, 180, "the first step", interval=0.2)
        assert status["job"]["blas"] == INSTALLED
        pids = {w["name"]: w["pid"] for w in status["workers"]}
        assert set(pids) == {"gen-0", "learner"}
        for name, pid in pids.items():
            assert MAPPED in Path(f"/proc/{pid}/maps").read_text(), f"{name} runs without the preloaded BLAS"
        table = subprocess.run(
            [sys.executable, "-m", "runner.cli", "status", "--coordinator", control],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert f"blas {INSTALLED}" in table.stdout
    finally:
        job.proc.send_signal(signal.SIGTERM)
        job.finish(60)


def test_commands_that_start_mlx_say_when_mlx_has_no_backend(monkeypatch, capsys, tmp_path):
    """On Linux MLX's library comes from `mlx[cpu]` or `mlx[cuda]`; a plain install has neither, and every child
    would die importing MLX. The CLI says so once, exit 2, before starting anything."""
    import importlib.metadata

    from runner import cli

    def no_backend(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(importlib.metadata, "distribution", no_backend)
    assert cli.main(["serve", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "MLX is installed without a backend" in err and ".[cpu]" in err and ".[cuda]" in err
    assert cli.main(["keys", "generate", "--out", str(tmp_path / "k")]) == 0  # a command that needs no MLX runs
