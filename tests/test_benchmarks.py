"""The benchmarks: the sweep end to end at test size through Flower (e2e) and in process, and
their parts without Flower: the report from recorded runs (the comparison's and the tradeoff's
figures), planning and resume bookkeeping, run sets, targets, the scaling fit and sampler."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import flwr_runs
import numpy as np
import pytest

from benchmarks.common import BenchmarkError, parse_overrides, validate_overrides
from benchmarks.report import aggregate, fmt_stat, load_runs, stats, write_report
from benchmarks.scaling import MemorySampler, linear_fit, superlinearity
from benchmarks.sweep import (
    RUN_SETS,
    RunSet,
    baseline,
    check_targets,
    collafuse,
    plan,
    recorded_state,
    run_sweep,
)
from collafuse_flwr.config import load_defaults, preset, run_config_text

TEST_SIZE = {**preset("tiny"), "num-server-rounds": 1}
PLOTS = ("fid_vs_c.png", "disclosure_vs_c.png", "client_flops_vs_c.png", "communication.png",
         "samples_by_method.png")


@pytest.mark.e2e
def test_sweep_end_to_end_and_resume(tmp_path):
    configs = [collafuse(0.2), baseline("fedavg")]
    first = run_sweep(configs, tmp_path, seeds=[0], run_config=TEST_SIZE, num_clients=2, timeout=600)
    assert first.ok, f"failed runs: {first.failed}"
    assert sorted(first.ran) == ["collafuse-c0.2-s0", "fedavg-s0"] and not first.skipped

    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert [(r["method"], r["c"], r["seed"]) for r in rows] == [("collafuse", "0.2", "0"), ("fedavg", "", "0")]
    for r in rows:
        assert r["status"] == "ok" and float(r["fid"]) > 0 and float(r["wall_seconds"]) > 0
        assert float(r["call_seconds"]) >= float(r["wall_seconds"])
        assert float(r["bytes_up_per_round"]) > 0 and r["num_clients"] == "2"
    cf, fa = rows
    assert float(cf["client_infer_flops_per_image"]) < float(fa["client_infer_flops_per_image"])
    assert float(cf["bytes_up_per_round"]) < float(fa["bytes_up_per_round"])
    assert 0 <= float(cf["reid_server"]) <= 1 and float(cf["epsilon"]) > 0
    # FedAvg's own outputs, as tests/test_e2e_flower.py checks the other methods'
    fa_dir = tmp_path / "runs" / "fedavg-s0"
    f = flwr_runs.check_outputs(fa_dir, json.loads((fa_dir / "results.json").read_text()), "fedavg", 2, rounds=1)
    assert f["bytes_up"] > 2 * 100_000  # the model goes up from each client every round

    report = (tmp_path / "report.md").read_text()
    assert "| CollaFuse c=0.2 | 1 |" in report and "| FedAvg | 1 |" in report
    for png in PLOTS:
        assert (tmp_path / png).stat().st_size > 5_000, png
        assert f"]({png})" in report
    meta = json.loads((tmp_path / "sweep.json").read_text())
    assert meta["ran"] == first.ran and meta["machine"]["cpu_count"] >= 1
    for name in first.ran:
        d = tmp_path / "runs" / name
        assert {"results.json", "metrics.csv", "samples.npz", "flwr.log", "sweep.json"} <= {p.name for p in d.iterdir()}

    # resume: nothing reruns, the recorded runs stay untouched
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*/results.json")}
    again = run_sweep(configs, tmp_path, seeds=[0], run_config=TEST_SIZE, num_clients=2, report=False)
    assert again.ran == [] and sorted(again.skipped) == sorted(first.ran)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a different budget must not be mixed into the same folder silently
    with pytest.raises(BenchmarkError, match="local-steps"):
        run_sweep(configs, tmp_path, seeds=[0], run_config={**TEST_SIZE, "local-steps": 3}, num_clients=2,
                  report=False)


@pytest.mark.e2e
def test_main_job_in_process_with_its_targets_and_resume(tmp_path):
    """The in-process engine (a GPU box's path, no Ray) through the same bookkeeping: the main-job
    run set at test size, both methods on the same settings, the harness on as in a simulation."""
    main_job = RUN_SETS["main-job"]
    meta = run_sweep(main_job.configs, tmp_path, run_config=TEST_SIZE, num_clients=2, run_set=main_job,
                     engine="inprocess")
    assert sorted(meta.ran) == ["collafuse-c0.2-s0", "local-s0"] and not meta.failed
    res = {m: json.loads((tmp_path / "runs" / f"{m}-s0" / "results.json").read_text()) for m in ("collafuse-c0.2", "local")}
    for r in res.values():
        assert r["status"] == "ok" and r["config"]["harness"] == "on" and r["final"]["fid_pooled"] is not None
        assert set(r["final"]["fid_per_client"]) == {"0", "1"}
    a, b = res["collafuse-c0.2"]["config"], res["local"]["config"]
    assert {k for k in a if a[k] != b[k]} <= {"method", "output-dir"}  # the same settings otherwise
    assert len(meta.targets) == 2  # judged (at this size: no verdict asserted, only that it is reported)
    assert json.loads((tmp_path / "sweep.json").read_text())["engine"].startswith("in-process")
    assert "| CollaFuse c=0.2 | 1 |" in (tmp_path / "report.md").read_text()
    again = run_sweep(main_job.configs, tmp_path, run_config=TEST_SIZE, num_clients=2, run_set=main_job,
                      engine="inprocess", report=False)
    assert sorted(again.skipped) == sorted(meta.ran) and not again.ran


# -- fast: the report from recorded runs ----------------------------------------------------------------
def _fake_run(root: Path, method: str, c: float | None, seed: int, fid: float, tag: str = "", dp: tuple = (),
              error: str = "") -> None:
    """A run folder shaped like the app's results.json (see collafuse_flwr/harness/report.py);
    dp: the per-client realised epsilons of a DP run; error: a failed run's."""
    tag = tag or (f"collafuse-c{c:g}" if method == "collafuse" else method)
    d = root / "runs" / f"{tag}-s{seed}"
    d.mkdir(parents=True)
    if error:
        (d / "results.json").write_text(json.dumps({"status": "failed", "method": method, "error": error}))
        (d / "sweep.json").write_text(json.dumps({"status": "failed", "tag": tag, "seed": seed, "error": "see log"}))
        return
    full = method != "collafuse" or c == 1.0
    disclosure = {"epsilon": "inf" if c == 0 else (0.0 if method == "local" else None),
                  "dp_per_client": {str(k): {"epsilon_realised": e} for k, e in enumerate(dp)}}
    if method == "collafuse" and c < 1:
        disclosure.update({"reid_server": 1 - c, "reid_scaled": 1 - c / 2, "reid_reference": 1 - c / 3,
                           "psnr_server": 10 + 20 * (1 - c), "ssim_server": 1 - c, "upload_fid": 100 * c,
                           "inference_fid": 90 * c, "epsilon": "inf" if c == 0 else 1000 * (1 - c)})
    infer = 1e8 if full else 1e8 * c
    final = {"fid": fid, "kid": fid / 30, "fid_pooled": fid * 0.8, "fid_backbone": "digits-cnn",
             "client_train_flops": 4e9, "client_train_flops_per_round": 2e9,
             "client_train_flops_per_client_round": 1e9, "client_infer_flops_per_image": infer,
             "server_train_flops": 0.0 if full else 1e9, "server_infer_flops_per_image": None,
             "bytes_up": 2e6 if method == "fedavg" else 1e4, "bytes_down": 4e6 if method == "fedavg" else 1e4,
             "bytes_up_per_round": 1e6 if method == "fedavg" else 5e3,
             "bytes_down_per_round": 2e6 if method == "fedavg" else 5e3, "disclosure": disclosure,
             "uploads_per_client": {"0": 40, "1": 40} if method == "collafuse" and c < 1 else {}}
    res = {"status": "ok", "method": method, "cut_ratio": c, "cut_step": None if c is None else round(c * 20),
           "dataset": "digits", "num_clients": 2, "num_rounds": 2, "seed": seed, "diffusion_steps": 20,
           "wall_seconds": 10.0 + seed, "config": {"dataset": "digits", "num-server-rounds": 2, "count-flops": True},
           "final": final}
    (d / "results.json").write_text(json.dumps(res))
    (d / "sweep.json").write_text(json.dumps({"status": "ok", "tag": tag, "call_seconds": 40.0 + seed}))
    rng = np.random.default_rng(seed)
    np.savez_compressed(d / "samples.npz", images=rng.integers(0, 255, (6, 8, 8, 1), dtype=np.uint8),
                        client=np.repeat([0, 1], 3))


def test_report_from_recorded_runs(tmp_path):
    for seed in (0, 1):
        for c in (0.0, 0.2, 1.0):
            _fake_run(tmp_path, "collafuse", c, seed, fid=20 + 10 * c + seed)
        for m in ("fedavg", "local", "centralized"):
            _fake_run(tmp_path, m, None, seed, fid=25 + seed)
    broken = tmp_path / "runs" / "collafuse-c0.4-s0"
    broken.mkdir()
    (broken / "sweep.json").write_text(json.dumps({"status": "failed", "method": "collafuse", "cut_ratio": 0.4,
                                                   "seed": 0, "error": "boom"}))
    paths = write_report(tmp_path)
    rows = list(csv.DictReader(open(paths["csv"])))
    assert len(rows) == 13 and sum(r["status"] == "failed" for r in rows) == 1
    assert [r["method"] for r in rows[:7]] == ["collafuse"] * 7 and rows[-1]["method"] == "centralized"
    assert next(r for r in rows if r["run"] == "collafuse-c0-s0")["epsilon"] == "inf"
    groups = aggregate(load_runs(tmp_path))
    assert [g["label"] for g in groups] == ["CollaFuse c=0", "CollaFuse c=0.2", "CollaFuse c=1", "FedAvg",
                                            "Local-only", "Centralized"]
    assert all(g["n"] == 2 for g in groups)
    mean, std, n = groups[1]["stats"]["fid"]
    assert mean == pytest.approx(22.5) and std == pytest.approx(math.sqrt(0.5)) and n == 2
    report = paths["report"].read_text()
    assert "22.5 ± 0.707" in report and "collafuse-c0.4-s0" in report and "boom" in report
    for png in PLOTS:
        assert paths[png.removesuffix(".png")].stat().st_size > 5_000


def test_the_tradeoffs_runs_are_reported_per_setting_with_the_realised_epsilon_and_why_one_failed(tmp_path):
    """The tradeoff run set: every run is CollaFuse at c = 0.2, so configurations are told apart by
    tag; a DP run shows its worst client's realised epsilon (mean over seeds), and a setting the
    nodes refused says why instead of vanishing."""
    _fake_run(tmp_path, "collafuse", 0.2, 0, fid=1.0)
    _fake_run(tmp_path, "collafuse", 0.2, 0, fid=2.0, tag="eps4", dp=(3.4, 3.9))
    _fake_run(tmp_path, "collafuse", 0.2, 1, fid=4.0, tag="eps4", dp=(3.7, 3.5))
    refusal = ("RoundFailed('all 5 connected node(s) were refused (node(s) 1, 2: its first-contact reply was an "
               "error: upload epsilon=1 (delta=1e-05) cannot be met for images uploaded up to K=1 times; use ...)')")
    _fake_run(tmp_path, "collafuse", 0.2, 0, fid=0, tag="eps1", error=refusal)
    paths = write_report(tmp_path)
    groups = {g["label"]: g for g in aggregate(load_runs(tmp_path))}
    assert list(groups) == ["CollaFuse c=0.2", "eps4"]  # the refused setting has no finished run ...
    eps4 = groups["eps4"]
    assert eps4["n"] == 2 and eps4["stats"]["fid"][:2] == (3.0, pytest.approx(2 ** 0.5))
    assert eps4["stats"]["epsilon"][0] == pytest.approx(3.8) and eps4["stats"]["uploads"][0] == 80
    assert groups["CollaFuse c=0.2"]["stats"]["epsilon"][0] == pytest.approx(800)  # no DP: the plain accounting
    report = paths["report"].read_text()
    assert "| eps4 | 2 | 3 ± 1.41 |" in report
    assert "`eps1-s0`: upload epsilon=1 (delta=1e-05) cannot be met for images uploaded up to K=1 times" in report


def test_report_needs_a_sweep_folder(tmp_path):
    with pytest.raises(BenchmarkError, match="runs"):
        write_report(tmp_path)


def test_stats_and_formatting():
    assert stats([math.inf, math.inf])[0] == math.inf
    assert stats([1.0, math.nan, 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))
    assert fmt_stat(stats([1e9, 3e9]), "flops") == "2 GFLOP ± 1.41 GFLOP"
    assert fmt_stat(stats([5.0]), "num") == "5" and fmt_stat(stats([]), "num") == "–"


# -- fast: sweep planning, run sets, bookkeeping, targets ------------------------------------------------------
def test_overrides_round_trip():
    parsed = parse_overrides("local-steps=3 model-size='tiny' method=fedavg count-flops=false lr=2e-4")
    assert parsed == {"local-steps": 3, "model-size": "tiny", "method": "fedavg", "count-flops": False, "lr": 2e-4}
    assert parse_overrides(run_config_text(parsed)) == parsed
    with pytest.raises(BenchmarkError, match="key=value"):
        parse_overrides("local-steps")


def test_plan_is_seed_major_and_guards_its_own_keys():
    specs = plan([collafuse(0.2), baseline("fedavg")], [0, 1], {"num-server-rounds": 2}, 5)
    assert [s.name for s in specs] == ["collafuse-c0.2-s0", "fedavg-s0", "collafuse-c0.2-s1", "fedavg-s1"]
    assert specs[2].run_config == {"num-server-rounds": 2, "method": "collafuse", "cut-ratio": 0.2, "seed": 1}
    with pytest.raises(BenchmarkError, match="cut-ratio"):
        plan([collafuse(0.2)], [0], {"cut-ratio": 0.5}, 5)
    with pytest.raises(BenchmarkError, match="duplicate"):
        plan([collafuse(0.2), collafuse(0.2)], [0], {}, 5)
    cuts, tradeoff = RUN_SETS["cuts"], RUN_SETS["tradeoff"]
    assert cuts.config("collafuse-c0.6").cut_ratio == 0.6 and cuts.config("local").method == "local"
    assert tradeoff.config("eps4").overrides["upload-epsilon"] == 4.0
    with pytest.raises(BenchmarkError, match="unknown configuration"):
        cuts.config("eps4")  # another run set's tag


def test_run_sets_are_valid_and_sized():
    cuts = RUN_SETS["cuts"]
    assert {c.cut_ratio for c in cuts.configs if c.method == "collafuse"} >= {0.0, 0.2}
    assert {c.method for c in cuts.configs} == {"collafuse", "fedavg", "local", "centralized"}
    runs = len(cuts.configs) * len(cuts.seeds)
    assert cuts.estimate(5, 5) * runs <= 65 * 60  # the cut sweep's budget, 3 seeds
    quick = RUN_SETS["quick"]
    assert quick.estimate(2, 5) * len(quick.configs) <= 5 * 60
    assert RUN_SETS["comparison"].run_config() == {}  # the main job's setting: the app defaults
    assert load_defaults()["dataset"] == "mnist5k" and load_defaults()["image-size"] == 16
    assert RUN_SETS["gpu"].run_config() == preset("gpu") and RUN_SETS["paper"].run_config() == preset("paper")
    for run_set in RUN_SETS.values():
        for spec in plan(run_set.configs, run_set.seeds, run_set.run_config(), run_set.num_clients):
            validate_overrides(spec.run_config)


def test_recorded_state(tmp_path):
    spec = plan([collafuse(0.2)], [0], dict(TEST_SIZE), 2)[0]
    run_dir = tmp_path / spec.name
    assert recorded_state(run_dir, spec) == ("todo", [])
    run_dir.mkdir()
    cfg = validate_overrides(spec.run_config).to_flwr()
    (run_dir / "results.json").write_text(json.dumps({"status": "failed", "config": cfg, "num_clients": 2}))
    assert recorded_state(run_dir, spec)[0] == "todo"
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "config": cfg, "num_clients": 2}))
    assert recorded_state(run_dir, spec) == ("done", [])
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "config": {**cfg, "local-steps": 9},
                                                      "num_clients": 3}))
    state, diff = recorded_state(run_dir, spec)
    assert state == "stale" and any("local-steps" in d for d in diff) and any("num-clients" in d for d in diff)


def test_main_job_targets_judge_the_time_and_the_gain_over_local_only(tmp_path):
    main_job = RUN_SETS["main-job"]
    _fake_run(tmp_path, "collafuse", 0.2, 0, fid=0.4)
    _fake_run(tmp_path, "local", None, 0, fid=0.8)  # 2x: met
    _fake_run(tmp_path, "collafuse", 0.2, 1, fid=0.7)
    _fake_run(tmp_path, "local", None, 1, fid=0.8)  # 1.14x: missed
    rec = tmp_path / "runs" / "collafuse-c0.2-s1" / "sweep.json"
    rec.write_text(json.dumps({**json.loads(rec.read_text()), "call_seconds": 300.0}))  # over 4 min
    checks = check_targets(main_job, tmp_path, [0, 1])
    assert [ok for name, ok in checks.items() if name.startswith("seed 0")] == [True, True]
    assert [ok for name, ok in checks.items() if name.startswith("seed 1")] == [False, False]
    assert any("2.00 >= 1.4" in name for name in checks)
    assert not any(check_targets(main_job, tmp_path, [2]).values())  # a seed that never ran fails
    assert check_targets(RunSet("x", "", main_job.configs), tmp_path, [0]) == {}  # no targets, nothing judged


def test_digits_benchmarks_keep_measuring_digits_after_the_default_moved():
    """The app's default dataset moved to MNIST-5k; the committed digits reports (sweep-cpu,
    tradeoff-cpu, scaling, client_compute, deploy_overhead) must still re-run on digits from their
    commands, or a resumed sweep would silently mix datasets."""
    from benchmarks import client_compute, deploy_overhead, scaling

    assert validate_overrides({}).dataset == "mnist5k"  # what the pins guard against
    for rc in (RUN_SETS["cuts"].run_config(), RUN_SETS["tradeoff"].run_config(), RUN_SETS["quick"].run_config(),
               scaling.SCALING_CONFIG, client_compute.SETTINGS[0][1], deploy_overhead.RUN_CONFIG):
        assert validate_overrides(rc).dataset == "digits"
    assert RUN_SETS["cuts"].out == "sweep-cpu" and RUN_SETS["tradeoff"].out == "tradeoff-cpu"
    assert validate_overrides(RUN_SETS["main-job"].run_config()) == validate_overrides({})  # the main command


# -- fast: scaling's fit and memory sampler -------------------------------------------------------------------
def test_scaling_fit_and_superlinearity():
    ns = [10, 30, 100]
    a, b = linear_fit(ns, [5 + 0.2 * n for n in ns])
    assert a == pytest.approx(5) and b == pytest.approx(0.2)
    assert superlinearity(ns, [5 + 0.2 * n for n in ns]) == pytest.approx(1.0)
    assert superlinearity(ns, [5 + 0.01 * n * n for n in ns]) > 1.25


def test_memory_sampler_sees_this_process():
    with MemorySampler(interval=0.05) as mem:
        mem.sample()
    assert mem.peak_rss > 10e6 and mem.peak_procs >= 1 and mem.samples >= 1
