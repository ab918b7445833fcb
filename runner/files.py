"""Atomic file writes: readers see the old content or the new, never a partial file or half-replaced directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: bytes | str, mode: int = 0o644, durable: bool = True) -> None:
    """Write `data` to a temp file beside `path`, fsync it, rename it over `path`, then fsync the directory (so the
    rename itself survives an OS crash). With ``durable=False`` there is no fsync (a disk round trip): still atomic
    for readers and across a crash of any process, but a crash of the OS may leave the previous content (or an empty
    file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_path(src: str | Path, dst: str | Path) -> None:
    """Move a finished temp file or directory onto `dst`. An existing directory is moved aside first and deleted
    after, so `dst` is never seen half-replaced (only, for an instant, absent)."""
    src, dst = Path(src), Path(dst)
    if dst.is_dir() and not dst.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "old")
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
