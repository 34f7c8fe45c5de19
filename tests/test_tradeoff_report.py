"""benchmarks.tradeoff's summary: means over seeds, the realised epsilon a DP run reports, and a
run with no finished seed shown as such rather than dropped or counted as zero."""

from __future__ import annotations

import pytest

from benchmarks.tradeoff import summarize, table


def _result(fid, reid, eps_realised=None, eps_plain=7100.0, uploads=(40, 40)):
    dp = ({"0": {"epsilon_realised": eps_realised - 0.5}, "1": {"epsilon_realised": eps_realised}}
          if eps_realised is not None else {})
    return {"status": "ok", "cut_step_per_client": {"0": 194, "1": 194},
            "final": {"fid": fid, "client_infer_flops_per_image": 2e9,
                      "uploads_per_client": {"0": uploads[0], "1": uploads[1]},
                      "disclosure": {"reid_server": reid, "reid_reference": reid / 2, "psnr_server": 9.0,
                                     "psnr_reference": 8.0, "epsilon": eps_plain, "dp_per_client": dp}}}


def test_a_dp_run_reports_the_worst_clients_realised_epsilon_and_the_fid_spread():
    row = summarize("eps4", [_result(2.0, 0.2, eps_realised=3.9), _result(4.0, 0.4, eps_realised=3.7)])
    assert row["seeds"] == 2 and row["fid"] == pytest.approx(3.0) and row["fid_sd"] == pytest.approx(2 ** 0.5)
    assert row["epsilon_realised"] == pytest.approx(3.8)  # the worst client per seed, then the mean
    assert row["reid_reference"] == pytest.approx(0.15) and row["uploads"] == 80
    assert "| eps4 | 2 | 3 ± 1.4 |" in table([row])


def test_without_dp_the_plain_accounting_is_shown_and_an_empty_run_says_so():
    plain = summarize("collafuse-c0.2", [_result(1.0, 0.99)])
    assert plain["epsilon_realised"] == 7100.0 and plain["fid_sd"] is None
    missing = summarize("eps1", [])
    assert missing["status"] == "no finished run: no run" and missing["fid"] is None
    text = table([plain, missing])
    assert "| eps1 | 0 | no finished run: no run |" in text and "| collafuse-c0.2 | 1 | 1 |" in text


def test_a_run_the_nodes_refused_says_why_in_the_table():
    err = ("RoundFailed('all 5 connected node(s) were refused (node(s) 1, 2: its first-contact reply was an "
           "error: upload epsilon=1 (delta=1e-05) cannot be met for images uploaded up to K=1 times; use ...)')")
    row = summarize("eps1", [{"status": "failed", "error": err}, _result(1.0, 0.0, eps_realised=0.9)])
    assert row["seeds"] == 1 and row["errors"] and row["status"] == "ok"  # the seed that finished counts
    row = summarize("eps1", [{"status": "failed", "error": err}])
    assert row["status"].startswith("no finished run: upload epsilon=1 (delta=1e-05) cannot be met")
