"""benchmarks.inprocess: the real ServerApp main + ClientApp in one process (the GPU box's path,
which has no Ray), recorded so that benchmarks.report reads it like a sweep."""

import json

import pytest

from benchmarks.inprocess import ENGINE, SMOKE, run_inprocess, run_sequence
from benchmarks.report import write_report
from benchmarks.sweep import collafuse


def test_run_inprocess_has_the_harness_and_per_client_fid(tiny_config, tmp_path):
    rc = {k: v for k, v in tiny_config(num_server_rounds=1).items()
          if k not in ("method", "cut-ratio", "seed", "output-dir", "harness")}
    meta = run_sequence([collafuse(0.2)], tmp_path / "out", preset=SMOKE, run_config=rc, seeds=[0], num_clients=2,
                        report=False)
    assert meta["ran"] == ["collafuse-c0.2-s0"] and meta["engine"] == ENGINE
    run = tmp_path / "out" / "runs" / "collafuse-c0.2-s0"
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "ok" and res["config"]["harness"] == "on"
    assert set(res["final"]["fid_per_client"]) == {"0", "1"}
    assert res["final"]["fid_pooled"] is not None  # the harness ran, as in a simulation
    assert (run / "metrics.csv").is_file() and json.loads((run / "sweep.json").read_text())["status"] == "ok"
    paths = write_report(tmp_path / "out")
    assert "| CollaFuse" in paths["report"].read_text()
    # recorded with the same settings: a second call skips it
    again = run_sequence([collafuse(0.2)], tmp_path / "out", preset=SMOKE, run_config=rc, seeds=[0], num_clients=2,
                         report=False)
    assert again["skipped"] == ["collafuse-c0.2-s0"] and not again["ran"]


def test_run_inprocess_returns_results(tiny_config, tmp_path):
    res = run_inprocess({**tiny_config(num_server_rounds=1, method="local")}, 2, tmp_path)
    assert res["status"] == "ok" and res["num_clients"] == 2


def test_main_job_variants_compare_collafuse_with_local_only_on_the_same_settings(tmp_path):
    """run_pair runs both methods with the variant's settings (attacker and FLOP counting off)
    and reports local / CollaFuse."""
    from conftest import TINY

    from benchmarks.main_job_variants import QUIET, run_pair

    overrides = {k: v for k, v in TINY.items() if k not in QUIET}
    r = run_pair({**overrides, "num-server-rounds": 1}, 2, seed=3)
    for m in ("collafuse", "local"):
        assert set(r[m]["per_client"]) == {"0", "1"} and all(v > 0 for v in r[m]["per_client"].values())
    assert r["gain"] == pytest.approx(r["local"]["fid"] / r["collafuse"]["fid"])
    assert r["collafuse"]["fid"] != r["local"]["fid"]  # two different runs, not one reported twice
    a, b = r["collafuse"]["config"], r["local"]["config"]
    assert {k for k in a if a[k] != b[k]} <= {"method", "output-dir"}  # the same settings otherwise
    assert not a["count-flops"] and a["attack-reference-steps"] == 0 and a["seed"] == 3
