"""Two machines on one: network namespaces A (coordinator, learner) and B (a remote generation worker), joined by a
veth pair 10.123.0.1/24 <-> 10.123.0.2/24 (A also has 10.123.0.3, for a weights socket B can be cut off from). The
worker is started as the README says (`--host 0.0.0.0`, no `--advertise-url`), joins over TCP with CURVE and
advertises its address on the veth; it serves the latest adapter version (checked from A over HTTP with the bearer
token) and takes the training requests of a `runner launch` job; a worker with a stranger's key is refused and the
coordinator logs it. Liveness: `kill -9` of `runner launch` ends its local children within the heartbeat timeout,
and the remote worker serves on, rejoins the restarted job and catches up; a version it never received (its weights
SUB socket cut off by a `prohibit` route) is re-sent as soon as its heartbeat reports the older version.

The namespaces share the hostname and /dev/shm, so a worker in B could take versions through the coordinator's
shared-memory slots; every job here sets `[coordinator] shared_memory = false`, so B takes them from the weights PUB
socket over the veth, as another Mac does (each test checks `weights_via == "pub"`). Skipped only where `ip netns` is
not permitted.

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

from runner.coordinator import VERSION_RESERVE

REPO = Path(__file__).resolve().parents[1]
ADDR_A, ADDR_B, ADDR_A2 = "10.123.0.1", "10.123.0.2", "10.123.0.3"
CONTROL = f"tcp://{ADDR_A}:5555"  # fixed ports are safe: the namespaces are new and empty
WEIGHTS = f"tcp://{ADDR_A}:5556"
HEARTBEAT_TIMEOUT = 10.0  # the default, and the bound for a killed launch's children
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
        _ip("-n", self.a, "addr", "add", f"{ADDR_A2}/24", "dev", self.veth_a)

    def pids(self, ns: str) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split()]

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
        "coordinator": {"control": CONTROL, "weights": WEIGHTS, "heartbeat_timeout": 30.0, "shared_memory": False},
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
    """The README's command on the worker Mac: bound to every interface, no --advertise-url, the job's API token
    from a 0600 file (the coordinator never sends it)."""
    token_file = log.parent / f"{name}-api-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
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
            "--api-token-file",
            str(token_file),
            "--name",
            name,
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--model",
            str(model),
        ),
        log,
    )


def status_from_a(net: Netns, keys: dict) -> dict:
    """`runner status --json` run in A, as a user on the coordinator's Mac would."""
    secret, public = str(keys["server_secret"]), str(keys["server_public"])
    cmd = ["-m", "runner.cli", "status", "--coordinator", CONTROL, "--key", secret, "--server-key", public, "--json"]
    r = net.run(net.a, _python(*cmd), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def worker_row(status: dict, name: str) -> dict | None:
    return next((w for w in status["workers"] if w["name"] == name), None)


def http_from_a(net: Netns, url: str) -> dict:
    """GET /health and /metrics of a worker from namespace A (with the token): status code and request count."""
    r = net.run(net.a, _helper("http", url, TOKEN), timeout=60)
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
    public = str(keys["server_public"])
    r = netns.run(
        netns.a,
        _helper("publish", CONTROL, str(keys["learner_secret"]), public, str(tiny_model), "1", "3", TOKEN),
        timeout=240,
    )
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["worker"]["name"] == "remote-b" and result["worker"]["local"] is False
    # Bound to 0.0.0.0, it advertises its address on the interface that reaches the coordinator.
    assert result["worker"]["http_url"] == f"http://{ADDR_B}:{WORKER_PORT}"
    assert result["worker"]["weights_via"] == "pub"
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

    # From B, an authorized worker key tries the learner's messages, and an observer key tries to join: each is
    # rejected with the rule, and the latest version stays 3.
    observer = str(keys["observer_secret"])
    r = netns.run(netns.b, _helper("intrude", CONTROL, str(keys["worker_secret"]), observer, public), timeout=120)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert "needs a learner key" in seen.pop("hello as learner")
    assert "needs a worker key" in seen.pop("observer hello")
    assert seen.pop("observer status") == 3
    assert seen and all(reply["type"] == "rejected" and "learner" in reply["reason"] for reply in seen.values()), seen
    assert worker_row(status_from_a(netns, keys), "intruder")["state"] == "loading"  # it joined as a worker only


def test_launch_trains_on_a_remote_worker_which_outlives_a_killed_coordinator(netns, keys, tiny_model, tmp_path):
    """`runner launch` in A with no local generation worker (so the job waits for B) and the README's worker in B.
    Training requests land on B; `kill -9` of the launch ends its learner within the heartbeat timeout while B serves
    on; the launch started again resumes from its newest checkpoint, B rejoins and catches up, and the job finishes
    with versions never going backwards."""
    steps = 40  # the kill comes at step 2: most of the job runs after the restart
    run_dir = tmp_path / "run"
    config = job_config(tiny_model, run_dir, keys, steps=steps)
    config["checkpoint"]["interval"] = 1
    config["coordinator"]["heartbeat_timeout"] = HEARTBEAT_TIMEOUT
    config_path = tmp_path / "job.toml"
    config_path.write_text(to_toml(config))
    launch_log, relaunch_log, worker_log = tmp_path / "launch.log", tmp_path / "relaunch.log", tmp_path / "worker.log"
    logs = (launch_log, relaunch_log, worker_log, run_dir / "logs" / "learner.log")
    job = netns.spawn(netns.a, _python("-m", "runner.cli", "launch", str(config_path)), launch_log)
    worker = remote_worker(
        netns, keys["worker_secret"], keys["server_public"], "remote-b", WORKER_PORT, worker_log, tiny_model
    )

    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 180, "two steps", (job,), logs)
    assert [p for p in netns.pids(netns.a) if p != job.pid]  # the learner
    job.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    job.wait(10)
    wait_until(lambda: not netns.pids(netns.a), HEARTBEAT_TIMEOUT, "A's processes to exit", (worker,), logs)
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT
    assert "exiting, as this process was started by it" in (run_dir / "logs" / "learner.log").read_text()

    # B serves on at its version, reachable from A at the address it advertised; the training requests went to it.
    url = f"http://{ADDR_B}:{WORKER_PORT}"
    seen = http_from_a(netns, url)
    assert seen["health"] == 200 and seen["requests"] > 0, seen
    served_before = seen["version"]
    assert worker.poll() is None

    job = netns.spawn(netns.a, _python("-m", "runner.cli", "launch", str(config_path)), relaunch_log)

    def rejoined():
        row = worker_row(status_from_a(netns, keys), "remote-b")
        return row if row and row["state"] == "serving" else None

    row = wait_until(rejoined, 120, "B to rejoin", (job, worker), logs)
    assert row["http_url"] == url and row["weights_via"] == "pub" and row["version"] >= served_before, row
    assert "rejoined at adapter version" in worker_log.read_text()
    try:
        code = job.wait(300)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the restarted job did not finish within 300s\n{_tails(logs)}") from None
    assert code == 0, _tails(logs)
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[-1]["step"] == steps and {x["step"] for x in lines} == set(range(1, steps + 1))
    versions = [x["version"] for x in lines]
    assert versions == sorted(versions), versions  # across the restart too
    worker_text = worker_log.read_text(errors="replace")
    live = [int(v) for v in re.findall(r"adapter version (\d+) is live", worker_text)]
    assert live == sorted(set(live)) and live[-1] > served_before, live
    assert re.search(rf"step {steps}/{steps} .*\[remote-b:v\d+\]", relaunch_log.read_text()), _tails(logs)
    assert worker.wait(60) == 0, _tails(logs)  # the coordinator told it to stop when the job ended


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["kill-9", "stopped"])
def test_kill_9_of_launch_leaves_no_child_behind(netns, keys, tiny_model, tmp_path, sig):
    """`runner launch` as on one Mac (defaults: shared memory, children on the Unix socket), a local generation worker
    and the learner: after `kill -9` of the launch, every process in its namespace is gone within the heartbeat
    timeout (a child sees its parent go, or hears no coordinator beats). A launch that is stopped (SIGSTOP: alive
    but silent) loses its children the same way, by the heartbeats alone."""
    run_dir = tmp_path / "run"
    config = job_config(tiny_model, run_dir, keys, steps=1000)
    config["generation"]["workers"] = 1
    config["coordinator"].update(heartbeat_timeout=HEARTBEAT_TIMEOUT, shared_memory=True)
    config_path = tmp_path / "job.toml"
    config_path.write_text(to_toml(config))
    launch_log = tmp_path / "launch.log"
    logs = (launch_log, run_dir / "logs" / "learner.log", run_dir / "logs" / "gen-0.log")
    job = netns.spawn(netns.a, _python("-m", "runner.cli", "launch", str(config_path)), launch_log)
    metrics = run_dir / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and metrics.read_text().strip(), 180, "a training step", (job,), logs)
    # A state reaches the coordinator with the next heartbeat, which may come after the first step's metrics line.
    expected = {"gen-0": "serving", "learner": "training"}
    status = wait_until(
        lambda: (s := status_from_a(netns, keys)) and {w["name"]: w["state"] for w in s["workers"]} == expected and s,
        30,
        f"worker states {expected}",
        (job,),
        logs,
    )
    children = {w["pid"] for w in status["workers"]}
    assert children <= set(netns.pids(netns.a))
    job.send_signal(sig)
    killed = time.monotonic()
    wait_until(lambda: set(netns.pids(netns.a)) <= {job.pid}, HEARTBEAT_TIMEOUT, "every child to exit", (), logs)
    assert time.monotonic() - killed <= HEARTBEAT_TIMEOUT
    job.kill()  # the stopped one
    job.wait(10)
    why = "exiting, as this process was started by it" if sig == signal.SIGKILL else "silent for"
    for name in ("learner", "gen-0"):
        assert why in (run_dir / "logs" / f"{name}.log").read_text()


def test_a_version_the_worker_missed_is_sent_again_at_its_next_heartbeat(netns, keys, tiny_model, tmp_path):
    """B's weights SUB socket cannot reach the PUB socket (a `prohibit` route to its address), so the PUB message
    of version 1 is dropped for B. B's next heartbeat reports version 0; the coordinator sends version 1 again on
    the control socket and B serves it well before any timeout. With the route gone, version 2 arrives as usual.
    Then a coordinator restart: B rejoins at once and versions continue above the one it serves."""
    config = job_config(tiny_model, tmp_path / "run", keys)
    config["coordinator"]["weights"] = f"tcp://{ADDR_A2}:5556"
    logs = coord_log, worker_log = tmp_path / "coordinator.log", tmp_path / "worker.log"
    _ip("-n", netns.b, "route", "add", "prohibit", f"{ADDR_A2}/32")
    coord = netns.spawn(netns.a, _helper("coordinator", json.dumps(config)), coord_log)
    wait_until(lambda: "control tcp://" in coord_log.read_text(errors="replace"), 60, "the coordinator", (coord,), logs)
    worker = remote_worker(
        netns, keys["worker_secret"], keys["server_public"], "remote-b", WORKER_PORT, worker_log, tiny_model
    )
    secret, public = str(keys["learner_secret"]), str(keys["server_public"])
    r = netns.run(netns.a, _helper("publish", CONTROL, secret, public, str(tiny_model), "1", "1", TOKEN), timeout=240)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["worker"]["version"] == 1 and result["worker"]["resent_version"] == 1, result
    assert result["worker"]["weights_via"] == "pub"
    assert result["served_after"] < config["coordinator"]["heartbeat_timeout"], result
    assert "remote-b serves version 0, the latest is 1: sending it again" in coord_log.read_text()

    _ip("-n", netns.b, "route", "del", "prohibit", f"{ADDR_A2}/32")

    def subscribed() -> bool:  # B's SUB socket reconnects by itself
        out = netns.run(netns.b, ["ss", "-Htn", "state", "established", "dst", f"{ADDR_A2}:5556"], timeout=30).stdout
        return bool(out.strip())

    wait_until(subscribed, 60, "B's SUB socket to connect", (coord, worker), logs)
    r = netns.run(netns.a, _helper("publish", CONTROL, secret, public, str(tiny_model), "2", "2", TOKEN), timeout=240)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    assert json.loads(r.stdout.strip().splitlines()[-1])["worker"]["version"] == 2

    # The coordinator is killed and started again at once: B's heartbeats reach a coordinator that does not know
    # it, which tells it to say hello again (well before B's own silence limit). The new coordinator continues above
    # the numbers the first one reserved on disk before fanning version 1 out: it refuses 2 (B holds a 2) and 16,
    # and takes the next number.
    coord.send_signal(signal.SIGKILL)
    coord.wait(10)
    coord = netns.spawn(netns.a, _helper("coordinator", json.dumps(config)), coord_log)
    wait_until(lambda: worker_log.read_text().count("rejoined at adapter version 2") == 1, 60, "B to rejoin", (coord,))
    assert "the coordinator does not know this worker (it restarted)" in worker_log.read_text()
    r = netns.run(netns.a, _helper("publish", CONTROL, secret, public, str(tiny_model), "2", "2", TOKEN), timeout=240)
    reserved = VERSION_RESERVE  # version 1 reserved 1..VERSION_RESERVE
    assert r.returncode != 0 and f"version 2 is not newer than {reserved}" in r.stderr, r.stderr[-2000:]
    nxt = str(reserved + 1)
    r = netns.run(netns.a, _helper("publish", CONTROL, secret, public, str(tiny_model), nxt, nxt, TOKEN), timeout=240)
    assert r.returncode == 0, f"{r.stdout[-2000:]}\n{r.stderr[-3000:]}\n{_tails(logs)}"
    assert json.loads(r.stdout.strip().splitlines()[-1])["worker"]["version"] == reserved + 1
    assert worker.poll() is None and coord.poll() is None


# ----------------------------------------------------------------------------------------------------------
# Helpers run inside namespace A
# ----------------------------------------------------------------------------------------------------------


def _client(endpoint: str, secret: str, public: str, name: str, role: str = "cli"):
    from runner.control import ControlClient

    return ControlClient(endpoint, name, role=role, curve={"secret": secret, "server_public": public})


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


def main_publish(endpoint: str, secret: str, public: str, model: str, first: str, last: str, token: str) -> int:
    """Publish random adapters `first`..`last` as the learner would, wait until every worker serves the last (how
    long that took: served_after), then ask the remote worker for a completion over the veth."""
    import httpx
    import mlx.core as mx
    import mlx_lm
    import numpy as np

    from runner import wire
    from runner.control import model_id
    from workers.learner.trainer import host_buffers
    from workers.lora import LoraSpec, apply_lora, lora_layout

    client = _client(endpoint, secret, public, "publisher", role="learner")
    try:
        client.hello(timeout=60)  # with a key in authorized_keys/learners/: only the learner may publish
        deadline = time.monotonic() + 120
        while not any(w["state"] == "serving" for w in _status(client)["workers"] if w["role"] == "generate"):
            if time.monotonic() > deadline:
                raise SystemExit("no remote worker served within 120s")
            time.sleep(0.2)
        model_obj, _ = mlx_lm.load(model)
        apply_lora(model_obj, LoraSpec(rank=LORA["rank"], keys=LORA["keys"]))
        rng = np.random.default_rng(int(first))
        last = int(last)
        for v in range(int(first), last + 1):
            tensors = {
                n: mx.array(rng.normal(0, 0.5, size=shape).astype(np.float32))
                for n, (shape, _) in lora_layout(model_obj).items()
            }
            client.send_weights(wire.encode(v, v, model_id(model), {}, host_buffers(tensors)))
            reply = client.wait_for(("published", "rejected"), timeout=30)[1]
            if reply["type"] != "published":
                raise SystemExit(f"version {v} was rejected: {reply}")
        published = time.monotonic()
        client.send({"type": "wait_serving", "version": last})
        client.wait_for(("serving",), timeout=60)
        served_after = time.monotonic() - published
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
                    "served_after": served_after,
                }
            )
        )
    finally:
        client.close()
    return 0


def main_intrude(endpoint: str, worker_secret: str, observer_secret: str, public: str) -> int:
    """A worker key sends the learner's messages; an observer key reads status and tries to say hello. Prints what
    the coordinator answered each."""
    from runner import wire
    from runner.control import HelloRefused

    seen = {}
    try:
        _client(endpoint, worker_secret, public, "fake-learner", role="learner").hello(timeout=30)
        seen["hello as learner"] = "welcome"
    except HelloRefused as e:
        seen["hello as learner"] = str(e)
    worker = _client(endpoint, worker_secret, public, "intruder", role="generate")
    welcome = worker.hello(timeout=30)
    one = [("x", "float32", (1,), memoryview(bytes(4)))]
    worker.send_weights(wire.encode(welcome["latest_version"] + 1, 0, welcome["base_model_id"], {}, one))
    seen["weights"] = worker.wait_for(("published", "rejected"), timeout=30)[1]
    for msg in (
        {"type": "progress", "name": "intruder", "metrics": {"step": 99}},
        {"type": "done", "name": "intruder"},
        {"type": "wait_serving", "version": 0},
        {"type": "weights_slot", "slot": 0, "version": 99, "nbytes": 1},
    ):
        seen[msg["type"]] = worker.request(msg, ("rejected", "serving", "published"), timeout=30)[1]
    observer = _client(endpoint, observer_secret, public, "watcher")
    seen["observer status"] = _status(observer)["job"]["latest_version"]
    try:
        observer.hello(timeout=30)
        seen["observer hello"] = "welcome"
    except HelloRefused as e:
        seen["observer hello"] = str(e)
    print(json.dumps(seen))
    return 0


def main_http(url: str, token: str) -> int:
    """A worker's /health (status code, adapter version) and its request counter (/metrics), from this namespace."""
    import httpx

    health = httpx.get(f"{url}/health", timeout=30)
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {token}"}, timeout=30).text
    requests = next(float(line.split()[1]) for line in text.splitlines() if line.startswith("runner_requests_total "))
    version = health.json()["adapter_version"]
    print(json.dumps({"health": health.status_code, "version": version, "requests": requests}))
    return 0


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    helpers = {"coordinator": main_coordinator, "publish": main_publish, "http": main_http, "intrude": main_intrude}
    sys.exit(helpers[command](*rest))
