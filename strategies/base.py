"""What every method's strategy shares: first contact and identity, which nodes take part in a
round, validating replies before they touch state, dropouts and metric averaging. Conventions are
those of `flwr.serverapp.strategy.FedAvg` (plain constructor arguments, `configure_*` forwards its
`config` to the nodes, `start()` returns Flower's `Result`); message names come from `protocol`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from collafuse_flwr import protocol as P

from . import isolation
from .isolation import is_infrastructure_error
from .recorder import EvalResult, Recorder
from .registry import NodeRegistry
from .robust import CLAIM_FACTOR, MIN_OTHERS, cap_claims

# Totals across nodes rather than example-weighted means.
SUM_KEYS = (P.NUM_EXAMPLES, P.NUM_UPLOADED, P.CLIENT_TRAIN_FLOPS)


def _last_line(text: str, limit: int = 400) -> str:
    """The message of a remote traceback: its last non-empty line, shortened."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    last = lines[-1].rstrip("'>") if lines else ""
    return last.split("Message: ", 1)[-1][:limit]  # Flower's "Exception ... occurred. Message: <it>"


class RoundFailed(RuntimeError):
    """Too few nodes replied (or were connected) for the round to mean anything."""


class ReplyRejected(Exception):
    """A reply the server will not use; its `kind` (the message up to the first ':') is what is counted."""

    @property
    def kind(self) -> str:
        return str(self).split(":")[0]


class MalformedReply(ReplyRejected):
    """Records, metrics or arrays that are missing, unasked for, or of the wrong type or shape."""


class OverBudget(ReplyRejected):
    """More than the node was asked for or may send."""


class ImplausibleUpload(ReplyRejected):
    """Well-formed values that no honest node could have sent (non-finite, out of range)."""


class NotAdmitted(Exception):
    """A node's first-contact reply that keeps it out of the run; the message says why."""


class DiffusionStrategy(Strategy):
    """Base of the CollaFuse, FedAvg, local-only and centralized strategies.

    min_available_nodes: admitted nodes to wait for (up to `connect_timeout` s) before a round.
    min_available_fraction: a round goes on when this share of the nodes it addressed replied
    validly in time; below it the run fails naming the missing clients.
    fraction_train / fraction_evaluate, min_train_nodes / min_evaluate_nodes: the share of the
    admitted nodes sampled each round (at least min_*, waited for), as in Flower's FedAvg; drawn
    from `seed` and the round, so a resumed run samples the same nodes.
    capacity: client slots (a conditional shared model's classes); None = unbounded.
    image_shape: what an evaluation reply's samples must be (None: any uint8 N x C x H x W).
    on_round_end(strategy, round): called after each round's evaluation step.
    """

    method = "diffusion"

    def __init__(self, *, min_available_nodes: int = 1, min_available_fraction: float = 0.5,
                 fraction_train: float = 1.0, min_train_nodes: int = 1, fraction_evaluate: float = 1.0,
                 min_evaluate_nodes: int = 1, seed: int = 0, capacity: int | None = None, num_eval_samples: int = 64,
                 eval_every: int = 0, sampling_steps: int = 0, connect_timeout: float = 300.0,
                 recorder: Recorder | None = None, image_shape: tuple[int, int, int] | None = None,
                 on_round_end: Callable[[Any, int], None] | None = None) -> None:
        if min(min_available_nodes, min_train_nodes, min_evaluate_nodes) < 1:
            raise ValueError(f"min_available_nodes, min_train_nodes and min_evaluate_nodes must be >= 1, got "
                             f"{min_available_nodes}, {min_train_nodes}, {min_evaluate_nodes}")
        for name, f in (("min_available_fraction", min_available_fraction), ("fraction_train", fraction_train),
                        ("fraction_evaluate", fraction_evaluate)):
            if not 0.0 < f <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {f}")
        if num_eval_samples < 1 or eval_every < 0 or sampling_steps < 0:
            raise ValueError(f"num_eval_samples >= 1, eval_every >= 0 and sampling_steps >= 0 required, got "
                             f"{num_eval_samples}, {eval_every}, {sampling_steps}")
        self.min_available_nodes, self.min_available_fraction = min_available_nodes, min_available_fraction
        self.sampling = {"train": (fraction_train, min_train_nodes),
                         "evaluate": (fraction_evaluate, min_evaluate_nodes)}
        self.num_eval_samples, self.eval_every, self.sampling_steps = num_eval_samples, eval_every, sampling_steps
        self.seed, self.connect_timeout = seed, connect_timeout
        self.recorder = recorder or Recorder()
        self.image_shape: tuple[int, ...] | None = tuple(image_shape) if image_shape else None
        self.registry = NodeRegistry(capacity)
        self.num_rounds: int | None = None
        self.round_timeout: float | None = None
        self.run_key = 0  # which run's private state nodes continue (a resumed run keeps the first id)
        self._on_round_end = on_round_end
        self._addressed: dict[str, list[int]] = {}  # phase -> nodes the last messages went to
        self._t0 = time.perf_counter()
        self.measured_every_round = False

    # -- the run ------------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, start_round: int = 1, result: Result | None = None,
              checkpoint_fn: Callable[[int, ArrayRecord, Result], None] | None = None) -> Result:
        """Flower's `Strategy.start` loop, plus resuming (`start_round`, the `result` so far) and
        `checkpoint_fn(round, arrays, result)` after every round, so a killed run can go on."""
        self.num_rounds, self.round_timeout = num_rounds, timeout
        # an evaluate_fn measures the model after every round: no server work may be left owed then
        self.measured_every_round = evaluate_fn is not None
        self._t0 = time.perf_counter()
        log(INFO, "Starting %s strategy (rounds %d..%d):", type(self).__name__, start_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = result if result is not None else Result()
        arrays = initial_arrays

        def measure(rnd: int) -> None:
            res = evaluate_fn(rnd, arrays) if evaluate_fn else None
            if res is not None:
                result.evaluate_metrics_serverapp[rnd] = res

        if start_round == 1:
            measure(0)
        for rnd in range(start_round, num_rounds + 1):
            log(INFO, "[ROUND %d/%d]", rnd, num_rounds)
            replies = self.exchange(grid, self.configure_train(rnd, arrays, train_config, grid), timeout,
                                    during=lambda: self.while_nodes_train(rnd))
            new_arrays, train_metrics = self.aggregate_train(rnd, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = self.exchange(grid, self.configure_evaluate(rnd, arrays, evaluate_config, grid), timeout)
            eval_metrics = self.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            measure(rnd)
            if checkpoint_fn is not None:
                checkpoint_fn(rnd, arrays, result)
        if result.arrays is None or not len(result.arrays):
            result.arrays = arrays
        return result

    @staticmethod
    def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None,
                 during: Callable[[], None] | None = None, interval: float = 0.05) -> list[Message]:
        """`grid.send_and_receive`, with `during()` (server work that overlaps the nodes') run once
        the messages are out; the timeout counts from the push, as in Flower's grid."""
        messages = list(messages)
        pending = set(grid.push_messages(messages)) if messages else set()
        deadline = None if timeout is None else time.time() + timeout
        if during is not None:
            during()
        replies: list[Message] = []
        while pending:
            got = list(grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.time() >= deadline):
                break
            time.sleep(interval)
        # resent once: messages whose simulation worker died (the engine failing, not the node: `isolation.py`), only
        # in simulation (a deployed node could fake the error text); a node that kills it again counts as failed
        lost = {m.metadata.src_node_id for m in replies if m.has_error() and m.error.code not in (P.REFUSED, P.FAILED)
                and is_infrastructure_error(m.error.reason)} if isolation.simulation_workers() else set()
        if not lost:
            return replies
        again = [Message(content=m.content, message_type=m.metadata.message_type, dst_node_id=m.metadata.dst_node_id)
                 for m in messages if m.metadata.dst_node_id in lost]
        log(WARNING, "node(s) %s lost the simulation worker that ran their ClientApp (%s); sending their "
            "message once more", sorted(lost), "Ray actor died")
        new = list(grid.send_and_receive(again, timeout=timeout)) if again else []
        got = {m.metadata.src_node_id for m in new}
        return [m for m in replies if m.metadata.src_node_id not in lost or m.metadata.src_node_id not in got] + new

    def while_nodes_train(self, server_round: int) -> None:
        """Server work that may run while round `server_round`'s train messages are out (none here)."""

    # -- checkpoint state: everything a resumed run needs to continue exactly -------------------------
    checkpoint_attrs: tuple[str, ...] = ()  # plain attributes a checkpoint keeps as they are

    def state_dict(self) -> dict[str, Any]:
        """Identity, records, RNGs, the server trainer where the method has one, `checkpoint_attrs`."""
        state: dict[str, Any] = {
            "registry": (self.registry.capacity, dict(self.registry.index), dict(self.registry.info),
                         dict(self.registry.refused)),
            "recorder": self.recorder.state_dict(), "torch_rng": torch.get_rng_state(),
            "attrs": {a: getattr(self, a) for a in self.checkpoint_attrs}}
        if hasattr(self, "trainer"):
            state["trainer"] = self.trainer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cap, index, info, refused = state["registry"]
        self.registry = NodeRegistry(cap, dict(index), dict(info), dict(refused))
        self.recorder.load_state_dict(state["recorder"])
        torch.set_rng_state(state["torch_rng"])
        if "trainer" in state:
            self.trainer.load_state_dict(state["trainer"])
        for a, v in state["attrs"].items():
            setattr(self, a, v)

    @property
    def model(self) -> torch.nn.Module:
        """The server's model, where the method trains one (`self.trainer`)."""
        return self.trainer.model  # type: ignore[attr-defined]

    def is_eval_round(self, server_round: int) -> bool:
        last = self.num_rounds is None or server_round == self.num_rounds
        return last or (self.eval_every > 0 and server_round % self.eval_every == 0)

    def client_of(self, node_id: int) -> int:
        """The server-assigned client index of an admitted node."""
        return self.registry.index[node_id]

    # -- first contact and participants ----------------------------------------------------------
    def accept_hello(self, node_id: int, info: dict[str, Any]) -> None:
        """Method-specific admission check on a node's hello reply: raise `NotAdmitted` to refuse.
        Here: a node whose images have other channels than the server's model cannot take part."""
        have = info.get(P.IMAGE_CHANNELS)
        if self.image_shape is not None and have is not None and int(have) != self.image_shape[0]:
            raise NotAdmitted(f"the node's images have {int(have)} channel(s), the server's model "
                              f"{self.image_shape[0]}: set run-config image-channels={self.image_shape[0]} so "
                              f"that every node converts its images")

    def on_admit(self, node_id: int, client: int, info: dict[str, Any]) -> None:
        """Called once a node is admitted as `client` (methods keep what its hello declared)."""

    def _refuse(self, node_id: int, why: str, what: str) -> None:
        """Not asked again: a node that cannot take part now will not be able to next round."""
        self.registry.refused[node_id] = why
        log(WARNING, "node %d %s", node_id, what)

    def _contact_new_nodes(self, grid: Grid) -> None:
        """Send the `hello` query to connected nodes the server has not seen, admit or refuse them."""
        connected = set(grid.get_node_ids())
        new = [n for n in connected if n not in self.registry.index and n not in self.registry.refused]
        if not new:
            return
        conf = ConfigRecord({P.METHOD: self.method})
        msgs = [Message(content=RecordDict({P.CONFIG: conf}), message_type=P.message_type(P.QUERY, P.HELLO),
                        dst_node_id=n) for n in sorted(new)]
        replies = list(grid.send_and_receive(msgs, timeout=self.round_timeout or self.connect_timeout))
        for nid in set(new) - {m.metadata.src_node_id for m in replies}:  # a dead node would cost a timeout a round
            self._refuse(nid, "no answer to the first-contact query in time",
                         "did not answer the first-contact query in time; it is not admitted")
        answers = []
        for m in replies:
            nid = m.metadata.src_node_id
            if m.has_error():  # its ClientApp raised (no data, bad node_config, ...)
                self._refuse(nid, f"its first-contact reply was an error: {_last_line(m.error.reason)}",
                             f"did not answer hello: {m.error.reason}")
                continue
            info = _metrics_dict(m)
            why = ("it carried records nobody asked for" if P.unexpected_records(m, "up", P.QUERY, P.HELLO) else
                   f"its {_metrics_problem(m)}" if info is None else
                   f"its {P.PARTITION_ID} claim {info[P.PARTITION_ID]!r} is not a whole number >= -1"
                   if P.PARTITION_ID in info and not (float(info[P.PARTITION_ID]).is_integer()
                                                      and info[P.PARTITION_ID] >= -1) else "")
            if why:
                self._refuse(nid, f"its first-contact reply was malformed: {why}",
                             f"sent a malformed first-contact reply ({why}); not admitted")
                continue
            answers.append((nid, info))
        # claims first, by claimed index, so the same claims give the same map whatever the ids
        answers.sort(key=lambda a: (a[1].get(P.PARTITION_ID, -1) < 0, a[1].get(P.PARTITION_ID, -1), a[0]))
        for nid, info in answers:
            try:
                self.accept_hello(nid, info)
                claimed = int(info[P.PARTITION_ID]) if P.PARTITION_ID in info else None
                idx, why = self.registry.admit(nid, claimed, info, connected)
                if idx is None:
                    raise NotAdmitted(why)
            except NotAdmitted as exc:
                self._refuse(nid, str(exc), f"refused: {exc}")
                continue
            self.on_admit(nid, idx, info)
            log(INFO, "node %d admitted as client %d", nid, idx)

    def _participants(self, grid: Grid, least: int = 1) -> list[int]:
        """Admitted, connected nodes in client order; waits for max(`min_available_nodes`, least)."""
        need = max(self.min_available_nodes, least)
        deadline = time.time() + self.connect_timeout
        while True:
            self._contact_new_nodes(grid)
            connected = list(grid.get_node_ids())
            nodes = self.registry.ordered(connected)
            if len(nodes) >= need:
                return nodes
            if (not self.registry.index and len(connected) >= need
                    and all(n in self.registry.refused for n in connected)):
                # nobody admitted yet and every node the run needs was refused: waiting only hides
                # why the run cannot start (once nodes were admitted, their return is worth a wait)
                reasons: dict[str, list[int]] = {}
                for n in sorted(connected):
                    reasons.setdefault(self.registry.refused[n], []).append(n)
                why = "; ".join(f"node(s) {', '.join(map(str, ns))}: {r}" for r, ns in reasons.items())
                raise RoundFailed(f"all {len(connected)} connected node(s) were refused ({why})")
            if time.time() > deadline:
                raise RoundFailed(f"only {len(nodes)} admitted client node(s) connected after "
                                  f"{self.connect_timeout:.0f}s, {need} required "
                                  f"(refused: {self.registry.refused or 'none'})")
            log(INFO, "waiting for client nodes: %d admitted, %d required", len(nodes), need)
            time.sleep(1.0)

    def sample(self, grid: Grid, server_round: int, phase: str) -> list[int]:
        """In client order, drawn from (seed, round, phase) alone, so a resumed run draws the same. The last
        round evaluates every client: its message ends each node's run, and the report needs every client."""
        fraction, least = self.sampling[phase]
        if phase == "evaluate" and server_round == self.num_rounds:
            fraction = 1.0
        nodes = self._participants(grid, least)
        k = max(int(len(nodes) * fraction), least)
        if k >= len(nodes):
            return nodes
        rng = np.random.default_rng([self.seed, server_round, int(phase == "evaluate")])
        chosen = sorted(rng.choice(len(nodes), size=k, replace=False).tolist())
        log(INFO, "round %d %s: sampled clients %s of %d", server_round, phase,
            [self.client_of(nodes[i]) for i in chosen], len(nodes))
        return [nodes[i] for i in chosen]

    # -- messages out -----------------------------------------------------------------------------
    def _config(self, config: ConfigRecord | None, server_round: int, node_id: int, **extra: Any) -> ConfigRecord:
        """The user's `config` from `start()`, plus the round, the node's client index and `extra`."""
        return ConfigRecord({**(dict(config) if config else {}), P.SERVER_ROUND: server_round,
                             P.CLIENT_INDEX: self.client_of(node_id), P.NUM_CLIENTS: self.registry.capacity or 0,
                             P.RUN_KEY: self.run_key, **extra})

    def _send(self, node_ids: list[int], content_for: Callable[[int], RecordDict], phase: str,
              harness: Iterable[str] = ()) -> list[Message]:
        """This method's `<phase>.<method>` message to each node (Flower's action routing)."""
        mtype = P.message_type(P.TRAIN if phase == "train" else P.EVALUATE, self.method)
        msgs = [Message(content=content_for(n), message_type=mtype, dst_node_id=n) for n in node_ids]
        self.recorder.down(msgs, phase, self.client_of, harness)
        self._addressed[phase] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def _train_messages(self, server_round: int, grid: Grid, config: ConfigRecord,
                        content_for: Callable[[int, ConfigRecord], RecordDict] | None = None,
                        everyone: bool = False) -> list[Message]:
        """A train message (its config, and what `content_for` adds) to each sampled node, or every admitted one."""
        def content(n: int) -> RecordDict:
            conf = self._config(config, server_round, n)
            return content_for(n, conf) if content_for is not None else RecordDict({P.CONFIG: conf})

        nodes = self._participants(grid) if everyone else self.sample(grid, server_round, "train")
        return self._send(nodes, content, "train")

    # -- replies in -------------------------------------------------------------------------------
    def validate_reply(self, phase: str, client: int, msg: Message) -> None:
        """Method-specific payload checks: raise a `ReplyRejected` for a reply that must not be used."""

    def _accept(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        """Validated replies in client order; errors, silences and rejections are counted by client.
        Fails the run when fewer than `min_available_fraction` of the addressed nodes are usable."""
        addressed = self._addressed.pop(phase, [])
        ok: list[Message] = []
        rejected: list[tuple[int, int, ReplyRejected]] = []  # (client, node, why)
        answered: set[int] = set()
        failed = 0
        for m in replies:
            nid = m.metadata.src_node_id
            answered.add(nid)
            if nid not in self.registry.index:
                log(WARNING, "round %d %s: reply from unknown node %d ignored", server_round, phase, nid)
                continue
            client = self.client_of(nid)
            if m.has_error():
                failed += 1
                log(WARNING, "round %d %s: client %d (node %d) failed: %s", server_round, phase, client, nid,
                    m.error.reason)
                self.recorder.fail(client, "its simulation worker died (ActorDiedError)"
                                   if is_infrastructure_error(m.error.reason) else _last_line(m.error.reason, 120))
                continue
            self.recorder.up(m, "eval" if phase == "evaluate" else phase, client)
            try:
                self._check_metrics(m, phase)
                if phase == "evaluate":
                    self._check_eval(m)
                self.validate_reply(phase, client, m)
            except Exception as exc:  # noqa: BLE001 - a reply that breaks a check is malformed, not fatal
                rejected.append((client, nid, exc if isinstance(exc, ReplyRejected) else
                                 MalformedReply(f"malformed: {type(exc).__name__}: {str(exc)[:120]}")))
                continue
            if phase == "train":
                self.recorder.train_reply(client, dict(m.content[P.METRICS]))
            ok.append(m)
        self._record_rejections(server_round, phase, rejected, len(ok))
        silent = [n for n in addressed if n not in answered]
        if silent:
            clients = [self.client_of(n) for n in silent]
            log(WARNING, "round %d %s: no reply within %ss from client(s) %s", server_round, phase,
                self.round_timeout, clients)
            self.recorder.missing[server_round] = sorted(self.recorder.missing.get(server_round, []) + clients)
        failed += len(silent)
        self.recorder.failures += failed
        if failed:
            self.recorder.record(server_round, **{f"failed-{phase}": failed})
        if addressed and len(ok) < math.ceil(self.min_available_fraction * len(addressed)):
            raise RoundFailed(f"round {server_round} {phase}: only {len(ok)} of {len(addressed)} clients "
                              f"replied validly (min-available-fraction={self.min_available_fraction}); see the "
                              f"warnings above for who failed and why{self._suspects_note()}")
        ok = sorted(ok, key=lambda m: self.client_of(m.metadata.src_node_id))
        if phase == "train":
            self._cap_claims(server_round, ok)
        return ok

    def _record_rejections(self, server_round: int, phase: str, rejected: list[tuple[int, int, ReplyRejected]],
                           accepted: int) -> None:
        """Count rejections by client, but never blame the many for the one: most train replies
        non-finite means the global model was already broken, an incident of the round."""
        diverged = ("non-finite", "not all finite", "not a finite number")
        if (phase == "train" and len(rejected) >= 2 and len(rejected) > accepted
                and all(any(d in str(r) for d in diverged) for _, _, r in rejected)):
            clients = sorted(c for c, _, _ in rejected)
            what = (f"{len(rejected)} of {len(rejected) + accepted} clients' training diverged from the global "
                    f"model (non-finite replies from clients {clients}): the model they were sent was "
                    f"already broken{self._suspects_note()}")
            log(WARNING, "round %d train: %s", server_round, what)
            self.recorder.incidents.append((server_round, what))
            for _, _, exc in rejected:
                self.recorder.reject(server_round, exc.kind, None)
            return
        for client, nid, exc in rejected:
            log(WARNING, "round %d %s: reply of client %d (node %d) rejected: %s", server_round, phase,
                client, nid, exc)
            self.recorder.reject(server_round, exc.kind, client)

    def _suspects_note(self) -> str:
        flagged = self.recorder.flagged().items()
        return "; likely cause: " + ", ".join(f"client {c} ({', '.join(k)})" for c, k in flagged) if flagged else ""

    def _cap_claims(self, server_round: int, ok: list[Message]) -> None:
        """Cap example claims (`robust.cap_claims`: they weigh every average) in the server's copy; a
        serious flag when over the declaration or 10x over the cap, else a note (clients differ)."""
        by_client = {self.client_of(m.metadata.src_node_id): m for m in ok
                     if isinstance(m.content[P.METRICS].get(P.NUM_EXAMPLES), (int, float))}
        claims = {c: float(m.content[P.METRICS][P.NUM_EXAMPLES]) for c, m in by_client.items()}
        declared = {c: float(self.registry.info.get(m.metadata.src_node_id, {}).get(P.NUM_EXAMPLES, 0) or 0)
                    for c, m in by_client.items()}
        for c, counted in cap_claims(claims, declared).items():
            if counted >= claims[c]:
                continue
            m = by_client[c]
            m.content[P.METRICS][P.NUM_EXAMPLES] = int(counted) if float(counted).is_integer() else counted
            lie = 0 < declared[c] < claims[c]
            serious = lie or claims[c] > 10 * counted
            detail = (f"claimed {claims[c]:.6g} examples, counted as {counted:.6g}"
                      + (f" (it declared {declared[c]:.6g} at first contact)" if lie else
                         f" (at most {CLAIM_FACTOR:g}x the median of the other clients' claims)"))
            log(WARNING, "round %d: client %d (node %d) %s", server_round, c, m.metadata.src_node_id, detail)
            if lie or len(claims) > MIN_OTHERS:  # one other client is no yardstick to blame by (robust.MIN_OTHERS)
                self.recorder.flag(server_round, c, "claim-capped", detail, serious=serious)

    def _check_eval(self, m: Message) -> None:
        """Evaluation replies are kept for the report: one client's bad array is refused here, not
        left to crash every client's report (uint8 N x C x H x W, N <= num_eval_samples)."""
        met = m.content[P.METRICS]
        n_claim = met.get(P.NUM_EXAMPLES)
        if n_claim is not None and not 0 <= n_claim <= self.num_eval_samples:
            raise OverBudget(f"num-examples: {n_claim} generated images claimed, {self.num_eval_samples} were "
                             f"asked for")
        if met.get(P.FID_SKIPPED, 0) not in (0, 1):
            raise MalformedReply(f"{P.FID_SKIPPED}: must be 0 or 1, got {met[P.FID_SKIPPED]}")
        if P.SAMPLES not in m.content.array_records:
            return
        rec = m.content[P.SAMPLES]
        if list(rec.keys()) != [P.IMAGES]:
            raise MalformedReply(f"samples: expected exactly the array '{P.IMAGES}', got {list(rec.keys())}")
        a = rec[P.IMAGES]
        want = f"uint8 (1..{self.num_eval_samples}, {', '.join(map(str, self.image_shape or ('C', 'H', 'W')))})"
        if (a.dtype != "uint8" or len(a.shape) != 4 or not 1 <= a.shape[0] <= self.num_eval_samples
                or (self.image_shape is not None and tuple(a.shape[1:]) != self.image_shape)):
            raise MalformedReply(f"samples: expected {want}, got {a.dtype}{tuple(a.shape)}")
        if n_claim is not None and n_claim != a.shape[0]:
            raise MalformedReply(f"samples: {a.shape[0]} images but num-examples says {n_claim}")
        decoded(a, f"{P.SAMPLES}/{P.IMAGES}")  # the report reads the bytes: they must be what was checked

    def _check_metrics(self, m: Message, phase: str) -> None:
        category = P.TRAIN if phase == "train" else P.EVALUATE
        extra = P.unexpected_records(m, "up", category, self.method)
        if extra:
            raise MalformedReply(f"records: {extra} were not asked for (a {phase} reply of {self.method} carries "
                                 f"only {sorted(P.ALLOWED_RECORDS[('up', category, self.method)])})")
        problem = _metrics_problem(m)
        if problem is not None:
            raise problem

    # -- aggregation of metrics -------------------------------------------------------------------
    def mean_metrics(self, replies: list[Message], weight_key: str = P.NUM_EXAMPLES) -> MetricRecord:
        """Example-weighted mean of every numeric metric the replies share; totals for SUM_KEYS.
        Not Flower's `aggregate_metricrecords`: it has no totals, and a metric a node could not
        compute (NaN) must drop out with its weight, not pull the mean toward 0."""
        recs = [dict(m.content[P.METRICS]) for m in replies]
        if not recs:
            return MetricRecord()
        keys = set.intersection(*(set(r) for r in recs)) - {P.PARTITION_ID, P.CLIENT_INDEX}
        w = np.array([max(float(r.get(weight_key, 1.0)), 0.0) for r in recs])
        out: dict[str, float] = {}
        for k in sorted(keys):
            vals = [r[k] for r in recs]
            if not all(isinstance(v, (int, float)) for v in vals):
                continue
            arr = np.array(vals, dtype=float)
            if k in SUM_KEYS:
                out[k] = float(np.nansum(arr))
                continue
            ok = ~np.isnan(arr)
            ww = w[ok] if w[ok].sum() > 0 else np.ones(ok.sum())
            out[k] = float(np.sum(arr[ok] * ww) / ww.sum()) if ok.any() else float("nan")
            if k.endswith("-seconds"):  # the round's busy time on all nodes, next to the mean
                out[f"{k}-total"] = float(np.nansum(arr))
        return MetricRecord(out)

    def _train_done(self, server_round: int, ok: list[Message], **server: float) -> MetricRecord:
        """The round's train metrics (the nodes' mean, and the server's own): recorded and logged."""
        metrics = self.mean_metrics(ok)
        metrics.update(server)
        self.recorder.record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items()
                                                 if k in (P.TRAIN_LOSS, "server-train-loss", "uploads-received")})
        return metrics

    # -- evaluation, shared by methods whose node generates -----------------------------------------
    def _eval_messages(self, server_round: int, grid: Grid, config: ConfigRecord | None,
                       content_for: Callable[[int, ConfigRecord], RecordDict],
                       harness: Iterable[str] = (), **extra: Any) -> list[Message]:
        if not self.is_eval_round(server_round):
            return []
        nodes = self.sample(grid, server_round, "evaluate")
        extra = {P.NUM_SAMPLES: self.num_eval_samples, P.FINAL_ROUND: int(server_round == self.num_rounds), **extra}
        return self._send(nodes, lambda n: content_for(n, self._config(config, server_round, n, **extra)),
                          "evaluate", harness)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Collect what the nodes returned; also where a round ends (for `on_round_end`)."""
        agg = None
        if self.is_eval_round(server_round):
            ok = self._accept(server_round, replies, "evaluate")
            res = EvalResult(server_round)
            for m in ok:
                client = self.client_of(m.metadata.src_node_id)
                res.metrics[client] = dict(m.content[P.METRICS])
                if P.SAMPLES in m.content.array_records:
                    res.images[client] = m.content[P.SAMPLES][P.IMAGES].numpy()
            self.recorder.evals[server_round] = res
            agg = self.mean_metrics(ok) if ok else None
            if agg is not None:
                self.recorder.record(server_round, **{f"eval-{k}": v for k, v in agg.items()})
            self._progress(server_round, "evaluate", **{k: float(v) for k, v in (agg or {}).items()
                                                        if k in (P.FID, P.KID, P.INFER_SECONDS)})
        if self._on_round_end is not None:
            self._on_round_end(self, server_round)
        return agg

    def _progress(self, server_round: int, phase: str, **figures: float) -> None:
        elapsed = time.perf_counter() - self._t0
        shown = "  ".join(f"{k}={v:.4g}" for k, v in figures.items() if v == v)
        log(INFO, "[%s] round %d/%s %s  %s  (elapsed %.1fs)", self.method, server_round,
            self.num_rounds or "?", phase, shown, elapsed)

    def summary(self) -> None:
        log(INFO, "\t├──> %s: min-available-nodes=%d min-available-fraction=%g fraction-train=%g "
            "fraction-evaluate=%g eval-every=%d samples=%d", type(self).__name__, self.min_available_nodes,
            self.min_available_fraction, self.sampling["train"][0], self.sampling["evaluate"][0], self.eval_every,
            self.num_eval_samples)


def _metrics_problem(m: Message) -> ReplyRejected | None:
    """Why the reply's metrics cannot be used (a missing record or a list is malformed, NaN or Inf an
    implausible value), None when each is one finite number. Flower's MetricRecord also carries lists of
    numbers; no message of this protocol has one and every reader takes a number (hello's claims,
    example weights, the report's means), so a list is refused here, where it enters."""
    if P.METRICS not in m.content.metric_records:
        return MalformedReply(f"metrics: no '{P.METRICS}' metric record")
    for k, v in m.content[P.METRICS].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return MalformedReply(f"metrics: '{k}' is {str(v)[:40]} ({type(v).__name__}), expected one number")
        if not math.isfinite(v):
            return ImplausibleUpload(f"metrics: '{k}' is {v}, not a finite number")
    return None


def _metrics_dict(m: Message) -> dict[str, Any] | None:
    """The reply's metrics as a dict, or None when absent or any value is not one finite number."""
    return None if _metrics_problem(m) is not None else dict(m.content[P.METRICS])


def decoded(a: Array, where: str) -> np.ndarray:
    """The ndarray `a` carries, once its payload is seen to be what its fields declare. Checks read
    `a.dtype` and `a.shape`, but Flower's `Array.numpy()` decodes the payload without comparing: bytes
    of another shape or dtype would pass them and reach the buffer, the average or the report."""
    try:
        x = a.numpy()
    except Exception as exc:  # noqa: BLE001 - bytes that do not decode at all are as malformed
        raise MalformedReply(f"array payload: {where} does not decode ({type(exc).__name__})") from None
    got = (str(x.dtype), tuple(x.shape)) if isinstance(x, np.ndarray) else (type(x).__name__, ())
    if got != (a.dtype, tuple(a.shape)):
        raise MalformedReply(f"array payload: {where} declares {a.dtype}{tuple(a.shape)}, its bytes hold "
                             f"{got[0]}{got[1]}")
    return x
