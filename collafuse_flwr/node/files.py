"""The node's private files: a folder only its owner can read, atomic writes, safe loads.

A node's state folder holds its secret key, its private denoiser and its upload ledger: with umask
defaults any local user could read them, a crash mid-write leaves half a file, and a swapped pickle
runs code. So the folder is 0700, files 0600, writes go through a renamed temporary file, and
`torch.load` runs with `weights_only=True`.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


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


def save_tensors(path: Path, obj: Any) -> None:
    """`torch.save` of plain containers of tensors and numbers, written with `write_private`."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_private(path, buf.getvalue())


def load_tensors(path: Path, what: str, fix: str) -> Any:
    """`torch.load(path, weights_only=True)` (a crafted pickle raises instead of running code);
    CorruptFile naming the file and `fix` if unreadable."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - truncated, crafted or foreign: all mean "unreadable"
        raise CorruptFile(f"{what} {path} cannot be read ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:160] if str(exc) else 'no detail'}); {fix}") from None


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
