"""The ClientApp driven with real Flower messages: what leaves a node, and what stays."""

import itertools

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from inprocess import message_to_node

from collafuse_flwr.client_app import app
from collafuse_flwr.config import parse_config
from collafuse_flwr.core.models import build_denoiser
from collafuse_flwr.data.client_data import client_data
from collafuse_flwr.node.state import MODEL_KEY

NUM_NODES = 3
_RUN_IDS = itertools.count(1)  # each context is a new run: node state files are per run


def _context(rc, pid=0, **node_config):
    """A node that trusts the run-config and shares research measurements (as in the simulation);
    see test_privacy_attacks for the deployment default."""
    return Context(run_id=next(_RUN_IDS), node_id=100 + pid,
                   node_config={"partition-id": pid, "num-partitions": NUM_NODES, "trust-run-config": "true",
                                **node_config},
                   state=RecordDict(), run_config=rc)


def _message(content: RecordDict, mtype: str) -> Message:
    return message_to_node(content, mtype)


def _mt(rc, category="train"):
    """The routed message type of the run-config's method, e.g. "train.collafuse"."""
    return f"{category}.{parse_config(rc).method}"


def _train(rc, ctx, rnd=1, cut=None, uploads=None):
    cfg = parse_config(rc)
    t_c = cfg.cut_step if cut is None else cut
    uploads = cfg.uploads_per_round if uploads is None else uploads
    conf = ConfigRecord({"server-round": rnd, "cut-step": t_c, "uploads": uploads})
    return app(_message(RecordDict({"config": conf}), _mt(rc)), ctx)


def _all_arrays(msg: Message) -> dict[str, np.ndarray]:
    return {f"{rk}/{ak}": a.numpy() for rk, rec in msg.content.array_records.items() for ak, a in rec.items()}


def _min_rms_distance(arrays: np.ndarray, images: np.ndarray) -> float:
    a = arrays.reshape(arrays.shape[0], -1).astype(np.float64)
    b = images.reshape(images.shape[0], -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
    return float(np.sqrt(np.maximum(d2, 0).min() / a.shape[1]))


def _param_arrays(rc):
    cfg = parse_config(rc)
    return build_denoiser(cfg.image_size, 1, cfg.model_size).state_dict()


@pytest.mark.parametrize("cut_ratio", [0.3, 0.6])
def test_collafuse_reply_holds_no_training_image_and_no_weights(tiny_config, cut_ratio):
    rc = tiny_config(cut_ratio=cut_ratio)
    ctx = _context(rc)
    reply = _train(rc, ctx)
    arrays = _all_arrays(reply)
    assert list(arrays) == ["upload/x_tc"]
    x_tc = arrays["upload/x_tc"]
    assert x_tc.shape == (8, 1, 8, 8)  # the tiny config's uploads-per-round
    data = client_data(parse_config(rc), 0, NUM_NODES)
    # every uploaded image is far from every training image (RMS per pixel, images in [-1, 1])
    assert _min_rms_distance(x_tc, data.train.numpy()) > 0.1
    # and nothing shaped like, or equal to, a model weight
    params = _param_arrays(rc)
    assert not set(reply.content.array_records["upload"].keys()) & set(params)
    assert x_tc.size < sum(p.numel() for p in params.values()) / 10
    assert set(reply.content.metric_records["metrics"].keys()) >= {"num-examples", "train-loss"}


def test_cut_zero_uploads_raw_images_so_the_check_above_can_fail(tiny_config):
    """Negative control: at c = 0 the same distance check finds the training images."""
    rc = tiny_config(cut_ratio=0.0)
    reply = _train(rc, _context(rc))
    data = client_data(parse_config(rc), 0, NUM_NODES)
    assert _min_rms_distance(_all_arrays(reply)["upload/x_tc"], data.train.numpy()) < 1e-6


def test_private_model_stays_in_context_state_and_keeps_training(tiny_config):
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)
    _train(rc, ctx, rnd=1)
    first = {k: v.numpy().copy() for k, v in ctx.state.array_records[MODEL_KEY].items()}
    reply = _train(rc, ctx, rnd=2)
    second = ctx.state.array_records[MODEL_KEY]
    assert any(not np.allclose(first[k], second[k].numpy()) for k in first)  # it trained on
    sent = _all_arrays(reply)
    for w in second.values():  # and no reply array equals a private weight
        assert all(a.shape != w.numpy().shape or not np.allclose(a, w.numpy()) for a in sent.values())


def test_cut_one_uploads_nothing(tiny_config):
    rc = tiny_config(cut_ratio=1.0)
    cfg = parse_config(rc)
    reply = _train(rc, _context(rc), cut=cfg.diffusion_steps, uploads=0)
    assert _all_arrays(reply) == {}


def test_local_only_sends_no_arrays(tiny_config):
    rc = tiny_config(method="local")
    ctx = _context(rc)
    reply = _train(rc, ctx)
    assert _all_arrays(reply) == {}
    assert MODEL_KEY in ctx.state.array_records
    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-start-step": 20, "client-sampling-steps": 0})
    ev = app(_message(RecordDict({"config": conf}), _mt(rc, "evaluate")), ctx)
    arrays = _all_arrays(ev)
    assert list(arrays) == ["samples/images"]
    assert arrays["samples/images"].dtype == np.uint8 and arrays["samples/images"].shape == (4, 1, 8, 8)


def test_collafuse_evaluate_finishes_the_servers_images(tiny_config):
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)
    _train(rc, ctx)
    x_tc = torch.randn(4, 1, 8, 8).numpy()
    from flwr.app import Array, ArrayRecord

    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-start-step": 10, "client-sampling-steps": 0})
    ev = app(_message(RecordDict({"config": conf, "handoff": ArrayRecord({"x_tc": Array(x_tc)})}),
                      _mt(rc, "evaluate")), ctx)
    m = ev.content["metrics"]
    assert m["num-examples"] == 4 and "fid" in m and "kid" in m
    # client inference ran exactly t_c = 10 denoiser passes per image
    assert m["client-infer-flops-per-image"] > 0
    images = ev.content["samples"]["images"].numpy()
    assert images.shape == (4, 1, 8, 8) and images.dtype == np.uint8
    assert MODEL_KEY not in ev.content.array_records


def test_client_inference_flops_are_cut_share_of_fedavgs(tiny_config):
    """CollaFuse's client runs c*T denoiser passes per image, FedAvg's client all T: measured."""
    from flwr.app import Array, ArrayRecord

    from collafuse_flwr.core.models import shared_denoiser

    rc = tiny_config(cut_ratio=0.3, image_size=8)
    ctx = _context(rc)
    _train(rc, ctx)
    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-start-step": 6, "client-sampling-steps": 0})
    x_tc = ArrayRecord({"x_tc": Array(torch.randn(4, 1, 8, 8).numpy())})
    collafuse = app(_message(RecordDict({"config": conf, "handoff": x_tc}), _mt(rc, "evaluate")), ctx)

    rf = tiny_config(method="fedavg", image_size=8)
    cfg = parse_config(rf)
    glob = shared_denoiser(8, 1, cfg.model_size, cfg.conditioning, NUM_NODES)
    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-sampling-steps": 0, "num-clients": NUM_NODES})
    fedavg = app(_message(RecordDict({"config": conf, "arrays": ArrayRecord(glob.state_dict())}),
                          _mt(rf, "evaluate")), _context(rf))
    a = collafuse.content["metrics"]["client-infer-flops-per-image"]
    b = fedavg.content["metrics"]["client-infer-flops-per-image"]
    # same architecture family (FedAvg's has a class embedding, which costs no matmul FLOPs)
    assert a > 0 and a / b == pytest.approx(6 / 20, rel=1e-6)


def test_centralized_client_scores_exactly_the_images_the_server_generated(tiny_config):
    from flwr.app import Array, ArrayRecord

    rc = tiny_config(method="centralized")
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 8, 8), dtype=np.uint8)
    conf = ConfigRecord({"server-round": 2, "num-samples": 4})
    ev = app(_message(RecordDict({"config": conf, "generated": ArrayRecord({"images": Array(images)})}),
                      _mt(rc, "evaluate")), _context(rc))
    np.testing.assert_array_equal(ev.content["samples"]["images"].numpy(), images)


def test_private_model_initialisation_is_seeded_per_client(tiny_config):
    rc = tiny_config(cut_ratio=0.5)
    states = []
    for pid in (0, 0, 1):
        torch.manual_seed(pid + 123)  # whatever the process RNG holds must not matter
        ctx = _context(rc, pid)
        _train(rc, ctx)
        states.append(ctx.state.array_records[MODEL_KEY])
    key = next(iter(states[0].keys()))
    np.testing.assert_array_equal(states[0][key].numpy(), states[1][key].numpy())
    assert not np.array_equal(states[0][key].numpy(), states[2][key].numpy())


def test_torch_threads_pins_the_workers_thread_count(tiny_config):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    try:
        rc = tiny_config(cut_ratio=0.5, torch_threads=want)
        _train(rc, _context(rc))
        assert torch.get_num_threads() == want
        torch.set_num_threads(before)
        rc = tiny_config(cut_ratio=0.5, torch_threads=0)
        _train(rc, _context(rc))
        assert torch.get_num_threads() == before  # 0 leaves the process's setting alone
    finally:
        torch.set_num_threads(before)
