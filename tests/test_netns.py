"""Two machines on one: network namespaces A (coordinator, learner) and B (a remote generation worker), joined by a
veth pair 10.123.0.1/24 <-> 10.123.0.2/24. The worker joins over TCP with CURVE, serves the latest adapter version
(checked from A over HTTP with the bearer token) and is the only worker a full `runner launch` job trains with; a
worker with a stranger's key is refused and the coordinator logs it. Skipped only where `ip netns` is not permitted.

Traffic stays on the two private test addresses inside namespaces this test creates. Everything it starts (namespaces,
veth, processes) is removed in teardown, also on failure. The helpers at the bottom run inside namespace A as
`python tests/test_netns.py COMMAND ...`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ADDR_A, ADDR_B = "10.123.0.1", "10.123.0.2"
CONTROL = f"tcp://{ADDR_A}:5555"  # fixed ports are safe: the namespaces are new and empty
WEIGHTS = f"tcp://{ADDR_A}:5556"
WORKER_PORT = 8000
TOKEN = "netns-test-token"
LORA = {"rank": 4, "keys": ["self_attn.q_proj", "self_attn.v_proj"]}


# ----------------------------------------------------------------------------------------------------------
# Namespaces and processes
# ----------------------------------------------------------------------------------------------------------


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class Netns:
    """Namespaces A and B joined by a veth pair; `spawn` runs a command inside one of them."""

    def __init__(self, tag: str):
        self.a, self.b = f"rt-a-{tag}", f"rt-b-{tag}"
        self.veth_a, self.veth_b = f"rtva{tag}"[:15], f"rtvb{tag}"[:15]
        self.procs: list[subprocess.Popen] = []
        self.created: list[str] = []

    def create(self) -> None:
        for ns in (self.a, self.b):
            _ip("netns", "add", ns)
            self.created.append(ns)
        _ip("link", "add", self.veth_a, "type", "veth", "peer", "name", self.veth_b)
        _ip("link", "set", self.veth_a, "netns", self.a)
        _ip("link", "set", self.veth_b, "netns", self.b)
        for ns, dev, addr in ((self.a, self.veth_a, ADDR_A), (self.b, self.veth_b, ADDR_B)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")  # the coordinator's status page and local children use loopback

    def spawn(self, ns: str, args: list[str], log: Path) -> subprocess.Popen:
        out = open(log, "ab")
        # `ip netns exec` execs the command in place, so the pid is the command's own.
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *args],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        )
        out.close()
        self.procs.append(proc)
        return proc

    def run(self, ns: str, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", ns, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )

    def destroy(self) -> None:
        """Stop what we started (politely, then by force), then delete the namespaces (which deletes the veth)."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        for ns in self.created:
            # Grandchildren (a launch's learner runs in its own session) are still ours: kill them by pid.
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            deadline = time.monotonic() + 10
            while _ip("netns", "pids", ns, check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.05)
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.veth_a, check=False)  # only if it never left the root namespace


def netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if sys.platform != "linux":
        return "network namespaces are Linux-only"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"rt-probe-{os.getpid()}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` is not permitted here: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def wait_until(predicate, timeout: float, what: str, procs: tuple[subprocess.Popen, ...] = (), logs: tuple = ()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(
                f"a process exited ({dead[0].args[3:6]}: {dead[0].returncode}) while waiting for {what}\n{_tails(logs)}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{_tails(logs)}")


def _tails(logs) -> str:
    return "\n".join(
        f"--- {p}:\n" + "\n".join(Path(p).read_text(errors="replace").splitlines()[-25:])
        for p in logs
        if Path(p).exists()
    )


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _helper(*args: str) -> list[str]:
    return _python(str(Path(__file__).resolve()), *args)


# ----------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def netns():
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    net = Netns(f"{os.getpid() % 100000}{int(time.time() * 1000) % 1000}")
    try:
        try:
            net.create()
        except subprocess.CalledProcessError as e:
            pytest.skip(f"cannot set up namespaces with a veth pair here: {e.stderr.strip()}")
        yield net
    finally:
        net.destroy()


def job_config(model: Path, run_dir: Path, keys: dict, **learner) -> dict:
    return {
        "model": {"path": str(model)},
        "lora": LORA,
        "generation": {"workers": 0, "port": 0},  # no local worker: only the one in namespace B serves
        "learner": {"steps": 3, "group_size": 2, "batch_size": 2, "max_tokens": 4, **learner},
        "checkpoint": {"dir": str(run_dir), "interval": 10},
        "coordinator": {"control": CONTROL, "weights": WEIGHTS, "heartbeat_timeout": 30.0},
        "security": {
            "curve_secret_key": str(keys["server_secret"]),
            "curve_public_key": str(keys["server_public"]),
            "authorized_keys": str(keys["authorized"]),
            "api_token": TOKEN,
        },
    }


def to_toml(config: dict) -> str:
    """Enough TOML for a job config (tables of strings, numbers and lists); JSON literals are valid TOML values."""
    return "".join(
        f"[{section}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()) + "\n"
        for section, values in config.items()
    )


def remote_worker(
    net: Netns, secret: Path, server_public: Path, name: str, port: int, log: Path, model: Path
) -> subprocess.Popen:
    return net.spawn(
        net.b,
        _python(
            "-m",
            "runner.cli",
            "worker",
            "generate",
            "--join",
            CONTROL,
            "--key",
            str(secret),
            "--server-key",
            str(server_public),
            "--name",
            name,
            "--host",
            ADDR_B,
            "--port",
            str(port),
            "--model",
            str(model),
        ),
        log,
    )


def status_from_a(net: Netns, keys: dict) -> dict:
    r = net.run(net.a, _helper("status", CONTROL, str(keys["server_secret"]), str(keys["server_public"])), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------


def test_remote_worker_joins_with_curve_serves_latest_and_strangers_are_refused(netns, keys, tiny_model, tmp_path):
    config = job_config(tiny_model, tmp_path / "run", keys)
    logs = coord_log, worker_log, stranger_log = [tmp_path / f"{n}.log" for n in ("coordinator", "worker", "stranger")]
    coord = netns.spawn(netns.a, _helper("coordinator", json.dumps(config)), coord_log)
    wait_until(lambda: "control tcp://" in coord_log.read_text(errors="replace"), 60, "the coordinator", (coord,), logs)
    worker = remote_worker(
        netns, keys["worker_secret"], keys["server_public"], "remote-b", WORKER_PORT, worker_log, tiny_model
    )
    # From namespace A: wait for it, publish versions 1..3, wait until it serves 3, ask it for a completion.
    r = netns.run(
        netns.a,
        _helper(
            "publish", CONTROL, str(keys["server_secret"]), str(keys["server_public"]), str(tiny_model), "3", TOKEN
        ),
        timeout=240,
    )
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["worker"]["name"] == "remote-b" and result["worker"]["local"] is False
    assert result["worker"]["http_url"] == f"http://{ADDR_B}:{WORKER_PORT}"
    assert result["worker"]["version"] == 3 and result["latest_version"] == 3
    assert result["policy_version"] == 3 and result["completion_tokens"] >= 1
    assert result["without_token"] == 401
    assert worker.poll() is None

    # The same join with a stranger's key: the CURVE handshake fails, so it never gets a welcome or weights.
    stranger = remote_worker(
        netns, keys["stranger_secret"], keys["server_public"], "stranger-b", WORKER_PORT + 1, stranger_log, tiny_model
    )
    wait_until(
        lambda: "refused CURVE client" in coord_log.read_text(errors="replace"),
        60,
        "the coordinator to refuse the stranger",
        (coord, worker),
        logs,
    )
    time.sleep(1.0)  # time it would have had to say hello, had it been let in
    names = [w["name"] for w in status_from_a(netns, keys)["workers"]]
    assert "remote-b" in names and "stranger-b" not in names
    assert stranger.poll() in (None, 2, 1)  # still waiting for a welcome that never comes, or gave up
    assert f"{ADDR_B}:{WORKER_PORT + 1}" not in stranger_log.read_text(errors="replace")  # it never served


def test_launch_trains_with_a_remote_worker_only(netns, keys, tiny_model, tmp_path):
    """`runner launch` in A with no local generation worker: the learner's rollouts can only come from B."""
    run_dir = tmp_path / "run"
    config_path = tmp_path / "job.toml"
    config_path.write_text(to_toml(job_config(tiny_model, run_dir, keys)))
    launch_log, worker_log = tmp_path / "launch.log", tmp_path / "worker.log"
    logs = (launch_log, worker_log, run_dir / "logs" / "learner.log")
    job = netns.spawn(netns.a, _python("-m", "runner.cli", "launch", str(config_path)), launch_log)
    wait_until(lambda: "job started" in launch_log.read_text(errors="replace"), 60, "the job to start", (job,), logs)
    worker = remote_worker(
        netns, keys["worker_secret"], keys["server_public"], "remote-b", WORKER_PORT, worker_log, tiny_model
    )
    try:
        code = job.wait(300)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the job did not finish within 300s\n{_tails(logs)}") from None
    assert code == 0, _tails(logs)
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    output = launch_log.read_text(errors="replace")
    assert re.search(r"step 3/3 .*remote-b:v\d", output), output[-2000:]
    # The coordinator told the remote worker to stop when the job ended.
    assert worker.wait(60) == 0, _tails(logs)
    assert "serving on http://10.123.0.2" in worker_log.read_text(errors="replace")


# ----------------------------------------------------------------------------------------------------------
# Helpers run inside namespace A
# ----------------------------------------------------------------------------------------------------------


def _client(endpoint: str, secret: str, public: str, name: str):
    from runner.control import ControlClient

    return ControlClient(endpoint, name, role="cli", curve={"secret": secret, "server_public": public})


def _status(client) -> dict:
    return client.request({"type": "status"}, ("status",), timeout=20)[1]


def main_coordinator(config_json: str) -> int:
    """A coordinator like `runner launch`'s, without a learner: the test publishes versions itself."""
    import logging

    from runner.config import build_config
    from runner.coordinator import create_coordinator

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = build_config(json.loads(config_json))
    coord = create_coordinator(config, Path(config.checkpoint.dir) / "job.toml")
    signal.signal(signal.SIGTERM, lambda *_: coord.request_stop("test over"))
    print(f"control {coord.control_endpoint}", flush=True)
    return coord.run()


def main_status(endpoint: str, secret: str, public: str) -> int:
    client = _client(endpoint, secret, public, f"status-{os.getpid()}")
    try:
        print(json.dumps(_status(client)))
    finally:
        client.close()
    return 0


def main_publish(endpoint: str, secret: str, public: str, model: str, versions: str, token: str) -> int:
    """Publish `versions` random adapters as the learner would, wait until every worker serves the last, then ask
    the remote worker for a completion over the veth."""
    import httpx
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    from runner import wire
    from runner.control import model_id
    from workers.learner.trainer import host_buffers
    from workers.lora import LoraSpec, apply_lora, lora_layout

    client = _client(endpoint, secret, public, "publisher")
    try:
        deadline = time.monotonic() + 120
        while not any(w["state"] == "serving" for w in _status(client)["workers"] if w["role"] == "generate"):
            if time.monotonic() > deadline:
                raise SystemExit("no remote worker served within 120s")
            time.sleep(0.2)
        model_obj, _ = mlx_lm.load(model)
        apply_lora(model_obj, LoraSpec(rank=LORA["rank"], keys=LORA["keys"]))
        rng = np.random.default_rng(0)
        last = int(versions)
        for v in range(1, last + 1):
            tensors = {
                n: mx.array(rng.normal(0, 0.5, size=shape).astype(np.float32))
                for n, (shape, _) in lora_layout(model_obj).items()
            }
            client.send_weights(wire.encode(v, v, model_id(model), {}, host_buffers(tensors)))
            reply = client.wait_for(("published", "rejected"), timeout=30)[1]
            if reply["type"] != "published":
                raise SystemExit(f"version {v} was rejected: {reply}")
        client.send({"type": "wait_serving", "version": last})
        client.wait_for(("serving",), timeout=60)
        status = _status(client)
        worker = next(w for w in status["workers"] if w["role"] == "generate")
        url = worker["http_url"]
        body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0}
        ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        ok.raise_for_status()
        denied = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        print(
            json.dumps(
                {
                    "worker": worker,
                    "latest_version": status["job"]["latest_version"],
                    "policy_version": ok.json()["policy_version"],
                    "completion_tokens": ok.json()["usage"]["completion_tokens"],
                    "without_token": denied.status_code,
                }
            )
        )
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    sys.exit({"coordinator": main_coordinator, "status": main_status, "publish": main_publish}[command](*rest))
