"""An in-process Grid: routes the strategy's messages straight to the ClientApp, one Context per node.

Lets tests drive strategies and the ClientApp with real Flower messages without a SuperLink.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

_ids = itertools.count(1)
_runs = itertools.count(int(time.time() * 1000) % 10**9)  # a fresh run id per grid: node state files are per run


class InProcessGrid(Grid):
    def __init__(self, client_app, run_config: dict, num_nodes: int, fail_nodes: Iterable[int] = (),
                 node_config: dict | None = None) -> None:
        """fail_nodes: these nodes answer their train and evaluate messages with an Error (they
        pass first contact, then fail, like a node that dies after joining). Nodes trust the
        run-config, as simulated nodes do (node_config may say otherwise)."""
        self.client_app = client_app
        # Message() stamps the run/task identity that a real SuperLink process would set
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.run_id = next(_runs)
        self.contexts = {
            nid: Context(run_id=self.run_id, node_id=nid,
                         node_config={"partition-id": i, "num-partitions": num_nodes, "trust-run-config": "true",
                                      **(node_config or {})},
                         state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.node_ids)
        }
        self.fail_nodes = set(fail_nodes)
        self.sent: list[Message] = []
        self.replies: list[Message] = []

    # -- Grid API ------------------------------------------------------------------------------
    def set_run(self, run) -> None:  # pragma: no cover - not used in tests
        self._run = run

    @property
    def run(self):  # pragma: no cover
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content=content, message_type=message_type, dst_node_id=dst_node_id, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def push_messages(self, messages) -> list[str]:
        """Run the ClientApp at once and keep the replies for `pull_messages` (for PollingGrid)."""
        replies = self.send_and_receive(messages)
        self._pending = getattr(self, "_pending", {})
        for r in replies:
            self._pending[r.metadata.reply_to_message_id] = r
        return [r.metadata.reply_to_message_id for r in replies]

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._pending.pop(i) for i in list(message_ids) if i in self._pending]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
            m.metadata.__dict__["_src_node_id"] = 0
            self.sent.append(m)
            nid = m.metadata.dst_node_id
            if nid in self.fail_nodes and m.metadata.message_type.split(".")[0] in ("train", "evaluate"):
                reply = Message(Error(code=0, reason="simulated node failure"), reply_to=m)
            else:
                reply = self.client_app(m, self.contexts[nid])
            reply.metadata.__dict__["_src_node_id"] = nid
            self.replies.append(reply)
            out.append(reply)
        return out


def message_to_node(content: RecordDict, message_type: str = "train", dst: int = 100) -> Message:
    """A server message as a ClientApp receives it (ids stamped as a SuperLink would)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    m = Message(content=content, message_type=message_type, dst_node_id=dst)
    m.metadata.__dict__["_message_id"] = f"m{next(_ids)}"
    return m
