"""What a strategy measured, round by round: bytes on the wire, per-round figures, failures and
rejected replies, and what each node returned at evaluation (the harness reads it after the run).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Message, RecordDict

from collafuse_flwr import protocol as P
from collafuse_flwr.comm import message_nbytes, recorddict_nbytes

#: train-reply metrics summed per client over the run
TRAIN_TOTALS = (P.CLIENT_TRAIN_FLOPS, P.NUM_UPLOADED, P.TRAIN_SECONDS)
#: the per-client tallies (client -> dict), kept in a checkpoint as plain dicts
BY_CLIENT = ("bytes_by_client", "train_totals", "rejected_by_client", "failed_by_client", "client_stats")


@dataclass
class EvalResult:
    """Everything the nodes returned from one evaluation round, by client index."""

    server_round: int
    images: dict[int, np.ndarray] = field(default_factory=dict)  # N x C x H x W uint8
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class RoundRecord:
    server_round: int
    values: dict[str, float] = field(default_factory=dict)


class Recorder:
    def __init__(self) -> None:
        self.bytes: dict[str, float] = defaultdict(float)  # totals by direction and phase
        self.bytes_by_client: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.rounds: dict[int, RoundRecord] = {}
        self.evals: dict[int, EvalResult] = {}
        self.failures = 0  # error replies and nodes that did not reply in time
        self.rejected: Counter[str] = Counter()  # replies dropped by validation, by reason
        self.missing: dict[int, list[int]] = {}  # round -> client indices that did not reply
        # per client, summed over its accepted train replies (what each data owner spent and sent)
        self.train_totals: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        # by client, so that results.json names who was rejected, failed or flagged
        self.rejected_by_client: dict[int, Counter[str]] = defaultdict(Counter)
        self.failed_by_client: dict[int, Counter[str]] = defaultdict(Counter)  # error replies, by what they said
        self.flags: dict[int, list[tuple[int, str, str]]] = defaultdict(list)  # client -> (round, kind, detail)
        self.client_stats: dict[int, dict[str, float]] = defaultdict(dict)  # client -> latest figures
        self.incidents: list[tuple[int, str]] = []  # (round, what): events no single client is blamed for

    def record(self, server_round: int, **values: float) -> None:
        self.rounds.setdefault(server_round, RoundRecord(server_round)).values.update(values)

    def down(self, messages: list[Message], phase: str, client_of, harness: Iterable[str] = ()) -> None:
        """Bytes server -> client; `harness` keys are measurement-only and counted apart."""
        for m in messages:
            n_harness = sum(recorddict_nbytes(RecordDict({k: m.content[k]})) for k in harness if k in m.content)
            n = message_nbytes(m)
            self.bytes[f"down-{phase}"] += n - n_harness
            self.bytes["down-harness"] += n_harness
            self.bytes_by_client[client_of(m.metadata.dst_node_id)][f"down-{phase}"] += n - n_harness

    def up(self, message: Message, phase: str, client: int) -> None:
        n = message_nbytes(message)
        key = f"up-{phase}"
        self.bytes[key] += n
        self.bytes_by_client[client][key] += n

    def train_reply(self, client: int, metrics: dict) -> None:
        """Add an accepted train reply's `TRAIN_TOTALS` to the client's totals."""
        for k in TRAIN_TOTALS:
            v = metrics.get(k)
            if isinstance(v, (int, float)):
                self.train_totals[client][k] += float(v)
        self.train_totals[client]["train-replies"] += 1  # client-rounds: sampling skips some

    def reject(self, server_round: int, reason: str, client: int | None = None) -> None:
        """One reply dropped by validation; `client` is blamed for it (None: nobody is)."""
        self.rejected[reason] += 1
        if client is not None:
            self.rejected_by_client[client][reason] += 1
        rec = self.rounds.setdefault(server_round, RoundRecord(server_round))
        rec.values["rejected-replies"] = rec.values.get("rejected-replies", 0) + 1

    def fail(self, client: int, reason: str) -> None:
        """One error reply from `client` (its ClientApp raised, or its worker died)."""
        self.failed_by_client[client][reason] += 1

    def flag(self, server_round: int, client: int, kind: str, detail: str, serious: bool = True) -> None:
        """A robustness check changed what one client's accepted reply counts for (its claim
        capped, its update clipped). `serious`: the run's status degrades (else a note)."""
        self.flags[client].append((server_round, kind if serious else f"note:{kind}", detail))

    def flagged(self) -> dict[int, list[str]]:
        """client -> the kinds of serious flag raised on it (notes aside)."""
        kinds = {c: sorted({k for _, k, _ in v if not k.startswith("note:")}) for c, v in sorted(self.flags.items())}
        return {c: k for c, k in kinds.items() if k}

    # -- checkpoint ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"bytes": dict(self.bytes), "rounds": {r: dict(v.values) for r, v in self.rounds.items()},
                "evals": {r: (dict(e.images), {c: dict(m) for c, m in e.metrics.items()})
                          for r, e in self.evals.items()},
                "failures": self.failures, "rejected": dict(self.rejected), "missing": dict(self.missing),
                **{k: {c: dict(v) for c, v in getattr(self, k).items()} for k in BY_CLIENT},
                "flags": {c: [list(f) for f in v] for c, v in self.flags.items()},
                "incidents": [list(i) for i in self.incidents]}

    def load_state_dict(self, state: dict) -> None:
        Recorder.__init__(self)  # empty tallies, then the checkpoint's
        self.bytes.update(state["bytes"])
        self.rounds = {r: RoundRecord(r, dict(v)) for r, v in state["rounds"].items()}
        self.evals = {r: EvalResult(r, dict(im), dict(me)) for r, (im, me) in state["evals"].items()}
        self.failures, self.missing = state["failures"], dict(state["missing"])
        self.rejected.update(state["rejected"])
        for k in BY_CLIENT:
            for c, v in state.get(k, {}).items():
                getattr(self, k)[c].update(v)
        self.flags.update({c: [tuple(f) for f in v] for c, v in state.get("flags", {}).items()})
        self.incidents = [tuple(i) for i in state.get("incidents", [])]
