"""benchmarks/overhead.py's plain loop must do the app's work: same seed, same images, same FID.

Otherwise the overhead ratio bills Flower for work the plain loop skips (or the reverse).
"""

import time

import pytest
import torch

from benchmarks.overhead import plain_collafuse
from collafuse_flwr.client_app import app as client_app
from collafuse_flwr.config import parse_config
from collafuse_flwr.report_run import finalize
from collafuse_flwr.server_app import build_strategy
from inprocess import InProcessGrid


def test_plain_loop_reproduces_the_apps_fid(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.3, num_server_rounds=2, count_flops=False)
    cfg = parse_config(rc)
    nodes = 2
    torch.manual_seed(cfg.seed)
    strategy, arrays = build_strategy(cfg, nodes, torch.device("cpu"))
    result = strategy.start(grid=InProcessGrid(client_app, rc, nodes), initial_arrays=arrays,
                   num_rounds=cfg.num_server_rounds)
    (tmp_path / "app").mkdir()
    app = finalize(cfg, strategy, result, tmp_path / "app", 1, nodes, time.time(), 0)["final"]
    plain = plain_collafuse(cfg, nodes, tmp_path / "plain")
    assert app["fid"] == pytest.approx(plain.fid, rel=1e-6)
    assert app["fid_pooled"] == pytest.approx(plain.fid_pooled, rel=1e-6)
