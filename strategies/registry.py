"""Which client index each node holds: kept by the server, checked at first contact.

A node's partition-id is self-reported, so it is a claim, not an identity. The server admits a
node once (at its first contact, the `hello` query), gives it an index in 0..capacity-1 (its
claim when the claim is in range and free, otherwise the lowest free index) and from then on
trusts only its own map node id -> index, never what a reply says about itself. The index is
what a conditional shared denoiser is labelled with, so it must be unique and in range.

A slot held by a node that is no longer connected goes to the next node that claims it (or,
when no slot is free, to the next node without a claim): a restarted SuperNode comes back under
a new node id, and a run resumed from a checkpoint meets only new ids, so the old holders would
otherwise block every slot forever. A node that drops out for a moment can lose its slot this
way to whoever claims it while it is gone; the claim is checked as any first claim is.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class NodeRegistry:
    capacity: int | None = None  # None: any number of clients (an unconditional shared model)
    index: dict[int, int] = field(default_factory=dict)  # node id -> client index
    info: dict[int, dict[str, Any]] = field(default_factory=dict)  # what the node said at hello
    refused: dict[int, str] = field(default_factory=dict)  # node id -> why it is not admitted

    def admit(self, node_id: int, claimed: int | None, info: dict[str, Any] | None = None,
              connected: Iterable[int] | None = None) -> tuple[int | None, str]:
        """Admit a node; returns (index, "") or (None, reason). Idempotent for admitted nodes.

        connected: the node ids connected now (None: all holders count as present); a slot whose
        holder is not among them is free for this node."""
        if node_id in self.index:
            return self.index[node_id], ""
        if connected is not None:
            self._release_absent(set(connected), claimed)
        held = {i: n for n, i in self.index.items()}
        if claimed is not None and claimed >= 0:
            if self.capacity is not None and claimed >= self.capacity:
                return self._refuse(node_id, f"partition-id {claimed} is outside 0..{self.capacity - 1} "
                                             f"(the shared model was built for {self.capacity} clients)")
            if claimed in held:
                return self._refuse(node_id, f"partition-id {claimed} is already held by node {held[claimed]}; "
                                             f"give every SuperNode its own partition-id")
            idx = claimed
        else:
            free = (i for i in range(self.capacity if self.capacity is not None else len(held) + 1) if i not in held)
            idx = next(free, None)
            if idx is None:
                return self._refuse(node_id, f"no free client slot: all {self.capacity} are held")
        self.index[node_id] = idx
        self.info[node_id] = dict(info or {})
        self.refused.pop(node_id, None)
        return idx, ""

    def _release_absent(self, connected: set[int], claimed: int | None) -> None:
        """Free the slot `claimed` if its holder is gone; without a claim, free every absent holder's
        slot when no slot is free."""
        absent = [n for n in self.index if n not in connected]
        if claimed is not None and claimed >= 0:
            absent = [n for n in absent if self.index[n] == claimed]
        elif self.capacity is None or len(self.index) < self.capacity:
            return
        for n in absent:
            del self.index[n]
            self.info.pop(n, None)

    def _refuse(self, node_id: int, reason: str) -> tuple[None, str]:
        self.refused[node_id] = reason
        return None, reason

    def known(self, node_id: int) -> bool:
        return node_id in self.index or node_id in self.refused

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """The admitted ones among `node_ids`, by client index.

        Why an order at all: Flower draws node ids at random each run and replies arrive in any
        order. Anything that consumes the server's RNG per node or stacks data per node must
        follow the client order, or the same seed gives a different result each run.
        """
        return sorted((n for n in node_ids if n in self.index), key=self.index.__getitem__)

    def describe(self, node_id: int) -> str:
        i = self.index.get(node_id)
        return f"client {i} (node {node_id})" if i is not None else f"node {node_id}"
