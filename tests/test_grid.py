"""PollingGrid: same push/pull protocol as Flower's grid, shorter waits."""

import time

import pytest

from collafuse_flwr.server.grid import PollingGrid


class _Meta:
    def __init__(self, reply_to):
        self.reply_to_message_id = reply_to


class _Reply:
    def __init__(self, reply_to):
        self.metadata = _Meta(reply_to)


class SlowGrid:
    """Replies to message k become available at pull number k + 1."""

    def __init__(self):
        self.pulls = 0

    def push_messages(self, messages):
        return [f"id{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        return [_Reply(i) for i in sorted(ids) if int(i[2:]) < self.pulls]

    def get_node_ids(self):
        return [1, 2, 3]


def test_collects_every_reply_polling_at_the_interval():
    inner = SlowGrid()
    g = PollingGrid(inner, interval=0.05)
    t0 = time.time()
    replies = g.send_and_receive(["a", "b", "c"], timeout=10)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["id0", "id1", "id2"]
    assert inner.pulls == 3
    assert time.time() - t0 < 1.0  # Flower's own loop would have slept 2 x 3 s here
    assert list(g.get_node_ids()) == [1, 2, 3]


def test_timeout_returns_what_arrived():
    class Never(SlowGrid):
        def pull_messages(self, ids):
            return []

    assert PollingGrid(Never(), interval=0.01).send_and_receive(["a"], timeout=0.1) == []
    with pytest.raises(ValueError, match="interval"):
        PollingGrid(Never(), interval=0)


class ArrivingNodes:
    """Nodes connect one by one, a new one every `every` get_node_ids calls, up to `total`."""

    def __init__(self, total, every):
        self.total, self.every, self.calls = total, every, 0

    def get_node_ids(self):
        self.calls += 1
        return list(range(min(self.total, self.calls // self.every)))


def test_wait_for_nodes_waits_for_min_nodes_not_a_settle_time():
    from collafuse_flwr.server_app import wait_for_nodes

    grid = ArrivingNodes(total=4, every=1)  # one more node at each look (once a second)
    assert wait_for_nodes(grid, min_nodes=3, timeout=10) == 3 and grid.calls == 3


def test_wait_for_nodes_returns_at_once_when_all_are_there_and_fails_clearly_when_too_few_come():
    from collafuse_flwr.server_app import wait_for_nodes

    t0 = time.time()
    assert wait_for_nodes(ArrivingNodes(total=5, every=0.001), min_nodes=1, timeout=10) >= 1
    assert time.time() - t0 < 2
    with pytest.raises(RuntimeError, match="only 0 client node.*min-nodes=2"):
        wait_for_nodes(ArrivingNodes(total=0, every=1), min_nodes=2, timeout=0.3)
