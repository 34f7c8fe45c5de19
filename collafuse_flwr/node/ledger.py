"""How often each of a node's images has left it: a cap that outlives runs, restarts and servers.

Averaging many noisy uploads of one image cleans it (300 at c = 0.8: PSNR 4.5 -> 22.3 dB), so the
count is a file in the state folder, keyed by a hash of each image's pixels, updated under a lock
*before* the upload leaves, never reset by a server message; a corrupt ledger stops uploads, and it
pins the image geometry of its first upload (the keys hash the images as the run loads them).
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from collafuse_flwr.core.dp import UploadLedger
from collafuse_flwr.node.files import CorruptFile, locked, write_private
from collafuse_flwr.node.steps import Refused

LEDGER_FILE = "upload-ledger.json"
_VERSION = 1


class GeometryChanged(Refused):
    """A run asks for the node's images at another size or channel count than its ledger counts."""


def image_keys(images_uint8: Tensor) -> list[str]:
    """One key per image: 16 bytes (hex) of SHA-256 over its uint8 pixels and shape."""
    arr = np.ascontiguousarray(images_uint8.numpy())
    return [hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:32] for a in arr]


def _read(path: Path, geometry: tuple[int, ...]) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        blob = json.loads(path.read_text())
        if blob.get("version") != _VERSION or not isinstance(blob.get("counts"), dict):
            raise ValueError("unknown layout")
        counts = {str(k): int(v) for k, v in blob["counts"].items()}
        if any(v < 0 for v in counts.values()):
            raise ValueError("negative count")
        seen = tuple(int(v) for v in blob.get("geometry") or ())
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise CorruptFile(f"the node's upload ledger {path} cannot be read ({exc}); uploads are stopped "
                          f"until it is restored from a backup. Deleting it resets every image's lifetime "
                          f"upload count to 0, which only the node's operator may decide") from None
    if counts and seen != tuple(geometry):
        raise GeometryChanged(f"this node's upload ledger counts its images at {'x'.join(map(str, seen))} "
                              f"(channels x height x width); a run at {'x'.join(map(str, geometry))} would meet "
                              f"fresh counts for the same images, so it uploads nothing: run at image-size "
                              f"{seen[-1]} with {seen[0]} channel(s), or its operator starts a new ledger")
    return counts


def lifetime_counts(folder: Path, keys: list[str], geometry: tuple[int, ...]) -> np.ndarray:
    counts = _read(Path(folder) / LEDGER_FILE, geometry)
    return np.array([counts.get(k, 0) for k in keys], dtype=np.int64)


def reserve(folder: Path, keys: list[str], cap: int, n: int, generator: torch.Generator,
            geometry: tuple[int, ...]) -> np.ndarray:
    """Up to n images uploaded fewer than `cap` times in the node's life, chosen uniformly among them
    and recorded as uploaded before their indices are returned."""
    path = Path(folder) / LEDGER_FILE
    with locked(path):
        counts = _read(path, geometry)
        ledger = UploadLedger(len(keys), cap, np.array([counts.get(k, 0) for k in keys], dtype=np.int64))
        kept = []
        for i in ledger.choose(n, generator):  # identical images share one key, hence one cap
            if counts.get(keys[i], 0) < cap:
                counts[keys[i]] = counts.get(keys[i], 0) + 1
                kept.append(int(i))
        idx = np.array(kept, dtype=np.int64)
        if idx.size:
            write_private(path, json.dumps({"version": _VERSION, "geometry": list(geometry),
                                            "counts": counts}).encode())
    return idx
