"""Data-parallel GRPO learners on MLX's own distributed engine (`mx.distributed`, ring backend over TCP).

Every rank holds the same model and adapter. For each batch:

    shard      rank r trains the whole groups r, r + size, r + 2*size, ... (GRPO advantages are per group, so
               sharding by whole groups keeps them exact)
    normaliser the trained-token (or sequence) count of the WHOLE batch, all-summed, so the shard losses -- and
               their gradients -- add up to the full-batch ones
    gradients  all-summed (a sum, not `nn.average_gradients`' mean: the global normaliser already made each shard's
               gradient its share of the batch mean); clipping then sees the global norm
    update     every rank applies the same Adam update to the same summed gradients: adapters stay identical

The trainer does the above when given a group (`Trainer.load(..., group=group)`) and `trainer.fit` keeps the ranks
in step (rank 0 resumes, publishes, checkpoints and writes metrics; the others follow through the same loop). This
module holds the collectives, the batch sharding, `BroadcastSource` and the launcher:

    mlx.launch -n 2 --backend ring python -m workers.learner.trainer \\
        --model DIR --replay batches.jsonl --steps 3 --out adapter/

and `python -m workers.learner.distributed launch --hosts 2 -- CMD...` runs any learner command as ring ranks (through
mlx.launch when hosts are remote) with a SIGTERM that reaches rank 0 (how `runner launch` starts a multi-learner).
It imports nothing of the trainer: the trainer builds on it.

Every collective runs on the CPU stream: MLX's Metal backend has no GPU kernel for them (they would throw on a
Mac's default GPU stream); MLX moves the arrays across, which for a LoRA-sized gradient is negligible.

Processes find each other the way `mlx.launch` sets them up: MLX_RANK (this rank) and MLX_HOSTFILE (a JSON list,
one entry per rank, of "ip:port" lists). A process started without them is a group of size 1 and trains alone,
bit-for-bit like a plain `Trainer`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_map_with_path

from runner.control import EXIT_ORPHANED  # a follower whose rank 0 is gone exits as an orphaned child does
from workers.learner.sources.base import Batch, Source

log = logging.getLogger(__name__)

Group = Any  # mx.distributed.Group (not subscriptable as a type in annotations on every MLX version)

LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE")  # set by `mlx.launch --backend ring` on every rank
# `mlx.launch` with this interpreter (its module has no __main__ guard, so `python -m` would do nothing).
MLX_LAUNCH = (sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())")


class StopTraining(Exception):
    """Rank 0 told the other ranks that training is over (see `BroadcastSource.stop`)."""


# ----------------------------------------------------------------------------------------------------------
# The group
# ----------------------------------------------------------------------------------------------------------


def launched() -> bool:
    """True when this process was started as one rank of a ring (by `mlx.launch` or `local_rank_env`)."""
    return all(os.environ.get(k) for k in LAUNCH_ENV)


def init(backend: str = "ring") -> Group | None:
    """The global group, or None for a learner that was not launched as a group (it trains alone). Started by a
    launcher, failing to join the ring is an error (strict): falling back to a group of 1 would make every rank
    train, publish and checkpoint on its own. Alone, no distributed backend is touched at all: MLX's default init
    tries every backend it was built with, and on a machine with OpenMPI that starts an `orted` for nothing."""
    if not launched():
        return None
    group = mx.distributed.init(strict=True, backend=backend)
    log.info("rank %d of %d (%s backend)", group.rank(), group.size(), backend)
    return group


def rank_of(group: Group | None) -> int:
    return 0 if group is None else group.rank()


def size_of(group: Group | None) -> int:
    return 1 if group is None else group.size()


def is_writer(group: Group | None) -> bool:
    """Only rank 0 publishes versions and writes checkpoints, metrics and adapters."""
    return rank_of(group) == 0


def shard_batch(batch: Batch, rank: int, size: int) -> Batch:
    """This rank's whole groups: rank, rank + size, ... (may be empty when the batch has fewer groups than ranks)."""
    return Batch(groups=batch.groups[rank::size], info=batch.info)


# ----------------------------------------------------------------------------------------------------------
# Collectives
# ----------------------------------------------------------------------------------------------------------


def all_sum_tree(tree: Any, group: Group | None) -> Any:
    """Sum a tree of arrays over the group, keeping its structure: one all_sum per dtype over the concatenated
    leaves (LoRA gradients are many small arrays; one message each would be latency-bound on a TCP ring)."""
    if size_of(group) == 1:
        return tree
    # Sorted by name: the buffers line up on every rank whatever order each rank's tree was built in.
    flat = sorted(tree_flatten(tree), key=lambda kv: kv[0])
    out: dict[str, mx.array] = {}
    for dtype in dict.fromkeys(v.dtype for _, v in flat):  # first-seen order: the same collectives on every rank
        items = [(k, v) for k, v in flat if v.dtype == dtype]
        summed = mx.distributed.all_sum(mx.concatenate([v.reshape(-1) for _, v in items]), group=group, stream=mx.cpu)
        offsets = np.cumsum([v.size for _, v in items])[:-1].tolist()
        for (k, v), part in zip(items, mx.split(summed, offsets)):
            out[k] = part.reshape(v.shape)
    return tree_map_with_path(lambda path, _: out[path], tree)


def all_sum_scalars(values: Sequence[float], group: Group | None) -> list[float]:
    """Sum a few Python floats over the group (float32: counts are exact up to 2**24)."""
    if size_of(group) == 1:
        return [float(v) for v in values]
    summed = mx.distributed.all_sum(mx.array(np.asarray(values, dtype=np.float32)), group=group, stream=mx.cpu)
    return [float(v) for v in summed.tolist()]


def broadcast_tree(tree: Any, group: Group | None, root: int = 0) -> Any:
    """Every rank gets `root`'s arrays (an all_sum where the others contribute zeros: MLX has no broadcast).
    The other ranks' trees only give the shapes and dtypes."""
    if size_of(group) == 1:
        return tree
    mine = rank_of(group) == root
    return all_sum_tree(tree if mine else tree_map(mx.zeros_like, tree), group)


def broadcast_bytes(data: bytes | None, group: Group | None, root: int = 0) -> bytes:
    """`root`'s bytes on every rank (the others pass None). Two collectives: the length, then the payload."""
    if size_of(group) == 1:
        return data or b""
    mine = rank_of(group) == root
    n = mx.distributed.all_sum(mx.array([len(data) if mine else 0], dtype=mx.int64), group=group, stream=mx.cpu)
    n = int(n.item())
    payload = np.frombuffer(data, dtype=np.uint8) if mine else np.zeros(n, dtype=np.uint8)
    out = mx.distributed.all_sum(mx.array(payload), group=group, stream=mx.cpu)
    return np.asarray(out).tobytes()


def broadcast_json(obj: Any, group: Group | None, root: int = 0) -> Any:
    """`root`'s JSON-able object on every rank (the others pass anything, e.g. None)."""
    if size_of(group) == 1:
        return obj
    mine = rank_of(group) == root
    return json.loads(broadcast_bytes(json.dumps(obj).encode() if mine else None, group, root).decode())


# ----------------------------------------------------------------------------------------------------------
# Keeping ranks in step
# ----------------------------------------------------------------------------------------------------------


class BroadcastSource:
    """Rank 0 draws batches from the real source (rollouts, Atropos) and every rank receives the same batch.

    Other ranks pass `source=None`: they never talk to generation workers or Atropos. Rank 0 ends training for
    everyone with `stop()`; the others' `next_batch` then raises StopTraining."""

    def __init__(self, source: Source | None, group: Group | None):
        if is_writer(group) and source is None:
            raise ValueError("rank 0 needs the real source")
        self.source, self.group = source, group
        self._stopped = False

    def next_batch(self, step: int) -> Batch:
        data = None
        if is_writer(self.group):
            try:
                data = self.source.next_batch(step).to_json().encode()
            except BaseException:  # the others are waiting for this batch: release them, then fail here
                self.stop()
                raise
        data = broadcast_bytes(data, self.group)
        if not data:  # rank 0's stop(): an empty message
            raise StopTraining()
        return Batch.from_json(data.decode())

    def stop(self) -> None:
        """Rank 0, between steps: tell the other ranks (waiting in next_batch) to finish. Once; a lost peer is
        only logged (there is nobody left to tell)."""
        if not is_writer(self.group) or size_of(self.group) == 1 or self._stopped:
            return
        self._stopped = True
        try:
            broadcast_bytes(b"", self.group)
        except RuntimeError as e:
            log.warning("could not tell the other ranks to stop: %s", e)

    def state(self) -> dict:
        return self.source.state() if self.source is not None else {}

    def load_state(self, d: dict) -> None:
        if self.source is not None:
            self.source.load_state(d)

    def close(self) -> None:
        if self.source is not None:
            self.source.close()


# ----------------------------------------------------------------------------------------------------------
# Launching: mlx.launch (ssh) for remote hosts, its local-rank environment for rings on this machine
# ----------------------------------------------------------------------------------------------------------


def ring_hosts(hosts: Sequence[str] | int) -> list[dict]:
    """mlx.launch hostfile entries for `[learner] hosts`.

    An int N: N ranks on this machine (127.0.0.1: no ssh). Otherwise one rank per entry, rank 0 first (it must be
    this machine: it talks to the coordinator). An entry is an ssh target, optionally `name=ip` to run the ring over
    another interface than the name resolves to (e.g. a Thunderbolt bridge). "localhost" (or 127.0.0.1) is started
    here without ssh: `localhost=10.0.0.1` is rank 0 on this Mac with the ring on its 10.0.0.1 interface."""
    if isinstance(hosts, int):
        return [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]} for _ in range(hosts)]
    entries = []
    for h in hosts:
        name, _, ip = h.partition("=")
        name = "127.0.0.1" if name in ("localhost", "local") else name  # mlx.launch starts 127.0.0.1 without ssh
        entries.append({"ssh": name, "ips": [ip or socket.gethostbyname(name)]})  # the ring needs IPs
    return entries


def parse_hosts(text: str) -> Sequence[str] | int:
    """`--hosts` as given on the command line: a count ("2") or a comma-separated list."""
    return int(text) if text.isdigit() else [h.strip() for h in text.split(",") if h.strip()]


def launch_command(
    hosts: Sequence[str] | int,
    command: Sequence[str],
    hostfile: str | Path,
    starting_port: int = 32323,
    env: dict[str, str] | None = None,
) -> list[str]:
    """The argv that starts `command` on every host with `mlx.launch --backend ring` (and writes `hostfile`).
    Rank i listens on starting_port + i; remote hosts need the same paths (interpreter, project, model)."""
    hostfile = Path(hostfile)
    hostfile.write_text(json.dumps({"backend": "ring", "hosts": ring_hosts(hosts)}, indent=2))
    argv = [*MLX_LAUNCH, "--backend", "ring", "--hostfile", str(hostfile), "--starting-port", str(starting_port)]
    for k, v in (env or {}).items():
        argv += ["--env", f"{k}={v}"]
    return argv + ["--", *command]


def local_rank_env(rank: int, hostfile: str | Path) -> dict[str, str]:
    """What mlx.launch exports for one local rank: MLX_RANK and MLX_HOSTFILE (a JSON list of 'ip:port' lists)."""
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)}


RANK0_PIDFILE_ENV = "RUNNER_RANK0_PIDFILE"


def announce_rank0(group: Group | None) -> None:
    """Rank 0 writes its pid where `launch` looks for it, so a SIGTERM to the launcher reaches rank 0 (which
    checkpoints and stops the others) instead of killing mlx.launch under the ranks' feet."""
    path = os.environ.get(RANK0_PIDFILE_ENV)
    if path and is_writer(group):
        Path(path).write_text(str(os.getpid()))


# ----------------------------------------------------------------------------------------------------------
# Liveness of the ranks: followers end with rank 0
# ----------------------------------------------------------------------------------------------------------

BEAT_INTERVAL = 1.0  # seconds between rank 0's beats to each follower


def rank0_beats(group: Group | None) -> str:
    """Rank 0: listen on its ring address and send a byte every BEAT_INTERVAL to each follower that connects
    (`watch_rank0`); returns the address ("host:port") to give them. A follower blocked in a collective has no other
    way to learn that rank 0 died (kill -9 included: the kernel closes the connection) or went silent."""
    server = socket.create_server((_rank0_host(), 0))
    followers: list[socket.socket] = []

    def serve() -> None:
        server.settimeout(BEAT_INTERVAL)
        while True:
            try:
                conn, _ = server.accept()
                conn.settimeout(BEAT_INTERVAL)
                followers.append(conn)
            except TimeoutError:
                pass
            for conn in list(followers):
                try:
                    conn.sendall(b".")
                except OSError:  # that follower is gone
                    followers.remove(conn)
                    conn.close()

    threading.Thread(target=serve, name="rank0-beats", daemon=True).start()
    host, port = server.getsockname()[:2]
    return f"{host}:{port}"


def watch_rank0(address: str, silence_limit: float, finished: threading.Event) -> None:
    """A follower: exit with EXIT_ORPHANED when rank 0's beats stop for `silence_limit` seconds or its connection
    closes, unless this rank finishes on its own within a few seconds of that (rank 0 closes the connection when it
    ends normally, right after telling the followers to stop)."""
    host, _, port = address.rpartition(":")

    def watch() -> None:
        why = ""
        try:
            with socket.create_connection((host, int(port)), timeout=silence_limit) as conn:
                while conn.recv(64):
                    pass
                why = "rank 0 closed its connection"
        except OSError as e:  # a timeout (silence) or a reset
            why = f"rank 0 is silent or gone ({e or type(e).__name__})"
        if finished.wait(min(5.0, silence_limit)):
            return
        log.error("%s; exiting, as this rank follows it", why)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_ORPHANED)

    threading.Thread(target=watch, name="rank0-watch", daemon=True).start()


def _rank0_host() -> str:
    """Rank 0's ring address (MLX_HOSTFILE: a JSON list, one list of "ip:port" per rank), where followers reach it."""
    try:
        return json.loads(Path(os.environ["MLX_HOSTFILE"]).read_text())[0][0].rpartition(":")[0]
    except (KeyError, OSError, ValueError, IndexError, TypeError, AttributeError):
        return "127.0.0.1"


def launch(
    hosts: Sequence[str] | int,
    command: Sequence[str],
    starting_port: int = 32323,
    workdir: str | Path | None = None,
    use_mlx_launch: bool | None = None,
    poll: float = 0.2,
) -> int:
    """Run `command` as a ring of ranks and wait; returns the first non-zero exit code of a rank, or 0 (through
    mlx.launch: its exit code, which 0.32 leaves at 0 even when a rank failed).

    Remote hosts are started by mlx.launch (ssh). A ring that is all on this machine is started here with the same
    environment mlx.launch gives local ranks (MLX_RANK, MLX_HOSTFILE): mlx.launch 0.32's output threads busy-poll
    (select on an always-writable stdin pipe), burning about a core the ranks need. `use_mlx_launch` forces either.

    SIGTERM/SIGINT go to rank 0 alone once it is up (mlx.launch itself would just die and orphan the ranks); rank 0
    checkpoints and tells the other ranks to stop. A rank that fails takes the others down."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="runner-ring-"))
    workdir.mkdir(parents=True, exist_ok=True)
    entries = ring_hosts(hosts)
    local = all(e["ssh"] == "127.0.0.1" for e in entries)
    requested: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: requested.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _: requested.append(signum))
    if use_mlx_launch if use_mlx_launch is not None else not local:
        pidfile = workdir / "rank0.pid"
        pidfile.unlink(missing_ok=True)
        argv = launch_command(
            hosts, command, workdir / "hostfile.json", starting_port, env={RANK0_PIDFILE_ENV: str(pidfile)}
        )
        log.info("starting %d learner rank(s) with mlx.launch: %s", len(entries), " ".join(argv))
        procs = [subprocess.Popen(argv, stdin=subprocess.DEVNULL)]
        rank0 = lambda: _read_pid(pidfile)  # noqa: E731 -- rank 0 is mlx.launch's child: it tells us its pid
    else:
        procs = _start_local(entries, command, starting_port, workdir)
        rank0 = lambda: procs[0].pid  # noqa: E731
    return _supervise(procs, rank0, requested, poll)


def _start_local(
    entries: list[dict], command: Sequence[str], starting_port: int, workdir: Path
) -> list[subprocess.Popen]:
    """What mlx.launch does for ranks on this machine: a ring hostfile of ip:port lists and MLX_RANK per rank."""
    hostfile = workdir / "ring.json"
    hostfile.write_text(json.dumps([[f"{e['ips'][0]}:{starting_port + i}"] for i, e in enumerate(entries)]))
    log.info("starting %d local learner rank(s) (ring %s): %s", len(entries), hostfile, " ".join(command))
    return [
        subprocess.Popen(list(command), stdin=subprocess.DEVNULL, env=os.environ | local_rank_env(r, hostfile))
        for r in range(len(entries))
    ]


def _supervise(procs: list[subprocess.Popen], rank0, requested: list[int], poll: float) -> int:
    """Wait for every process; forward a requested stop to rank 0 once; a failed rank stops the rest."""
    forwarded = False
    while any(p.poll() is None for p in procs):
        if requested and not forwarded:
            pid = rank0()
            if pid is not None:  # before rank 0 is up there is nothing to checkpoint: wait for it
                log.info("forwarding signal %d to rank 0 (pid %d)", requested[0], pid)
                os.kill(pid, signal.SIGTERM)
                forwarded = True
        if any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                if p.poll() is None:
                    log.warning("a learner rank failed; stopping pid %d", p.pid)
                    p.terminate()
        time.sleep(poll)
    return next((p.returncode for p in procs if p.returncode != 0), 0)


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m workers.learner.distributed",
        description="Data-parallel GRPO learners on mx.distributed (ring backend).",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    lp = sub.add_parser(
        "launch",
        help="run a command as ring ranks (mlx.launch for remote hosts), SIGTERM to rank 0",
        description=launch.__doc__,
    )
    lp.add_argument(
        "--hosts",
        required=True,
        help="a count of local ranks (2) or host[=ip],host[=ip],... (rank 0 first: this machine)",
    )
    lp.add_argument("--port", type=int, default=32323, help="rank i listens on PORT + i")
    lp.add_argument("--workdir", help="where the hostfile and rank 0's pid file go (default: a temp dir)")
    lp.add_argument("--mlx-launch", action="store_true", help="start even local ranks with mlx.launch")
    lp.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("launch needs a command after --")
    return launch(parse_hosts(args.hosts), command, args.port, args.workdir, use_mlx_launch=args.mlx_launch or None)


if __name__ == "__main__":
    raise SystemExit(main())
