"""Strategies' configure/aggregate steps against a fake Grid (no SuperLink, no Ray), including
replies a faulty or hostile node could send: each must be refused before it touches state."""

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.supercore.task_identity import TaskIdentity

from collafuse_flwr.comm import message_nbytes
from collafuse_flwr.config import parse_config
from collafuse_flwr.core.models import build_denoiser, shared_denoiser
from collafuse_flwr import protocol as P
from strategies import CollaFuse, ImplausibleUpload, NotAdmitted, ReplyRejected, RoundFailed, ServerTrainer
from collafuse_flwr.server.build import from_config


def _reply(to: Message, content: RecordDict, src: int) -> Message:
    to.metadata.__dict__["_message_id"] = f"m{src}"
    r = Message(error=content, reply_to=to) if isinstance(content, Error) else Message(content=content, reply_to=to)
    r.metadata.__dict__["_src_node_id"] = src
    return r


class FakeGrid:
    """What strategies ask of a Grid: node ids, and answers to the first-contact `hello` query.

    claims: node id -> the partition-id it claims at hello (absent: no claim).
    """

    def __init__(self, ids, claims=None, silent=(), broken=()):
        self.ids = list(ids)
        self.claims = dict(claims or {})
        self.silent = set(silent)  # these never answer
        self.broken = set(broken)  # their ClientApp raises at first contact
        self.asked: list[int] = []
        self.extra: dict[int, dict] = {}  # node id -> more hello metrics

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            assert m.metadata.message_type == "query.hello"
            nid = m.metadata.dst_node_id
            self.asked.append(nid)
            if nid in self.silent:
                continue
            if nid in self.broken:
                err = Error(code=0, reason="Traceback ...\nFileNotFoundError: data_dir /x does not exist'>")
                out.append(_reply(m, err, nid))
                continue
            met = {"num-examples": 10}
            if nid in self.claims:
                met["partition-id"] = self.claims[nid]
            met.update(self.extra.get(nid, {}))
            out.append(_reply(m, RecordDict({"metrics": MetricRecord(met)}), nid))
        return out


def grid_of(n=0, ids=None, claims="index"):
    ids = list(ids) if ids is not None else list(range(1, n + 1))
    if claims == "index":
        claims = {nid: i for i, nid in enumerate(ids)}
    return FakeGrid(ids, claims)


@pytest.fixture(autouse=True)
def _identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _collafuse(rc, clients=3, **kw):
    """A CollaFuse on the tiny config; it trains within aggregate_train (overlap has its own tests)."""
    kw.setdefault("overlap", False)
    cfg = parse_config(rc)
    model = shared_denoiser(cfg.image_size, 1, cfg.model_size, "client", clients)
    s = from_config(cfg, model, (1, 8, 8), **kw)
    s.num_rounds = cfg.num_server_rounds
    return cfg, s


def _train_replies(s, msgs, uploads, metrics=None):
    """One reply per message: uploads[i] (array or None) with standard metrics."""
    out = []
    for m, up in zip(msgs, uploads):
        met = MetricRecord({"num-examples": 10, "train-loss": 1.0, **(metrics or {})})
        rd = RecordDict({"metrics": met})
        if up is not None:
            rd["upload"] = ArrayRecord({"x_tc": Array(up)})
        out.append(_reply(m, rd, m.metadata.dst_node_id))
    return out


def _x(n=5, scale=0.5, dtype=np.float32, shape=(1, 8, 8)):
    return (np.random.default_rng(n).standard_normal((n, *shape)) * scale).astype(dtype)


def test_collafuse_configure_train_sends_config_only(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord({"user-key": 7}), grid_of(3)))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2, 3]
    for i, m in enumerate(msgs):
        assert m.metadata.message_type == "train.collafuse"
        assert not m.content.array_records  # the server model is never sent
        conf = m.content["config"]
        assert conf["cut-step"] == 6 and conf["uploads"] == cfg.uploads_per_round and conf["server-round"] == 1
        assert conf["client-index"] == i and conf["user-key"] == 7  # the caller's config is forwarded
    assert s.recorder.bytes["down-train"] == sum(message_nbytes(m) for m in msgs)


def test_collafuse_aggregate_trains_server_on_uploads_and_skips_failures(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    replies = _train_replies(s, msgs[:2], [_x(), _x()])
    replies.append(Message(Error(code=1, reason="boom"), reply_to=msgs[2]))
    replies[-1].metadata.__dict__["_src_node_id"] = 3
    arrays, metrics = s.aggregate_train(1, replies)
    assert s.recorder.failures == 1
    assert sum(t.shape[0] for ts in s.buffer.values() for t in ts) == 10
    assert metrics["uploads-received"] == 10 and metrics["num-examples"] == 20
    after = arrays.to_torch_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert s.recorder.bytes["up-train"] == sum(message_nbytes(r) for r in replies[:2])


BAD_UPLOADS = {
    "nan": lambda: np.where(np.arange(5 * 64).reshape(5, 1, 8, 8) == 7, np.nan, _x()).astype(np.float32),
    "inf": lambda: np.where(np.arange(5 * 64).reshape(5, 1, 8, 8) == 7, np.inf, _x()).astype(np.float32),
    "huge": lambda: np.where(np.arange(5 * 64).reshape(5, 1, 8, 8) == 7, 1e30, _x()).astype(np.float32),
    "wrong-shape": lambda: _x(shape=(1, 9, 9)),
    "wrong-channels": lambda: _x(shape=(3, 8, 8)),
    "float64": lambda: _x(dtype=np.float64),
    "over-budget": lambda: _x(n=500),
}


@pytest.mark.parametrize("bad", sorted(BAD_UPLOADS))
def test_a_poisoned_or_malformed_upload_is_refused_and_the_others_are_used(tiny_config, bad):
    """Naively, one NaN/Inf/1e30 pixel makes the shared model NaN for good, and a wrong shape or
    dtype crashes the ServerApp in every later round (it stays in the buffer)."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=3, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    replies = _train_replies(s, msgs, [_x(), BAD_UPLOADS[bad](), _x()])
    arrays, metrics = s.aggregate_train(1, replies)
    assert metrics["uploads-received"] == 10  # the two good replies
    assert sorted(s.buffer) == [0, 2]
    assert sum(s.recorder.rejected.values()) == 1 and s.recorder.rounds[1].values["rejected-replies"] == 1
    assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())
    # later rounds still train (nothing bad stayed behind)
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), grid_of(3)))
    arrays, _ = s.aggregate_train(2, _train_replies(s, msgs, [_x(), _x(), _x()]))
    assert all(torch.isfinite(v).all() for v in arrays.to_torch_state_dict().values())


def test_non_finite_metrics_reject_the_reply(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    replies = _train_replies(s, msgs, [_x(), _x()])
    replies[1].content["metrics"]["train-loss"] = float("nan")
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["uploads-received"] == 5 and sum(s.recorder.rejected.values()) == 1


def test_identity_is_the_servers_not_the_replys(tiny_config):
    """A reply saying it is another partition does not move its uploads to that client's label."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    s.aggregate_train(1, _train_replies(s, msgs, [_x(), _x()], metrics={"partition-id": 0}))
    assert sorted(s.buffer) == [0, 1]


def test_duplicate_and_out_of_range_partition_claims_are_refused(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=3)
    grid = FakeGrid([11, 22, 33, 44], claims={11: 0, 22: 0, 33: 99, 44: -1})
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in msgs] == [11, 44]  # 44 (no claim) got the lowest free slot
    assert s.registry.index == {11: 0, 44: 1}
    assert "already held" in s.registry.refused[22] and "outside 0..2" in s.registry.refused[33]


def test_a_late_node_takes_a_free_slot_or_is_ignored(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=2)
    assert len(list(s.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1], {1: 0})))) == 1
    late = FakeGrid([1, 2, 3], {1: 0})  # 2 and 3 join later without a claim; one slot is left
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), late))
    assert [m.metadata.dst_node_id for m in msgs] == [1, 2]
    assert "no free client slot" in s.registry.refused[3]


def test_too_few_replies_fail_the_round_clearly(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, min_available_fraction=0.75), clients=4)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(4)))
    with pytest.raises(RoundFailed, match="only 2 of 4"):
        s.aggregate_train(1, _train_replies(s, msgs[:2], [_x(), _x()]))
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, min_available_fraction=0.5), clients=4)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(4)))
    _, metrics = s.aggregate_train(1, _train_replies(s, msgs[:2], [_x(), _x()]))  # half is enough
    assert s.recorder.missing[1] == [2, 3] and metrics["uploads-received"] == 10


def test_a_non_finite_server_step_is_skipped_and_the_model_kept(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(1)))
    s.aggregate_train(1, _train_replies(s, msgs, [_x()]))
    before = {k: v.clone() for k, v in s.model.state_dict().items()}
    opt_before = {k: v["exp_avg"].clone() for k, v in s.trainer.optimizer.state_dict()["state"].items()}
    s.buffer[0] = [torch.full((5, 1, 8, 8), float("nan"))]  # whatever got in: the step must not apply
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), grid_of(1)))
    _, metrics = s.aggregate_train(2, _train_replies(s, msgs, [None]))
    assert metrics["server-steps-skipped"] == 2
    assert all(torch.equal(before[k], v) for k, v in s.model.state_dict().items())
    assert all(torch.equal(opt_before[k], v["exp_avg"]) for k, v in s.trainer.optimizer.state_dict()["state"].items())


def test_the_upload_buffer_is_capped_fairly(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=1, server_buffer_size=12, uploads_per_round=8))
    for rnd in range(1, 4):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid_of(2)))
        s.aggregate_train(rnd, _train_replies(s, msgs, [_x(n=8), _x(n=2)]))
    sizes = {c: sum(t.shape[0] for t in ts) for c, ts in s.buffer.items()}
    assert sum(sizes.values()) == 12 and sizes == {0: 6, 1: 6}  # the heavy uploader gave way


def test_collafuse_evaluate_sends_server_half_on_eval_rounds_only(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.5, eval_every=0, num_server_rounds=3))
    assert list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid_of(2))) == []
    msgs = list(s.configure_evaluate(3, ArrayRecord(), ConfigRecord(), grid_of(2)))
    assert len(msgs) == 2
    for m in msgs:
        assert m.content["handoff"]["x_tc"].numpy().shape == (cfg.num_eval_samples, 1, 8, 8)
        assert m.content["config"]["client-start-step"] == 10
    a, b = (m.content["handoff"]["x_tc"].numpy() for m in msgs)
    assert not np.allclose(a, b)  # each node gets its own draw, not one shared batch


def test_collafuse_same_seed_same_result_whatever_node_ids_and_reply_order(tiny_config):
    """Flower draws node ids at random per run and replies arrive in any order: neither may
    change what the server learns or which server half each partition gets."""
    rc = tiny_config(cut_ratio=0.5, server_steps=3, eval_every=1, num_server_rounds=1)
    uploads = {pid: np.random.default_rng(pid).standard_normal((4, 1, 8, 8)).astype(np.float32) * 0.5
               for pid in range(3)}
    runs = []
    for node_of_pid, reverse in (({0: 11, 1: 22, 2: 33}, False), ({0: 90, 1: 40, 2: 5}, True)):
        torch.manual_seed(0)
        cfg, s = _collafuse(rc)
        grid = FakeGrid(node_of_pid.values(), {nid: pid for pid, nid in node_of_pid.items()})
        by_node = {m.metadata.dst_node_id: m for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
        replies = [_train_replies(s, [by_node[nid]], [uploads[pid]])[0] for pid, nid in node_of_pid.items()]
        arrays, _ = s.aggregate_train(1, replies[::-1] if reverse else replies)
        pid_of = {nid: pid for pid, nid in node_of_pid.items()}
        x_by_pid = {pid_of[m.metadata.dst_node_id]: m.content["handoff"]["x_tc"].numpy()
                    for m in s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid)}
        runs.append((arrays.to_torch_state_dict(), x_by_pid))
    (w_a, x_a), (w_b, x_b) = runs
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)
    assert all(np.array_equal(x_a[p], x_b[p]) for p in range(3))


def test_collafuse_cut_one_asks_for_nothing_and_sends_nothing(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=1.0))
    (m,) = s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(1))
    assert m.content["config"]["uploads"] == 0
    (e,) = s.configure_evaluate(cfg.num_server_rounds, ArrayRecord(), ConfigRecord(), grid_of(1))
    assert "handoff" not in e.content.array_records
    assert e.content["config"]["client-start-step"] == cfg.diffusion_steps


def test_a_node_with_another_cut_is_not_admitted(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    with pytest.raises(NotAdmitted, match="own cut step is 10"):
        s.accept_hello(5, {"cut-step": 10})
    assert s.accept_hello(5, {"cut-step": 6}) is None


def _fedavg_replies(msgs, weights, examples):
    return [_reply(m, RecordDict({"arrays": ArrayRecord({"w": Array(w)}),
                                  "metrics": MetricRecord({"num-examples": n, "train-seconds": 2.0 * (i + 1)})}),
                   m.metadata.dst_node_id)
            for i, (m, w, n) in enumerate(zip(msgs, weights, examples))]


def _fedavg(tiny_config, n=2):
    s = from_config(parse_config(tiny_config(method="fedavg")), capacity=n)
    s.num_rounds = 2
    msgs = list(s.configure_train(1, ArrayRecord({"w": Array(np.zeros(3, np.float32))}), ConfigRecord(), grid_of(n)))
    return s, msgs


def test_fedavg_weights_by_examples(tiny_config):
    s, msgs = _fedavg(tiny_config)
    assert all("arrays" in m.content.array_records for m in msgs)
    replies = _fedavg_replies(msgs, [np.full(3, 1.0, np.float32), np.full(3, 2.0, np.float32)], [2, 3])
    arrays, metrics = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 1.6))  # (1*2 + 2*3) / 5
    assert metrics["num-examples"] == 5
    # timings: the example-weighted mean as for every metric, and the round's total beside it
    assert metrics["train-seconds"] == pytest.approx((2 * 2 + 4 * 3) / 5)
    assert metrics["train-seconds-total"] == pytest.approx(6.0)
    assert "num-examples-total" not in metrics


@pytest.mark.parametrize("bad_w, n, reason", [
    (np.array([0, np.nan, 0], np.float32), 3, "non-finite"),
    (np.array([0, 1e30, np.inf], np.float32), 3, "non-finite"),
    (np.zeros(4, np.float32), 3, "is float32(4,)"),
    (np.zeros(3, np.float64), 3, "is float64"),
    (np.zeros(3, np.float32), 0, "num-examples"),
])
def test_fedavg_refuses_bad_weights_and_averages_the_rest(tiny_config, bad_w, n, reason):
    """Naively FedAvg averages a NaN or 1e30 tensor in, broadcasts a wrong shape into the global
    model, or divides by a zero example count."""
    s, msgs = _fedavg(tiny_config, n=3)
    replies = _fedavg_replies(msgs, [np.full(3, 2.0, np.float32), bad_w, np.full(3, 4.0, np.float32)], [1, n, 1])
    arrays, _ = s.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(3, 3.0))
    assert sum(s.recorder.rejected.values()) == 1


def test_mean_of_metrics_drops_nan_with_its_weight(tiny_config):
    s, msgs = _fedavg(tiny_config, n=3)
    recs = [RecordDict({"metrics": MetricRecord({"num-examples": 1, "fid": v})}) for v in (2.0, float("nan"), 4.0)]
    out = s.mean_metrics([_reply(m, r, m.metadata.dst_node_id) for m, r in zip(msgs, recs)])
    assert out["fid"] == pytest.approx(3.0)  # not (2 + 0 + 4) / 3


def test_local_only_messages_carry_no_arrays(tiny_config):
    cfg = parse_config(tiny_config(method="local"))
    s = from_config(cfg)
    s.num_rounds = cfg.num_server_rounds
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    assert all(not m.content.array_records for m in msgs)
    ev = list(s.configure_evaluate(cfg.num_server_rounds, ArrayRecord(), ConfigRecord(), grid_of(2)))
    assert all(not m.content.array_records for m in ev)
    replies = [_reply(m, RecordDict({"metrics": MetricRecord({"num-examples": 3})}), m.metadata.dst_node_id)
               for m in msgs]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is None


def test_strategy_takes_plain_arguments_without_the_project_config():
    """A Flower user builds it from a model and numbers; no RunConfig involved."""
    model = build_denoiser(8, 1, "tiny")
    s = CollaFuse(ServerTrainer(model, server_steps=1), (1, 8, 8), diffusion_steps=50, cut_step=10,
                  uploads_per_round=4)
    assert s.t_c == 10 and s.registry.capacity is None
    with pytest.raises(ValueError, match="exactly one of"):
        CollaFuse(ServerTrainer(model), (1, 8, 8), diffusion_steps=50, cut_step=10, cut_ratio=0.2)


def test_a_silent_node_is_not_admitted_nor_asked_again_every_round(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=3)
    grid = FakeGrid([1, 2], claims={1: 0, 2: 1}, silent=[2])
    assert [m.metadata.dst_node_id for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)] == [1]
    s._addressed.clear()
    s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    assert grid.asked == [1, 2]  # one first-contact query each, not one per round
    assert "no answer" in s.registry.refused[2]


def test_when_every_connected_node_fails_first_contact_the_run_stops_at_once_saying_why(tiny_config):
    """Naively a node whose ClientApp raises at hello is asked again every second until
    connect_timeout (300 s), and the run then fails without the nodes' reason."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=2)
    s.connect_timeout = 60
    grid = FakeGrid([1, 2], broken=[1, 2])
    t0 = time.time()
    with pytest.raises(RoundFailed, match=r"all 2 connected node\(s\) were refused .*data_dir /x does not exist"):
        s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    assert time.time() - t0 < 5 and grid.asked == [1, 2]


def test_a_broken_node_is_refused_and_the_healthy_one_runs(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=2)
    grid = FakeGrid([1, 2], claims={1: 0}, broken=[2])
    assert [m.metadata.dst_node_id for m in s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)] == [1]
    assert "error: FileNotFoundError: data_dir /x" in s.registry.refused[2]


def test_once_a_node_was_admitted_its_return_is_waited_for_even_if_only_refused_nodes_remain(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3), clients=2)
    s.connect_timeout = 1.0
    grid = FakeGrid([1, 2], claims={1: 0}, broken=[2])
    s.configure_train(1, ArrayRecord(), ConfigRecord(), grid)
    grid.ids = [2]  # the admitted node is gone for now; only the refused one is connected
    with pytest.raises(RoundFailed, match="admitted client node"):  # the connect timeout, not "all refused"
        s.configure_train(2, ArrayRecord(), ConfigRecord(), grid)


def test_a_reply_that_breaks_a_check_is_rejected_not_fatal(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    replies = _train_replies(s, msgs, [_x(), _x()])
    replies[1].content["upload"]["x_tc"].data = b"not an array"  # undecodable bytes
    _, metrics = s.aggregate_train(1, replies)
    assert metrics["uploads-received"] == 5 and sum(s.recorder.rejected.values()) == 1


def test_a_node_that_allows_fewer_uploads_is_asked_for_fewer(tiny_config):
    """Naively every node is asked for the run's uploads-per-round: a default deployed node (64 a
    round) refuses every train message of a paper-preset run (512), and every round fails."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, uploads_per_round=8), clients=2)
    grid = grid_of(2)
    grid.extra = {1: {P.UPLOAD_BUDGET: 3}}
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    asked = {m.metadata.dst_node_id: m.content[P.CONFIG][P.UPLOADS_ASKED] for m in msgs}
    assert asked == {1: 3, 2: 8}
    assert s.uploads_for(0) == 3 and s.uploads_for(1) == 8  # and a reply over 3 fails the budget check


def test_a_deployment_lets_each_node_choose_a_noisier_cut(tiny_config):
    """A deployed node's floor is in its node_config, which the server cannot see: outside the
    simulation (no research harness) the strategy takes each node's declared cut."""
    from collafuse_flwr.server.build import build_strategy

    cfg = parse_config(tiny_config(cut_ratio=0.2))
    deployed, _ = build_strategy(cfg, 2, torch.device("cpu"), harness=False, simulation=False)
    simulated, _ = build_strategy(cfg, 2, torch.device("cpu"), harness=False, simulation=True)
    assert deployed.node_cuts and not simulated.node_cuts
    assert deployed.accept_hello(1, {P.CUT_STEP: 16}) is None
    with pytest.raises(NotAdmitted):
        simulated.accept_hello(1, {P.CUT_STEP: 16})


def test_a_users_own_check_raises_a_rejection_that_is_recorded_naming_the_client(tiny_config):
    class Strict(CollaFuse):
        def validate_reply(self, phase, client, msg):
            super().validate_reply(phase, client, msg)
            if phase == "train" and client == 1:
                raise ImplausibleUpload("my-check: client 1's uploads are too bright")

    cfg = parse_config(tiny_config(cut_ratio=0.3))
    trainer = ServerTrainer(shared_denoiser(8, 1, "tiny", "client", 3), server_steps=1, overlap=False)
    s = Strict(trainer, (1, 8, 8), diffusion_steps=cfg.diffusion_steps, beta_schedule=cfg.beta_schedule,
               cut_ratio=0.3)
    s.num_rounds = 1
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    _, metrics = s.aggregate_train(1, _train_replies(s, msgs, [_x(), _x(), _x()]))
    assert sorted(s.buffer) == [0, 2] and metrics["uploads-received"] == 10
    assert s.recorder.rejected == {"my-check": 1} and s.recorder.rejected_by_client == {1: {"my-check": 1}}
    assert issubclass(ImplausibleUpload, ReplyRejected) and ImplausibleUpload("my-check: x").kind == "my-check"


def _sampled(s, rounds, n=6):
    """The train messages' nodes of each round (no replies needed to see whom a round asks)."""
    grid, out = grid_of(n), []
    for rnd in rounds:
        out.append(tuple(m.metadata.dst_node_id for m in s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid)))
        s._addressed.clear()
    return out


def test_fraction_train_samples_that_share_of_the_nodes_each_round_reproducibly(tiny_config):
    rc = tiny_config(cut_ratio=0.3, fraction_train=0.5, seed=3)
    first, again = (_sampled(_collafuse(rc, clients=6)[1], range(1, 5)) for _ in range(2))
    assert all(len(nodes) == 3 for nodes in first) and len(set(first)) > 1  # 3 of 6, not the same 3
    assert again == first  # the same seed, the same subsets
    assert _sampled(_collafuse(rc, clients=6)[1], [3, 4]) == first[2:]  # a resumed run samples as the first did
    assert _sampled(_collafuse(tiny_config(cut_ratio=0.3, fraction_train=0.5, seed=4), clients=6)[1],
                    range(1, 5)) != first
    assert all(len(nodes) == 5 for nodes in _sampled(_collafuse(rc, clients=6, min_train_nodes=5)[1], range(1, 4)))
    assert _sampled(_collafuse(tiny_config(cut_ratio=0.3), clients=6)[1], [1, 2]) == [tuple(range(1, 7))] * 2
    from collafuse_flwr.config import ConfigError

    for key in ("fraction_train", "fraction_evaluate"):  # refused at start, naming the key
        with pytest.raises(ConfigError, match=key.replace("_", "-")):
            parse_config(tiny_config(**{key: 0.0}))


def test_a_sampled_in_process_run_asks_half_the_nodes_a_round_and_serves_only_them(tiny_config):
    from inprocess import InProcessGrid

    from collafuse_flwr import client_app as ca
    from collafuse_flwr.server.build import build_strategy

    rc = {**tiny_config(cut_ratio=0.5, num_server_rounds=3, local_steps=2, server_steps="auto", fraction_train=0.5,
                        fraction_evaluate=0.5, eval_every=2, seed=1), "count-flops": False}
    cfg = parse_config(rc)
    s, arrays = build_strategy(cfg, 6, torch.device("cpu"), harness=False)
    grid = InProcessGrid(ca.app, rc, 6)
    s.start(grid=grid, initial_arrays=arrays, num_rounds=3)
    asked: dict[tuple[int, str], list[int]] = {}
    for m in grid.sent:
        phase = m.metadata.message_type.split(".")[0]
        if phase in ("train", "evaluate"):
            asked.setdefault((m.content["config"]["server-round"], phase), []).append(m.metadata.dst_node_id)
    assert sorted(asked) == [(1, "train"), (2, "evaluate"), (2, "train"), (3, "evaluate"), (3, "train")]
    # the last evaluation reaches every client: it ends each node's run and gives every client's figures
    assert len(asked.pop((3, "evaluate"))) == 6
    assert all(len(nodes) == 3 for nodes in asked.values()) and asked[1, "train"] != asked[2, "train"]
    assert not s.recorder.failures and not s.recorder.rejected
    assert s.recorder.rounds[1].values["server-steps-owed"] == 2 * 3  # "auto": local-steps x the nodes it served
    served = {s.client_of(n) for n in asked[1, "train"] + asked[2, "train"] + asked[3, "train"]}
    assert set(s.buffer) == served
    # per client-round figures divide by the client-rounds that trained (3 a round), not 6 x rounds
    assert sum(v["train-replies"] for v in s.recorder.train_totals.values()) == 9


def test_centralized_pools_every_clients_data_whatever_fraction_train_says(tiny_config):
    """Naively its one collection round went to a sample: the pool (and the upper bound) held half
    the clients for good."""
    from inprocess import InProcessGrid

    from collafuse_flwr import client_app as ca
    from collafuse_flwr.server.build import build_strategy

    rc = {**tiny_config(method="centralized", num_server_rounds=2, fraction_train=0.5), "count-flops": False}
    s, arrays = build_strategy(parse_config(rc), 4, torch.device("cpu"), harness=False)
    grid = InProcessGrid(ca.app, rc, 4)
    s.start(grid=grid, initial_arrays=arrays, num_rounds=2)
    trained = [m.metadata.dst_node_id for m in grid.sent if m.metadata.message_type.startswith("train")]
    assert sorted(trained) == sorted(grid.node_ids) and set(s.trainer.buffer) == {0, 1, 2, 3}


def test_overlapped_steps_owed_with_nothing_to_train_on_take_none(tiny_config):
    """A fixed server-steps budget is owed even by a round whose uploads were all refused; with an
    empty buffer the overlapped steps take nothing (naively: KeyError, the run ended)."""
    model = build_denoiser(8, 1, "tiny")
    s = CollaFuse(ServerTrainer(model, server_steps=5, overlap=True), (1, 8, 8), diffusion_steps=20, cut_step=4)
    s.owed_steps = s.steps_for(0)
    s.while_nodes_train(2)
    assert s.owed_steps == 0 and s._overlap_metrics["server-steps"] == 0
