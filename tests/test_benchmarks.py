"""The benchmark harness: the sweep end to end at test size (e2e), and its parts without Flower.

The e2e test goes through the real code path of `python -m benchmarks.sweep` (`run_sweep`:
Flower runs, run folders, resume bookkeeping, then `benchmarks.report`), at the smallest size
that still exercises it: tiny UNet, 1 round, CollaFuse c=0.2 and FedAvg, 2 clients.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from benchmarks.common import BenchmarkError, MemorySampler, app_keys, format_overrides, parse_overrides
from benchmarks.report import aggregate, fmt_stat, load_runs, stats, write_report
from benchmarks.scaling import linear_fit, superlinearity
from benchmarks.sweep import PRESETS, baseline, collafuse, config_from_tag, plan, recorded_state, run_sweep

TEST_SIZE = app_keys({
    "dataset": "digits", "num-server-rounds": 1, "model-size": "tiny", "image-size": 8, "diffusion-steps": 20, "local-steps": 2,
    "server-steps": 2, "uploads-per-round": 8, "num-eval-samples": 6, "batch-size": 16,
    "attack-reference-steps": 5,
})
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
        run_sweep(configs, tmp_path, seeds=[0], run_config=TEST_SIZE, extra="local-steps=3", num_clients=2,
                  report=False)


# -- fast: the report from recorded runs ----------------------------------------------------------------
def _fake_run(root: Path, method: str, c: float | None, seed: int, fid: float) -> None:
    """A run folder shaped like the app's results.json (see collafuse_flwr/harness/report.py)."""
    tag = f"collafuse-c{c:g}" if method == "collafuse" else method
    d = root / "runs" / f"{tag}-s{seed}"
    d.mkdir(parents=True)
    full = method != "collafuse" or c == 1.0
    disclosure = {"epsilon": "inf" if c == 0 else (0.0 if method == "local" else None)}
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
             "bytes_down_per_round": 2e6 if method == "fedavg" else 5e3, "disclosure": disclosure}
    res = {"status": "ok", "method": method, "cut_ratio": c, "cut_step": None if c is None else round(c * 20),
           "dataset": "digits", "num_clients": 2, "num_rounds": 2, "seed": seed, "diffusion_steps": 20,
           "wall_seconds": 10.0 + seed, "config": {"dataset": "digits", "num-server-rounds": 2, "count-flops": True},
           "final": final}
    (d / "results.json").write_text(json.dumps(res))
    (d / "sweep.json").write_text(json.dumps({"status": "ok", "call_seconds": 40.0 + seed}))
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


def test_report_needs_a_sweep_folder(tmp_path):
    with pytest.raises(BenchmarkError, match="runs"):
        write_report(tmp_path)


def test_stats_and_formatting():
    assert stats([math.inf, math.inf])[0] == math.inf
    assert stats([1.0, math.nan, 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))
    assert fmt_stat(stats([1e9, 3e9]), "flops") == "2 GFLOP ± 1.41 GFLOP"
    assert fmt_stat(stats([5.0]), "num") == "5" and fmt_stat(stats([]), "num") == "–"


# -- fast: sweep planning and bookkeeping ---------------------------------------------------------------------
def test_overrides_round_trip():
    parsed = parse_overrides("local-steps=3 model-size='tiny' method=fedavg count-flops=false lr=2e-4")
    assert parsed == {"local-steps": 3, "model-size": "tiny", "method": "fedavg", "count-flops": False, "lr": 2e-4}
    assert parse_overrides(format_overrides(parsed)) == parsed
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
    assert config_from_tag("collafuse-c0.4").cut_ratio == 0.4 and config_from_tag("local").method == "local"
    with pytest.raises(BenchmarkError, match="unknown configuration"):
        config_from_tag("fedprox")


def test_presets_are_valid_and_sized():
    cpu = PRESETS["cpu"]
    assert 0.2 in cpu.cut_ratios and set(cpu.baselines) == {"fedavg", "local", "centralized"}
    assert cpu.run_config["num-server-rounds"] == 5 and len(cpu.seeds) == 3
    runs = (len(cpu.cut_ratios) + len(cpu.baselines)) * len(cpu.seeds)
    assert cpu.estimate(5, 5) * runs <= 65 * 60  # the default sweep's budget, 3 seeds
    assert PRESETS["quick"].estimate(2, 5) * 4 <= 5 * 60
    assert PRESETS["mnist5k"].run_config["dataset"] == "mnist5k"
    for name in ("cpu", "quick", "mnist5k"):
        for spec in plan([collafuse(0.2), baseline("fedavg")], [0], app_keys(PRESETS[name].run_config), 5):
            from benchmarks.common import validate_overrides

            validate_overrides(spec.run_config)


def test_recorded_state(tmp_path):
    spec = plan([collafuse(0.2)], [0], dict(TEST_SIZE), 2)[0]
    run_dir = tmp_path / spec.name
    assert recorded_state(run_dir, spec) == ("todo", [])
    run_dir.mkdir()
    from benchmarks.common import validate_overrides

    cfg = validate_overrides(spec.run_config).to_flwr()
    (run_dir / "results.json").write_text(json.dumps({"status": "failed", "config": cfg, "num_clients": 2}))
    assert recorded_state(run_dir, spec)[0] == "todo"
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "config": cfg, "num_clients": 2}))
    assert recorded_state(run_dir, spec) == ("done", [])
    (run_dir / "results.json").write_text(json.dumps({"status": "ok", "config": {**cfg, "local-steps": 9},
                                                      "num_clients": 3}))
    state, diff = recorded_state(run_dir, spec)
    assert state == "stale" and any("local-steps" in d for d in diff) and any("num-clients" in d for d in diff)


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


def test_main_jobs_local_only_comparison_is_a_run_config_flower_accepts():
    """The local-only half of benchmarks.main_job once passed `method=local`, which Flower
    refuses (values are TOML), so the quality target could never be judged."""
    from flwr.common.config import parse_config_args

    from benchmarks.main_job import local_only_args

    for rc, n in ((None, None), ("num-server-rounds=2 model-size='tiny'", 3)):
        args = local_only_args(rc, n)
        parsed = parse_config_args([args[1]])
        assert parsed["method"] == "local" and ("--num-clients" in args) == (n is not None)
        if rc:
            assert parsed["num-server-rounds"] == 2


def test_digits_benchmarks_keep_measuring_digits_after_the_default_moved():
    """The app's default dataset moved to MNIST-5k; the committed digits reports (sweep-cpu,
    tradeoff-cpu, scaling, client_compute, deploy_overhead, main_job_variants) must still
    re-run on digits from their commands, or a resumed sweep would silently mix datasets."""
    from benchmarks import client_compute, deploy_overhead, scaling
    from benchmarks.common import validate_overrides
    from benchmarks.main_job_variants import QUIET, VARIANTS
    from benchmarks.tradeoff import SETTINGS

    assert validate_overrides({}).dataset == "mnist5k"  # what the pins guard against
    for rc in (PRESETS["cpu"].run_config, PRESETS["quick"].run_config, SETTINGS,
               scaling.SCALING_CONFIG, client_compute.SETTINGS[0][1], parse_overrides(deploy_overhead.TINY)):
        assert validate_overrides(app_keys(rc)).dataset == "digits"
    for name, overrides in VARIANTS.items():
        cfg = validate_overrides({**QUIET, **overrides})
        assert cfg.dataset == ("digits" if name.startswith("digits") else "mnist5k")
        assert cfg.num_server_rounds == 8 and cfg.attack_reference_steps == 0 and not cfg.count_flops
