"""Attacks an honest-but-curious or malicious server could mount with what it legitimately has
(the run-config, the messages, the code). Each test shows the attack works where the defence
is missing, then that it recovers nothing from the node as it is now."""

import itertools
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from collafuse_flwr import diffusion as D
from collafuse_flwr.client_app import app
from collafuse_flwr.client_data import client_data
from collafuse_flwr.config import parse_config
from inprocess import message_to_node
from collafuse_flwr.node import REFUSED

NUM_NODES = 3
_RUNS = itertools.count(int(time.time()) % 10**6)


def _context(rc, pid=0, **node_config):
    return Context(run_id=next(_RUNS), node_id=100 + pid,
                   node_config={"partition-id": pid, "num-partitions": NUM_NODES, **node_config},
                   state=RecordDict(), run_config=rc)


def _message(content: RecordDict, mtype=MessageType.TRAIN) -> Message:
    return message_to_node(content, mtype)


def _train(rc, ctx, rnd=1, **conf):
    cfg = parse_config(rc)
    c = {"server-round": rnd, "cut-step": cfg.cut_step, "uploads": cfg.uploads_per_round, "client-index": 0, **conf}
    return app(_message(RecordDict({"config": ConfigRecord(c)})), ctx)


def _replay_public_seed(cfg, pid, rnd, salt):
    """The seed formula of the node before this fix: run-config seed, partition, round, salt."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + pid * 10_007 + rnd * 101 + salt)


def _replay_attack(cfg, data, x_tc, t_c, gen):
    """Redo the node's draws (its minibatches, then the upload's indices and noise) and invert x_tc."""
    from collafuse_flwr.training import minibatch_indices

    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    for idx in minibatch_indices(data.train.shape[0], cfg.batch_size, cfg.local_steps, gen):
        x0 = data.train[idx]
        D.sample_timesteps(x0.shape[0], 1, t_c, gen)
        torch.randn(x0.shape, generator=gen)
    idx = torch.randperm(data.train.shape[0], generator=gen)[: x_tc.shape[0]]
    eps = torch.randn((x_tc.shape[0], *data.train.shape[1:]), generator=gen)
    ab = float(sched.alpha_bars[t_c])
    x0_hat = (torch.from_numpy(x_tc) - (1 - ab) ** 0.5 * eps) / ab**0.5
    return float((x0_hat - data.train[idx]).abs().max())


@pytest.mark.parametrize("c", [0.2, 0.5, 0.8])
def test_replaying_the_generator_recovers_nothing(tiny_config, c):
    rc = tiny_config(cut_ratio=c)
    cfg = parse_config(rc)
    data = client_data(cfg, 0, NUM_NODES)
    # the attack is right: against noise drawn from public inputs it recovers x0 exactly
    gen = _replay_public_seed(cfg, 0, 1, 0)
    from collafuse_flwr.training import client_share_loss, make_optimizer, train_steps
    from collafuse_flwr.client_app import init_private_denoiser

    model = init_private_denoiser(cfg, 0, 1, torch.device("cpu"))
    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    train_steps(model, make_optimizer(model, cfg.learning_rate), client_share_loss(model, sched, cfg.cut_step, gen),
                data.train, cfg.local_steps, cfg.batch_size, gen, torch.device("cpu"))
    idx = torch.randperm(data.train.shape[0], generator=gen)[: cfg.uploads_per_round]
    naive = D.upload(sched, data.train[idx], cfg.cut_step, torch.randn(data.train[idx].shape, generator=gen)).numpy()
    assert _replay_attack(cfg, data, naive, cfg.cut_step, _replay_public_seed(cfg, 0, 1, 0)) < 1e-4
    # against the node: its draws are keyed by its secret, so the replay is off by the data range
    x_tc = _train(rc, _context(rc)).content["upload"]["x_tc"].numpy()
    assert _replay_attack(cfg, data, x_tc, cfg.cut_step, _replay_public_seed(cfg, 0, 1, 0)) > 0.5


def test_same_seed_on_the_same_node_reproduces_its_uploads(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5)
    up = [_train(rc, _context(rc, **{"state-dir": str(d)})).content["upload"]["x_tc"].numpy()
          for d in (tmp_path / "a", tmp_path / "a", tmp_path / "b")]
    np.testing.assert_array_equal(up[0], up[1])  # same node secret, same seed
    assert not np.allclose(up[0], up[2])  # another node's secret


@pytest.mark.parametrize("conf, what", [({"cut-step": 0}, "cut step 0"), ({"uploads": 10**9}, "1000000000 uploads")])
def test_the_node_refuses_privacy_parameters_it_did_not_choose(tiny_config, conf, what):
    """Naively, cut-step=0 makes a c=0.5 node upload raw images; uploads=1e9 uploads everything."""
    rc = tiny_config(cut_ratio=0.5)
    reply = _train(rc, _context(rc), **conf)
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == REFUSED and what in reply.error.reason


def test_node_config_cut_ratio_overrides_the_run_config(tiny_config):
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc, **{"cut-ratio": 0.8})
    assert _train(rc, ctx).has_error()  # the server asks for t_c = 10, the node's is 16
    reply = _train(rc, ctx, **{"cut-step": 16})
    assert reply.content["upload"]["x_tc"].numpy().shape[0] == parse_config(rc).uploads_per_round


def _evaluate(rc, ctx, **records):
    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-start-step": 10, "client-sampling-steps": 0,
                         "client-index": 0})
    return app(_message(RecordDict({"config": conf, **records}), MessageType.EVALUATE), ctx)


def test_scores_are_no_reconstruction_oracle(tiny_config):
    """Naively the node scores any number of server-chosen arrays against its x0 by PSNR: ~1,000
    crafted arrays and the server solves for every uploaded image."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc, **{"share-harness": "true"})
    n_up = _train(rc, ctx).content["upload"]["x_tc"].numpy().shape[0]
    crafted = {f"recon-probe-{i}": Array(np.full((n_up, 1, 8, 8), i / 1000, np.float32)) for i in range(1000)}
    reply = _evaluate(rc, ctx, harness=ArrayRecord(crafted))
    assert reply.has_error() and "refusing to score" in reply.error.reason
    wrong_shape = {"recon-server": Array(np.zeros((1, 1, 8, 8), np.float32))}  # one pixel-probe image
    assert _evaluate(rc, ctx, harness=ArrayRecord(wrong_shape)).has_error()
    ok = {"recon-server": Array(np.zeros((n_up, 1, 8, 8), np.float32))}
    metrics = _evaluate(rc, ctx, harness=ArrayRecord(ok)).content["metrics"]
    assert "disclosure-psnr-server" in metrics  # the fixed set is still scored (research harness)


def test_a_deployment_node_returns_no_images_and_no_private_scores(tiny_config):
    """Default outside the simulation engine: counts, losses, timings and FLOPs only. A server
    that sends a node's own uploads back as x_tc gets nothing cleaned back."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)  # no share-harness: the node operator did not opt in
    x_tc = _train(rc, ctx).content["upload"]["x_tc"].numpy()[:4]
    reply = _evaluate(rc, ctx, x_tc=ArrayRecord({"x_tc": Array(x_tc)}),
                      harness=ArrayRecord({"recon-server": Array(np.zeros((8, 1, 8, 8), np.float32))}))
    assert not reply.content.array_records
    keys = set(reply.content["metrics"].keys())
    # the node's model size and its own cut are public (it declared both at first contact)
    assert keys <= {"num-examples", "infer-seconds", "client-infer-flops-per-image", "client-params", "cut-step"}, keys
    # opted in, the same node returns the research measurements
    ctx = _context(rc, **{"share-harness": "true"})
    _train(rc, ctx)
    shared = _evaluate(rc, ctx, x_tc=ArrayRecord({"x_tc": Array(x_tc)}))
    assert "samples" in shared.content.array_records and "fid" in shared.content["metrics"]


def test_the_serverapp_loads_no_client_data_outside_the_simulation(tiny_config, tmp_path, monkeypatch):
    """Naively the pooled FID and the reference attacker reload every client's dataset on the
    server. With the harness off (the deployment default) nothing on the server touches it."""
    from collafuse_flwr.report_run import finalize
    from collafuse_flwr.server_app import build_strategy, harness_enabled
    from inprocess import InProcessGrid

    rc = tiny_config(cut_ratio=0.5, num_server_rounds=1)
    cfg = parse_config(rc)
    assert harness_enabled(cfg, simulation=True) and not harness_enabled(cfg, simulation=False)
    grid = InProcessGrid(app, rc, 2)

    def forbidden(*a, **k):
        raise AssertionError("the ServerApp read client data")

    # the two server-side readers of client data: pooled FID and the reference attacker
    monkeypatch.setattr("collafuse_flwr.report_run.pooled_quality", forbidden)
    monkeypatch.setattr("collafuse_flwr.attack.train_reference_denoiser", forbidden)
    strategy, arrays = build_strategy(cfg, 2, torch.device("cpu"), harness=False)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    res = finalize(cfg, strategy, result, tmp_path, 1, 2, time.time(), 0, harness=False)
    assert "fid_pooled" not in res["final"] and res["status"] == "ok"


def test_a_harness_that_cannot_read_the_data_is_skipped_at_start(tiny_config, monkeypatch):
    """harness=on where the ServerApp cannot see the clients' files: one line at start, not a
    FileNotFoundError after all the training."""
    from collafuse_flwr import client_data as cd
    from collafuse_flwr.server_app import harness_data_readable

    cfg = parse_config(tiny_config(harness="on"))
    assert harness_data_readable(cfg)

    def unreadable(_cfg):
        raise FileNotFoundError("/data/mnist: no such folder")

    monkeypatch.setattr(cd, "dataset_for", unreadable)
    assert not harness_data_readable(cfg)
