"""The comparison without Flower's SuperLink or Ray: ServerApp main and ClientApp in one process.

For a machine that has torch but not Flower's simulation engine (Ray is ~220 MB and cannot travel
to a lent GPU box). The *same* ServerApp main (`collafuse_flwr.server_app.main`) and ClientApp
(`collafuse_flwr.client_app.app`) run with real Flower messages; only the transport differs: an
in-process Grid (tests/inprocess.py's `InProcessGrid`) hands each message straight to the
ClientApp, one Context per node, one node after the other. The research harness is forced on
(`harness="on"`), so pooled FID, the reference attacker and the disclosure probe are measured as in
a simulation. Runs are recorded exactly as `benchmarks.sweep` records them (OUT/runs/<tag>-s<seed>/
with results.json, metrics.csv, samples.png/npz and a per-run sweep.json; OUT/sweep.json with the
machine and the engine), so `python -m benchmarks.report OUT` writes the same report.

    python -m benchmarks.inprocess --config gpu-mnist5k --out /tmp/gpu-sweep      # the GPU comparison
    python -m benchmarks.inprocess --config smoke --out /tmp/smoke                 # ~1-2 min CPU smoke test
    python -m benchmarks.inprocess --config gpu-mnist5k --out DIR --only collafuse-c0.2 --rounds 2

Each run's files are written the moment it ends (and a run stopped by SIGTERM/SIGINT is recorded
as "stopped" with what it had), so a job killed at a time limit leaves every finished run on disk.
Runs already recorded "ok" with the same settings are skipped, as in the sweep.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _stub_cryptography_if_unusable() -> str | None:
    """Flower imports `cryptography` at module level for secure aggregation and SuperNode auth,
    neither of which an in-process run uses. Where its compiled part cannot load (say, no
    `_cffi_backend` for this Python), stand in placeholders that fail only when called, so the
    apps can import; returns why, or None when the real package works."""
    try:
        import cryptography.exceptions  # noqa: F401
        import cryptography.fernet  # noqa: F401
        from cryptography.hazmat.primitives.asymmetric import ec  # noqa: F401
        from cryptography.hazmat.primitives.kdf import hkdf  # noqa: F401

        return None
    except Exception as exc:  # noqa: BLE001 - any failure to load it is the case handled here
        reason = f"{type(exc).__name__}: {exc}"
    import types

    class _Missing:
        def __init__(self, name: str) -> None:
            self._name = name

        def __getattr__(self, attr: str) -> _Missing:
            return _Missing(f"{self._name}.{attr}")

        def __call__(self, *a: Any, **k: Any) -> Any:
            raise RuntimeError(f"{self._name} is unavailable: cryptography could not load ({reason})")

    class _Module(types.ModuleType):
        def __getattr__(self, attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Missing(f"{self.__name__}.{attr}")

    for k in [k for k in sys.modules if k == "cryptography" or k.startswith("cryptography.")]:
        del sys.modules[k]
    names = ("cryptography", "cryptography.exceptions", "cryptography.fernet", "cryptography.x509",
             "cryptography.x509.oid", "cryptography.hazmat", "cryptography.hazmat.primitives",
             "cryptography.hazmat.primitives.hashes", "cryptography.hazmat.primitives.serialization",
             "cryptography.hazmat.primitives.asymmetric", "cryptography.hazmat.primitives.asymmetric.ec",
             "cryptography.hazmat.primitives.kdf", "cryptography.hazmat.primitives.kdf.hkdf")
    for name in names:
        mod = _Module(name)
        mod.__path__ = []  # a package, so `import a.b` finds b in sys.modules
        sys.modules[name] = mod
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, mod)
    print(f"warning: cryptography cannot load here ({reason}); Flower's secure-aggregation/auth imports get "
          f"placeholders (not used by an in-process run)", file=sys.stderr)
    return reason


CRYPTOGRAPHY_STUBBED = _stub_cryptography_if_unusable()

from .common import BenchmarkError, command_line, fmt_seconds, machine_info, parse_overrides, validate_overrides  # noqa: E402 - after the cryptography check, which must precede Flower's imports
from .sweep import RUN_FILES, Preset, RunSpec, config_from_tag, plan, recorded_state, standard_configs  # noqa: E402

ENGINE = "in-process grid, no Flower SuperLink/Ray"
REPO = Path(__file__).resolve().parent.parent

#: The paper's setting in miniature (issue 15): real 28 px MNIST digits, base UNet, T = 1000.
#: Work per run: 6 rounds x 5 clients x 100 steps of batch 64 (CollaFuse: as many server steps
#: again), 200 samples per client with 100 DDIM steps; one base-UNet step at 28 px is ~0.45 TFLOP
#: (2.33 GFLOP per image forward, benchmarks/results/client_compute.json). `--time-budget` times a
#: step on the device first and lowers the rounds (equally for every run) if all four would not fit.
GPU_MNIST5K = Preset(
    "gpu-mnist5k",
    "embedded MNIST-5k at 28 px, base UNet, T=1000, c = 0.2 + local-only, FedAvg, centralized, 6 rounds x 100 "
    "local steps (batch 64, lr 2e-4), server-steps auto, 256 uploads, 200 eval samples (100 DDIM steps), seed 0; "
    "FID on mnist-cnn (trained on rows the clients never see); run in-process (no SuperLink/Ray)",
    (0.2,), ("local", "fedavg", "centralized"),
    {"dataset": "mnist5k", "image-size": 28, "model-size": "base", "diffusion-steps": 1000,
     "batch-size": 64, "learning-rate": 2e-4, "local-steps": 100, "server-steps": "auto",
     "num-server-rounds": 6, "uploads-per-round": 256, "num-eval-samples": 200, "sampling-steps": 100,
     "count-flops": True, "attack-reference-steps": 200, "fid-backbone": "mnist-cnn"},
    est_startup_s=10.0, est_round_s=15.0, est_eval_s=20.0,
)

#: Proves the in-process path end to end on a CPU in about a minute per run.
SMOKE = Preset(
    "smoke", "CPU smoke test of the in-process path: mnist5k at 8 px, tiny UNet, T=20, 1 round, 2 clients",
    (0.2,), ("local", "fedavg", "centralized"),
    {"dataset": "mnist5k", "image-size": 8, "model-size": "tiny", "diffusion-steps": 20, "num-server-rounds": 1,
     "local-steps": 2, "server-steps": 2, "batch-size": 16, "uploads-per-round": 8, "num-eval-samples": 8,
     "attack-reference-steps": 5, "max-samples": 400, "torch-threads": 1},
    num_clients=2, est_startup_s=5.0, est_round_s=5.0, est_eval_s=10.0,
)

PRESETS: dict[str, Preset] = {p.name: p for p in (GPU_MNIST5K, SMOKE)}


# -- the in-process grid ------------------------------------------------------------------------------------
def _grid_class():
    """tests/inprocess.py's InProcessGrid (loaded by path: tests/ is not a package)."""
    mod = sys.modules.get("inprocess")
    if mod is None or not hasattr(mod, "InProcessGrid"):
        path = REPO / "tests" / "inprocess.py"
        spec = importlib.util.spec_from_file_location("inprocess", path)
        if spec is None or spec.loader is None:
            raise BenchmarkError(f"cannot load the in-process grid from {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["inprocess"] = mod
        spec.loader.exec_module(mod)
    return mod.InProcessGrid


def _prepare_like_simulation(cfg) -> None:
    """What the ServerApp does at start under the simulation engine (it cannot tell it is beside
    the nodes here): check the dataset can be read and ready the FID backbone once."""
    from collafuse_flwr.data.load import check_dataset
    from collafuse_flwr.metrics.features import prepare_backbone

    check_dataset(cfg.dataset)
    prepare_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None, cfg.fid_download)


def run_inprocess_dir(run_config: dict[str, Any], num_clients: int, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Like run_inprocess, and also the run's own folder (under out_dir)."""
    from flwr.app import Context, RecordDict

    from collafuse_flwr import client_app, server_app
    from collafuse_flwr.config import load_defaults, parse_config

    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Flower merges --run-config over [tool.flwr.app.config]; the harness is on as in a simulation
    rc = {**load_defaults(), **run_config, "harness": "on", "output-dir": str(out_dir)}
    cfg = parse_config(rc)  # a bad key fails here, before any work
    _prepare_like_simulation(cfg)
    before = {p for p in out_dir.iterdir() if p.is_dir()}
    grid = _grid_class()(client_app.app, rc, num_clients)
    context = Context(run_id=grid.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc))
    try:
        server_app.main(grid, context)  # @app.main() returns the function unchanged
    finally:
        # the run's own folder: the new one holding results.json (a node may add others beside it)
        new = sorted(p for p in out_dir.iterdir() if p.is_dir() and p not in before)
        runs = [p for p in new if (p / "results.json").is_file()]
        folder = runs[-1] if runs else (new[-1] if new else None)
        run_inprocess_dir.last_folder = folder  # type: ignore[attr-defined]  # for callers that catch
    if folder is None or not (folder / "results.json").is_file():
        raise RuntimeError(f"the ServerApp wrote no results.json under {out_dir}")
    return folder, json.loads((folder / "results.json").read_text())


def run_inprocess(run_config: dict[str, Any], num_clients: int, out_dir: Path) -> dict[str, Any]:
    """One run of the real ServerApp main with `num_clients` ClientApp nodes in this process.

    run_config: run-config overrides (dash keys, as `--run-config`), merged over the app's
    pyproject defaults as Flower does; `harness` is forced "on" and `output-dir` is out_dir (the
    app makes its own run folder below it). Returns the run's results.json content. A run that
    fails raises, after the ServerApp has written results.json with status "failed".
    """
    return run_inprocess_dir(run_config, num_clients, out_dir)[1]


# -- a sequence of runs, recorded like a sweep ----------------------------------------------------------------
def _device_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a missing driver only leaves the field empty
        return None


def _record_run(spec: RunSpec, runs_dir: Path, started: float, status: str, error: str | None,
                folder: Path | None) -> dict[str, Any]:
    run_dir = runs_dir / spec.name
    if folder is not None:
        for f in RUN_FILES:
            if (folder / f).is_file():
                shutil.copy2(folder / f, run_dir / f)
    record = {
        "name": spec.name, "tag": spec.config.tag, "seed": spec.seed, "method": spec.config.method,
        "cut_ratio": spec.config.cut_ratio, "num_clients": spec.num_clients, "run_config": spec.run_config,
        "status": status, "error": error, "engine": ENGINE, "call_seconds": time.time() - started,
        "flower_output_dir": str(folder) if folder else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
    }
    (run_dir / "sweep.json").write_text(json.dumps(record, indent=2))
    return record


def _run_one(spec: RunSpec, runs_dir: Path) -> dict[str, Any]:
    run_dir = runs_dir / spec.name
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in RUN_FILES:  # never leave a previous attempt's files beside a new attempt's
        (run_dir / f).unlink(missing_ok=True)
    started = time.time()
    try:
        folder, res = run_inprocess_dir(spec.run_config, spec.num_clients, run_dir / "app")
    except BaseException as exc:  # record what there is, then stop (Ctrl-C / SIGTERM) or go on
        folder = getattr(run_inprocess_dir, "last_folder", None)
        stopped = isinstance(exc, (KeyboardInterrupt, SystemExit))
        (run_dir / "flwr.log").write_text(traceback.format_exc())  # the report links failed runs' logs here
        _record_run(spec, runs_dir, started, "stopped" if stopped else "failed", repr(exc), folder)
        if stopped:
            raise
        return json.loads((run_dir / "sweep.json").read_text())
    status = "ok" if res.get("status") == "ok" else "failed"
    return _record_run(spec, runs_dir, started, status, res.get("error"), folder)


# -- fitting a time limit ------------------------------------------------------------------------------------
def calibrate_step_seconds(run_config: dict[str, Any], num_clients: int, steps: int = 8) -> float:
    """Seconds of one optimizer step of the shared denoiser at the run's size and batch, on the
    device the apps will use (after warm-up, which includes cudnn autotuning)."""
    import torch

    from collafuse_flwr.config import parse_config
    from collafuse_flwr.core.models import default_device, shared_denoiser

    cfg = parse_config({**run_config, "harness": "on"})
    device = default_device()
    with torch.random.fork_rng(devices=[]):
        model = shared_denoiser(cfg.image_size, cfg.image_channels, cfg.model_size, cfg.conditioning,
                                num_clients).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        x = torch.randn(cfg.batch_size, cfg.image_channels, cfg.image_size, cfg.image_size, device=device)
        t = torch.randint(0, cfg.diffusion_steps, (cfg.batch_size,), device=device)
        labels = torch.randint(0, num_clients, (cfg.batch_size,), device=device)

        def step() -> None:
            out = model(x, t, class_labels=labels if model.num_classes else None)
            loss = torch.nn.functional.mse_loss(out, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        def sync() -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()

        for _ in range(3):
            step()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        return (time.perf_counter() - t0) / steps


def step_units(run_config: dict[str, Any], method: str, num_clients: int) -> float:
    """One run's work in training-step equivalents (one optimizer step of batch-size images):
    client steps, server steps, the reference attacker's steps and the final sampling (a
    forward pass is ~1/3 of a training step; per-client sampling of num-eval-samples images)."""
    from collafuse_flwr.config import parse_config

    with warnings.catch_warnings():  # keys another method ignores: said once per run, not here
        warnings.simplefilter("ignore")
        cfg = parse_config({**run_config, "method": method, "harness": "on"})
    per_round = num_clients * cfg.local_steps
    server = (num_clients * cfg.local_steps if cfg.server_steps == "auto" else int(cfg.server_steps))
    units = cfg.num_server_rounds * per_round  # every method's clients (centralized: its server)
    if method == "collafuse":
        units += cfg.num_server_rounds * server + cfg.attack_reference_steps
    sampling = cfg.sampling_steps or cfg.diffusion_steps
    units += num_clients * cfg.num_eval_samples * sampling / cfg.batch_size / 3.0
    return units


#: Measured work is multiplied by this for what the calibration does not see (data loading, FLOP
#: counting, FID features, the disclosure probe, state files, Python overhead of the messages).
OVERHEAD = 1.3
PER_RUN_FIXED_S = 8.0


def project_seconds(step_s: float, run_config: dict[str, Any], methods: Sequence[str], num_clients: int) -> float:
    return sum(step_s * OVERHEAD * step_units(run_config, m, num_clients) + PER_RUN_FIXED_S for m in methods)


def fit_rounds(step_s: float, run_config: dict[str, Any], methods: Sequence[str], num_clients: int,
               budget_s: float) -> int:
    """The most rounds (<= the configured number, >= 1) whose projected time fits budget_s."""
    rounds = int(run_config.get("num-server-rounds", 1))
    while rounds > 1 and project_seconds(step_s, {**run_config, "num-server-rounds": rounds}, methods,
                                         num_clients) > budget_s:
        rounds -= 1
    return rounds


def run_sequence(configs, out: Path, *, preset: Preset, run_config: dict[str, Any], seeds: Sequence[int],
                 num_clients: int, report: bool = True, command: str | None = None,
                 calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run every (configuration, seed) not already done under out/runs, one after another."""
    out = Path(out).resolve()
    run_config = {**run_config, "harness": "on"}  # what run_inprocess sends, so resume checks compare alike
    specs = plan(configs, seeds, run_config, num_clients)
    for spec in specs:
        validate_overrides(spec.run_config)
    runs_dir = out / "runs"
    states = {s.name: recorded_state(runs_dir / s.name, s) for s in specs}
    stale = {n: d for n, (st, d) in states.items() if st == "stale"}
    if stale:
        lines = "\n".join(f"  {n}: {', '.join(d)}" for n, d in stale.items())
        raise BenchmarkError(f"{len(stale)} run(s) in {runs_dir} were recorded with other settings:\n{lines}\n"
                             f"use another --out")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "sweep.json"
    machine = machine_info()
    machine["cuda"] = machine.get("cuda") or _device_name()
    meta = {
        "command": command or command_line(), "preset": preset.name, "preset_about": preset.about,
        "engine": ENGINE, "configs": [{"tag": c.tag, **c.overrides} for c in configs], "seeds": list(seeds),
        "num_clients": num_clients, "run_config": run_config, "machine": machine,
        "device": machine["cuda"] or "cpu", "cryptography_stubbed": CRYPTOGRAPHY_STUBBED, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None,
        "ran": [], "skipped": [], "failed": [], "calibration": calibration,
    }
    try:
        import torch

        meta["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
    except Exception:  # noqa: BLE001
        pass
    meta_path.write_text(json.dumps(meta, indent=2))
    t0 = time.time()
    print(f"in-process sweep ({ENGINE}) on {meta['device']}: {len(specs)} runs -> {out}", flush=True)
    try:
        for k, spec in enumerate(specs, 1):
            prefix = f"run {k}/{len(specs)} {spec.name}"
            if states[spec.name][0] == "done":
                print(f"{prefix}: already done, skipped", flush=True)
                meta["skipped"].append(spec.name)
                continue
            print(f"{prefix}: running (elapsed {fmt_seconds(time.time() - t0)})", flush=True)
            rec = _run_one(spec, runs_dir)
            if rec["status"] == "ok":
                res = json.loads((runs_dir / spec.name / "results.json").read_text())
                fid = res.get("final", {}).get("fid")
                meta["ran"].append(spec.name)
                print(f"{prefix}: ok in {fmt_seconds(rec['call_seconds'])} "
                      f"(FID {fid if fid is None else f'{fid:.3g}'}); elapsed {fmt_seconds(time.time() - t0)}",
                      flush=True)
            else:
                meta["failed"].append(spec.name)
                print(f"{prefix}: FAILED after {fmt_seconds(rec['call_seconds'])}: {rec['error']} "
                      f"(traceback: {runs_dir / spec.name / 'flwr.log'})", flush=True)
            meta["sweep_seconds"] = time.time() - t0
            meta_path.write_text(json.dumps(meta, indent=2))  # on disk after every run
    finally:
        meta.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "sweep_seconds": time.time() - t0})
        meta_path.write_text(json.dumps(meta, indent=2))
    print(f"in-process sweep finished in {fmt_seconds(meta['sweep_seconds'])}: {len(meta['ran'])} ran, "
          f"{len(meta['skipped'])} skipped, {len(meta['failed'])} failed", flush=True)
    if report:
        from .report import write_report

        print(f"report: {write_report(out)['report']}", flush=True)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inprocess", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--config", choices=sorted(PRESETS), default="gpu-mnist5k",
                   help="preset: " + "; ".join(f"{k}: {v.about}" for k, v in PRESETS.items()))
    p.add_argument("--out", type=Path, required=True, help="output folder (runs/, sweep.json, the report)")
    p.add_argument("--only", nargs="+", default=None, metavar="TAG",
                   help="run only these configurations (collafuse-c0.2 local fedavg centralized), in this order")
    p.add_argument("--rounds", type=int, default=None, help="num-server-rounds for every run")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the preset's)")
    p.add_argument("--clients", type=int, default=None, help="client nodes (default: the preset's)")
    p.add_argument("--extra", default="", help='run-config overrides for every run, e.g. "local-steps=20"')
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (it is switched on where CUDA is present)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="time one training step on this device first and lower num-server-rounds (the same for "
                        "every run) until the projected time of all runs fits S seconds")
    p.add_argument("--no-report", action="store_true", help="skip benchmarks.report at the end")
    a = p.parse_args(argv)
    try:
        preset = PRESETS[a.config]
        rc = {**preset.run_config, **parse_overrides(a.extra)}
        if a.rounds is not None:
            if a.rounds < 1:
                raise BenchmarkError(f"--rounds must be >= 1, got {a.rounds}")
            rc["num-server-rounds"] = a.rounds
        configs = ([config_from_tag(t) for t in a.only] if a.only
                   else standard_configs(preset.cut_ratios, preset.baselines))
        import torch

        if torch.cuda.is_available() and not a.no_cudnn_benchmark:
            # fixed shapes (batch 64 training, fixed eval batches): autotuning pays off at once
            torch.backends.cudnn.benchmark = True
        calibration = None
        if a.time_budget is not None:
            clients = a.clients if a.clients is not None else preset.num_clients
            methods = [c.method for c in configs]
            t0 = time.time()
            step_s = calibrate_step_seconds(rc, clients)
            wanted = int(rc.get("num-server-rounds", 1))
            rounds = fit_rounds(step_s, rc, methods, clients, a.time_budget)
            projected = project_seconds(step_s, {**rc, "num-server-rounds": rounds}, methods, clients)
            calibration = {"train_step_seconds": step_s, "time_budget_s": a.time_budget, "rounds_wanted": wanted,
                           "rounds_used": rounds, "projected_seconds": projected, "overhead_factor": OVERHEAD,
                           "calibration_seconds": time.time() - t0}
            print(f"calibration: one training step {step_s * 1e3:.1f} ms; {rounds} round(s) "
                  f"(of {wanted}) project to {fmt_seconds(projected)} for {len(methods)} run(s) "
                  f"(budget {fmt_seconds(a.time_budget)})", flush=True)
            rc["num-server-rounds"] = rounds
        run_sequence(configs, a.out, preset=preset, run_config=rc,
                     seeds=a.seeds if a.seeds is not None else list(preset.seeds),
                     num_clients=a.clients if a.clients is not None else preset.num_clients,
                     report=not a.no_report, calibration=calibration)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
