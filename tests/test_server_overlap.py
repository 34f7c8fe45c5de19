"""The server's fair budget (server-steps = "auto") and its overlap with the nodes' training.

What must hold: the server takes local-steps x (nodes whose upload it accepted) steps per round;
with overlap, the steps a round earns run while the next round's nodes train, on the buffer as
it was after that round (never on uploads that have not arrived and been validated); before an
evaluation and in the last round they run at once, so the evaluated model has its whole budget.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from inprocess import InProcessGrid

from collafuse_flwr import client_app as ca
from collafuse_flwr.config import parse_config
from collafuse_flwr.server.build import build_strategy

UPLOADS = 8  # tiny config: uploads-per-round


def _run(rc, num_nodes=3, fail_nodes=(), grid_cls=InProcessGrid, evaluate_fn=None):
    """Run the strategy through the real ClientApp; log every server training call."""
    rc = {**rc, "count-flops": False}
    cfg = parse_config(rc)
    strategy, arrays = build_strategy(cfg, num_nodes, torch.device("cpu"), harness=False)
    calls: list[dict] = []
    where = {"phase": "aggregate", "round": 0}
    train, during = strategy._train_server, strategy.while_nodes_train

    def logged_train(steps, server_round):
        rows = sum(t.shape[0] for ts in strategy.buffer.values() for t in ts)
        calls.append({"round": server_round, "phase": where["phase"], "steps": steps, "buffer": rows,
                      "t": time.perf_counter()})
        return train(steps, server_round)

    def logged_during(server_round):
        where["phase"] = "during"
        try:
            during(server_round)
        finally:
            where["phase"] = "aggregate"

    strategy._train_server = logged_train
    strategy.while_nodes_train = logged_during
    grid = grid_cls(ca.app, rc, num_nodes, fail_nodes=fail_nodes)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.num_server_rounds, evaluate_fn=evaluate_fn)
    return strategy, [c for c in calls if c["steps"]], grid


def test_auto_budget_overlaps_with_the_next_round_and_sees_only_earlier_uploads(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=3, server_steps="auto", local_steps=2)
    s, calls, _ = _run(rc)
    per_round = 2 * 3  # local-steps x nodes served
    assert [(c["round"], c["phase"], c["steps"]) for c in calls] == [
        (2, "during", per_round), (3, "during", per_round), (3, "aggregate", per_round)]
    # a step owed by round r runs in round r + 1 on uploads of rounds <= r only
    for c in calls[:2]:
        assert c["buffer"] == 3 * UPLOADS * (c["round"] - 1)
    assert calls[-1]["buffer"] == 3 * UPLOADS * 3  # the last round's uploads are trained on before evaluation
    assert s.owed_steps == 0
    rec = s.recorder.rounds
    assert sum(rec[r].values.get("server-steps", 0) for r in rec) == 3 * per_round


def test_an_evaluation_round_flushes_the_owed_steps_first(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=3, eval_every=2, local_steps=2, server_steps="auto")
    _, calls, _ = _run(rc)
    before_eval = [c for c in calls if c["round"] <= 2]
    assert [(c["round"], c["phase"]) for c in before_eval] == [(2, "during"), (2, "aggregate")]
    assert sum(c["steps"] for c in before_eval) == 2 * 2 * 3  # rounds 1 and 2, both taken before round 2's eval
    assert before_eval[-1]["buffer"] == 2 * 3 * UPLOADS


def test_a_users_evaluate_fn_sees_every_rounds_server_steps(tiny_config):
    """Naively, with overlap the arrays after round r lack round r's server steps, so a user's
    evaluate_fn (Flower's per-round hook) measures a model one round stale; round 1 unchanged."""
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=2, local_steps=2, server_steps="auto")
    seen: dict[int, float] = {}

    def norm(rnd, arrays):
        seen[rnd] = sum(float((a.numpy().astype("float64") ** 2).sum()) for a in arrays.values())

    _, calls, _ = _run(rc, evaluate_fn=norm)
    assert [(c["round"], c["phase"]) for c in calls] == [(1, "aggregate"), (2, "aggregate")]
    assert len(set(seen.values())) == 3, seen  # initial, after round 1, after round 2: all differ


def test_without_overlap_each_round_trains_at_once_on_its_own_uploads(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=2, server_overlap=False, local_steps=2, server_steps="auto")
    _, calls, _ = _run(rc)
    assert [(c["round"], c["phase"], c["buffer"]) for c in calls] == [
        (1, "aggregate", 3 * UPLOADS), (2, "aggregate", 6 * UPLOADS)]


def test_the_budget_follows_the_nodes_served_and_a_fixed_one_does_not(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=1, local_steps=3, min_available_fraction=0.3,
                     server_steps="auto")
    _, calls, _ = _run(rc, fail_nodes=[1001])  # one node dies after joining: 2 served
    assert sum(c["steps"] for c in calls) == 3 * 2
    _, calls, _ = _run({**rc, "server-steps": 5}, fail_nodes=[1001])
    assert sum(c["steps"] for c in calls) == 5


class ThreadedGrid(InProcessGrid):
    """Nodes answer from a background thread after `delay` seconds, as real nodes would."""

    delay = 1.0

    def push_messages(self, messages):
        messages = list(messages)
        self._pending = getattr(self, "_pending", {})
        self.ready_at: list[float] = getattr(self, "ready_at", [])

        def work():
            time.sleep(self.delay)
            for r in self.send_and_receive(messages):
                self._pending[r.metadata.reply_to_message_id] = r
            self.ready_at.append(time.perf_counter())

        ids = [f"m-pending-{id(m)}" for m in messages]
        for i, m in zip(ids, messages):
            m.metadata.__dict__["_message_id"] = i
        t = threading.Thread(target=work, daemon=True)
        t.start()
        return ids

    def send_and_receive(self, messages, *, timeout=None):
        if threading.current_thread() is threading.main_thread():  # the hello query: answer at once
            return super().send_and_receive(messages)
        out = []
        for m in messages:  # keep the ids the push handed out
            mid = m.metadata.message_id
            reply = super().send_and_receive([m])[0]
            reply.metadata.__dict__["_reply_to_message_id"] = mid
            out.append(reply)
        return out


def test_the_server_trains_while_the_nodes_are_still_working(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=2, local_steps=2, server_steps="auto")
    _, calls, grid = _run(rc, grid_cls=ThreadedGrid)
    during = [c for c in calls if c["phase"] == "during"]
    assert during, "no server step overlapped the nodes' round"
    # round 2's server steps started before round 2's replies existed (pushes: train r1, train r2, eval)
    assert during[0]["t"] < grid.ready_at[1]


def test_owed_steps_are_checkpointed(tiny_config):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=3, local_steps=2)
    cfg = parse_config(rc)
    s, _ = build_strategy(cfg, 3, torch.device("cpu"), harness=False)
    s.owed_steps = 6
    t, _ = build_strategy(cfg, 3, torch.device("cpu"), harness=False)
    t.load_state_dict(s.state_dict())
    assert t.owed_steps == 6


@pytest.mark.parametrize("bad", ["lots", -1, 2.5])
def test_a_bad_server_budget_is_refused_at_start(tiny_config, bad):
    from collafuse_flwr.config import ConfigError

    with pytest.raises(ConfigError, match="server-steps"):
        parse_config(tiny_config(server_steps=bad))
