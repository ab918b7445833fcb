"""Shared-memory weight slots (runner.slots): the learner writes, the coordinator and workers read."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from runner import slots, wire
from runner.wire import WireError

BASE = "base-x"


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((64, 8)).astype(np.float32), "b": rng.standard_normal((8, 32)).astype(np.float16)}


@pytest.fixture
def slot_dir():
    directory = slots.create_dir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_versions_round_robin_through_the_slots(slot_dir):
    writer, reader = slots.SlotWriter(slot_dir), slots.SlotReader(slot_dir)
    for version in range(1, 2 * slots.SLOTS + 2):
        notice = writer.write(version, version, BASE, {"rank": 8}, tensors(version))
        assert notice == {
            "type": slots.NOTICE,
            "slot": version % slots.SLOTS,
            "version": version,
            "nbytes": notice["nbytes"],
        }
        msg = wire.decode_segment(reader.segment(notice))
        slots.check_notice(notice, msg.version)
        for name, arr in tensors(version).items():
            np.testing.assert_array_equal(msg.tensors[name], arr)
    assert sorted(p.name for p in slot_dir.iterdir()) == [f"slot-{i}" for i in range(slots.SLOTS)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in slot_dir.iterdir())
    assert slot_dir.stat().st_mode & 0o777 == 0o700


def test_a_reader_sees_a_rewritten_slot_and_a_resized_one(slot_dir):
    writer, reader = slots.SlotWriter(slot_dir), slots.SlotReader(slot_dir)
    first = writer.write(1, 1, BASE, {}, tensors(1))
    old = wire.decode_segment(reader.segment(first))
    # The same slot, SLOTS versions later: a reader still holding the old notice finds another version.
    again = writer.write(1 + slots.SLOTS, 0, BASE, {}, tensors(2))
    with pytest.raises(WireError, match="notice announced 1"):
        slots.check_notice(first, wire.decode_segment(reader.segment(first)).version)
    # A bigger adapter gets a new file; the old mapping stays valid for whoever still holds views of it.
    big = {"a": np.ones((256, 8), np.float32)}
    resized = writer.write(1 + 2 * slots.SLOTS, 0, BASE, {}, big)
    assert resized["nbytes"] > again["nbytes"]
    with pytest.raises(WireError, match="rewritten"):
        reader.segment(again)
    np.testing.assert_array_equal(wire.decode_segment(reader.segment(resized)).tensors["a"], big["a"])
    assert old.tensors["a"].shape == (64, 8)  # still readable, no crash


@pytest.mark.parametrize(
    "notice, match",
    [
        ({"slot": slots.SLOTS, "nbytes": 10}, "int slot"),
        ({"slot": -1, "nbytes": 10}, "int slot"),
        ({"slot": True, "nbytes": 10}, "int slot"),
        ({"slot": "0", "nbytes": 10}, "int slot"),
        ({"slot": 0, "nbytes": 1.5}, "int nbytes"),
        ({"slot": 0}, "int nbytes"),
        ({"slot": 2, "nbytes": 10}, "cannot be mapped"),  # never written
    ],
)
def test_bad_notices(slot_dir, notice, match):
    slots.SlotWriter(slot_dir).write(3, 0, BASE, {}, tensors(0))  # slot 0 exists
    with pytest.raises(WireError, match=match):
        slots.SlotReader(slot_dir).segment({"type": slots.NOTICE, "version": 3, **notice})


def test_empty_slot_file_is_a_wire_error(slot_dir):
    (slot_dir / "slot-1").write_bytes(b"")
    with pytest.raises(WireError, match="cannot be mapped"):
        slots.SlotReader(slot_dir).segment({"slot": 1, "nbytes": 0})


def test_create_dir_removes_only_dirs_of_dead_coordinators():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = slots.create_dir().parent
    stale = root / f"runner-weights-{int(dead.stdout)}-test"
    alive = root / f"runner-weights-{os.getpid()}-test"
    stale.mkdir()
    alive.mkdir()
    mine = slots.create_dir()
    try:
        assert not stale.exists() and alive.exists() and mine.is_dir()
    finally:
        for d in (stale, alive, mine, *root.glob(f"runner-weights-{os.getpid()}-*")):
            shutil.rmtree(d, ignore_errors=True)


def test_usable_dir_only_on_the_same_host(slot_dir):
    info = slots.advertise(slot_dir)
    assert slots.usable_dir(info) == slot_dir
    assert slots.usable_dir({**info, "host": socket.gethostname() + "-elsewhere"}) is None
    assert slots.usable_dir({**info, "dir": str(slot_dir / "missing")}) is None
    assert slots.usable_dir(None) is None and slots.usable_dir("junk") is None
    assert slots.advertise(None) is None
