"""examples/custom_serverapp: a ServerApp this project did not write imports the CollaFuse
strategy, runs it through `flwr run` (simulation engine, 3 nodes) against this project's
ClientApp, and gets Flower's `Result` back, with its own `evaluate_fn` measure in it."""

from __future__ import annotations

import json

import pytest

from collafuse_flwr.tools.launch import APP_DIR, run_flower

pytestmark = pytest.mark.e2e

EXAMPLE = APP_DIR / "examples" / "custom_serverapp"


def test_users_serverapp_runs_collafuse_against_this_projects_clientapp(tmp_path):
    out = run_flower(f"output-dir='{tmp_path}'", num_clients=3, app_dir=EXAMPLE, flwr_home=tmp_path / "home",
                     timeout=600, stream=False, client_cpus=1)
    assert out.ok, f"status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    summaries = list(tmp_path.glob("custom-serverapp-*/summary.json"))
    assert len(summaries) == 1, out.log[-2000:]
    s = json.loads(summaries[0].read_text())
    assert s["cut_step"] == 6 and s["num_nodes"] == 3  # round(0.3 * 20), from the example's own config
    assert sorted(s["train_metrics_clientapp"]) == ["1", "2"]
    # the user's own evaluate_fn ran on the initial model and after every round, on changing weights
    norms = {r: m["server-param-norm"] for r, m in s["evaluate_metrics_serverapp"].items()}
    assert sorted(norms) == ["0", "1", "2"] and len(set(norms.values())) == 3
    assert s["final_arrays"] > 0
