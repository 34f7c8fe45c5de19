"""The comparison sweep: CollaFuse over cut ratios beside FedAvg, local-only and centralized.

Every configuration runs through the real Flower app (`collafuse_flwr.tools.launch.run_flower`, one
isolated `flwr run` on the simulation engine each), with the same clients, partitions, seeds and
training budget, so differences in the report come from the method alone. Defaults are the
app's own (`[tool.flwr.app.config]` in pyproject.toml: 5 clients, non-IID by class); a preset
only changes what it names (`cpu` and `quick` pin scikit-learn's digits).

    python -m benchmarks.sweep                 # 7 configurations x seeds 0 1 2, ~60 min on 2 CPU cores
    python -m benchmarks.sweep --config mnist5k  # real MNIST digits (embedded), 4 configurations, 1 seed
    python -m benchmarks.sweep --quick         # c in {0, 0.2, 1} + FedAvg, tiny model, <= 5 min
    python -m benchmarks.sweep --seeds 0 1 2 --rounds 8 --extra "local-steps=60"
    python -m benchmarks.sweep --config gpu --dataset mnist --data-dir /abs/mnist   # on a GPU box
    python -m benchmarks.sweep --dry-run       # the plan and its time estimate, nothing run

Resuming: each run is recorded in OUT/runs/<tag>-s<seed>/ (results.json, metrics.csv,
samples.npz/png copied from the run's own folder under ./flower/, the Flower log, sweep.json).
A run whose results.json says status "ok" and whose settings match the request is skipped, so
an interrupted sweep picks up where it stopped. A run recorded with *different* settings
(say, --rounds changed) stops the sweep before anything runs, unless --rerun-stale is given:
mixing budgets in one report would be silently wrong.

After the runs, `benchmarks.report` writes OUT/results.csv, OUT/report.md and the plots.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from collafuse_flwr.tools.launch import RunOutcome, run_flower

from .common import (
    RESULTS_DIR,
    BenchmarkError,
    app_keys,
    command_line,
    fmt_seconds,
    format_overrides,
    machine_info,
    parse_overrides,
    validate_overrides,
)

#: Files copied from the run's own folder into OUT/runs/<name>/ (the report reads these).
RUN_FILES = ("results.json", "metrics.csv", "samples.npz", "samples.png")
ALL_CUT_RATIOS = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
BASELINES = ("fedavg", "local", "centralized")


# -- what runs ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """One method setting of the sweep: a tag for folders and tables, and its run-config keys."""

    tag: str
    overrides: dict[str, Any] = field(hash=False)

    @property
    def method(self) -> str:
        return str(self.overrides.get("method", "collafuse"))

    @property
    def cut_ratio(self) -> float | None:
        return float(self.overrides["cut-ratio"]) if self.method == "collafuse" else None


def collafuse(c: float) -> SweepConfig:
    """CollaFuse at cut ratio c (c = 0: server-only, raw uploads; c = 1: client-only)."""
    if not 0.0 <= float(c) <= 1.0:
        raise BenchmarkError(f"cut ratio must be in [0, 1], got {c}")
    return SweepConfig(f"collafuse-c{float(c):g}", {"method": "collafuse", "cut-ratio": float(c)})


def baseline(method: str) -> SweepConfig:
    if method not in BASELINES:
        raise BenchmarkError(f"baseline must be one of {BASELINES}, got {method!r}")
    return SweepConfig(method, {"method": method})


def config_from_tag(tag: str) -> SweepConfig:
    """`collafuse-c0.4`, `fedavg`, `local` or `centralized` back to its configuration."""
    if tag in BASELINES:
        return baseline(tag)
    if tag.startswith("collafuse-c"):
        try:
            return collafuse(float(tag.removeprefix("collafuse-c")))
        except ValueError:
            pass
    raise BenchmarkError(f"unknown configuration tag {tag!r}; use collafuse-c<c> (e.g. collafuse-c0.2) "
                         f"or one of {list(BASELINES)}")


def standard_configs(cut_ratios: Sequence[float] = ALL_CUT_RATIOS,
                     baselines: Sequence[str] = BASELINES) -> list[SweepConfig]:
    return [collafuse(c) for c in cut_ratios] + [baseline(m) for m in baselines]


@dataclass(frozen=True)
class Preset:
    """A named sweep size. The time estimate is for the ETA before the first run has finished
    and for --dry-run; it was sized from the app's measured costs on a 2-core CPU."""

    name: str
    about: str
    cut_ratios: tuple[float, ...]
    baselines: tuple[str, ...]
    run_config: dict[str, Any]
    num_clients: int = 5
    seeds: tuple[int, ...] = (0,)
    client_gpus: float = 0.0
    est_startup_s: float = 40.0  # flwr run: SuperLink + Ray + imports
    est_round_s: float = 15.0  # one round, 5 clients, on a 2-core CPU
    est_eval_s: float = 25.0  # final evaluation: sampling + FID + disclosure metrics

    def estimate(self, rounds: int, num_clients: int) -> float:
        """Seconds for one run (rounds and clients scale the per-round share)."""
        return self.est_startup_s + rounds * self.est_round_s * num_clients / 5 + self.est_eval_s * num_clients / 5


#: The comparison's cut ratios: the server-only extreme, the paper's c, and two more shares.
CUT_RATIOS = (0.0, 0.2, 0.4, 0.8)

PRESETS: dict[str, Preset] = {
    # 7 runs x 3 seeds x (40 s startup + 5 rounds x ~20 s + ~30 s evaluation) ~ 60 min on 2 CPU cores.
    "cpu": Preset("cpu", "c in {0, 0.2, 0.4, 0.8} + FedAvg, local-only, centralized on scikit-learn's digits "
                  "(8x8, small UNet, T=200, fair server budget), 5 rounds, seeds 0 1 2",
                  CUT_RATIOS, BASELINES, {"dataset": "digits", "num-server-rounds": 5}, seeds=(0, 1, 2), est_round_s=20.0,
                  est_eval_s=30.0),
    # Real 28 px digits downsampled to 16 px (4x the pixels of digits): 4 runs x ~5 min.
    "mnist5k": Preset("mnist5k", "embedded MNIST-5k at 16 px, c = 0.2 + FedAvg, local-only, centralized, "
                      "small UNet, T=200, 5 rounds, seed 0; FID on mnist-cnn (trained on rows the clients "
                      "never see)", (0.2,), BASELINES,
                      {"dataset": "mnist5k", "image-size": 16, "num-server-rounds": 5},
                      est_round_s=50.0, est_eval_s=60.0),
    # 4 runs x (40 s + 2 x ~4 s + ~10 s) ~ 4 min on 2 CPU cores.
    "quick": Preset("quick", "c in {0, 0.2, 1} + FedAvg, tiny UNet, T=50, 2 rounds; a <= 5 min smoke sweep",
                    (0.0, 0.2, 1.0), ("fedavg",),
                    {"dataset": "digits", "num-server-rounds": 2, "model-size": "tiny", "diffusion-steps": 50,
                     "local-steps": 10, "uploads-per-round": 32,
                     "num-eval-samples": 32, "attack-reference-steps": 50},
                    est_round_s=4.0, est_eval_s=10.0),
    # Not runnable on the CPU box: real images at 28-32 px, the base UNet, 1000 steps, 3 seeds.
    "gpu": Preset("gpu", "MNIST (28 px) or CIFAR-10 (32 px), base UNet, T=1000, 20 rounds, 3 seeds; "
                  "needs --data-dir (and --extra \"fid-weights='/abs/...pth'\" for CIFAR-10)",
                  ALL_CUT_RATIOS, BASELINES,
                  {"dataset": "mnist", "image-size": 28, "model-size": "base", "diffusion-steps": 1000,
                   "num-server-rounds": 20, "local-steps": 200, "batch-size": 128,
                   "learning-rate": 2e-4, "uploads-per-round": 512, "num-eval-samples": 500,
                   "sampling-steps": 100, "count-flops": True},
                  seeds=(0, 1, 2), client_gpus=0.2, est_startup_s=60, est_round_s=40, est_eval_s=60),
}
GPU_DATASETS = {"mnist": 28, "cifar10": 32}


@dataclass(frozen=True)
class RunSpec:
    """One Flower run of the sweep: a configuration at one seed with the full override set."""

    config: SweepConfig
    seed: int
    run_config: dict[str, Any] = field(hash=False)  # everything sent to flwr but output-dir
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

    @property
    def ok(self) -> bool:
        return not self.failed


def plan(configs: Sequence[SweepConfig], seeds: Sequence[int], run_config: dict[str, Any],
         num_clients: int) -> list[RunSpec]:
    """Seed-major order, so an interrupted sweep leaves whole seeds rather than whole methods."""
    if not configs:
        raise BenchmarkError("the sweep has no configurations")
    if not seeds:
        raise BenchmarkError("the sweep has no seeds")
    tags = [c.tag for c in configs]
    if len(set(tags)) != len(tags):
        raise BenchmarkError(f"duplicate configuration tags: {tags}")
    if num_clients < 1:
        raise BenchmarkError(f"--clients must be >= 1, got {num_clients}")
    owned = sorted(k for k in run_config if k in ("method", "cut-ratio", "seed", "output-dir"))
    if owned:
        raise BenchmarkError(f"{owned} are set by the sweep itself (configurations, --seeds, --out); "
                             f"remove them from the overrides")
    specs = []
    for seed in seeds:
        for cfg in configs:
            specs.append(RunSpec(cfg, int(seed), {**run_config, **cfg.overrides, "seed": int(seed)}, num_clients))
    return specs


# -- resume bookkeeping ---------------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def recorded_state(run_dir: Path, spec: RunSpec) -> tuple[str, list[str]]:
    """('done' | 'stale' | 'todo', differing keys) for a run folder.

    done: results.json has status ok and was made with the same full configuration (the
    request merged with the app defaults, output-dir aside) and client count. A changed
    pyproject default therefore also makes a recorded run stale.
    """
    path = run_dir / "results.json"
    if not path.is_file():
        return "todo", []
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "todo", []
    if res.get("status") != "ok":
        return "todo", []
    wanted = validate_overrides(spec.run_config).to_flwr()
    have = res.get("config", {})
    diff = [f"{k} ({have.get(k)!r} recorded, {v!r} requested)" for k, v in wanted.items()
            if k != "output-dir" and not _same(v, have.get(k))]
    if int(res.get("num_clients", -1)) != spec.num_clients:
        diff.append(f"num-clients ({res.get('num_clients')} recorded, {spec.num_clients} requested)")
    return ("stale", diff) if diff else ("done", [])


def _run_one(spec: RunSpec, runs_dir: Path, timeout: float, stream: bool, client_gpus: float) -> dict[str, Any]:
    """One Flower run; its files are copied into runs/<name>/ and sweep.json records the outcome."""
    run_dir = runs_dir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in RUN_FILES:  # never leave a previous attempt's files beside a new attempt's
        (run_dir / f).unlink(missing_ok=True)
    flower_root = run_dir / "flower"
    flower_root.mkdir(exist_ok=True)
    cfg = {**spec.run_config, "output-dir": str(flower_root.resolve())}
    kwargs: dict[str, Any] = {"num_clients": spec.num_clients, "timeout": timeout, "stream": stream}
    if client_gpus > 0:
        if "client_gpus" in inspect.signature(run_flower).parameters:
            kwargs["client_gpus"] = client_gpus
        else:
            print(f"warning: run_flower has no client_gpus parameter; ClientApps get no GPU share "
                  f"(wanted {client_gpus})", file=sys.stderr)
    started = time.time()
    try:
        with tempfile.TemporaryDirectory(prefix="sweep-flwr-home-") as home:
            outcome = run_flower(cfg, flwr_home=Path(home), **kwargs)
    except Exception as exc:  # the launcher itself broke (flwr missing, ...): record it, go on
        outcome = RunOutcome(None, "launcher-error", -1, None, f"run_flower raised {exc!r}\n", 0, 0)
    call_s = time.time() - started
    (run_dir / "flwr.log").write_text(outcome.log)
    status = "failed"
    error = None
    if outcome.output_dir is not None and (outcome.output_dir / "results.json").is_file():
        for f in RUN_FILES:
            if (outcome.output_dir / f).is_file():
                shutil.copy2(outcome.output_dir / f, run_dir / f)
        res = json.loads((run_dir / "results.json").read_text())
        status = "ok" if outcome.ok and res.get("status") == "ok" else "failed"
        error = res.get("error")
    if status != "ok" and error is None:
        error = f"flower status {outcome.status!r}, return code {outcome.returncode}; see flwr.log"
    record = {
        "name": spec.name, "tag": spec.config.tag, "seed": spec.seed, "method": spec.config.method,
        "cut_ratio": spec.config.cut_ratio, "num_clients": spec.num_clients, "run_config": spec.run_config,
        "status": status, "error": error, "flower_status": outcome.status, "returncode": outcome.returncode,
        "run_id": outcome.run_id, "call_seconds": call_s,
        "flower_output_dir": str(outcome.output_dir) if outcome.output_dir else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }
    (run_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    return record


# -- progress -----------------------------------------------------------------------------------------------
class _Clock:
    """ETA from this invocation's own run times; before the first one ends, the preset's estimate."""

    def __init__(self, estimate_s: float, to_run: int) -> None:
        self.estimate_s = estimate_s
        self.to_run = to_run
        self.durations: list[float] = []
        self.current_start: float | None = None
        self.t0 = time.time()

    def per_run(self) -> tuple[float, bool]:
        if self.durations:
            return sum(self.durations) / len(self.durations), True
        return self.estimate_s, False

    def eta(self) -> str:
        per, measured = self.per_run()
        left = self.to_run - len(self.durations)
        if left <= 0:
            return "0s"
        cur = time.time() - self.current_start if self.current_start else 0.0
        secs = max(per - cur, per * 0.05) + per * (left - 1)
        return ("" if measured else "~") + fmt_seconds(secs)


class _EtaColumn(ProgressColumn):
    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        return Text(f"ETA {self.clock.eta()}", style="progress.remaining")


# -- the sweep ----------------------------------------------------------------------------------------------
def run_sweep(
    configs: Sequence[SweepConfig],
    out: Path,
    *,
    seeds: Sequence[int] = (0,),
    run_config: dict[str, Any] | None = None,
    extra: str | dict[str, Any] | None = None,
    num_clients: int = 5,
    preset: Preset | None = None,
    timeout: float = 3600,
    stream: bool = False,
    rerun_stale: bool = False,
    report: bool = True,
    command: str | None = None,
    console: Console | None = None,
) -> SweepSummary:
    """Run every (configuration, seed) not already done in `out`, then write the report.

    run_config: the preset's overrides; extra: the user's overrides on top (a
    `--run-config`-style string or a dict). Both go to every run; `method`, `cut-ratio` and
    `seed` come from the configuration and seed. Raises BenchmarkError before running
    anything when a configuration is invalid or a recorded run has other settings.
    """
    console = console or Console()
    out = Path(out).resolve()
    merged = {**(run_config or {}), **(parse_overrides(extra) if isinstance(extra, str) else dict(extra or {}))}
    specs = plan(configs, seeds, merged, num_clients)
    for spec in specs:  # fail on a bad key now, not 40 s into the first Flower run
        validate_overrides(spec.run_config)
    runs_dir = out / "runs"
    states = {s.name: recorded_state(runs_dir / s.name, s) for s in specs}
    stale = {n: d for n, (st, d) in states.items() if st == "stale"}
    if stale and not rerun_stale:
        lines = "\n".join(f"  {n}: {', '.join(d)}" for n, d in stale.items())
        raise BenchmarkError(f"{len(stale)} run(s) in {runs_dir} were recorded with other settings:\n{lines}\n"
                             f"use another --out, or --rerun-stale to replace them")
    todo = [s for s in specs if states[s.name][0] != "done"]
    if preset is None:  # a caller's own list: describe it as such, estimate like the CPU preset
        cpu = PRESETS["cpu"]
        preset = Preset("custom", "configurations and overrides chosen by the caller", (), (), dict(run_config or {}),
                        est_startup_s=cpu.est_startup_s, est_round_s=cpu.est_round_s, est_eval_s=cpu.est_eval_s)
    rounds = int(validate_overrides(specs[0].run_config).num_server_rounds)
    est = preset.estimate(rounds, num_clients)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "sweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta.update({
        "command": command or command_line(), "preset": preset.name, "preset_about": preset.about,
        "configs": [{"tag": c.tag, **c.overrides} for c in configs], "seeds": list(seeds),
        "num_clients": num_clients, "run_config": merged, "machine": machine_info(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
    })
    meta_path.write_text(json.dumps(meta, indent=2))

    console.print(f"[bold]sweep[/]: {len(specs)} runs ({len(todo)} to run, {len(specs) - len(todo)} done) "
                  f"-> {out}")
    if todo:
        console.print(f"estimate: ~{fmt_seconds(est)} per run, ~{fmt_seconds(est * len(todo))} in all "
                      f"({preset.name} preset, {rounds} rounds, {num_clients} clients)")
    summary = SweepSummary(out)
    clock = _Clock(est, len(todo))
    t0 = time.time()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("elapsed"), TimeElapsedColumn(), _EtaColumn(clock),
                        console=console, transient=False)
    with progress:
        task = progress.add_task("sweep", total=len(specs))
        for k, spec in enumerate(specs, 1):
            prefix = f"run {k}/{len(specs)} {spec.name}"
            if states[spec.name][0] == "done":
                console.print(f"[dim]{prefix}: already done, skipped[/]")
                summary.skipped.append(spec.name)
                progress.advance(task)
                continue
            progress.update(task, description=prefix)
            console.print(f"{prefix}: running (elapsed {fmt_seconds(time.time() - t0)}, ETA {clock.eta()})")
            clock.current_start = time.time()
            rec = _run_one(spec, runs_dir, timeout, stream, preset.client_gpus)
            clock.durations.append(time.time() - clock.current_start)
            clock.current_start = None
            if rec["status"] == "ok":
                res = json.loads((runs_dir / spec.name / "results.json").read_text())
                fid = res.get("final", {}).get("fid")
                summary.ran.append(spec.name)
                console.print(f"[green]{prefix}: ok[/] in {fmt_seconds(rec['call_seconds'])} "
                              f"(FID {fid if fid is None else f'{fid:.3g}'}); "
                              f"elapsed {fmt_seconds(time.time() - t0)}, ETA {clock.eta()}")
            else:
                summary.failed.append(spec.name)
                console.print(f"[red]{prefix}: FAILED[/] after {fmt_seconds(rec['call_seconds'])}: "
                              f"{rec['error']} (log: {runs_dir / spec.name / 'flwr.log'})")
            progress.advance(task)
    summary.seconds = time.time() - t0
    meta.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "sweep_seconds": summary.seconds,
                 "ran": summary.ran, "skipped": summary.skipped, "failed": summary.failed})
    meta_path.write_text(json.dumps(meta, indent=2))
    console.print(f"sweep finished in {fmt_seconds(summary.seconds)}: {len(summary.ran)} ran, "
                  f"{len(summary.skipped)} skipped, {len(summary.failed)} failed")
    if report:
        from .report import write_report

        paths = write_report(out)
        console.print(f"report: {paths['report']}")
    return summary


def _preset_from_args(a: argparse.Namespace) -> tuple[Preset, dict[str, Any]]:
    name = "quick" if a.quick else a.config
    if a.quick and a.config not in ("cpu", "quick"):
        raise BenchmarkError("--quick and --config gpu exclude each other")
    preset = PRESETS[name]
    rc = app_keys(dict(preset.run_config))
    if name == "gpu":
        rc["dataset"] = a.dataset
        rc["image-size"] = GPU_DATASETS[a.dataset]
        if not a.data_dir and "data-dir" not in parse_overrides(a.extra):
            raise BenchmarkError(f"--config gpu reads {a.dataset} from disk: pass --data-dir /abs/path "
                                 f"(nothing is downloaded)")
    elif a.dataset != "mnist":
        raise BenchmarkError("--dataset only applies to --config gpu (the CPU presets use embedded data)")
    if a.data_dir:
        rc["data-dir"] = str(Path(a.data_dir).expanduser().resolve())
    if a.rounds is not None:
        if a.rounds < 1:
            raise BenchmarkError(f"--rounds must be >= 1, got {a.rounds}")
        rc["num-server-rounds"] = a.rounds
    return preset, rc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    p.add_argument("--quick", action="store_true", help="the small smoke sweep (same as --config quick)")
    p.add_argument("--config", choices=sorted(PRESETS), default="cpu",
                   help="preset: " + "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/sweep-<preset>)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's)")
    p.add_argument("--rounds", type=int, default=None, help="num-server-rounds for every run")
    p.add_argument("--clients", type=int, default=None, help="virtual clients (default: the preset's, 5)")
    p.add_argument("--extra", default="", help='run-config overrides for every run, e.g. "local-steps=20"')
    p.add_argument("--only", nargs="+", default=None, metavar="TAG",
                   help="run only these configurations (tags such as collafuse-c0.2 fedavg local centralized)")
    p.add_argument("--dataset", choices=sorted(GPU_DATASETS), default="mnist", help="--config gpu only")
    p.add_argument("--data-dir", default="", help="absolute folder of the dataset (--config gpu)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds allowed per run")
    p.add_argument("--stream", action="store_true", help="show each run's Flower log live")
    p.add_argument("--rerun-stale", action="store_true", help="replace runs recorded with other settings")
    p.add_argument("--no-report", action="store_true", help="skip benchmarks.report at the end")
    p.add_argument("--dry-run", action="store_true", help="print the plan and time estimate only")
    a = p.parse_args(argv)
    console = Console()
    try:
        preset, rc = _preset_from_args(a)
        configs = standard_configs(preset.cut_ratios, preset.baselines)
        if a.only:
            configs = [config_from_tag(t) for t in a.only]
        seeds = a.seeds if a.seeds is not None else list(preset.seeds)
        clients = a.clients if a.clients is not None else preset.num_clients
        out = a.out or RESULTS_DIR / f"sweep-{preset.name}"
        if a.dry_run:
            specs = plan(configs, seeds, {**rc, **parse_overrides(a.extra)}, clients)
            for s in specs:
                validate_overrides(s.run_config)
            rounds = validate_overrides(specs[0].run_config).num_server_rounds
            est = preset.estimate(rounds, clients)
            for s in specs:
                state, diff = recorded_state(Path(out).resolve() / "runs" / s.name, s)
                print(f"{s.name:24s} {state:5s} {format_overrides(s.run_config)}"
                      + (f"  (differs: {', '.join(diff)})" if diff else ""))
            print(f"{len(specs)} runs, ~{fmt_seconds(est)} each, ~{fmt_seconds(est * len(specs))} in all "
                          f"if none is done; output {out}")
            return 0
        summary = run_sweep(configs, out, seeds=seeds, run_config=rc, extra=a.extra, num_clients=clients,
                            preset=preset, timeout=a.timeout, stream=a.stream, rerun_stale=a.rerun_stale,
                            report=not a.no_report, console=console)
    except BenchmarkError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
