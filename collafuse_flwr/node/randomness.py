"""The node's randomness: never predictable by the server, and never the same twice for two releases.

Every draw that touches data (minibatches, training noise, which images are uploaded and their
noise) comes from a generator made here. Two threats shaped it:

- Replay. Seeds derived from the run-config and the round alone let a server redo the node's
  draws and subtract the noise from x_tc, recovering x0 exactly. So every generator is keyed by
  the node's 32-byte secret, which never leaves its state folder.
- Reuse. A server that runs twice with another cut-ratio, T or schedule, or replays a round,
  gets two releases of the same image; if they share their noise, x0 is solved exactly from the
  pair. So noise must never repeat across runs or restarts.

Hence two modes, chosen by the node's policy (`policy.NodePolicy.reproducible`):
- fresh (a deployed node's default): each generator is seeded from OS entropy. Nothing repeats,
  ever; the same run twice gives different uploads.
- keyed (the simulation's default, the researcher being both server and data owner): seeded by
  SHA-256(secret, run fingerprint, client, round, phase, counter). The fingerprint hashes every
  run-config value, so two runs that differ in anything (c, T, schedule, K, ...) draw unrelated
  noise; the counter (the node's upload count in this run, which only grows) makes a replayed
  round draw new noise; the same run repeated draws the same, which is what makes a seed
  reproducible.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from collafuse_flwr.node.files import write_private

SECRET_FILE = "node-secret"
SECRET_BYTES = 32


class NodeSecretError(RuntimeError):
    """The node's secret exists but is unusable; the node refuses to start rather than guess."""


def node_secret(folder: str | os.PathLike[str]) -> bytes:
    """32 random bytes kept in `<folder>/node-secret` (created from OS entropy on first use).

    An existing file of any other length (empty, truncated, tampered with) is refused: keying the
    node's noise by a known or empty key would make it replayable, and silently replacing the
    key would orphan the node's state. The operator removes the file to start over.
    """
    path = Path(folder) / SECRET_FILE
    if not path.exists():
        try:
            _create(path)
        except FileExistsError:  # another process won the race: use its key
            pass
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise NodeSecretError(f"the node secret in the node's state-dir holds {len(data)} bytes, not "
                              f"{SECRET_BYTES}; it is corrupt or was tampered with. Stop the node and delete "
                              f"the file '{SECRET_FILE}' in its state-dir to make a new key (its private state "
                              f"is then started afresh)")
    return data


def _create(path: Path) -> None:
    tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{os.urandom(6).hex()}.tmp")  # threads of one process too
    write_private(tmp, os.urandom(SECRET_BYTES))
    try:
        os.link(tmp, path)  # atomic, and the first writer wins if two start at once
    finally:
        tmp.unlink(missing_ok=True)


def keyed_generator(secret: bytes, *parts: Any) -> torch.Generator:
    """A generator seeded by SHA-256(secret, parts): reproducible for whoever holds the secret,
    unpredictable for anyone else."""
    h = hashlib.sha256(secret + repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def fresh_generator() -> torch.Generator:
    """A generator seeded from OS entropy: never the same stream twice."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def run_fingerprint(run_config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A digest of every run-config value (but `ignore`): runs that differ in anything differ here."""
    items = sorted((k, v) for k, v in run_config.items() if k not in ignore)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]
