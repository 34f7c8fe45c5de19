"""`client-model-size`: a CollaFuse client's private denoiser smaller than the server's.

Config validation, the half-width presets, the ClientApp building and reporting the smaller
net (parameters and measured inference FLOPs). Its run through `flwr run` is in
tests/test_e2e_flower.py.
"""

import itertools
import warnings

import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from inprocess import message_to_node

from collafuse_flwr.client_app import app, init_private_denoiser, private_model_size
from collafuse_flwr.config import ConfigError, parse_config
from collafuse_flwr.core.models import PRESETS, build_denoiser, client_preset, count_parameters

_RUN_IDS = itertools.count(10_000)


def _context(rc, pid=0):
    return Context(run_id=next(_RUN_IDS), node_id=100 + pid,
                   node_config={"partition-id": pid, "num-partitions": 3, "share-harness": "false"},
                   state=RecordDict(), run_config=rc)


# -- config -----------------------------------------------------------------------------------------
def test_default_is_the_servers_preset(tiny_config):
    cfg = parse_config(tiny_config())
    assert cfg.client_model_size == "" and private_model_size(cfg, "collafuse") == cfg.model_size


@pytest.mark.parametrize("value, preset", [("half", "small-half"), ("tiny", "tiny"), ("base-half", "base-half")])
def test_accepted_values(value, preset):
    cfg = parse_config({"model-size": "small", "client-model-size": value})
    assert private_model_size(cfg, "collafuse") == preset == client_preset("small", value)


@pytest.mark.parametrize("override, match", [
    ({"client-model-size": "huge"}, r"client-model-size='huge' is not a preset: use '' .*'half'"),
    ({"client-model-size": 3}, "client-model-size must be a string"),
    ({"client-model-size": "base", "image-size": 6}, r"needs image-size to be a multiple of 4, got 6"),
])
def test_bad_values_name_the_value_and_the_fix(override, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(override)


def test_other_methods_warn_that_they_ignore_it():
    with pytest.warns(UserWarning, match="client-model-size=half is ignored by method='fedavg'"):
        cfg = parse_config({"method": "fedavg", "client-model-size": "half"})
    assert private_model_size(cfg, "fedavg") == cfg.model_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_config({"method": "collafuse", "client-model-size": "half"})


# -- the smaller net ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size, image", [("tiny", 8), ("small", 8), ("base", 16)])
def test_half_presets_have_half_the_widths_and_about_a_quarter_of_the_parameters(size, image):
    full, half = PRESETS[size], PRESETS[f"{size}-half"]
    assert half.block_out_channels == tuple(w // 2 for w in full.block_out_channels)
    assert (half.layers_per_block, half.attention) == (full.layers_per_block, full.attention)
    n_full = count_parameters(build_denoiser(image, 1, size))
    n_half = count_parameters(build_denoiser(image, 1, f"{size}-half"))
    assert 0.2 < n_half / n_full < 0.3


def test_private_model_is_built_with_the_client_preset(tiny_config):
    full = init_private_denoiser(parse_config(tiny_config(model_size="small")), 0, 1, torch.device("cpu"))
    half = init_private_denoiser(parse_config(tiny_config(model_size="small", client_model_size="half")), 0, 1,
                                 torch.device("cpu"))
    assert full.unet.config.block_out_channels == (32, 64)
    assert half.unet.config.block_out_channels == (16, 32)
    assert count_parameters(half) < count_parameters(full) / 3


def _train_and_evaluate(rc):
    """One train round and one evaluation of node 0 through the ClientApp; returns its replies."""
    cfg = parse_config(rc)
    ctx = _context(rc)
    hello = app(message_to_node(RecordDict({"config": ConfigRecord({"method": "collafuse"})}), "query.hello"), ctx)
    conf = ConfigRecord({"server-round": 1, "cut-step": cfg.cut_step, "uploads": cfg.uploads_per_round})
    train = app(message_to_node(RecordDict({"config": conf}), "train.collafuse"), ctx)
    conf = ConfigRecord({"server-round": 2, "num-samples": 4, "client-start-step": cfg.cut_step,
                         "client-sampling-steps": 0})
    x_tc = ArrayRecord({"x_tc": Array(torch.randn(4, 1, 8, 8).numpy())})
    ev = app(message_to_node(RecordDict({"config": conf, "handoff": x_tc}), "evaluate.collafuse"), ctx)
    return hello.content["metrics"], train.content["metrics"], ev.content["metrics"]


def test_client_reports_its_smaller_net_and_spends_fewer_flops(tiny_config):
    """Measured by the ClientApp itself: parameters at hello and evaluation, FLOPs per image."""
    base = dict(model_size="small", cut_ratio=0.3, diffusion_steps=20, local_steps=1)
    h_full, t_full, e_full = _train_and_evaluate(tiny_config(**base))
    h_half, t_half, e_half = _train_and_evaluate(tiny_config(**base, client_model_size="half"))
    n_full = count_parameters(build_denoiser(8, 1, "small"))
    n_half = count_parameters(build_denoiser(8, 1, "small-half"))
    assert h_full["client-params"] == e_full["client-params"] == n_full
    assert h_half["client-params"] == e_half["client-params"] == n_half
    # inference: same 6 steps, a net with half the widths -> about a quarter of the FLOPs
    ratio = e_half["client-infer-flops-per-image"] / e_full["client-infer-flops-per-image"]
    assert 0.2 < ratio < 0.3
    assert t_half["client-train-flops"] < t_full["client-train-flops"] / 3
