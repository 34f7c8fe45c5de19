"""One lock for every import the apps make while Flower's threads run: the simulation loads the
ServerApp and the ClientApp in two threads at once, and Python's per-module import locks deadlock on
such imports (`_DeadlockError ... _ModuleLock`). Heavy optional libraries are imported with `load`."""

import importlib
import threading
from types import ModuleType

LOCK = threading.RLock()


def load(name: str) -> ModuleType:
    """`importlib.import_module(name)` under the process-wide import lock."""
    with LOCK:
        return importlib.import_module(name)
