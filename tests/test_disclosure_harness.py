"""The disclosure harness end to end in process: extremes of the cut give known answers."""

import pytest
import torch

from collafuse_flwr.client_app import app as client_app
from collafuse_flwr.config import parse_config
from collafuse_flwr.report_run import finalize
from collafuse_flwr.server_app import build_strategy
from inprocess import InProcessGrid


def _run(rc, tmp_path, nodes=2):
    cfg = parse_config(rc)
    grid = InProcessGrid(client_app, rc, nodes)
    strategy, arrays = build_strategy(cfg, nodes, torch.device("cpu"))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.num_server_rounds)
    return finalize(cfg, strategy, tmp_path, 1, nodes, 0.0, 0), grid


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
    assert not any("upload" in r.content.array_records for r in grid.replies)
    assert f["server_train_flops"] == 0


def test_failed_node_is_counted_and_skipped(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=1)
    cfg = parse_config(rc)
    grid = InProcessGrid(client_app, rc, 3, fail_nodes=[1001])
    strategy, arrays = build_strategy(cfg, 3, torch.device("cpu"))
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    res = finalize(cfg, strategy, tmp_path, 1, 3, 0.0, 0)
    assert res["final"]["failed_replies"] == 2  # its train and its evaluate reply
    assert len(res["final"]["fid_per_client"]) == 2
