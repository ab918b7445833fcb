"""The `runner` console script: help lists every documented subcommand; unbuilt ones fail plainly."""

import subprocess

import runner


def run(*args, timeout=60):
    return subprocess.run(["runner", *args], capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_subcommand():
    r = run("--help")
    assert r.returncode == 0
    for name in ("launch", "serve", "worker", "status", "models", "adapters", "deploy", "keys", "report"):
        assert name in r.stdout


def test_version():
    r = run("--version")
    assert r.returncode == 0 and runner.__version__ in r.stdout


def test_unknown_subcommand_fails():
    assert run("frobnicate").returncode != 0


def test_models_prepare_tiny_refuses_to_overwrite(tmp_path):
    out = tmp_path / "tiny"
    r = run("models", "prepare", "tiny", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "config.json").exists()
    before = (out / "model.safetensors").read_bytes()
    r = run("models", "prepare", "tiny", "--out", str(out), "--seed", "1")
    assert r.returncode == 2 and "--force" in r.stderr
    assert (out / "model.safetensors").read_bytes() == before
    r = run("models", "prepare", "tiny", "--out", str(out), "--seed", "1", "--force")
    assert r.returncode == 0 and (out / "model.safetensors").read_bytes() != before
