"""The disclosure harness end to end in process: extremes of the cut give known answers."""

import time

import numpy as np
import pytest
import torch
from inprocess import InProcessGrid

from collafuse_flwr.client_app import app as client_app
from collafuse_flwr.config import parse_config
from collafuse_flwr.harness.report import finalize
from collafuse_flwr.server.build import build_strategy


def _run(rc, tmp_path, nodes=2):
    cfg = parse_config(rc)
    grid = InProcessGrid(client_app, rc, nodes)
    strategy, arrays = build_strategy(cfg, nodes, torch.device("cpu"))
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.num_server_rounds)
    return finalize(cfg, strategy, result, tmp_path, 1, nodes, time.time(), 0), grid


def test_cut_zero_is_full_disclosure(tiny_config, tmp_path):
    res, _ = _run(tiny_config(cut_ratio=0.0, num_server_rounds=1), tmp_path)
    d = res["final"]["disclosure"]
    assert d["reid_server"] == 1.0 and d["reid_reference"] == 1.0 and d["reid_scaled"] == 1.0
    assert d["psnr_server"] == pytest.approx(100.0)  # the PSNR cap: exact reconstruction
    assert d["epsilon"] == float("inf")


def test_cut_one_discloses_nothing(tiny_config, tmp_path):
    res, grid = _run(tiny_config(cut_ratio=1.0, num_server_rounds=1), tmp_path)
    f = res["final"]
    assert f["disclosure"]["epsilon"] == 0.0
    assert 0.0 <= f["precision"] <= 1.0 and 0.0 <= f["recall"] <= 1.0  # beside FID, on the same features
    assert not any("upload" in r.content.array_records for r in grid.replies)
    assert f["server_train_flops"] == 0


def test_failed_node_is_counted_and_skipped(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=1)
    cfg = parse_config(rc)
    grid = InProcessGrid(client_app, rc, 3, fail_nodes=[1001])
    strategy, arrays = build_strategy(cfg, 3, torch.device("cpu"))
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    res = finalize(cfg, strategy, result, tmp_path, 1, 3, time.time(), 0)
    assert res["final"]["failed_replies"] == 2  # its train and its evaluate reply
    assert len(res["final"]["fid_per_client"]) == 2


def test_reference_attacker_is_seeded_and_leaves_the_rng_alone(tiny_config):
    from collafuse_flwr.harness.attack import train_reference_denoiser

    cfg = parse_config(tiny_config(attack_reference_steps=3))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = train_reference_denoiser(cfg, 3, torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's global stream is untouched
    again = train_reference_denoiser(cfg, 3, torch.device("cpu"))
    assert not first.training
    for (name, a), (_, b) in zip(first.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    untrained = train_reference_denoiser(parse_config(tiny_config(attack_reference_steps=1)), 3, torch.device("cpu"))
    assert any(not torch.equal(a, b) for a, b in zip(untrained.state_dict().values(),
                                                     first.state_dict().values()))
    assert train_reference_denoiser(parse_config(tiny_config(attack_reference_steps=0)), 3,
                                    torch.device("cpu")) is None


@pytest.mark.parametrize("cut, expected", [(0.0, False), (0.3, True), (1.0, False)])
def test_reference_attacker_trains_only_where_uploads_are_scored_with_it(tiny_config, cut, expected):
    # c=0 scores the raw uploads directly; c=1 uploads nothing
    strategy, _ = build_strategy(parse_config(tiny_config(cut_ratio=cut)), 3, torch.device("cpu"))
    probe = strategy.harness_payload
    assert probe.reference is None  # not before the first evaluation: the clients train first
    if cut < 1.0:
        probe(strategy, 0, np.zeros((2, 1, 8, 8), dtype=np.float32))
    assert (probe.reference is not None) is expected
    if expected:
        assert not probe.reference.training


def test_no_harness_no_probe(tiny_config):
    """Outside the simulation the strategy gets no disclosure probe: the ServerApp reads no client data."""
    strategy, _ = build_strategy(parse_config(tiny_config(cut_ratio=0.3)), 3, torch.device("cpu"), harness=False)
    assert strategy.harness_payload is None


def test_the_console_summary_shows_the_servers_psnr_the_readme_quotes():
    """README quotes the server model's PSNR (20.3 dB at c = 0.2); the summary printed only the reference
    attacker's (24.25), so a user comparing the two saw another figure."""
    from collafuse_flwr.harness.report import _summary_rows

    final = {"fid_backbone": "mnist-cnn", "fid": 11.3, "kid": 0.1, "client_train_flops": 1.0,
             "client_infer_flops_per_image": 1.0, "server_train_flops": 1.0, "bytes_up_per_round": 1.0,
             "bytes_down_per_round": 1.0, "disclosure": {"reid_server": 1.0, "psnr_server": 20.33,
                                                         "psnr_reference": 24.25}}
    r = {"method": "collafuse", "cut_ratio": 0.2, "cut_step": 40, "diffusion_steps": 200, "num_clients": 5,
         "num_rounds": 5, "client_model_size": "", "wall_seconds": 1.0, "final": final}
    rows = dict(_summary_rows(r))
    assert rows["disclosure psnr_server"] == 20.33 and rows["disclosure psnr_reference"] == 24.25
