"""Per-client cut ratios: each data owner runs at its own t_c,k; the server trains t > t_c,k on
that node's uploads, validates them against that node's cut and hands it x_{t_c,k}. Their run
through `flwr run` is in tests/test_e2e_flower.py."""


import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_strategies import FakeGrid, _reply, _train_replies

from collafuse_flwr.client_app import node_cut_step
from collafuse_flwr.config import ConfigError, parse_config
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.models import shared_denoiser
from collafuse_flwr.node.policy import node_policy
from collafuse_flwr.server.build import from_config
from strategies import NotAdmitted

CUTS = {1: 2, 2: 10, 3: 18}  # node -> the cut step it declares (T = 20)


class CutGrid(FakeGrid):
    """Nodes that declare their own cut at first contact."""

    declared = CUTS

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            met = {"num-examples": 10, "partition-id": nid - 1, "cut-step": self.declared[nid]}
            out.append(_reply(m, RecordDict({"metrics": MetricRecord(met)}), nid))
        return out


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _strategy(tiny_config, **kw):
    cfg = parse_config(tiny_config(cut_ratio=0.3, client_cut_ratios="0.1,0.5,0.9"))
    model = shared_denoiser(8, 1, "tiny", "client", 3)
    s = from_config(cfg, model, (1, 8, 8), overlap=False, **kw)
    s.num_rounds = 2
    return s


def _upload(t_c, n=4, seed=0):
    sched = D.make_schedule(20, "cosine")
    x0 = torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return D.upload(sched, x0, t_c, torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))).numpy()


def test_each_node_is_asked_to_train_and_upload_at_its_own_cut(tiny_config):
    s = _strategy(tiny_config)
    assert s.node_cuts
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), CutGrid(CUTS)))
    assert {m.metadata.dst_node_id: m.content["config"]["cut-step"] for m in msgs} == CUTS
    assert s.client_cut == {0: 2, 1: 10, 2: 18}


def test_an_upload_is_judged_against_its_own_nodes_cut(tiny_config):
    """A high-noise upload is a valid x_tc for the node at t_c = 18; the same pixels from the node
    at t_c = 2 would be a poisoned upload (far outside what an x_2 can be) and are refused."""
    s = _strategy(tiny_config)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), CutGrid(CUTS)))
    noisy = _upload(18).astype(np.float32)  # an honest x_18: nearly pure noise
    assert np.abs(noisy).max() > D.anchor_bound(s.sched, 2, 8.0)
    assert np.abs(noisy).max() < D.anchor_bound(s.sched, 18, 8.0)
    replies = _train_replies(s, msgs, [noisy, _upload(10), noisy])
    s.aggregate_train(1, replies)
    assert set(s.buffer) == {1, 2}  # client 0's (t_c = 2) was refused
    assert s.recorder.rejected and "upload range" in next(iter(s.recorder.rejected))


def test_the_server_trains_each_row_above_its_own_cut(tiny_config, monkeypatch):
    s = _strategy(tiny_config)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), CutGrid(CUTS)))
    seen = []
    real = s.model.forward

    def spy(x, t, class_labels=None):
        seen.append((t.clone(), s.model._labels.clone() if hasattr(s.model, "_labels") else None))
        return real(x, t, class_labels)

    monkeypatch.setattr(s.model, "forward", spy)
    s.aggregate_train(1, _train_replies(s, msgs, [_upload(2), _upload(10), _upload(18)]))
    ts = torch.cat([t for t, _ in seen])
    assert ts.min() >= 3 and ts.max() <= 20
    # rows of the t_c = 18 client only ever see t in {19, 20}; those of the t_c = 2 client reach low t
    data, labels = s.trainer.tensors()
    row_cuts = torch.tensor([s.cut_for(int(c)) for c in labels])
    g = torch.Generator().manual_seed(0)
    t_rows = []
    model = lambda x, t: (t_rows.append(t), torch.zeros_like(x))[1]  # noqa: E731
    D.server_loss(model, s.sched, data, row_cuts, "exact", g)
    assert bool((t_rows[0] > row_cuts).all()) and bool((t_rows[0] <= 20).all())
    assert t_rows[0][row_cuts == 2].min() < 10


def test_each_node_gets_its_own_hand_off(tiny_config):
    s = _strategy(tiny_config)
    list(s.configure_train(1, ArrayRecord(), ConfigRecord(), CutGrid(CUTS)))
    calls = []
    real = D.server_sample

    def spy(model, sched, shape, t_c, *a, **k):
        calls.append(t_c)
        return real(model, sched, shape, t_c, *a, **k)

    import strategies.collafuse as C

    C.D.server_sample = spy
    try:
        msgs = list(s.configure_evaluate(2, ArrayRecord(), ConfigRecord(), CutGrid(CUTS)))
    finally:
        C.D.server_sample = real
    assert sorted(calls) == [2, 10, 18]
    starts = {m.metadata.dst_node_id: m.content["config"]["client-start-step"] for m in msgs}
    assert starts == CUTS


@pytest.mark.parametrize("bad", [21, -1, 2.5, 10**9])
def test_a_node_declaring_an_impossible_cut_is_refused_and_the_others_run(tiny_config, bad):
    """Naively the server trusts the declared cut: 21 > T makes it train no step of the node's
    chain and hand back x at t > T; -1 or 2.5 index the schedule out of range or off the grid."""
    s = _strategy(tiny_config)
    grid = CutGrid(CUTS)
    grid.declared = {**CUTS, 2: bad}
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 3]
    assert f"cut step {bad} is not a whole step in 0..20" in s.registry.refused[2]
    assert s.client_cut == {0: 2, 2: 18}


def test_without_node_cuts_a_node_with_another_cut_is_refused(tiny_config):
    cfg = parse_config(tiny_config(cut_ratio=0.5))
    s = from_config(cfg, shared_denoiser(8, 1, "tiny", "client", 3), (1, 8, 8))
    with pytest.raises(NotAdmitted, match="client-cut-ratios"):
        s.accept_hello(1, {"cut-step": 2})


def _cut(cfg, pid, **node_config):
    return node_cut_step(cfg, node_policy({"partition-id": pid, **node_config}, cfg, pid), pid)


def test_the_node_takes_its_entry_and_node_config_is_a_floor(tiny_config):
    """A trusting (simulated) node runs at its client-cut-ratios entry; a node_config cut-ratio is
    a noise floor: it raises a lower entry (0.1 -> 0.2), and a noisier entry (0.5) stands."""
    cfg = parse_config(tiny_config(cut_ratio=0.3, client_cut_ratios="0.1,0.5,0.9"))
    trust = {"trust-run-config": "true"}
    assert [_cut(cfg, i, **trust) for i in range(3)] == [2, 10, 18]
    assert _cut(cfg, 0, **trust, **{"cut-ratio": 0.2}) == 4
    assert _cut(cfg, 1, **trust, **{"cut-ratio": 0.2}) == 10
    assert _cut(cfg, 0) == 4  # a deployed node's default floor is c = 0.2
    with pytest.raises(ConfigError, match="one cut ratio per client"):
        _cut(cfg, 3, **trust)


@pytest.mark.parametrize("bad, match", [("0.2,x", "comma-separated"), ("0.2,1.5", r"in \[0, 1\]"),
                                        ("0.001,0.2", "cut")])
def test_bad_client_cut_ratios_are_refused_at_start(tiny_config, bad, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        parse_config(tiny_config(client_cut_ratios=bad))
