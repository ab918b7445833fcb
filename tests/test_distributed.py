"""Data-parallel learners on mx.distributed (ring backend over TCP on 127.0.0.1): two ranks make the same update
as one process on the combined batch and stay identical to each other; under `distributed launch` a SIGTERM stops
both ranks after a checkpoint and a relaunch resumes to the same adapter; through mlx.launch (the path for remote
hosts) the SIGTERM reaches rank 0.

The first test starts the ranks the way `mlx.launch --backend ring` starts local ranks (MLX_RANK + a MLX_HOSTFILE of
'ip:port' lists) but by itself, so every wait is bounded and a hung rank is killed. A probe through `mlx.launch`
first checks that the ring can start here; the tests skip (with the reason) only if not.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from runner.config import LearnerConfig
from workers.learner import distributed as dist
from workers.learner.sources.base import Batch, Sample
from workers.learner.sources.replay import ReplaySource
from workers.learner.trainer import Trainer
from workers.lora import LoraSpec, read_adapter

REPO = Path(__file__).resolve().parents[1]
PROBE_TIMEOUT = 30.0
RUN_TIMEOUT = 90.0
TOLERANCE = 1e-5

KEYS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]
SPEC = LoraSpec(rank=4, scale=10.0, keys=KEYS)
# micro-batches of 3 (shards are micro-batched too), a KL term (reference forward per micro-batch), and a gradient
# norm cap the updates exceed, so the clipping must use the global norm to match.
# Two epochs over three minibatches: ranks must also make the single process's updates when a batch gets several.
LEARNER = LearnerConfig(
    learning_rate=1e-3, micro_batch_size=3, kl_coef=0.05, max_grad_norm=0.05, seed=3, ppo_epochs=2, minibatches=3
)
SETS = [
    "lora.rank=4",
    "lora.scale=10.0",
    f"lora.keys={json.dumps(KEYS)}",
    "learner.learning_rate=0.001",
    "learner.micro_batch_size=3",
    "learner.kl_coef=0.05",
    "learner.max_grad_norm=0.05",
    "learner.seed=3",
    "learner.ppo_epochs=2",
    "learner.minibatches=3",
]
GROUPS_PER_STEP = [5, 6, 1]  # odd split (3 + 2 groups), even split, and one group: rank 1 trains nothing


def make_batches(seed: int = 11, group_size: int = 4, vocab: int = 512) -> list[Batch]:
    """Deterministic ragged rollouts: random prompts/completions, rewards and sampling log-probs; batch i sampled at
    version i (fresh when trained in order)."""
    rng = np.random.default_rng(seed)
    batches = []
    for version, n_groups in enumerate(GROUPS_PER_STEP):
        groups = []
        for _ in range(n_groups):
            prompt = rng.integers(3, vocab, int(rng.integers(3, 8))).tolist()
            group = []
            for _ in range(group_size):
                n = int(rng.integers(2, 9))
                group.append(
                    Sample.from_completion(
                        prompt,
                        rng.integers(3, vocab, n).tolist(),
                        float(rng.random()),
                        (-rng.random(n) * 5).tolist(),
                        version,
                    )
                )
            groups.append(group)
        batches.append(Batch(groups))
    return batches


def free_port_pair() -> int:
    """A port p with p and p + 1 free (mlx.launch gives rank i the port starting_port + i)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p < 65535 and _free(p) and _free(p + 1):
            return p
    raise RuntimeError("no two consecutive free ports on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in dist.LAUNCH_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env | extra


def _kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)  # its own session: the rank and anything it started
            p.wait(5)


def _wait_all(procs: list[subprocess.Popen], timeout: float) -> list[str]:
    """Wait for every process (bounded); outputs in order. Kills them all on timeout."""
    deadline = time.monotonic() + timeout
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            outs.append(out)
    except subprocess.TimeoutExpired:
        _kill(procs)
        raise AssertionError(f"distributed run did not finish within {timeout:.0f}s") from None
    finally:
        _kill(procs)
    return outs


# One write per rank: print() writes its arguments piece by piece, and the two ranks' pieces interleaved.
PROBE = (
    "import os, mlx.core as mx; g = mx.distributed.init(strict=True, backend='ring'); "
    "os.write(1, f'size {g.size()} sum {mx.distributed.all_sum(mx.array([1.0])).item()}\\n'.encode())"
)


@pytest.fixture(scope="module")
def ring(tmp_path_factory) -> None:
    """Skip unless two ranks started by `mlx.launch -n 2 --backend ring` can all_sum over loopback TCP."""
    cmd = [
        *dist.MLX_LAUNCH,
        "-n",
        "2",
        "--backend",
        "ring",
        "--starting-port",
        str(free_port_pair()),
        "--",
        sys.executable,
        "-c",
        PROBE,
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        _kill([proc])
        pytest.skip(f"the mx.distributed ring backend did not start within {PROBE_TIMEOUT:.0f}s here")
    finally:
        _kill([proc])
    if proc.returncode != 0 or out.count("size 2 sum 2.0") != 2:
        pytest.skip(
            f"the mx.distributed ring backend cannot start here (mlx.launch exit {proc.returncode}): "
            f"{out.strip()[-500:]}"
        )


def start_ranks(args: list[str], tmp: Path) -> list[subprocess.Popen]:
    """`python -m workers.learner.trainer ARGS` as ranks 0 and 1 of a ring on 127.0.0.1."""
    port = free_port_pair()
    hostfile = tmp / "hosts.json"  # what mlx.launch writes for local ranks: a JSON list of 'ip:port' lists
    hostfile.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in (port, port + 1)]))
    cmd = [sys.executable, "-m", "workers.learner.trainer", *args]
    return [
        subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=_env(**dist.local_rank_env(r, hostfile)),
            start_new_session=True,
        )
        for r in range(2)
    ]


def max_abs_diff(a: dict[str, mx.array], b: dict[str, mx.array]) -> float:
    assert set(a) == set(b)
    return max(float(mx.abs(a[k].astype(mx.float32) - b[k].astype(mx.float32)).max()) for k in a)


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory) -> tuple[Path, dict[str, mx.array], list[dict]]:
    """The batches as JSONL, and what one plain Trainer makes of them: final adapter and per-step metrics."""
    replay = tmp_path_factory.mktemp("replay") / "batches.jsonl"
    replay.write_text("".join(b.to_json() + "\n" for b in make_batches()))
    single = Trainer.load(tiny_model, LEARNER, SPEC)
    source = ReplaySource(replay)
    metrics = [single.step(source.next_batch(i + 1)) for i in range(len(GROUPS_PER_STEP))]
    tensors = single.lora_tensors()
    mx.eval(tensors)
    return replay, tensors, metrics


def train_args(tiny_model: Path, replay: Path, tmp: Path, *extra: str) -> list[str]:
    args = [
        "--model",
        str(tiny_model),
        "--replay",
        str(replay),
        "--steps",
        str(len(GROUPS_PER_STEP)),
        "--out",
        str(tmp / "adapter"),
        "--run-dir",
        str(tmp / "run"),
        *extra,
    ]
    for s in SETS:
        args += ["--set", s]
    return args


def test_two_ranks_make_the_single_process_update(tiny_model, tmp_path, ring, reference):
    replay, single, ref_metrics = reference
    procs = start_ranks(train_args(tiny_model, replay, tmp_path, "--dump-ranks", str(tmp_path / "ranks")), tmp_path)
    outs = _wait_all(procs, RUN_TIMEOUT)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"
    assert "rank 0 of 2" in outs[0] and "rank 1 of 2" in outs[1]

    # The clipping was active, so a per-rank (instead of global) norm could not have matched.
    assert all(m["grad_norm"] > LEARNER.max_grad_norm for m in ref_metrics)
    rank0 = mx.load(str(tmp_path / "ranks" / "rank0.safetensors"))
    rank1 = mx.load(str(tmp_path / "ranks" / "rank1.safetensors"))
    assert max_abs_diff(rank0, rank1) == 0.0, "the ranks' adapters diverged"
    assert max_abs_diff(rank0, single) <= TOLERANCE
    assert max(float(mx.abs(v).max()) for k, v in single.items() if k.endswith("lora_b")) > 1e-3  # it trained

    # Rank 0 alone wrote the adapter and the metrics, reduced over both ranks.
    spec, written = read_adapter(tmp_path / "adapter")
    assert (spec.rank, spec.scale, spec.keys) == (SPEC.rank, SPEC.scale, SPEC.keys)
    assert max_abs_diff(written, rank0) == 0.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and all(m["ranks"] == 2 for m in lines)
    for got, want in zip(lines, ref_metrics):
        # grad_norm also catches averaging instead of summing the gradients, which Adam would hide in the adapter
        for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm", "sampler_diff"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
        for key in ("reward_mean", "reward_std", "groups", "sequences", "tokens", "trained_tokens"):
            assert got[key] == want[key], key
    assert "step 3/3" in outs[0] and "step 1/3" not in outs[1]  # only rank 0 reports


def _launch(command: list[str], tmp: Path, *launch_args: str) -> subprocess.Popen:
    """`distributed launch --hosts 2 [LAUNCH_ARGS] -- COMMAND`: two local ranks (started directly unless
    --mlx-launch)."""
    cmd = [
        sys.executable,
        "-m",
        "workers.learner.distributed",
        "launch",
        "--hosts",
        "2",
        "--port",
        str(free_port_pair()),
        "--workdir",
        str(tmp / "ring"),
        *launch_args,
        "--",
        *command,
    ]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=_env(),
        start_new_session=True,
    )


def _train_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "workers.learner.trainer", *args]


def _metric_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_launch_stops_on_sigterm_and_resumes(tiny_model, tmp_path, ring, reference):
    replay, single, _ = reference
    run = tmp_path / "run"
    first = _launch(_train_cmd(train_args(tiny_model, replay, tmp_path, "--step-delay", "2")), tmp_path)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not _metric_steps(run) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        done = first.stdout.read() if first.poll() is not None else ""
        assert _metric_steps(run) == [1], f"step 1 never finished:\n{done[-3000:]}"
        first.send_signal(signal.SIGTERM)  # the launcher forwards it to rank 0, which stops rank 1
        out, _ = first.communicate(timeout=RUN_TIMEOUT)
    finally:
        _kill([first])
    assert first.returncode == 0, out[-3000:]
    assert "forwarding signal" in out and "stopped at step 1 of 3" in out, out[-3000:]
    assert out.count("stopped at step 1 of 3") == 2  # rank 0 stopped, and told rank 1
    assert _metric_steps(run) == [1] and (run / "checkpoints").is_dir() and not (tmp_path / "adapter").exists()

    second = _launch(_train_cmd(train_args(tiny_model, replay, tmp_path)), tmp_path)
    try:
        out, _ = second.communicate(timeout=RUN_TIMEOUT)
    finally:
        _kill([second])
    assert second.returncode == 0 and "resumed from" in out, out[-3000:]
    assert _metric_steps(run) == [1, 2, 3]
    _, resumed = read_adapter(tmp_path / "adapter")
    assert max_abs_diff(resumed, single) <= TOLERANCE


# Rank 0 waits for SIGTERM, then releases rank 1 through the ring; both report how they ended.
STOP_SCRIPT = """
import signal, sys, threading
from workers.learner import distributed as dist
group = dist.init()
if dist.is_writer(group):
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dist.announce_rank0(group)
    print("rank 0 up", flush=True)
    if not stop.wait(60):
        sys.exit(3)
    dist.broadcast_json("stop", group)
    print("rank 0 stopped by SIGTERM", flush=True)
else:
    print("rank 1 got", dist.broadcast_json(None, group), flush=True)
"""


def test_mlx_launch_path_forwards_sigterm_to_rank0(tmp_path, ring):
    """With remote hosts the ranks come from mlx.launch; rank 0 announces its pid so the launcher's SIGTERM reaches
    it (and not mlx.launch, which would die and orphan the ranks)."""
    proc = _launch([sys.executable, "-c", STOP_SCRIPT], tmp_path, "--mlx-launch")
    try:
        deadline = time.monotonic() + PROBE_TIMEOUT
        while not (tmp_path / "ring" / "rank0.pid").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "ring" / "rank0.pid").exists(), "rank 0 never announced itself"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=PROBE_TIMEOUT)
    finally:
        _kill([proc])
    assert proc.returncode == 0, out[-3000:]
    assert "with mlx.launch" in out and "forwarding signal 15 to rank 0" in out, out[-3000:]
    assert "rank 0 stopped by SIGTERM" in out and "rank 1 got stop" in out, out[-3000:]


def test_size_one_helpers_are_the_identity():
    """Without a launcher the group has one rank: no collective runs and the trees come back untouched."""
    if dist.launched():
        pytest.skip("this test process is itself a rank of a launched ring")
    group = dist.init()  # no backend touched: None stands for the group of one
    assert group is None and dist.size_of(group) == 1 and dist.is_writer(group)
    tree = {"a": mx.arange(3), "b": [mx.ones((2, 2))]}
    assert dist.all_sum_tree(tree, group) is tree and dist.broadcast_tree(tree, group) is tree
    assert dist.all_sum_scalars([1.5, 2], group) == [1.5, 2.0]
    assert dist.broadcast_json({"x": 1}, group) == {"x": 1}


def test_shard_batch_splits_whole_groups():
    batch = make_batches()[0]
    shards = [dist.shard_batch(batch, r, 2) for r in range(2)]
    assert [len(s.groups) for s in shards] == [3, 2]
    assert [g for s in shards for g in s.groups] == [batch.groups[i] for i in (0, 2, 4, 1, 3)]
    assert dist.shard_batch(make_batches()[2], 1, 2).groups == []


def test_launch_command_writes_an_mlx_hostfile(tmp_path):
    argv = dist.launch_command(
        2, ["python", "-m", "workers.learner.main"], tmp_path / "hosts.json", starting_port=40000, env={"A": "1"}
    )
    assert argv[argv.index("--env") + 1] == "A=1"
    assert argv[:3] == list(dist.MLX_LAUNCH)
    assert argv[argv.index("--") + 1 :] == ["python", "-m", "workers.learner.main"]
    hostfile = json.loads((tmp_path / "hosts.json").read_text())
    assert hostfile["backend"] == "ring"
    assert hostfile["hosts"] == [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}] * 2
    from mlx._distributed_utils.common import Hostfile  # mlx.launch itself must accept it

    assert [h.ips for h in Hostfile.from_file(tmp_path / "hosts.json").hosts] == [["127.0.0.1"]] * 2
    assert dist.ring_hosts(["localhost=10.0.0.1", "mac2.local=10.0.0.2"]) == [
        {"ssh": "127.0.0.1", "ips": ["10.0.0.1"]},
        {"ssh": "mac2.local", "ips": ["10.0.0.2"]},
    ]
    assert dist.parse_hosts("2") == 2 and dist.parse_hosts("a, b") == ["a", "b"]
