"""End to end through `flwr run` on the simulation engine (Ray), one tiny run per method.

Each run gets its own FLWR_HOME and ports from the launcher, which stops the SuperLink it
started; the test then checks that nothing it started is left listening.
"""

import csv
import json
from pathlib import Path

import flwr_runs
import numpy as np
import pytest

from collafuse_flwr.config import preset
from collafuse_flwr.tools.launch import run_flower

pytestmark = pytest.mark.e2e

NUM_CLIENTS = 3
SAMPLES = preset("tiny")["num-eval-samples"]  # per client


def _run(tmp_path: Path, extra: str):
    return flwr_runs.run_tiny(tmp_path, extra, NUM_CLIENTS)


def _check_common(run_dir: Path, res: dict, method: str):
    assert res["status"] == "ok" and res["method"] == method
    assert res["num_clients"] == NUM_CLIENTS and res["num_rounds"] == 2 and res["diffusion_steps"] == 20
    f = res["final"]
    for key in ("fid", "fid_per_client", "fid_backbone", "kid", "client_train_flops",
                "client_infer_flops_per_image", "server_train_flops", "bytes_up", "bytes_down", "disclosure"):
        assert key in f, key
    assert f["fid_backbone"] == "digits-cnn"
    assert len(f["fid_per_client"]) == NUM_CLIENTS and all(v > 0 for v in f["fid_per_client"].values())
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["round"] for r in rows] == ["1", "2"]
    s = np.load(run_dir / "samples.npz")
    assert s["images"].dtype == np.uint8 and s["images"].shape == (NUM_CLIENTS * SAMPLES, 8, 8, 1)
    assert sorted(set(s["client"].tolist())) == list(range(NUM_CLIENTS))
    assert (run_dir / "samples.png").stat().st_size > 1000
    return f


def test_collafuse_end_to_end(tmp_path):
    run_dir, res = _run(tmp_path, "method='collafuse' cut-ratio=0.3")
    f = _check_common(run_dir, res, "collafuse")
    assert res["cut_ratio"] == 0.3 and res["cut_step"] == 6
    assert f["bytes_up"] > 0 and f["server_train_flops"] > 0 and f["client_train_flops"] > 0
    d = f["disclosure"]
    assert 0 <= d["reid_server"] <= 1 and d["epsilon"] > 0 and "sensitivity" in d["epsilon_assumption"]


@pytest.mark.parametrize("method", ["fedavg", "local", "centralized"])
def test_baselines_end_to_end(tmp_path, method):
    run_dir, res = _run(tmp_path, f"method='{method}'")
    f = _check_common(run_dir, res, method)
    if method == "local":
        assert f["bytes_up"] < 5_000  # metrics only
    if method == "fedavg":
        assert f["bytes_up"] > 2 * NUM_CLIENTS * 100_000  # the model goes up every round
    if method == "centralized":
        assert f["client_train_flops"] == 0 and f["server_train_flops"] > 0


def test_failed_run_is_reported_as_failed(tmp_path):
    """A run that breaks must not look like a success (flwr run --stream can exit 0), and must
    stop as soon as it cannot go on, saying why (naively: every node's first contact fails,
    the server waits its 300-s connect timeout and the launcher's timeout ends it)."""
    rc = flwr_runs.tiny_run_config(f"dataset='mnist' data-dir='{tmp_path}/nothing-here'")
    out = run_flower(f"{rc} output-dir='{tmp_path}'",
                     num_clients=2, flwr_home=tmp_path / "flwr-home", timeout=200, stream=False)
    assert not out.ok and out.status == "finished:failed", out.status
    assert out.output_dir is not None and out.output_dir.parent == tmp_path  # a failed run's folder is named
    res = json.loads((out.output_dir / "results.json").read_text())
    assert res["status"] == "failed"
    assert "all 2 connected node(s) were refused" in res["error"] and "download=true" in res["error"]
    assert "nothing-here" not in res["error"]  # the nodes' reason names no local path (issue 22)


@pytest.mark.parametrize("kwargs, match", [({"num_clients": 0}, "num-clients"),
                                           ({"client_cpus": 1.5}, "whole number of CPUs"),
                                           ({"client_cpus": 0}, "whole number of CPUs")])
def test_run_flower_rejects_bad_resources_before_starting_anything(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_flower("", flwr_home=tmp_path / "home", **{"num_clients": 2, **kwargs})
    assert not (tmp_path / "home").exists()  # failed before any SuperLink or FLWR_HOME
