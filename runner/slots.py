"""Same-host weight delivery through shared memory (no MLX).

Over sockets a version costs two kernel copies per hop and travels two hops (learner → coordinator → worker), which
is several times the cost of copying it once. On one host the learner instead writes each version once into a slot
file of a shared-memory directory (`/dev/shm` on Linux, the temp directory elsewhere, page-cache backed), laid out
in the wire format's segment form, and sends the coordinator a small notice:

    {"type": "weights_slot", "slot": int, "version": int, "nbytes": int}

The coordinator validates the header and passes the notice on to its same-host workers at once; later (when idle, or
within a second) it copies the segment for itself (the latest version for late joiners and for remote workers on the
PUB socket) and verifies its checksum. Each worker copies the tensors into MLX and verifies the checksum of its copy
before installing it.

Slots are reused round-robin (version % SLOTS) and mapped once per process, so a steady run writes and reads
memory that is already mapped. A reader more than SLOTS - 1 versions behind can read a slot while it is being
rewritten: the checksum of its copy then fails, and the worker drops that version and asks the coordinator for the
latest over the control socket. The directory is private to the user (0700) and also holds the Unix socket the
coordinator's children join its control socket on; the coordinator removes it at shutdown, and one left behind by a
killed coordinator is removed by the next one started on the host.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

from runner import wire

log = logging.getLogger(__name__)

SLOTS = 3
NOTICE = "weights_slot"
_PREFIX = "runner-weights-"


def _root() -> Path:
    shm = Path("/dev/shm")  # tmpfs on Linux; macOS has no such mount, and its temp dir is page-cache backed
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def create_dir() -> Path:
    """A fresh slot directory for this coordinator; removes those of coordinators that are gone."""
    root = _root()
    for old in root.glob(f"{_PREFIX}*"):
        try:
            pid = int(old.name[len(_PREFIX) :].split("-")[0])
        except ValueError:
            continue
        if old.is_dir() and old.stat().st_uid == os.getuid() and not _pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed the slot directory %s of a coordinator that is gone", old)
    return Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=root))


def advertise(directory: Path | None) -> dict[str, Any] | None:
    """What the coordinator tells joining processes, so those on this host can use the slots."""
    return {"dir": str(directory), "host": socket.gethostname()} if directory else None


def usable_dir(info: Any) -> Path | None:
    """The slot directory from a coordinator's welcome, if this process is on the same host and may use it."""
    if not isinstance(info, dict) or info.get("host") != socket.gethostname():
        return None
    directory = Path(str(info.get("dir", "")))
    return directory if directory.is_dir() and os.access(directory, os.R_OK | os.W_OK | os.X_OK) else None


class SlotWriter:
    """The learner's end: writes versions into the slots, each mapped once."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._maps: dict[int, mmap.mmap] = {}

    def write(self, version: int, step: int, base_model_id: str, adapter_config: dict, tensors: Any) -> dict[str, Any]:
        """Encode one version into its slot (see `wire.encode_into`); returns the notice for the coordinator."""
        slot = version % SLOTS
        size = wire.encode_into(lambda n: self._mapping(slot, n), version, step, base_model_id, adapter_config, tensors)
        return {"type": NOTICE, "slot": slot, "version": version, "nbytes": size}

    def _mapping(self, slot: int, size: int) -> mmap.mmap:
        mapped = self._maps.get(slot)
        if mapped is None or len(mapped) != size:
            # A new file (renamed into place) rather than a resize: readers keep their old mapping valid.
            tmp = self.directory / f".slot-{slot}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.ftruncate(fd, size)
                mapped = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            os.replace(tmp, self.directory / f"slot-{slot}")
            self._maps[slot] = mapped
        return mapped


class SlotReader:
    """The coordinator's and the workers' end: maps the slots read-only, once per file."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._maps: dict[int, tuple[tuple[int, int], mmap.mmap]] = {}

    def segment(self, notice: dict[str, Any]) -> memoryview:
        """The slot a notice points at (a view of shared memory: copy before trusting it)."""
        slot, nbytes = notice.get("slot"), notice.get("nbytes")
        if type(slot) is not int or not 0 <= slot < SLOTS or type(nbytes) is not int:
            raise wire.WireError(f"slot notice {notice!r} needs an int slot in [0, {SLOTS}) and int nbytes")
        path = self.directory / f"slot-{slot}"
        try:
            st = os.stat(path)
            key = (st.st_ino, st.st_size)
            cached = self._maps.get(slot)
            if cached is None or cached[0] != key:
                with open(path, "rb") as f:
                    cached = (key, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
                self._maps[slot] = cached
        except (OSError, ValueError) as e:
            raise wire.WireError(f"slot {slot} cannot be mapped ({e})") from None
        if key[1] != nbytes:
            raise wire.WireError(f"slot {slot} holds {key[1]} bytes, the notice says {nbytes} (it was rewritten)")
        return memoryview(cached[1])


def check_notice(notice: dict[str, Any], version: int) -> None:
    """The version read from a slot is the one its notice announced (not one written over it since)."""
    if version != notice.get("version"):
        raise wire.WireError(
            f"slot {notice.get('slot')} holds version {version}, the notice announced {notice.get('version')!r}"
        )
