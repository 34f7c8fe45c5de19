"""End to end through `flwr run` on the simulation engine (Ray): CollaFuse with the choices a data
owner makes per client, the local-only and centralized baselines, and a failing run. (FedAvg runs
end to end in tests/test_benchmarks.py's sweep, which checks its outputs the same way.)

Each run gets its own FLWR_HOME and ports from the launcher, which stops the SuperLink it
started; the test then checks that nothing it started is left listening.
"""

import json
from pathlib import Path

import flwr_runs
import pytest
import torch

from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.models import build_denoiser, count_parameters
from collafuse_flwr.tools.launch import run_flower

pytestmark = pytest.mark.e2e

NUM_CLIENTS = 3


def _run(tmp_path: Path, extra: str):
    return flwr_runs.run_tiny(tmp_path, extra, NUM_CLIENTS)


def test_collafuse_end_to_end_with_per_client_cuts_and_a_half_size_client_net(tmp_path):
    """One run with what each data owner may choose: its own cut (clients 0, 1, 2 at c = 0.3, 0.2,
    0.6 of T = 20: t_c = 6, 4, 12) and a private net half the width of the server's
    (model-size small, client-model-size half)."""
    run_dir, res = _run(tmp_path, "method='collafuse' cut-ratio=0.3 client-cut-ratios='0.3,0.2,0.6' "
                                  "model-size='small' client-model-size='half'")
    f = flwr_runs.check_outputs(run_dir, res, "collafuse", NUM_CLIENTS)
    assert res["cut_ratio"] == 0.3 and res["cut_step"] == 6
    assert f["bytes_up"] > 0 and f["server_train_flops"] > 0 and f["client_train_flops"] > 0
    d = f["disclosure"]
    assert 0 <= d["reid_server"] <= 1 and d["epsilon"] > 0 and "sensitivity" in d["epsilon_assumption"]

    # each node ran at its own cut, and spent accordingly
    clients = {str(k) for k in range(NUM_CLIENTS)}
    assert res["cut_step_per_client"] == {"0": 6, "1": 4, "2": 12}
    flops = f["client_train_flops_per_client"]
    assert set(flops) == clients and all(v > 0 for v in flops.values())
    infer = f["client_infer_flops_per_image_per_client"]
    assert set(infer) == clients and infer["2"] > infer["1"] * 2  # 12 client steps vs 4
    assert set(f["bytes_per_client"]) == clients

    # the private nets are the half-width preset; the server kept the full one
    assert res["config"]["client-model-size"] == "half" and res["client_model_size"] == "small-half"
    n_half = count_parameters(build_denoiser(8, 1, "small-half"))
    assert f["client_parameters_per_client"] == dict.fromkeys(clients, n_half)
    assert res["denoiser_parameters"] > 3 * n_half
    # client 0 takes 6 steps per image on the half-width net, measured by its ClientApp
    meter = FlopMeter()
    with torch.no_grad(), meter.count("p"):
        build_denoiser(8, 1, "small-half").eval()(torch.randn(1, 1, 8, 8), torch.tensor([1]))
    assert infer["0"] / 6 == pytest.approx(meter.totals["p"], rel=1e-6)


@pytest.mark.parametrize("method", ["local", "centralized"])
def test_baselines_end_to_end(tmp_path, method):
    run_dir, res = _run(tmp_path, f"method='{method}'")
    f = flwr_runs.check_outputs(run_dir, res, method, NUM_CLIENTS)
    if method == "local":
        assert f["bytes_up"] < 5_000  # metrics only
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
