"""One lock for every import the apps make while Flower's threads run.

The simulation loads the ServerApp and the ClientApp in two threads at once, and Python's per-module
import locks deadlock on such concurrent imports (seen: `_DeadlockError ... _ModuleLock(
'collafuse_flwr.metrics.features')`). So both app modules import under `LOCK`, and heavy optional
libraries are imported with `load`, under the same lock.
"""

import importlib
import threading
from types import ModuleType

LOCK = threading.RLock()


def load(name: str) -> ModuleType:
    """`importlib.import_module(name)` under the process-wide import lock."""
    with LOCK:
        return importlib.import_module(name)
