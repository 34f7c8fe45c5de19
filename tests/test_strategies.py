"""Strategies' configure/aggregate steps against a fake Grid (no SuperLink, no Ray)."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from collafuse_flwr.config import parse_config
from collafuse_flwr.metrics.comm import message_nbytes
from collafuse_flwr.models import build_denoiser
from strategies import CollaFuse, FedAvgDiffusion, LocalOnly


class FakeGrid:
    """Just what strategies ask of a Grid: the connected node ids."""

    def __init__(self, n):
        self.ids = list(range(1, n + 1))

    def get_node_ids(self):
        return list(self.ids)


def _reply(to: Message, content: RecordDict, src: int) -> Message:
    to.metadata.__dict__["_message_id"] = f"m{src}"
    r = Message(content=content, reply_to=to)
    r.metadata.__dict__["_src_node_id"] = src
    return r


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _collafuse(rc):
    cfg = parse_config(rc)
    model = build_denoiser(cfg.image_size, 1, cfg.model_size)
    return cfg, CollaFuse(cfg, model, (1, 8, 8), torch.device("cpu"), min_nodes=1)


def test_collafuse_configure_train_sends_config_only(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(3)))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2, 3]
    for m in msgs:
        assert m.metadata.message_type == MessageType.TRAIN
        assert not m.content.array_records  # the server model is never sent
        conf = m.content["config"]
        assert conf["cut-step"] == 6 and conf["uploads"] == cfg.uploads_per_round and conf["server-round"] == 1
    assert s.bytes["down-train"] == sum(message_nbytes(m) for m in msgs)


def test_collafuse_aggregate_trains_server_on_uploads_and_skips_failures(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(3)))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    replies = []
    for m in msgs[:2]:
        up = ArrayRecord({"x_tc": Array(np.random.randn(5, 1, 8, 8).astype(np.float32))})
        met = MetricRecord({"num-examples": 10, "partition-id": m.metadata.dst_node_id - 1, "train-loss": 1.0})
        replies.append(_reply(m, RecordDict({"upload": up, "metrics": met}), m.metadata.dst_node_id))
    failed = Message(Error(code=1, reason="boom"), reply_to=msgs[2])
    replies.append(failed)
    arrays, metrics = s.aggregate_train(1, replies)
    assert s.failures == 1
    assert sum(b.shape[0] for b in s.buffer) == 10
    assert metrics["uploads-received"] == 10
    assert metrics["num-examples"] == 20
    after = arrays.to_torch_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert s.bytes["up-train"] == sum(message_nbytes(r) for r in replies[:2])


def test_collafuse_evaluate_sends_server_half_on_eval_rounds_only(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.5, eval_every=0, num_server_rounds=3))
    assert list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), FakeGrid(2))) == []
    msgs = list(s.configure_evaluate(3, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    assert len(msgs) == 2
    for m in msgs:
        x = m.content["x_tc"]["x_tc"].numpy()
        assert x.shape == (cfg.num_eval_samples, 1, 8, 8)
        assert m.content["config"]["client-start-step"] == 10
    # each node gets its own draw, not one shared batch
    a, b = (m.content["x_tc"]["x_tc"].numpy() for m in msgs)
    assert not np.allclose(a, b)


def _grid_of(ids):
    g = FakeGrid(0)
    g.ids = list(ids)
    return g


def test_collafuse_same_seed_same_result_whatever_node_ids_and_reply_order(tiny_config):
    """Flower draws node ids at random per run and replies arrive in any order: neither may
    change what the server learns or which server half each partition gets."""
    rc = tiny_config(cut_ratio=0.5, server_steps=3, eval_every=1, num_server_rounds=1)
    uploads = {pid: np.random.default_rng(pid).standard_normal((4, 1, 8, 8)).astype(np.float32) for pid in range(3)}
    runs = []
    for node_of_pid, reverse in (({0: 11, 1: 22, 2: 33}, False), ({0: 90, 1: 40, 2: 5}, True)):
        torch.manual_seed(0)
        cfg, s = _collafuse(rc)
        msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), _grid_of(node_of_pid.values())))
        by_node = {m.metadata.dst_node_id: m for m in msgs}
        replies = []
        for pid, nid in node_of_pid.items():
            met = MetricRecord({"num-examples": 10, "partition-id": pid, "train-loss": float(pid)})
            content = RecordDict({"upload": ArrayRecord({"x_tc": Array(uploads[pid])}), "metrics": met})
            replies.append(_reply(by_node[nid], content, nid))
        arrays, _ = s.aggregate_train(1, replies[::-1] if reverse else replies)
        evals = s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), _grid_of(node_of_pid.values()))
        pid_of = {nid: pid for pid, nid in node_of_pid.items()}
        x_by_pid = {pid_of[m.metadata.dst_node_id]: m.content["x_tc"]["x_tc"].numpy() for m in evals}
        runs.append((arrays.to_torch_state_dict(), x_by_pid))
    (w_a, x_a), (w_b, x_b) = runs
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert all(np.array_equal(x_a[p], x_b[p]) for p in range(3))


def test_collafuse_cut_one_asks_for_nothing_and_sends_nothing(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=1.0))
    (m,) = s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(1))
    assert m.content["config"]["uploads"] == 0
    (e,) = s.configure_evaluate(cfg.num_server_rounds, ArrayRecord(), ConfigRecord(), FakeGrid(1))
    assert "x_tc" not in e.content.array_records
    assert e.content["config"]["client-start-step"] == cfg.diffusion_steps


def test_fedavg_weights_by_examples(tiny_config):
    cfg = parse_config(tiny_config(method="fedavg"))
    s = FedAvgDiffusion(cfg, min_nodes=1)
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord(), FakeGrid(2)))
    assert all("arrays" in m.content.array_records for m in msgs)
    replies = [
        _reply(msgs[0], RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
                                    "metrics": MetricRecord({"num-examples": 1, "partition-id": 0,
                                                             "train-seconds": 2.0})}), 1),
        _reply(msgs[1], RecordDict({"arrays": ArrayRecord({"w": Array(np.full(3, 4.0, np.float32))}),
                                    "metrics": MetricRecord({"num-examples": 3, "partition-id": 1,
                                                             "train-seconds": 6.0})}), 2),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.0))  # (0*1 + 4*3) / 4
    assert metrics["num-examples"] == 4
    # timings: the example-weighted mean as for every metric, and the round's total beside it
    assert metrics["train-seconds"] == pytest.approx((2 * 1 + 6 * 3) / 4)
    assert metrics["train-seconds-total"] == pytest.approx(8.0)
    assert "num-examples-total" not in metrics


def test_local_only_messages_carry_no_arrays(tiny_config):
    cfg = parse_config(tiny_config(method="local"))
    s = LocalOnly(cfg, min_nodes=1)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    assert all(not m.content.array_records for m in msgs)
    ev = list(s.configure_evaluate(cfg.num_server_rounds, ArrayRecord(), ConfigRecord(), FakeGrid(2)))
    assert all(not m.content.array_records for m in ev)
    arrays, _ = s.aggregate_train(1, [])
    assert arrays is None
