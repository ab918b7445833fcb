"""The shared-memory weight transport (runner.control.SlotTransport): the learner writes, the coordinator and
workers read."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from runner import control
from runner.control import SLOTS, SlotTransport
from runner.wire import WireError

BASE = "base-x"


def tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "a": rng.standard_normal((64, 8)).astype(np.float32),
        "b": rng.standard_normal((8, 32)).astype(np.float16),
    }
    return [(name, arr.dtype.name, arr.shape, arr) for name, arr in arrays.items()]


@pytest.fixture
def slot_dir():
    directory = control.create_slot_dir()
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_versions_round_robin_through_the_slots(slot_dir):
    writer, reader = SlotTransport(slot_dir), SlotTransport(slot_dir)
    for version in range(1, 2 * SLOTS + 2):
        notice = writer.write(version, version, BASE, {"rank": 8}, tensors(version))
        assert notice == {
            "type": "weights_slot",
            "slot": version % SLOTS,
            "version": version,
            "nbytes": notice["nbytes"],
        }
        for copy in (False, True):
            msg = reader.read(notice, copy=copy)
            for name, _, _, arr in tensors(version):
                np.testing.assert_array_equal(msg.tensors[name], arr)
    assert sorted(p.name for p in slot_dir.iterdir()) == [f"slot-{i}" for i in range(SLOTS)]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in slot_dir.iterdir())
    assert slot_dir.stat().st_mode & 0o777 == 0o700


def test_a_reader_sees_a_rewritten_slot_and_a_resized_one(slot_dir):
    writer, reader = SlotTransport(slot_dir), SlotTransport(slot_dir)
    first = writer.write(1, 1, BASE, {}, tensors(1))
    old = reader.read(first)
    # The same slot, SLOTS versions later: a reader still holding the old notice finds another version.
    again = writer.write(1 + SLOTS, 0, BASE, {}, tensors(2))
    with pytest.raises(WireError, match="notice announced 1"):
        reader.read(first)
    # A bigger adapter gets a new file; the old mapping stays valid for whoever still holds views of it.
    big = {"a": np.ones((256, 8), np.float32)}
    resized = writer.write(1 + 2 * SLOTS, 0, BASE, {}, [("a", "float32", (256, 8), big["a"])])
    assert resized["nbytes"] > again["nbytes"]
    with pytest.raises(WireError, match="rewritten"):
        reader.segment(again)
    np.testing.assert_array_equal(reader.read(resized).tensors["a"], big["a"])
    assert old.tensors["a"].shape == (64, 8)  # still readable, no crash


@pytest.mark.parametrize(
    "notice, match",
    [
        ({"slot": SLOTS, "nbytes": 10}, "int slot"),
        ({"slot": -1, "nbytes": 10}, "int slot"),
        ({"slot": True, "nbytes": 10}, "int slot"),
        ({"slot": "0", "nbytes": 10}, "int slot"),
        ({"slot": 0, "nbytes": 1.5}, "int nbytes"),
        ({"slot": 0}, "int nbytes"),
        ({"slot": 2, "nbytes": 10}, "cannot be mapped"),  # never written
    ],
)
def test_bad_notices(slot_dir, notice, match):
    SlotTransport(slot_dir).write(3, 0, BASE, {}, tensors(0))  # slot 0 exists
    with pytest.raises(WireError, match=match):
        SlotTransport(slot_dir).read({"type": "weights_slot", "version": 3, **notice})


def test_a_corrupt_slot_fails_the_check_of_a_private_copy(slot_dir):
    writer = SlotTransport(slot_dir)
    notice = writer.write(1, 1, BASE, {}, tensors(1))
    with open(slot_dir / f"slot-{notice['slot']}", "r+b") as f:
        f.seek(notice["nbytes"] - 1)
        last = f.read(1)
        f.seek(notice["nbytes"] - 1)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(WireError, match="checksum mismatch"):
        SlotTransport(slot_dir).read(notice, copy=True)
    assert SlotTransport(slot_dir).read(notice, verify=False).version == 1  # a reader that verifies its own copy


def test_empty_slot_file_is_a_wire_error(slot_dir):
    (slot_dir / "slot-1").write_bytes(b"")
    with pytest.raises(WireError, match="cannot be mapped"):
        SlotTransport(slot_dir).segment({"slot": 1, "nbytes": 0})


def test_create_dir_removes_only_dirs_of_dead_coordinators():
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    root = control.create_slot_dir().parent
    stale = root / f"runner-weights-{int(dead.stdout)}-test"
    alive = root / f"runner-weights-{os.getpid()}-test"
    stale.mkdir()
    alive.mkdir()
    mine = control.create_slot_dir()
    try:
        assert not stale.exists() and alive.exists() and mine.is_dir()
    finally:
        for d in (stale, alive, mine, *root.glob(f"runner-weights-{os.getpid()}-*")):
            shutil.rmtree(d, ignore_errors=True)


def test_usable_dir_only_on_the_same_host(slot_dir):
    info = control.advertise_slot_dir(slot_dir)
    assert control.usable_slot_dir(info) == slot_dir
    assert isinstance(control.weight_transport(info), SlotTransport)
    assert control.usable_slot_dir({**info, "host": socket.gethostname() + "-elsewhere"}) is None
    assert isinstance(control.weight_transport({**info, "host": "elsewhere"}), control.FrameTransport)
    assert control.usable_slot_dir({**info, "dir": str(slot_dir / "missing")}) is None
    assert control.usable_slot_dir(None) is None and control.usable_slot_dir("junk") is None
    assert control.advertise_slot_dir(None) is None
