"""The `runner` console script: help lists every documented subcommand; unbuilt ones fail plainly; `runner serve`
refuses a non-loopback bind without an API token."""

import subprocess

import pytest

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


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "[::]"])
def test_serve_refuses_a_non_loopback_host_without_an_api_token(tmp_path, host):
    """The rule `runner launch` applies: one line naming the address and the flag, before any model is loaded."""
    r = run("serve", "--model", str(tmp_path / "not-loaded"), "--host", host, "--port", "8123")
    assert r.returncode == 2 and r.stdout == ""
    (line,) = r.stderr.splitlines()
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    assert line == (
        f"runner: error: refusing to bind http://{bound}:8123 without an API token: "
        "pass --api-token-file PATH (a 0600 file holding a long random string) or set RUNNER_API_TOKEN"
    )


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_serve_on_loopback_needs_no_token(tmp_path, host):
    """Past the security check, the next complaint is the missing model directory (one line, no traceback)."""
    r = run("serve", "--model", str(tmp_path / "missing"), "--host", host, "--port", "8123")
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"runner: error: --model {tmp_path / 'missing'} is not a model directory; expected a local directory with "
        "config.json (`runner models prepare` writes one) or a Hugging Face repo id"
    ]
