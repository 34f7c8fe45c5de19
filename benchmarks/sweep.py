"""One sweep for every comparison: a named run set of the app through Flower or in process,
resumable, then the report (and the run set's targets, where it has any).

    python -m benchmarks.sweep --preset cuts          # CollaFuse over c + FedAvg, local-only, centralized on digits
    python -m benchmarks.sweep --preset main-job      # the README's main command, and local-only beside it
    python -m benchmarks.sweep --preset gpu --engine inprocess --time-budget 420   # a lent GPU (scripts/gpu_run.sh)
    python -m benchmarks.sweep --preset cuts --only collafuse-c0.2 fedavg --seeds 3 --extra "local-steps=60"
    python -m benchmarks.sweep --preset tradeoff --dry-run                        # the plan and its time estimate

Engines: `flwr` (one isolated `flwr run` per run, what `collafuse-run` calls) or `inprocess` (the same
ServerApp and ClientApp on tests/inprocess.py's grid, for a GPU box Ray cannot travel to). Each run
lands in OUT/runs/<tag>-s<seed>/; a run recorded "ok" with the same configuration is skipped, a failed
one retried, one recorded with other settings stops the sweep before anything runs.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collafuse_flwr.config import preset, run_config_text
from collafuse_flwr.tools.launch import run_flower

from .common import (RESULTS_DIR, BenchmarkError, command_line, fmt_seconds, in_process_grid, machine_info,
                     parse_overrides, print_checks, read_json, validate_overrides)

#: Files copied from the run's own folder into OUT/runs/<name>/ (the report reads these).
RUN_FILES = ("results.json", "metrics.csv", "samples.npz", "samples.png")
BASELINES = ("fedavg", "local", "centralized")
ENGINES = {"flwr": "flwr run, simulation engine", "inprocess": "in-process grid, no Flower SuperLink/Ray"}


# -- what runs ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """One configuration of a run set: a tag for folders and tables, and the run-config keys it sets."""
    tag: str
    overrides: dict[str, Any] = field(hash=False)

    @property
    def method(self) -> str:
        return str(self.overrides.get("method", "collafuse"))

    @property
    def cut_ratio(self) -> float | None:
        return float(self.overrides.get("cut-ratio", 0.2)) if self.method == "collafuse" else None


def collafuse(c: float, tag: str = "", **changes: Any) -> SweepConfig:
    """CollaFuse at cut ratio c (0: server-only, raw uploads; 1: client-only), plus `changes`."""
    return SweepConfig(tag or f"collafuse-c{float(c):g}", {"method": "collafuse", "cut-ratio": float(c), **changes})


def baseline(method: str) -> SweepConfig:
    if method not in BASELINES:
        raise BenchmarkError(f"baseline must be one of {BASELINES}, got {method!r}")
    return SweepConfig(method, {"method": method})


def standard_configs(cut_ratios: Sequence[float], baselines: Sequence[str] = BASELINES) -> tuple[SweepConfig, ...]:
    return tuple([collafuse(c) for c in cut_ratios] + [baseline(m) for m in baselines])


@dataclass(frozen=True)
class RunSet:
    """A named set of runs. The time estimates (2-core CPU, 5 clients) feed --dry-run and the ETA
    until the first run ends; `target_s` / `target_gain` (main-job) are checked after the runs."""
    name: str
    about: str
    configs: tuple[SweepConfig, ...]
    preset: str | None = None  # collafuse_flwr/presets/<preset>.toml, under `settings`
    settings: dict[str, Any] = field(default_factory=dict, hash=False)
    seeds: tuple[int, ...] = (0,)
    num_clients: int = 5
    out: str = ""  # default folder under benchmarks/results (where the committed runs are)
    client_gpus: float = 0.0
    startup_s: float = 40.0  # flwr run: SuperLink, Ray, imports
    round_s: float = 15.0
    eval_s: float = 25.0
    target_s: float | None = None  # the first configuration's whole call within this many seconds
    target_gain: float | None = None  # the last configuration's FID / the first's at least this

    def run_config(self) -> dict[str, Any]:
        return {**(preset(self.preset) if self.preset else {}), **self.settings}

    def estimate(self, rounds: int, num_clients: int) -> float:
        """Seconds for one run; rounds and clients scale the per-round share."""
        return self.startup_s + (rounds * self.round_s + self.eval_s) * num_clients / 5

    def config(self, tag: str) -> SweepConfig:
        """A tag of this run set, or any `collafuse-c<c>` or baseline."""
        known = {c.tag: c for c in self.configs} | {m: baseline(m) for m in BASELINES}
        try:
            return known.get(tag) or collafuse(float(tag.split("collafuse-c", 1)[1]))
        except (ValueError, IndexError):
            raise BenchmarkError(f"unknown configuration tag {tag!r}; use collafuse-c<c> (e.g. collafuse-c0.2) or one "
                                 f"of {list(known)}") from None


DIGITS = {"dataset": "digits", "num-server-rounds": 5}  # the committed digits sweeps (the app default is MNIST-5k)
#: every tradeoff run is CollaFuse at the paper's c; each names what it changes. In order of
#: importance: a sweep cut off at a time limit loses the last.
TRADEOFF = (collafuse(0.2), collafuse(0.2, "eps4", **{"upload-epsilon": 4.0, "max-uploads-per-image": 1}),
            collafuse(0.2, "mixed", **{"client-cut-ratios": "0.1,0.1,0.2,0.3,0.3"}),  # mean cut 0.2
            collafuse(0.2, "half", **{"client-model-size": "half"}),
            collafuse(0.2, "eps10", **{"upload-epsilon": 10.0, "max-uploads-per-image": 1}),
            collafuse(0.2, "eps1", **{"upload-epsilon": 1.0, "max-uploads-per-image": 1}))
RUN_SETS: dict[str, RunSet] = {s.name: s for s in (
    RunSet("cuts", "CollaFuse at c in {0, 0.2, 0.4, 0.8} + FedAvg, local-only, centralized on digits (8x8, small UNet, "
           "T=200), 5 rounds, seeds 0 1 2", standard_configs((0.0, 0.2, 0.4, 0.8)), settings=DIGITS, seeds=(0, 1, 2),
           out="sweep-cpu", round_s=20.0, eval_s=30.0),
    RunSet("comparison", "the main job's setting (app defaults: MNIST-5k at 16 px, all 10 digits, tiny UNet, T=200, "
           "5 rounds): c in {0, 0.2, 0.4, 0.8} + FedAvg, local-only, centralized; seeds 0 1 2",
           standard_configs((0.0, 0.2, 0.4, 0.8)), seeds=(0, 1, 2), out="comparison", round_s=25.0, eval_s=45.0),
    RunSet("tradeoff", "at c = 0.2 on digits: upload-epsilon 10/4/1 (each image uploaded at most once), mixed cuts "
           "at the same mean, a half-size client net", TRADEOFF, settings=DIGITS, out="tradeoff-cpu", round_s=20.0,
           eval_s=30.0),
    RunSet("main-job", "the README's main command (app defaults) and local-only; targets: CollaFuse's whole call "
           "<= 4 min on 2 CPU cores, local-only's FID / CollaFuse's >= 1.4", (collafuse(0.2), baseline("local")),
           out="main-job", round_s=25.0, eval_s=45.0, target_s=240.0, target_gain=1.4),
    RunSet("quick", "c in {0, 0.2, 1} + FedAvg at the quick preset: a <= 5 min smoke sweep",
           standard_configs((0.0, 0.2, 1.0), ("fedavg",)), preset="quick", round_s=4.0, eval_s=10.0),
    RunSet("paper", "every c + the baselines at the paper preset, 3 seeds: hours on one GPU",
           standard_configs((0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)), preset="paper", seeds=(0, 1, 2), client_gpus=0.2,
           startup_s=60.0, round_s=40.0, eval_s=60.0),
    RunSet("gpu", "c = 0.2 + local-only, FedAvg, centralized at the gpu preset: minutes on a lent GPU, in process",
           standard_configs((0.2,), ("local", "fedavg", "centralized")), preset="gpu", startup_s=10.0, round_s=15.0,
           eval_s=20.0),
)}


@dataclass(frozen=True)
class RunSpec:
    """One run: a configuration at one seed, with every key sent to it (output-dir aside)."""
    config: SweepConfig
    seed: int
    run_config: dict[str, Any] = field(hash=False)
    num_clients: int

    @property
    def name(self) -> str:
        return f"{self.config.tag}-s{self.seed}"


@dataclass
class SweepSummary:
    out: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    targets: dict[str, bool] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and all(self.targets.values())


def plan(configs: Sequence[SweepConfig], seeds: Sequence[int], run_config: dict[str, Any],
         num_clients: int) -> list[RunSpec]:
    """Seed-major order, so an interrupted sweep leaves whole seeds rather than whole methods."""
    tags = [c.tag for c in configs]
    if not configs or not seeds or len(set(tags)) != len(tags) or num_clients < 1:
        raise BenchmarkError(f"a sweep needs configurations without duplicate tags ({tags}), seeds ({list(seeds)}) "
                             f"and >= 1 client ({num_clients})")
    owned = sorted(k for k in run_config if k in ("method", "cut-ratio", "seed", "output-dir"))
    if owned:
        raise BenchmarkError(f"{owned} are set by the sweep itself (configurations, --seeds, --out); "
                             f"remove them from the overrides")
    return [RunSpec(c, int(s), {**run_config, **c.overrides, "seed": int(s)}, num_clients)
            for s in seeds for c in configs]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def recorded_state(run_dir: Path, spec: RunSpec) -> tuple[str, list[str]]:
    """('done' | 'stale' | 'todo', differing keys). Done: results.json says ok and was made with the
    same full configuration (merged with the app's defaults: a changed default makes it stale) and clients."""
    res = read_json(run_dir / "results.json")
    if res.get("status") != "ok":
        return "todo", []
    have = res.get("config", {})
    diff = [f"{k} ({have.get(k)!r} recorded, {v!r} requested)" for k, v in validate_overrides(spec.run_config)
            .to_flwr().items() if k != "output-dir" and not _same(v, have.get(k))]
    if int(res.get("num_clients", -1)) != spec.num_clients:
        diff.append(f"num-clients ({res.get('num_clients')} recorded, {spec.num_clients} requested)")
    return ("stale", diff) if diff else ("done", [])


# -- the in-process engine -------------------------------------------------------------------------------------
def run_inprocess(run_config: dict[str, Any], num_clients: int, out_dir: Path,
                  client_app=None) -> tuple[Path, dict[str, Any]]:
    """The real ServerApp main with `num_clients` ClientApp nodes (client_app: the real one unless given)
    in this process: (the run's folder under out_dir, its results.json). The harness is on, as in a
    simulation. A failed run raises after results.json is written; `run_inprocess.last_folder` names it."""
    from flwr.app import Context, RecordDict

    from collafuse_flwr import client_app as real_client, server_app
    from collafuse_flwr.config import load_defaults, parse_config
    from collafuse_flwr.data.load import check_dataset
    from collafuse_flwr.metrics.features import prepare_backbone

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    rc = {**load_defaults(), **run_config, "harness": "on", "output-dir": str(out_dir)}
    cfg = parse_config(rc)  # a bad key fails here, before any work
    check_dataset(cfg.dataset)  # what the ServerApp does beside a simulation's nodes
    prepare_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None, cfg.fid_download)
    before = {p for p in out_dir.iterdir() if p.is_dir()}
    grid = in_process_grid()(client_app or real_client.app, rc, num_clients)
    try:
        server_app.main(grid, Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(),
                                      run_config=dict(rc)))
    finally:  # the run's folder is the new one with results.json (a node may add others beside it)
        new = sorted((p for p in out_dir.iterdir() if p.is_dir() and p not in before),
                     key=lambda p: ((p / "results.json").is_file(), p.name))
        run_inprocess.last_folder = new[-1] if new else None  # type: ignore[attr-defined]
    folder = run_inprocess.last_folder  # type: ignore[attr-defined]
    if folder is None or not (folder / "results.json").is_file():
        raise RuntimeError(f"the ServerApp wrote no results.json under {out_dir}")
    return folder, json.loads((folder / "results.json").read_text())


#: what the step calibration does not see (data, FLOP counting, FID features, the probe, messages)
OVERHEAD, PER_RUN_FIXED_S = 1.3, 8.0


def fit_rounds(run_config: dict[str, Any], methods: Sequence[str], num_clients: int, budget_s: float) -> dict:
    """Time one optimizer step of the shared denoiser here, project every run's work in such steps
    (sampling: ~1/3 step per batch) x OVERHEAD + a fixed cost, and lower num-server-rounds to fit budget_s."""
    import torch

    from collafuse_flwr.core.models import default_device, shared_denoiser

    cfg, device = validate_overrides(run_config), default_device()
    model = shared_denoiser(cfg.image_size, cfg.image_channels, cfg.model_size, cfg.conditioning,
                            num_clients).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    x = torch.randn(cfg.batch_size, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
    t = torch.randint(0, cfg.diffusion_steps, (cfg.batch_size,), device=device)
    labels = torch.randint(0, num_clients, (cfg.batch_size,), device=device) if model.num_classes else None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for k in range(11):  # 3 warm-up steps, 8 timed
        if k == 3:
            sync()
            t0 = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x, t, class_labels=labels), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    step_s = (time.perf_counter() - t0) / 8

    def projected(rounds: int) -> float:
        total = 0.0
        for m in methods:
            c = validate_overrides({**run_config, "method": m, "num-server-rounds": rounds})
            server = num_clients * c.local_steps if c.server_steps == "auto" else int(c.server_steps)
            units = rounds * (num_clients * c.local_steps + (server if m == "collafuse" else 0))
            units += (c.attack_reference_steps if m == "collafuse" else 0) + num_clients * c.num_eval_samples * (
                c.sampling_steps or c.diffusion_steps) / c.batch_size / 3
            total += step_s * OVERHEAD * units + PER_RUN_FIXED_S
        return total

    wanted = rounds = int(run_config.get("num-server-rounds", 1))
    while rounds > 1 and projected(rounds) > budget_s:
        rounds -= 1
    return {"train_step_seconds": step_s, "time_budget_s": budget_s, "rounds_wanted": wanted, "rounds_used": rounds,
            "projected_seconds": projected(rounds), "overhead_factor": OVERHEAD}


# -- one run, either engine ----------------------------------------------------------------------------------------
def _run_one(spec: RunSpec, runs_dir: Path, engine: str, timeout: float, stream: bool,
             client_gpus: float) -> dict[str, Any]:
    """One run; its files are copied into runs/<name>/ and sweep.json records the outcome."""
    run_dir = runs_dir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in RUN_FILES:  # never leave a previous attempt's files beside a new attempt's
        (run_dir / f).unlink(missing_ok=True)
    started, error, stopped = time.time(), None, None
    if engine == "flwr":
        (run_dir / "flower").mkdir(exist_ok=True)
        try:  # run_flower gives the run a private FLWR_HOME and removes it after
            out = run_flower({**spec.run_config, "output-dir": str(run_dir / "flower")}, num_clients=spec.num_clients,
                             timeout=timeout, stream=stream, client_gpus=client_gpus)
            folder, log = out.output_dir, out.log
            error = None if out.ok else f"flower status {out.status!r}, return code {out.returncode}; see flwr.log"
        except Exception as exc:
            folder, log, error = None, f"run_flower raised {exc!r}\n", f"run_flower raised {exc!r}"
    else:
        try:
            folder, log = run_inprocess(spec.run_config, spec.num_clients, run_dir / "app")[0], ""
        except BaseException as exc:  # record what there is; then stop (Ctrl-C, SIGTERM) or go on
            folder, log, error = getattr(run_inprocess, "last_folder", None), traceback.format_exc(), repr(exc)
            stopped = exc if isinstance(exc, (KeyboardInterrupt, SystemExit)) else None
    (run_dir / "flwr.log").write_text(log)
    res: dict[str, Any] = {}
    if folder is not None and (folder / "results.json").is_file():
        for f in RUN_FILES:
            if (folder / f).is_file():
                shutil.copy2(folder / f, run_dir / f)
        res = json.loads((run_dir / "results.json").read_text())
    status = "stopped" if stopped else "ok" if error is None and res.get("status") == "ok" else "failed"
    record = {"name": spec.name, "tag": spec.config.tag, "seed": spec.seed, "method": spec.config.method,
              "cut_ratio": spec.config.cut_ratio, "num_clients": spec.num_clients, "run_config": spec.run_config,
              "status": status, "error": None if status == "ok" else res.get("error") or error,
              "engine": ENGINES[engine], "call_seconds": time.time() - started,
              "flower_output_dir": str(folder) if folder else None,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))}
    (run_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    if stopped:
        raise stopped
    return record


def check_targets(run_set: RunSet, out: Path, seeds: Sequence[int]) -> dict[str, bool]:
    """The run set's targets per seed: its first configuration's whole call within target_s, and
    the last configuration's FID / the first's at least target_gain (main-job: local-only / CollaFuse)."""
    checks: dict[str, bool] = {}
    first, last = run_set.configs[0].tag, run_set.configs[-1].tag
    for seed in seeds:
        rec, res, ref = (read_json(out / "runs" / f"{tag}-s{seed}" / f) for tag, f in (
            (first, "sweep.json"), (first, "results.json"), (last, "results.json")))
        if run_set.target_s is not None:
            took = rec.get("call_seconds", math.inf) if rec.get("status") == "ok" else math.inf
            checks[f"seed {seed}: {first} in {fmt_seconds(took)} <= {fmt_seconds(run_set.target_s)}"] = \
                took <= run_set.target_s
        if run_set.target_gain is not None:
            fid, fid_ref = res.get("final", {}).get("fid"), ref.get("final", {}).get("fid")
            gain = fid_ref / fid if fid and fid_ref and res.get("status") == ref.get("status") == "ok" else 0.0
            checks[f"seed {seed}: FID {last} / {first} = {gain:.2f} >= {run_set.target_gain}"] = \
                gain >= run_set.target_gain
    return checks


# -- the sweep ----------------------------------------------------------------------------------------------------
def run_sweep(configs: Sequence[SweepConfig], out: Path, *, seeds: Sequence[int] = (0,),
              run_config: dict[str, Any] | None = None, num_clients: int = 5, run_set: RunSet | None = None,
              engine: str = "flwr", timeout: float = 3600, stream: bool = False, rerun_stale: bool = False,
              report: bool = True, dry_run: bool = False, calibration: dict[str, Any] | None = None) -> SweepSummary:
    """Run every (configuration, seed) not already done in `out`, then write the report. BenchmarkError
    before anything runs when a configuration is invalid or a recorded run has other settings."""
    if engine not in ENGINES:
        raise BenchmarkError(f"engine must be one of {list(ENGINES)}, got {engine!r}")
    out = Path(out).resolve()
    merged = {**(run_config or {}), **({"harness": "on"} if engine == "inprocess" else {})}  # as run_inprocess sends
    specs = plan(configs, seeds, merged, num_clients)
    rounds = [validate_overrides(s.run_config).num_server_rounds for s in specs][0]  # all valid, or fail now
    runs_dir = out / "runs"
    states = {s.name: recorded_state(runs_dir / s.name, s) for s in specs}
    stale = {n: d for n, (st, d) in states.items() if st == "stale"}
    if stale and not (rerun_stale or dry_run):
        lines = "\n".join(f"  {n}: {', '.join(d)}" for n, d in stale.items())
        raise BenchmarkError(f"{len(stale)} run(s) in {runs_dir} were recorded with other settings:\n{lines}\n"
                             f"use another --out, or --rerun-stale to replace them")
    run_set = run_set or RunSet("custom", "configurations and keys chosen by the caller", tuple(configs),
                                settings=dict(run_config or {}))
    todo = [s for s in specs if states[s.name][0] != "done"]
    est = run_set.estimate(rounds, num_clients)
    print(f"sweep {run_set.name} ({ENGINES[engine]}): {len(specs)} runs, {len(todo)} to run -> {out}; estimate "
          f"~{fmt_seconds(est)} a run, ~{fmt_seconds(est * len(todo))} in all", flush=True)
    if dry_run:
        for spec in specs:
            state, diff = states[spec.name]
            print(f"{spec.name:24s} {state:5s} {run_config_text(spec.run_config)}"
                  + (f"  (differs: {', '.join(diff)})" if diff else ""))
        return SweepSummary(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "sweep.json"
    meta = {"command": command_line(), "preset": run_set.name, "preset_about": run_set.about, "engine": ENGINES[engine],
            "configs": [{"tag": c.tag, **c.overrides} for c in configs], "seeds": list(seeds),
            "num_clients": num_clients, "run_config": merged, "machine": machine_info(),
            "calibration": calibration, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None}
    summary, durations, t0 = SweepSummary(out), [], time.time()

    def save(**changes: Any) -> None:
        meta.update(changes, ran=summary.ran, skipped=summary.skipped, failed=summary.failed)
        meta_path.write_text(json.dumps(meta, indent=2))

    try:
        for k, spec in enumerate(specs, 1):
            prefix = f"run {k}/{len(specs)} {spec.name}"
            if states[spec.name][0] == "done":
                print(f"{prefix}: already done, skipped", flush=True)
                summary.skipped.append(spec.name)
                continue
            left = len(todo) - len(durations)
            eta = (sum(durations) / len(durations) if durations else est) * left
            print(f"{prefix}: running (elapsed {fmt_seconds(time.time() - t0)}, ETA {'' if durations else '~'}"
                  f"{fmt_seconds(eta)})", flush=True)
            rec = _run_one(spec, runs_dir, engine, timeout, stream, run_set.client_gpus)
            durations.append(rec["call_seconds"])
            if rec["status"] == "ok":
                summary.ran.append(spec.name)
                fid = read_json(runs_dir / spec.name / "results.json").get("final", {}).get("fid")
                shown = "None" if fid is None else f"{fid:.3g}"
                print(f"{prefix}: ok in {fmt_seconds(rec['call_seconds'])} (FID {shown})", flush=True)
            else:
                summary.failed.append(spec.name)
                print(f"{prefix}: FAILED after {fmt_seconds(rec['call_seconds'])}: {rec['error']} "
                      f"(log: {runs_dir / spec.name / 'flwr.log'})", flush=True)
            save()  # on disk after every run
    finally:
        summary.seconds = time.time() - t0
        save(finished=time.strftime("%Y-%m-%dT%H:%M:%S"), sweep_seconds=summary.seconds)
    print(f"sweep finished in {fmt_seconds(summary.seconds)}: {len(summary.ran)} ran, {len(summary.skipped)} skipped, "
          f"{len(summary.failed)} failed", flush=True)
    if run_set.target_s is not None or run_set.target_gain is not None:
        summary.targets = check_targets(run_set, out, seeds)
        save(targets=summary.targets)
        print_checks(summary.targets)
    if report:
        from .report import write_report

        print(f"report: {write_report(out)['report']}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.split("\n\n")
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=doc[0], epilog="\n\n".join(doc[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(RUN_SETS), default="cuts",
                   help="run set: " + "; ".join(f"{k}: {v.about}" for k, v in RUN_SETS.items()))
    p.add_argument("--engine", choices=list(ENGINES), default="flwr")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: benchmarks/results/<the run set's>)")
    p.add_argument("--only", nargs="+", default=None, metavar="TAG", help="these configurations, in this order")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the run set's)")
    p.add_argument("--clients", type=int, default=None, help="clients (default: the run set's, 5)")
    p.add_argument("--extra", default="", help='run-config keys for every run, e.g. "local-steps=20"')
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run (flwr engine)")
    p.add_argument("--stream", action="store_true", help="show each run's Flower log live")
    p.add_argument("--rerun-stale", action="store_true", help="replace runs recorded with other settings")
    p.add_argument("--no-report", action="store_true", help="skip benchmarks.report at the end")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimate only")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="inprocess: time a training step here first and lower num-server-rounds (the same for "
                        "every run) until all runs project to fit S seconds")
    a = p.parse_args(argv)
    try:
        run_set = RUN_SETS[a.preset]
        rc = {**run_set.run_config(), **parse_overrides(a.extra)}
        configs = [run_set.config(t) for t in a.only] if a.only else list(run_set.configs)
        seeds = a.seeds if a.seeds is not None else list(run_set.seeds)
        clients = a.clients if a.clients is not None else run_set.num_clients
        out = a.out or RESULTS_DIR / (run_set.out or f"sweep-{run_set.name}")
        calibration = None
        if a.engine == "inprocess" and not a.dry_run:
            import torch

            torch.backends.cudnn.benchmark = torch.cuda.is_available()  # fixed shapes: autotuning pays off at once
            if a.time_budget is not None:
                calibration = fit_rounds(rc, [c.method for c in configs], clients, a.time_budget)
                rc["num-server-rounds"] = calibration["rounds_used"]
                print(f"calibration: a training step {calibration['train_step_seconds'] * 1e3:.1f} ms; "
                      f"{rc['num-server-rounds']} round(s) of {calibration['rounds_wanted']} fit "
                      f"{fmt_seconds(a.time_budget)}", flush=True)
        summary = run_sweep(configs, out, seeds=seeds, run_config=rc, num_clients=clients, run_set=run_set,
                            engine=a.engine, timeout=a.timeout, stream=a.stream, rerun_stale=a.rerun_stale,
                            report=not a.no_report, dry_run=a.dry_run, calibration=calibration)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
