"""The node's private files: a 0700 folder, 0600 files written atomically, locks. The state folder
holds the node's secret key, private denoiser and upload ledger: no other local user may read them,
and a crash mid-write must not leave half a file."""

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class CorruptFile(RuntimeError):
    """A node file exists but cannot be read back; the message names the file and the fix."""


def private_dir(path: str | os.PathLike[str]) -> Path:
    """`path` created if needed and closed to everyone but its owner (0700)."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=0o700)
    if p.stat().st_mode & 0o077:
        p.chmod(0o700)
    return p


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file + rename), readable by the owner only."""
    private_dir(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path`.lock: nodes (virtual ones, or two SuperNodes) may share a state folder."""
    private_dir(path.parent)
    fd = os.open(path.with_name(f".{path.name}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
