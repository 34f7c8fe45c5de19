"""One lock for every import the apps make while Flower's threads run.

Why: the simulation engine loads the ServerApp in one thread and the ClientApp in another, at the
same time, and both import this package and its dependencies. Python's per-module import locks
deadlock on such concurrent imports (seen here: `_DeadlockError ... _ModuleLock(
'collafuse_flwr.metrics.features')`, and diffusers' lazy module half-initialised in the other
thread), and nothing in Flower serialises them. So both app modules do all their imports under
`LOCK`, and the few heavy optional libraries this package imports only when a feature needs
them (flwr-datasets, torchvision's datasets, ...) are imported with `load`, under the same lock.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

LOCK = threading.RLock()


def load(name: str) -> ModuleType:
    """`importlib.import_module(name)` under the process-wide import lock."""
    with LOCK:
        return importlib.import_module(name)
