"""Which client index each node holds, kept by the server. A node's partition-id is a claim, not an
identity: the server admits a node once (its `hello`), gives it an index in 0..capacity-1 (its claim
when in range and free, else the lowest free one; a conditional model's label) and from then on
trusts only its own map node id -> index. A slot whose holder is gone can be taken again: a
restarted or resumed SuperNode comes back under a new id.
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
        """(index, "") or (None, reason); idempotent. A slot whose holder is not in `connected` (None:
        all are) is free for this node: the one it claims or, without a claim when none is free, any."""
        if node_id in self.index:
            return self.index[node_id], ""
        claims = claimed is not None and claimed >= 0
        if connected is not None and (claims or (self.capacity is not None and len(self.index) >= self.capacity)):
            for n in set(self.index) - set(connected):
                if not claims or self.index[n] == claimed:
                    del self.index[n]
                    self.info.pop(n, None)
        held = {i: n for n, i in self.index.items()}
        if claims:
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

    def _refuse(self, node_id: int, reason: str) -> tuple[None, str]:
        self.refused[node_id] = reason
        return None, reason

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """The admitted ones among `node_ids`, by client index: node ids are random each run and
        replies come in any order, so whatever draws from the server's RNG per node follows this."""
        return sorted((n for n in node_ids if n in self.index), key=self.index.__getitem__)
