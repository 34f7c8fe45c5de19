"""One node's crash must not take other nodes down with it on Flower's simulation engine.

What happens in Flower 1.42 (flwr/server/superlink/fleet/vce/backend/raybackend.py and
flwr/simulation/ray_transport/ray_actor.py): every virtual node's ClientApp runs on one of a
small pool of Ray actors (one per `client-resources-num-cpus` share of the machine), created
with Ray's default `max_restarts=0`. A ClientApp that ends its process (os._exit, a segfault in
native code, the OOM killer) kills its actor; `ray.get` raises ActorDiedError, the Simulation
Runtime answers that node's message with an Error, and `RayBackend.process_message` puts the
dead actor back into the pool (`BasicActorPool.add_actor_back_to_pool`). From then on every
message the pool hands to that actor - any node's - fails at once with ActorDiedError, and
because the pool is a stack the dead actor, returned quickest, takes the most messages: honest
nodes fail and the run fails with them. The run's federation config cannot ask for restarts:
`flwr run` builds the backend config from `client-resources-num-cpus/-gpus` and Ray's init
arguments only (flwr/simulation/app.py), never the actor options.

What this module does from our side:
- `repair_dead_actors()`: in the simulation process (where the ServerApp runs beside the
  Simulation Runtime), a dead actor returned to the pool is replaced by a fresh one, so only the
  message that was on it fails. Installed once by the ServerApp when it runs in a simulation; a
  no-op elsewhere or on a Flower whose pool has another shape (then the retry below still helps).
- `is_infrastructure_error(reason)`: what the strategies treat as the engine failing rather than
  the node answering (they send such a node's message once more: base.retry_lost_workers).
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
    """Whether this ServerApp runs beside Flower's Ray simulation workers (the actor-pool repair is
    installed): the only place a dead worker, not the node, can be the reason of an error reply."""
    return _installed


def repair_dead_actors() -> bool:
    """Make Flower's Ray actor pool replace an actor that died instead of reusing it; True when
    installed (now or before). Idempotent; needs Flower's simulation extra (Ray)."""
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
        ready, _ = ray.wait([future], timeout=0)
        if not ready:
            return False
        ray.get(future, timeout=0)
        return False
    except ray.exceptions.RayActorError:
        return True
    except Exception:  # noqa: BLE001 - the ClientApp raised: the actor is alive
        return False
