"""One client, one file or one evaluation reply never takes the federation down (issue 25).

Each attack is one a naive server falls for: a reply that is valid in every single field (a
CollaFuse upload of constant images just under the magnitude bound, a FedAvg claim of 1e12
examples, weights x100, samples of the wrong shape at evaluation), a crafted or truncated
checkpoint, or a client that dies. The tests show the defence acting on the hostile client,
naming it, and leaving the honest ones alone (honest uploads pass the statistical checks; an
honest FedAvg round averages bit-identically to Flower's FedAvg).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.app.error import Error
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from collafuse_flwr.server import checkpoint as ck
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.config import ConfigError, parse_config
from collafuse_flwr.core.dp import dp_upload, plan_uploads
from collafuse_flwr.harness.report import consistent_images, run_notes, run_status
from strategies import RoundFailed
from collafuse_flwr.server.build import from_config
from strategies import isolation
from strategies.base import DiffusionStrategy
from strategies.collafuse import UPLOAD_Z
from strategies.recorder import EvalResult, Recorder
from strategies.robust import UploadCheck, balanced_batches, cap_claims
from test_strategies import FakeGrid, _collafuse, _reply, _train_replies, grid_of


@pytest.fixture(autouse=True)
def _identity():
    """Message() stamps the run/task identity a SuperLink process would set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


# -- CollaFuse: an upload that passes every per-value check but is no x_tc -------------------------------
def _constant_at_bound(s, client, n=5):
    return np.full((n, 1, 8, 8), 0.999 * s.upload_bound(client), np.float32)


def _honest_upload(s, client, n=8, seed=0):
    """What a node sends: real digits (in [-1, 1]) diffused to its cut with fresh noise."""
    g = torch.Generator().manual_seed(seed)
    x0 = _digits(n, seed)
    return D.upload(s.sched, x0, s.cut_for(client), torch.randn(x0.shape, generator=g)).float().numpy()


def _digits(n: int, seed: int = 0) -> torch.Tensor:
    """n real 8x8 digits scaled to [-1, 1] (sklearn's, as the `digits` dataset)."""
    from sklearn.datasets import load_digits

    imgs = load_digits().images.astype(np.float32) / 16.0 * 2 - 1  # 1797 x 8 x 8 in [-1, 1]
    idx = np.random.default_rng(seed).choice(len(imgs), size=n, replace=n > len(imgs))
    return torch.from_numpy(imgs[idx][:, None])


def test_a_constant_upload_just_under_the_bound_is_refused_naming_the_client(tiny_config):
    """Naively (range check only) client 1's constant images at 0.999 x the bound join the
    buffer and train the shared model, and the run says "ok" with 0 rejections."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    poison = _constant_at_bound(s, 1)
    assert float(np.abs(poison).max()) < s.upload_bound(1)  # passes the magnitude check
    replies = _train_replies(s, msgs, [_honest_upload(s, 0, seed=1), poison, _honest_upload(s, 2, seed=2)])
    _, metrics = s.aggregate_train(1, replies)
    assert sorted(s.buffer) == [0, 2] and metrics["uploads-received"] == 16
    assert dict(s.recorder.rejected_by_client) == {1: {"upload statistics": 1}}
    status, reasons = run_status(s.recorder, 3, {}, False, [0, 1, 2])
    assert status == "degraded" and any(r.startswith("client 1:") for r in reasons)


@pytest.mark.parametrize("attack", ["constant", "low-noise", "smooth-large", "checkerboard-large", "offset"])
def test_uploads_that_cannot_be_x_tc_fail_the_statistics(attack):
    """Each fails at least one statistic, though all stay within the magnitude bound."""
    sched = D.make_schedule(200, "cosine")
    t_c = 40
    ab = float(sched.alpha_bars[t_c])
    check = UploadCheck(ab, (1, 8, 8))
    bound = D.anchor_bound(sched, t_c, UPLOAD_Z)
    rng = np.random.default_rng(0)
    s = math.sqrt(1 - ab)
    yy, xx = np.mgrid[0:8, 0:8]
    x = {"constant": np.full((4, 1, 8, 8), 0.9 * bound),
         "low-noise": math.sqrt(ab) * 0.5 + 0.1 * s * rng.standard_normal((4, 1, 8, 8)),
         "smooth-large": np.broadcast_to(np.sin(xx / 3.0) * 0.8 * bound, (4, 1, 8, 8)),
         "checkerboard-large": np.broadcast_to(((xx + yy) % 2 * 2 - 1) * 0.8 * bound, (4, 1, 8, 8)),
         "offset": math.sqrt(ab) + 0.6 + s * rng.standard_normal((4, 1, 8, 8))}[attack].astype(np.float32)
    assert float(np.abs(x).max()) <= bound
    assert "upload statistics" in check(x)


def test_honest_uploads_pass_the_statistics_at_every_cut_and_with_dp():
    """False positives: 20 000+ honest images - real digits and the extreme data an image in
    [-1, 1] can hold (all black, all white, a +-1 checkerboard) - at cuts across the chain, raw
    (t_c = 0) and DP-clipped, none refused (each statistic's tail is 1e-12 per image)."""
    sched = D.make_schedule(200, "cosine")
    g = torch.Generator().manual_seed(0)
    yy, xx = np.mgrid[0:8, 0:8]
    extremes = torch.from_numpy(np.stack([np.full((8, 8), -1.0), np.full((8, 8), 1.0),
                                          ((xx + yy) % 2 * 2 - 1.0)])[:, None].astype(np.float32))
    x0 = torch.cat([_digits(1000), extremes.repeat(100, 1, 1, 1)])
    checked = 0
    for t_c in (0, 1, 5, 20, 40, 100, 160, 199):
        check = UploadCheck(float(sched.alpha_bars[t_c]), (1, 8, 8))
        for _ in range(2):
            x = D.upload(sched, x0, t_c, torch.randn(x0.shape, generator=g)).float().numpy()
            assert check(x) == "", (t_c, check(x))
            checked += len(x)
    plan = plan_uploads(sched, 20, 50.0, max_uploads_per_image=2, image_dim=64, clip=4.0)
    assert plan.t_upload > 20  # DP moved the cut and clips the images
    check = UploadCheck(float(sched.alpha_bars[plan.t_upload]), (1, 8, 8))
    x = dp_upload(x0, sched, plan, g).numpy()
    assert check(x) == ""
    assert checked + len(x) > 20_000


def test_no_client_gets_more_than_its_share_of_server_steps():
    """Client 0 holds 40 rows, clients 1 and 2 hold 4 each: naively 83 % of every minibatch
    is client 0's. Balanced, each gets a third of the rows, and every row of client 0 is seen."""
    labels = torch.tensor([0] * 40 + [1] * 4 + [2] * 4)
    batches = balanced_batches(labels, 12, 30, torch.Generator().manual_seed(0))
    rows = torch.cat(batches)
    share = torch.bincount(labels[rows], minlength=3).float() / rows.numel()
    assert torch.allclose(share, torch.full((3,), 1 / 3))
    assert set(rows[labels[rows] == 0].tolist()) == set(range(40))
    # equal holdings: None, so the plain sampler (and an honest run) is unchanged
    assert balanced_batches(torch.tensor([0, 0, 1, 1]), 2, 5, torch.Generator()) is None


def test_collafuse_trains_on_equal_shares_when_one_client_holds_more(tiny_config, monkeypatch):
    import strategies.trainer as cf

    seen = {}

    def spy(*args, **kw):
        seen["batches"], seen["labels"] = kw.get("batches"), kw["labels"]
        return 1.0

    monkeypatch.setattr(cf, "train_steps", spy)
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=20, uploads_per_round=8, batch_size=6))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    s.aggregate_train(1, _train_replies(s, msgs, [_honest_upload(s, c, n=n, seed=c) for c, n in enumerate((8, 2, 2))]))
    rows = torch.cat(seen["batches"])
    counts = torch.bincount(seen["labels"][rows], minlength=3)
    assert counts.tolist() == [40, 40, 40]
    # equal uploads: the plain sampler (bit-identical to a run without the defence)
    msgs = list(s.configure_train(2, ArrayRecord(), ConfigRecord(), grid_of(3)))
    s.buffer.clear()
    s.aggregate_train(2, _train_replies(s, msgs, [_honest_upload(s, c, n=4, seed=c) for c in range(3)]))
    assert seen["batches"] is None


def test_the_server_loss_on_each_clients_upload_is_reported(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    s.aggregate_train(1, _train_replies(s, msgs, [_honest_upload(s, 0), _honest_upload(s, 1, seed=3)]))
    for c in (0, 1):
        st = s.recorder.client_stats[c]
        assert st["server-loss"] > 0 and 0.5 < st["upload-texture-ratio"] and "upload-mean" in st


# -- FedAvg: claims, update sizes, aggregation rules, blame ----------------------------------------------
def _fedavg(tiny_config, n=5, agg="mean", declared=None):
    s = from_config(parse_config(tiny_config(method="fedavg", fedavg_aggregation=agg)), capacity=n)
    s.num_rounds = 3
    grid = grid_of(n)
    if declared:  # what each node says about its size at first contact
        real = grid.send_and_receive

        def hello(messages, timeout=None):
            out = real(messages, timeout=timeout)
            for r in out:
                if r.metadata.src_node_id in declared:
                    r.content["metrics"]["num-examples"] = declared[r.metadata.src_node_id]
            return out

        grid.send_and_receive = hello
    glob = ArrayRecord({"w": Array(np.zeros(4, np.float32))})
    return s, grid, list(s.configure_train(1, glob, ConfigRecord(), grid))


def _fa_replies(msgs, weights, examples):
    return [_reply(m, RecordDict({"arrays": ArrayRecord({"w": Array(np.asarray(w, np.float32))}),
                                  "metrics": MetricRecord({"num-examples": n})}), m.metadata.dst_node_id)
            for m, w, n in zip(msgs, weights, examples)]


@pytest.mark.parametrize("declared_too", [False, True])
def test_a_claim_of_1e12_examples_does_not_take_the_average_over(tiny_config, declared_too):
    """Naively client 4's weight is 1e12 / (1e12 + 40) and the global model becomes its own."""
    s, grid, msgs = _fedavg(tiny_config, declared={5: 1e12} if declared_too else None)
    w = [np.full(4, 1.0)] * 4 + [np.full(4, 2.0)]
    arrays, metrics = s.aggregate_train(1, _fa_replies(msgs, w, [10, 10, 10, 10, 1e12]))
    got = float(arrays["w"].numpy()[0])
    counted = 10 if not declared_too else 20  # its hello said 10, else 2 x the others' median
    assert got == pytest.approx((4 * 10 * 1.0 + counted * 2.0) / (40 + counted))
    assert metrics["num-examples"] == 40 + counted
    kinds = s.recorder.flagged()
    assert kinds == {4: ["claim-capped"]}  # serious either way: a lie, or 5e10 x over the cap
    assert "client 4" in run_status(s.recorder, 5, {}, False)[1][-1]


def test_honest_size_differences_are_kept_and_only_noted(tiny_config):
    claims = {0: 100.0, 1: 120.0, 2: 150.0, 3: 90.0, 4: 300.0}
    capped = cap_claims(claims, {c: v for c, v in claims.items()})
    assert capped == {**claims, 4: 2 * 110.0}  # 4 holds 2.7x the median of the others: 2x counts
    s, grid, msgs = _fedavg(tiny_config, declared={c + 1: v for c, v in claims.items()})
    s.aggregate_train(1, _fa_replies(msgs, [np.ones(4)] * 5, [100, 120, 150, 90, 300]))
    assert s.recorder.flagged() == {} and "client 4: claim-capped" in run_notes(s.recorder, {})[0]


def test_honest_rounds_average_bit_identically_to_flowers_fedavg(tiny_config):
    sizes = [10, 12, 9, 11, 10]
    s, grid, msgs = _fedavg(tiny_config, declared={c + 1: v for c, v in enumerate(sizes)})
    rng = np.random.default_rng(0)
    w = [rng.standard_normal(4).astype(np.float32) for _ in range(5)]
    replies = _fa_replies(msgs, w, sizes)
    ref = aggregate_arrayrecords([r.content for r in replies], "num-examples")
    arrays, _ = s.aggregate_train(1, replies)
    assert np.array_equal(arrays["w"].numpy(), ref["w"].numpy()) and not s.recorder.flags


def test_weights_x100_are_clipped_and_the_global_model_stays_sane(tiny_config):
    """Naively the global model becomes (4 x honest + 100 x w) / 5: its training loss went to
    1.7e4 and the next round every client's reply was non-finite."""
    s, grid, msgs = _fedavg(tiny_config)
    honest = [np.full(4, 0.1) + 0.01 * i for i in range(4)]
    arrays, _ = s.aggregate_train(1, _fa_replies(msgs, honest + [np.full(4, 0.1) * 100], [10] * 5))
    got = arrays["w"].numpy()
    # client 4's update is scaled to 3 x the others' median norm (0.69 of its 20): it adds
    # 0.345 / 5 per coordinate to the average (0.16), instead of 10 / 5
    assert float(got.max()) < 0.2
    assert s.recorder.flagged() == {4: ["update-clipped"]}



@pytest.mark.parametrize("attack, hostile, claims, w", [
    ("tiny-claim", 0.4, [100, 1e-9], (2 * 0.5 + 0.4) / 3),  # the honest client counted as 2x the other
    ("huge-claim", 0.4, [100, 1e12], (0.5 + 2 * 0.4) / 3),  # the hostile one counted as 2x the honest
    ("tiny-update", 1e-7, [100, 100], (3e-7 + 1e-7) / 2),  # the honest update clipped to 3x the other's
    ("huge-update", 1e6, [100, 100], (0.5 + 1.5) / 2)])  # the hostile update clipped to 3x the honest's
def test_with_two_clients_neither_takes_the_average_over_and_the_honest_is_not_blamed(
        tiny_config, attack, hostile, claims, w):
    """Two clients: "the median of the others" is the other one, perhaps the hostile one. Naively its
    claim of 1e-9 examples, or an update of norm 2e-7, flagged the honest client and the run was
    "degraded" naming it. Both are still bounded by each other (an unbounded 1e12 claim or a 1e6 update
    would take the model over), but one other client is no yardstick to blame by; a claim over a
    client's own first-contact declaration is still flagged."""
    s, grid, msgs = _fedavg(tiny_config, n=2, declared={1: 100, 2: 1e12 if attack == "huge-claim" else 100})
    arrays, _ = s.aggregate_train(1, _fa_replies(msgs, [np.full(4, 0.5), np.full(4, hostile)], claims))
    np.testing.assert_allclose(arrays["w"].numpy(), np.full(4, w), rtol=1e-5)
    assert s.recorder.flagged() == {} and run_status(s.recorder, 2, {}, False, [0, 1])[0] == "ok"
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid))
    honest = np.full(4, 0.5)
    s.aggregate_train(2, _fa_replies(msgs, [honest, honest], [1e6, 100]))  # over client 0's declaration of 100
    assert s.recorder.flagged() == {0: ["claim-capped"]}


@pytest.mark.parametrize("agg", ["median", "trimmed-mean"])
def test_flowers_robust_aggregations_are_selectable(tiny_config, agg):
    s, grid, msgs = _fedavg(tiny_config, agg=agg)
    w = [np.array([1, 2, 3, 4.0]), np.array([2, 2, 2, 2.0]), np.array([3, 1, 0, 5.0]), np.array([0, 9, 1, 1.0]),
         np.array([4, 4, 4, 4.0])]
    arrays, _ = s.aggregate_train(1, _fa_replies(msgs, w, [10] * 5))
    stack = np.stack(w).astype(np.float32)
    ref = np.median(stack, axis=0) if agg == "median" else trim_mean(stack, 0.2)
    np.testing.assert_allclose(arrays["w"].numpy(), ref, rtol=1e-6)
    assert s.aggregation == agg


def test_a_bad_aggregation_name_is_one_clear_config_error(tiny_config):
    with pytest.raises(ConfigError, match=r"fedavg-aggregation='avg' is not one of \['mean', 'median', 'trimmed-mean'\]"):
        parse_config(tiny_config(method="fedavg", fedavg_aggregation="avg"))


def test_when_most_clients_diverge_the_culprit_is_named_not_them(tiny_config):
    """Round 1: client 4 sends weights x1e6 (clipped, flagged). Round 2: four clients return
    non-finite weights (the model they were sent blew up): they are not blamed; the failure names
    client 4. Naively each of them is "rejected" as a culprit and client 4 is not mentioned."""
    s, grid, msgs = _fedavg(tiny_config, n=5)
    s.min_available_fraction = 0.5
    s.aggregate_train(1, _fa_replies(msgs, [np.full(4, 0.1)] * 4 + [np.full(4, 1e5)], [10] * 5))
    msgs = list(s.configure_train(2, ArrayRecord({"w": Array(np.zeros(4, np.float32))}), ConfigRecord(), grid))
    nan = np.full(4, np.nan)
    with pytest.raises(RoundFailed, match=r"likely cause: client 4 \(update-clipped\)"):
        s.aggregate_train(2, _fa_replies(msgs, [nan, nan, nan, nan, np.full(4, 0.1)], [10] * 5))
    assert dict(s.recorder.rejected_by_client) == {}
    assert "clients [0, 1, 2, 3]" in s.recorder.incidents[0][1]
    status, reasons = run_status(s.recorder, 5, {}, False)
    assert not any(r.startswith(("client 0", "client 1", "client 2", "client 3")) for r in reasons)


# -- evaluation replies ------------------------------------------------------------------------------------
def _eval_reply(m, images=None, **metrics):
    rd = RecordDict({"metrics": MetricRecord({"num-examples": 4, "fid": 3.0, **metrics})})
    if images is not None:
        rd["samples"] = ArrayRecord({"images": Array(images)})
    return _reply(m, rd, m.metadata.dst_node_id)


BAD_SAMPLES = {
    "wrong-shape": lambda: np.zeros((4, 1, 9, 9), np.uint8),
    "float": lambda: np.zeros((4, 1, 8, 8), np.float32),
    "too-many": lambda: np.zeros((400, 1, 8, 8), np.uint8),
    "flat": lambda: np.zeros((4, 64), np.uint8),
}


@pytest.mark.parametrize("bad", sorted(BAD_SAMPLES))
def test_a_bad_evaluation_reply_is_refused_and_the_others_kept(tiny_config, bad):
    """Naively such an array is kept and crashes the report (np.concatenate) after training."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, num_server_rounds=1))
    msgs = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    good = np.zeros((4, 1, 8, 8), np.uint8)
    images = BAD_SAMPLES[bad]()
    n = images.shape[0] if images.ndim else 4
    s.aggregate_evaluate(1, [_eval_reply(msgs[0], good), _eval_reply(msgs[1], images, **{"num-examples": min(n, 4)}),
                             _eval_reply(msgs[2], good)])
    assert sorted(s.recorder.evals[1].images) == [0, 2]
    assert list(s.recorder.rejected_by_client) == [1]


def test_evaluation_metrics_must_fit_the_request(tiny_config):
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, num_server_rounds=1, min_available_fraction=0.25), clients=4)
    msgs = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid_of(4)))
    good = np.zeros((4, 1, 8, 8), np.uint8)
    s.aggregate_evaluate(1, [_eval_reply(msgs[0], good), _eval_reply(msgs[1], good, **{"num-examples": 3}),
                             _eval_reply(msgs[2], good, **{"cut-step": 2}),
                             _eval_reply(msgs[3], None, **{"fid-skipped": 7})])
    assert sorted(s.recorder.evals[1].metrics) == [0]
    assert sorted(s.recorder.rejected_by_client) == [1, 2, 3]



# -- values Flower's records allow but no honest node sends ---------------------------------------------------
@pytest.mark.parametrize("key", ["partition-id", "image-channels", "cut-step", "num-examples"])
def test_a_list_where_a_hello_number_belongs_refuses_that_node_only(tiny_config, key):
    """Flower's MetricRecord also carries lists of numbers. Naively a hello saying partition-id=[0.0, 1.0]
    (or image-channels, cut-step) crashed the ServerApp at first contact (float(list), int(list)), and
    num-examples=[...] crashed it when the first round's claims were weighed."""
    _, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    grid = grid_of(3)
    grid.extra[3] = {key: [0.0, 1.0]}
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(s.registry.index) == [1, 2]
    assert f"'{key}' is [0.0, 1.0] (list), expected one number" in s.registry.refused[3]
    _, metrics = s.aggregate_train(1, _train_replies(s, msgs, [_honest_upload(s, c, seed=c) for c in range(2)]))
    assert sorted(s.buffer) == [0, 1] and metrics["num-examples"] == 20


@pytest.mark.parametrize("phase", ["train", "evaluate"])
def test_a_list_valued_metric_rejects_that_reply_only(tiny_config, phase):
    """Naively num-examples=[10.0, 10.0] in a train reply crashed the ServerApp (the example weights of
    the mean metrics), and fid or max-uploads-per-image lists in an evaluation reply were kept and
    crashed the report after the last round (its means, its max)."""
    _, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8, num_server_rounds=1))
    if phase == "train":
        msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
        replies = _train_replies(s, msgs, [_honest_upload(s, c, seed=c) for c in range(3)])
        replies[1].content["metrics"]["num-examples"] = [10.0, 10.0]
        _, metrics = s.aggregate_train(1, replies)
        assert sorted(s.buffer) == [0, 2] and metrics["num-examples"] == 20
    else:
        msgs = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
        good = np.zeros((4, 1, 8, 8), np.uint8)
        s.aggregate_evaluate(1, [_eval_reply(msgs[0], good),
                                 _eval_reply(msgs[1], good, fid=[1.0, 2.0], **{"max-uploads-per-image": [1, 2]}),
                                 _eval_reply(msgs[2], good)])
        assert sorted(s.recorder.evals[1].metrics) == [0, 2]
    assert dict(s.recorder.rejected_by_client) == {1: {"metrics": 1}}


def _lying(declared_shape: tuple[int, ...], declared_dtype: str, payload: np.ndarray) -> Array:
    """An Array whose fields (what the checks read) say one thing and whose npy bytes (what Flower's
    `Array.numpy()` returns, never comparing) say another."""
    buf = io.BytesIO()
    np.save(buf, payload, allow_pickle=False)
    return Array(dtype=declared_dtype, shape=tuple(declared_shape), stype="numpy.ndarray", data=buf.getvalue())


@pytest.mark.parametrize("attack", ["larger-images", "over-budget"])
def test_an_upload_whose_bytes_are_not_what_it_declares_is_refused(tiny_config, attack):
    """Client 2 declares 8 x (1, 8, 8) float32. Naively its bytes were used as they were: 8 honest-looking
    16 x 16 x_tc crashed the server's training (torch.cat in the buffer), 4000 x_tc (budget 8) went
    into the buffer past the upload budget."""
    _, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    replies = _train_replies(s, msgs, [_honest_upload(s, c, seed=c) for c in range(3)])
    if attack == "larger-images":
        x0 = torch.rand((8, 1, 16, 16), generator=torch.Generator().manual_seed(5)) * 2 - 1
        payload = D.upload(s.sched, x0, s.cut_for(2), torch.randn(x0.shape)).float().numpy()
    else:
        payload = _honest_upload(s, 2, n=4000, seed=9)
    replies[2].content["upload"] = ArrayRecord({"x_tc": _lying((8, 1, 8, 8), "float32", payload)})
    _, metrics = s.aggregate_train(1, replies)
    assert sorted(s.buffer) == [0, 1] and metrics["uploads-received"] == 16
    assert dict(s.recorder.rejected_by_client) == {2: {"array payload": 1}}


@pytest.mark.parametrize("attack", ["float64-bytes", "larger-bytes"])
def test_fedavg_weights_whose_bytes_are_not_what_they_declare_are_refused(tiny_config, attack):
    """Client 0 declares float32 (4,). Naively float64 bytes made the global model float64, so the next
    round every honest client's float32 reply "differed from the global model": all five rejected, the
    round failed. (4, 4) bytes became the global model's shape (sent first) or crashed the average
    (aggregate_arrayrecords, sent later)."""
    s, grid, msgs = _fedavg(tiny_config, n=5)
    honest = [np.full(4, 0.1) + 0.01 * i for i in range(5)]
    replies = _fa_replies(msgs, honest, [10] * 5)
    payload = np.full(4, 0.1, np.float64) if attack == "float64-bytes" else np.full((4, 4), 0.1, np.float32)
    replies[0].content["arrays"] = ArrayRecord({"w": _lying((4,), "float32", payload)})
    arrays, _ = s.aggregate_train(1, replies)
    w = arrays["w"].numpy()
    assert (w.dtype, w.shape, arrays["w"].dtype) == (np.float32, (4,), "float32")
    assert dict(s.recorder.rejected_by_client) == {0: {"array payload": 1}}
    msgs = list(s.configure_train(2, arrays, ConfigRecord(), grid))
    s.aggregate_train(2, _fa_replies(msgs, honest, [10] * 5))  # everyone honest: everyone accepted
    assert dict(s.recorder.rejected_by_client) == {0: {"array payload": 1}}


def test_evaluation_samples_whose_bytes_are_not_what_they_declare_are_refused(tiny_config):
    """Naively 9 x 9 bytes declared (4, 1, 8, 8) uint8 passed the samples check and were kept for the
    report (which then left them out and called the run degraded, without blaming the client)."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, num_server_rounds=1))
    msgs = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid_of(3)))
    good = np.zeros((4, 1, 8, 8), np.uint8)
    replies = [_eval_reply(m, good) for m in msgs]
    replies[1].content["samples"] = ArrayRecord({"images": _lying((4, 1, 8, 8), "uint8",
                                                                  np.zeros((4, 1, 9, 9), np.uint8))})
    s.aggregate_evaluate(1, replies)
    assert sorted(s.recorder.evals[1].images) == [0, 2]
    assert dict(s.recorder.rejected_by_client) == {1: {"array payload": 1}}


def test_an_empty_upload_is_no_upload_not_a_crash(tiny_config):
    """Round 2: client 2 uploads a well-formed (0, 1, 8, 8) x_tc. Naively it passed validation and
    crashed the ServerApp summarising it (UploadCheck.summary reshapes 0 rows). An own ClientApp built on
    `collafuse_flwr.node.make_upload` sends one when asked for 0 images or all its images reached their
    cap, so it is not blamed either: it adds nothing to the buffer, earns no server steps."""
    _, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    grid = grid_of(3)
    for rnd in (1, 2):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        ups = [_honest_upload(s, c, seed=10 * rnd + c) for c in range(3)]
        if rnd == 2:
            ups[2] = np.zeros((0, 1, 8, 8), np.float32)
        _, metrics = s.aggregate_train(rnd, _train_replies(s, msgs, ups))
    assert metrics["uploads-received"] == 16 and metrics["server-buffer-size"] == 5 * 8
    assert [sum(len(t) for t in s.buffer[c]) for c in range(3)] == [16, 16, 8]
    assert not s.recorder.rejected_by_client and not s.recorder.flagged()

def test_report_survives_one_clients_unstackable_samples():
    images = {0: np.zeros((4, 1, 8, 8), np.uint8), 1: np.zeros((4, 1, 9, 9), np.uint8),
              2: np.zeros((2, 1, 8, 8), np.uint8), 3: np.zeros((4, 1, 8, 8), np.float32)}
    kept, dropped = consistent_images(images)
    assert sorted(kept) == [0, 2] and dropped == [1, 3]


def test_a_skipped_fid_is_a_note_not_a_degradation():
    """100 clients: one holds a single test image; its node says fid-skipped. Naively (its FID
    raising) the run ended "degraded"; now it is "ok" with a note naming the client."""
    rec = Recorder()
    per_client = {c: {"fid": 4.0, "checksum": 100.0} for c in range(100)}
    per_client[57] = {"fid-skipped": 1, "checksum": 100.0}
    status, reasons = run_status(rec, 100, per_client, True)
    assert status == "ok" and reasons == []
    assert run_notes(rec, per_client) == ["FID skipped for clients [57]: too few held-out test images for a "
                                          "Frechet distance; the mean FID is over the others"]


def _shape_attack_app(msg, ctx):
    """The real ClientApp, except that partition 1's evaluation samples have the wrong shape."""
    from collafuse_flwr.client_app import app

    reply = app(msg, ctx)
    if (msg.metadata.message_type.startswith("evaluate") and ctx.node_config["partition-id"] == 1
            and not reply.has_error()):
        reply.content["samples"] = ArrayRecord({"images": Array(np.zeros((4, 1, 9, 9), np.uint8))})
    return reply


def test_one_bad_evaluation_reply_never_costs_the_run_its_results(tiny_config, tmp_path, monkeypatch):
    """The real ServerApp with three real nodes, one returning 9x9 samples for 8x8 images.
    Naively finalize crashed after training (results lost, resume refused). Now the run ends
    "degraded" naming client 1, with everyone else's results written. Then: a run whose report
    broke after its last round is resumed by writing the report from its checkpoint."""
    from collafuse_flwr import server_app
    from inprocess import InProcessGrid

    out = tmp_path / "out"
    out.mkdir()
    rc = {**tiny_config(cut_ratio=0.5, num_server_rounds=1), "output-dir": str(out)}
    ctx = Context(run_id=3, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc))
    server_app.main(InProcessGrid(_shape_attack_app, rc, 3), ctx)
    (run,) = out.iterdir()
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "degraded" and sorted(res["final"]["fid_per_client"]) == ["0", "2"]
    assert res["final"]["rejected_replies_by_client"] == {"1": {"samples": 1}}
    assert any(r.startswith("client 1:") for r in res["status_reasons"])
    assert np.load(run / "samples.npz")["images"].shape[0] == 2 * 4

    # the report breaks after the last round: status failed, results not written ...
    out2 = tmp_path / "out2"
    out2.mkdir()
    rc2 = {**rc, "output-dir": str(out2)}
    with monkeypatch.context() as mp:
        mp.setattr(server_app, "finalize", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError):
            server_app.main(InProcessGrid(_shape_attack_app, rc2, 3),
                            Context(run_id=4, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc2)))
    (run2,) = out2.iterdir()
    assert json.loads((run2 / "results.json").read_text())["status"] == "failed"
    # ... and resuming writes them from the checkpoint without running a round
    rc3 = {**rc2, "resume-from": str(run2)}
    grid = InProcessGrid(_shape_attack_app, rc3, 3)
    server_app.main(grid, Context(run_id=5, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc3)))
    res2 = json.loads((run2 / "results.json").read_text())
    assert res2["status"] == "degraded" and sorted(res2["final"]["fid_per_client"]) == ["0", "2"]
    assert grid.sent == []  # no round ran again


# -- untrusted files ----------------------------------------------------------------------------------------
class _Crafted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_crafted_checkpoint_runs_no_code_and_says_so_in_one_line(tmp_path):
    """Naively torch.load(weights_only=False) calls whatever the pickle names: here Path.touch."""
    marker = tmp_path / "pwned"
    torch.save({"round": 1, "x": _Crafted(marker)}, tmp_path / ck.FILE)
    try:
        ck.load_checkpoint(tmp_path)
        err = None
    except Exception as exc:  # noqa: BLE001 - which error is asserted below, after the marker
        err = exc
    assert not marker.exists(), "loading the checkpoint ran code the file named"
    assert isinstance(err, ck.CheckpointError), err
    msg = str(err)
    assert "\n" not in msg and ck.FILE in msg and "resume from another run folder or start afresh" in msg
    assert "weights_only" not in msg  # never the advice to load it unsafely
    assert err.__cause__ is None and err.__suppress_context__


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not-a-checkpoint"])
def test_a_corrupt_checkpoint_is_one_line_naming_the_file(tmp_path, damage):
    path = tmp_path / ck.FILE
    if damage == "truncated":
        torch.save({"round": 1, "big": torch.zeros(10000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 10)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_checkpoint(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value) and ck.FILE in str(err.value)



@pytest.mark.parametrize("damage", ["no-registry", "foreign-recorder", "slots-not-a-number"])
def test_a_checkpoint_whose_strategy_state_is_not_ours_is_one_line_naming_the_file(tiny_config, tmp_path, damage):
    """torch.load(weights_only=True) reads the file and load_checkpoint accepts its keys, but the strategy
    part is not this project's. Naively the ServerApp failed with a bare KeyError ('registry', 'bytes')."""
    from collafuse_flwr import server_app
    from inprocess import InProcessGrid

    rc = {**tiny_config(cut_ratio=0.5, num_server_rounds=2), "output-dir": str(tmp_path)}
    cfg = parse_config(rc)
    registry = (3, {}, {}, {})
    strategy = {"no-registry": {},
                "foreign-recorder": {"registry": registry, "recorder": {}, "torch_rng": torch.zeros(3), "attrs": {}},
                "slots-not-a-number": {"registry": ("3", {}, {}, {})}}[damage]
    torch.save({"round": 1, "config": cfg.to_flwr(), "run_key": 7, "strategy": strategy, "arrays": None,
                "result": {"arrays": None, "train_metrics_clientapp": {}, "evaluate_metrics_clientapp": {},
                           "evaluate_metrics_serverapp": {}}}, tmp_path / ck.FILE)
    ck.load_checkpoint(tmp_path)  # accepted: the damage shows only when the state is used
    rc = {**rc, "resume-from": str(tmp_path)}
    grid = InProcessGrid(_shape_attack_app, rc, 3)
    with pytest.raises(ck.CheckpointError) as err:
        server_app.main(grid, Context(run_id=9, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc)))
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path) in msg and ck.FILE in msg and "start afresh" in msg
    assert err.value.__cause__ is None and grid.sent == []
    assert json.loads((tmp_path / "results.json").read_text())["status"] == "failed"

def test_checkpoints_hold_only_what_weights_only_loading_reads(tiny_config, tmp_path):
    """The recorder's numpy images, the last uploads, RNG states, buffers and flags round-trip."""
    from flwr.serverapp.strategy import Result

    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    s.aggregate_train(1, _train_replies(s, msgs, [_honest_upload(s, 0), _constant_at_bound(s, 1)]))
    s.recorder.evals[1] = EvalResult(1)
    s.recorder.evals[1].images[0] = np.arange(64, dtype=np.uint8).reshape(1, 1, 8, 8)
    s.recorder.flag(1, 1, "claim-capped", "x")
    ck.save_checkpoint(tmp_path, s, 1, ArrayRecord(s.model.state_dict()), Result(), cfg.to_flwr(), 7)
    torch.load(tmp_path / ck.FILE, weights_only=True)  # no unsafe global anywhere
    blob = ck.load_checkpoint(tmp_path)
    cfg2, s2 = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    s2.load_state_dict(blob["strategy"])
    np.testing.assert_array_equal(s2.recorder.evals[1].images[0], s.recorder.evals[1].images[0])
    np.testing.assert_array_equal(s2.last_upload[0], s.last_upload[0])
    assert s2.recorder.rejected_by_client == {1: {"upload statistics": 1}} and s2.recorder.flagged() == {1: ["claim-capped"]}
    assert torch.equal(s2.trainer.gen.get_state(), s.trainer.gen.get_state()) and blob["run_key"] == 7


# -- isolation: a dead simulation worker is infrastructure, not the node's answer -----------------------------
class _LosesAWorker(FakeGrid):
    """Node 2's first train message comes back as Ray's ActorDiedError (another node's ClientApp
    killed the actor it was given); asked again, it answers."""

    def __init__(self, always: bool = False):
        super().__init__([1, 2, 3], {1: 0, 2: 1, 3: 2})
        self.train_sent: list[int] = []
        self.always = always  # node 2's own ClientApp kills every worker it is given

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        if messages and messages[0].metadata.message_type == "query.hello":
            return super().send_and_receive(messages, timeout=timeout)
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            self.train_sent.append(nid)
            if nid == 2 and (self.always or self.train_sent.count(2) == 1):
                out.append(_reply(m, Error(code=0, reason="<class 'ray.exceptions.ActorDiedError'>:<'The actor "
                                                          "died unexpectedly before finishing this task.'>"), nid))
            else:
                out.append(_reply(m, RecordDict({"metrics": MetricRecord({"num-examples": 10})}), nid))
        return out

    def push_messages(self, messages):
        self._replies = {r.metadata.reply_to_message_id: r for r in self.send_and_receive(messages)}
        return list(self._replies)

    def pull_messages(self, ids):
        return [self._replies.pop(i) for i in list(ids) if i in self._replies]


def test_a_node_that_lost_its_simulation_worker_is_asked_again(tiny_config, monkeypatch):
    """Naively node 2 counts as failed (and, on Flower's engine, every node the dead actor is
    given next fails too: isolation.repair_dead_actors replaces it)."""
    s = from_config(parse_config(tiny_config(method="local")), capacity=3)
    grid = _LosesAWorker()
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    monkeypatch.setattr(isolation, "_installed", True)  # beside Flower's Ray workers
    replies = DiffusionStrategy.exchange(grid, msgs, timeout=5)
    assert grid.train_sent == [1, 2, 3, 2]
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == [1, 2, 3]


def test_a_deployed_node_cannot_fake_a_dead_worker(tiny_config):
    """Outside the simulation nothing dies under a node but the node: a node whose error reply
    quotes ActorDiedError (to get a second, blocking send) is not sent its message again."""
    s = from_config(parse_config(tiny_config(method="local")), capacity=3)
    grid = _LosesAWorker()
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    DiffusionStrategy.exchange(grid, msgs, timeout=5)
    assert grid.train_sent == [1, 2, 3]


def test_a_node_that_kills_every_worker_is_blamed_alone(tiny_config, monkeypatch):
    monkeypatch.setattr(isolation, "_installed", True)
    s = from_config(parse_config(tiny_config(method="local")), capacity=3)
    grid = _LosesAWorker(always=True)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    s.aggregate_train(1, DiffusionStrategy.exchange(grid, msgs, timeout=5))
    assert grid.train_sent == [1, 2, 3, 2]  # asked once more, not forever
    assert dict(s.recorder.failed_by_client) == {1: {"its simulation worker died (ActorDiedError)": 1}}
    assert any(r.startswith("client 1: 1 error reply") for r in run_status(s.recorder, 3, {}, False)[1])


def test_the_launcher_says_so_before_flower_starts(tmp_path):
    """collafuse-run checks resume-from's checkpoint with the run-config: one line, exit 2."""
    from collafuse_flwr.tools.precheck import RunConfigError, check_run_config

    (tmp_path / ck.FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RunConfigError, match=r"checkpoint\.pt cannot be read .* start afresh") as err:
        check_run_config(Path(__file__).resolve().parent.parent, f"resume-from='{tmp_path}'", 2)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("extra", ["bulk", "arrays"])
def test_a_valid_reply_carrying_a_record_nobody_asked_for_is_refused(tiny_config, extra):
    """Naively the extra record (here 16 MB; 200 MB works the same) rides along a valid upload:
    kept in memory, counted as the node's traffic, and its upload trains the shared model."""
    cfg, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=1, uploads_per_round=8))
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid_of(2)))
    replies = _train_replies(s, msgs, [_honest_upload(s, 0), _honest_upload(s, 1, seed=5)])
    replies[1].content[extra] = ArrayRecord({"x": Array(np.zeros((4, 1024, 1024), np.float32))})
    _, metrics = s.aggregate_train(1, replies)
    assert sorted(s.buffer) == [0] and metrics["uploads-received"] == 8
    assert dict(s.recorder.rejected_by_client) == {1: {"records": 1}}


def test_each_upload_goes_back_to_its_node_for_scoring_once(tiny_config):
    """Nodes score an upload's reconstructions once (asked again, they refuse: repeated scores are an
    oracle). Naively the server sent the last upload's harness in every evaluation until the next
    upload, so an honest node that uploaded nothing new was refused."""
    _, s = _collafuse(tiny_config(cut_ratio=0.3, server_steps=2, uploads_per_round=8))
    sent = []
    s.harness_payload, s.eval_every = lambda strategy, client, upload: sent.append(client) or ArrayRecord(), 1
    grid = grid_of(2)
    msgs = list(s.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    s.aggregate_train(1, _train_replies(s, msgs, [_honest_upload(s, 0), _honest_upload(s, 1)]))
    first = list(s.configure_evaluate(1, ArrayRecord(), ConfigRecord(), grid))
    second = list(s.configure_evaluate(2, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(sent) == [0, 1] and len(first) == len(second) == 2
    assert all("harness" in m.content.array_records for m in first)
    assert not any("harness" in m.content.array_records for m in second)
