"""The node's randomness: never predictable by the server, and never the same twice for two releases.

A server that could redo the node's draws would subtract the noise from x_tc, and two releases of one
image with the same noise solve x0. So every draw that touches data comes from here: fresh OS entropy
(a deployed node), or for a trusting node SHA-256(32-byte node secret, run fingerprint, client,
round, phase, counter), the counter (the run's upload count) giving a replayed round new noise.
"""

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
    """32 random bytes kept in `<folder>/node-secret`, created on first use. A file of another length is
    refused: a known or empty key would make the noise replayable, a silently new one orphan the state."""
    path = Path(folder) / SECRET_FILE
    if not path.exists():
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.{os.urandom(6).hex()}.tmp")  # threads of one process too
        write_private(tmp, os.urandom(SECRET_BYTES))
        try:
            os.link(tmp, path)  # atomic: if two start at once, the first writer wins and both use its key
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    data = path.read_bytes()
    if len(data) != SECRET_BYTES:
        raise NodeSecretError(f"the node secret in the node's state-dir holds {len(data)} bytes, not "
                              f"{SECRET_BYTES}; it is corrupt or was tampered with. Stop the node and delete "
                              f"the file '{SECRET_FILE}' in its state-dir to make a new key (its private state "
                              f"is then started afresh)")
    return data


def keyed_generator(secret: bytes, *parts: Any) -> torch.Generator:
    """A generator seeded by SHA-256(secret, parts): reproducible only for whoever holds the secret."""
    h = hashlib.sha256(secret + repr(parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


def fresh_generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))


def run_fingerprint(run_config: dict[str, Any], ignore: tuple[str, ...] = ()) -> str:
    """A digest of every run-config value (but `ignore`): runs that differ in anything differ here."""
    items = sorted((k, v) for k, v in run_config.items() if k not in ignore)
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]
