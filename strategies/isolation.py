"""One node's crash must not take other nodes down with it on Flower's simulation engine. In
Flower 1.42 every virtual node's ClientApp runs on one of a few Ray actors created with
`max_restarts=0`; a ClientApp that ends its process (os._exit, a segfault, the OOM killer) kills
its actor, and `RayBackend.process_message` puts the dead actor back into the pool, where it
fails every later message - any node's - with ActorDiedError (the run config cannot ask for
restarts). `repair_dead_actors()` replaces a dead actor in the pool; `is_infrastructure_error`
tells the strategies an error reply is the engine's, not the node's (they retry it once).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.supercore import log

#: Ray's exceptions for a worker that is gone (a message it ran, or was given, failed with them)
INFRASTRUCTURE_ERRORS = ("ActorDiedError", "RayActorError", "ActorUnavailableError", "WorkerCrashedError")


def is_infrastructure_error(reason: str) -> bool:
    """Whether an error reply says the simulation worker died (not the node's own answer)."""
    return any(name in str(reason) for name in INFRASTRUCTURE_ERRORS)


_installed = False


def simulation_workers() -> bool:
    """Whether the actor-pool repair is installed: only there can a dead worker explain an error."""
    return _installed


def repair_dead_actors() -> bool:
    """Make Flower's Ray actor pool replace an actor that died instead of reusing it; True when installed."""
    global _installed
    if _installed:
        return True
    try:
        import ray
        from flwr.simulation.ray_transport.ray_actor import BasicActorPool
    except Exception:  # noqa: BLE001 - no Ray: not a simulation, nothing to repair
        return False
    original = BasicActorPool.add_actor_back_to_pool
    if not callable(original) or not hasattr(BasicActorPool, "submit"):
        return False

    def add_actor_back_to_pool(self: Any, future: Any) -> None:
        actor = self._future_to_actor.get(future)
        if actor is None or not _died(ray, future):
            original(self, future)
            return
        self._future_to_actor.pop(future, None)
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.pool.append(self.create_actor_fn())
        log(WARNING, "a simulation worker (Ray actor) died running a node's ClientApp; replaced it with a fresh "
            "one so that other nodes' messages do not fail with it")

    BasicActorPool.add_actor_back_to_pool = add_actor_back_to_pool
    _installed = True
    return True


def _died(ray: Any, future: Any) -> bool:
    """Whether `future` failed because its actor is gone (it has finished: its error is known)."""
    try:
        if ray.wait([future], timeout=0)[0]:
            ray.get(future, timeout=0)
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # noqa: BLE001 - the ClientApp raised: the actor is alive
        pass
    return False
