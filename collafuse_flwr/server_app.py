"""The ServerApp: validate the run-config, wait for the nodes, build the method's strategy
(`server/build.py`), run Flower's loop and write the outputs; the research harness only where
it may run (the simulation engine, or `harness = "on"`)."""

from __future__ import annotations

from collafuse_flwr.imports import LOCK

with LOCK:  # the ClientApp may be loading in another thread (collafuse_flwr/imports.py)
    import json
    import signal
    import sys
    import threading
    import time
    import traceback
    from logging import INFO, WARNING
    from pathlib import Path

    import torch
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.supercore import log

    from collafuse_flwr.config import RunConfig, parse_config, run_dir
    from collafuse_flwr.core.models import default_device, use_torch_threads
    from collafuse_flwr.data.client_data import dataset_for
    from collafuse_flwr.data.load import check_dataset
    from collafuse_flwr.harness.outputs import MetricsCsv, write_json
    from collafuse_flwr.harness.report import finalize
    from collafuse_flwr.metrics.features import prepare_backbone
    from collafuse_flwr.server import checkpoint as ck
    from collafuse_flwr.server.build import build_strategy
    from collafuse_flwr.server.grid import PollingGrid
    from strategies.isolation import repair_dead_actors

    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # Flower's server stack (fastapi, ...) absent: benchmarks.inprocess on a bare box
        InMemoryGrid = None  # noqa: N806
    try:
        from flwr.supercore.exit import add_exit_handler
    except ImportError:  # a Flower without it: the launcher marks results.json instead
        add_exit_handler = None

app = ServerApp()


def harness_enabled(cfg: RunConfig, simulation: bool) -> bool:
    """The harness reloads client data in the ServerApp: only a simulation can (and may), or `harness = "on"`."""
    return cfg.harness == "on" or (cfg.harness == "auto" and simulation)


def harness_data_readable(cfg: RunConfig) -> bool:
    """The harness's data is readable (checked at start: skipped now, with one line, not failing after training)."""
    try:
        dataset_for(cfg)
        return True
    except Exception as exc:  # noqa: BLE001 - any reason to be unable to read is a reason to skip
        log(WARNING, "research harness skipped: the ServerApp cannot read dataset=%r (%s); pooled FID and "
            "the reference attacker need the clients' data, which only a simulation has", cfg.dataset,
            str(exc).splitlines()[0][:200])
        return False


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float) -> int:
    """Connected nodes once at least `min_nodes` are there (a simulation has them all at start)."""
    t0 = time.time()
    while True:
        n = len(list(grid.get_node_ids()))
        if n >= min_nodes:
            return n
        if time.time() - t0 > timeout:
            raise RuntimeError(f"only {n} client node(s) connected within {timeout:.0f}s, min-nodes={min_nodes}; "
                               f"start the SuperNodes or lower min-nodes")
        log(INFO, "waiting for nodes: %d connected, min-nodes=%d", n, min_nodes)
        time.sleep(1.0)


def _resume_point(cfg: RunConfig, context: Context):
    """(run folder, checkpoint or None): a fresh folder, or the killed run's with its checkpoint."""
    if not cfg.resume_from:
        return run_dir(cfg, context.run_id), None
    ckpt = ck.load_checkpoint(Path(cfg.resume_from))
    now, then = cfg.to_flwr(), ckpt["config"]
    changed = sorted(k for k in set(now) | set(then) if k != "resume-from" and now.get(k) != then.get(k))
    if changed:
        raise RuntimeError(f"resume-from: the run-config differs from the checkpoint's in {changed}; resume with "
                           f"the same settings (only resume-from may differ)")
    if ckpt["round"] >= cfg.num_server_rounds:
        try:
            status = str(json.loads((Path(cfg.resume_from) / "results.json").read_text()).get("status"))
        except (OSError, ValueError, AttributeError):
            status = "unknown"
        if status in ("ok", "degraded"):
            raise RuntimeError(f"resume-from: {cfg.resume_from} already finished all {cfg.num_server_rounds} rounds "
                               f"(status {status})")
        log(WARNING, "resume-from: all %d rounds of %s finished but its results were not written (status %s); "
            "writing them from the checkpoint", cfg.num_server_rounds, cfg.resume_from, status)
    return Path(cfg.resume_from), ckpt


class _EngineExit:
    """Record "stopped" when Flower's engine exits under a running ServerApp: `flwr stop` ends a simulation
    in its main thread, so the ServerApp's thread sees no signal. The handler remembers "stopped", so the error
    the thread hits next (its grid gone) is recorded "stopped", not "failed". Disarmed when the run ends."""

    def __init__(self, results: Path, header: dict) -> None:
        self.results, self.header, self.armed, self.exiting = results, header, True, False
        if add_exit_handler is not None:
            add_exit_handler(self, run_before_force_exit=True)

    def __call__(self) -> None:
        if not self.armed:
            return
        self.exiting = True
        try:
            if json.loads(self.results.read_text()).get("status") == "running":
                write_json(self.results, {**self.header, "status": "stopped",
                                          "error": "stopped by Flower's engine (flwr stop, or a signal to it)"})
        except Exception:  # noqa: BLE001 - an exit handler must not stop the engine's own clean-up
            pass


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    out, ckpt = _resume_point(cfg, context)
    log(INFO, "collafuse-flwr: method=%s dataset=%s; outputs go to %s (on the machine that runs the "
        "ServerApp; set run-config output-dir to choose)%s", cfg.method, cfg.dataset, out,
        f"; resuming after round {ckpt['round']}" if ckpt else "")
    if threading.current_thread() is threading.main_thread():  # SIGTERM -> SystemExit: results.json says "stopped"
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # (in a simulation thread the engine stops it)
    started = time.time()
    csv = MetricsCsv(out / "metrics.csv", keep_rounds_upto=ckpt["round"] if ckpt else 0)
    run_key = ckpt["run_key"] if ckpt else context.run_id
    header = {"status": "running", "run_id": run_key, "config": cfg.to_flwr()}
    write_json(out / "results.json", header)
    engine_exit = _EngineExit(out / "results.json", header)
    try:
        use_torch_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        inner = grid.inner if isinstance(grid, PollingGrid) else grid
        simulation = InMemoryGrid is not None and isinstance(inner, InMemoryGrid)  # the simulation engine's grid
        if simulation:  # the nodes share this machine's data and network: stop now if they cannot load it
            repair_dead_actors()  # and one node's crash must not kill the Ray worker others run on
            check_dataset(cfg.dataset)
            prepare_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None, cfg.fid_download)  # fetch once
        harness = harness_enabled(cfg, simulation) and harness_data_readable(cfg)
        if cfg.harness == "auto" and not simulation:
            log(WARNING, "not a simulation: the research harness (pooled FID, reference attacker, disclosure "
                "probe) is off, so the ServerApp reads no client data; nodes report only what their "
                "share-harness policy allows")
        num_nodes = wait_for_nodes(grid, cfg.min_nodes, cfg.round_timeout)
        device = default_device()

        def on_round_end(strategy, server_round: int) -> None:
            rec = strategy.recorder.rounds.get(server_round)
            csv.append({"round": server_round, "elapsed-s": round(time.time() - started, 2),
                        **dict(rec.values if rec else {}),
                        **{f"bytes-total-{k}": v for k, v in strategy.recorder.bytes.items()}})

        if ckpt:  # the same client slots as before, whoever is connected now
            with ck.applying(cfg.resume_from):
                slots = ckpt["strategy"]["registry"][0]
                if not (slots is None or type(slots) is int and slots >= 0):
                    raise TypeError(f"client slots {slots!r}, expected a whole number >= 0 or None")
                num_nodes = slots or num_nodes
        strategy, arrays = build_strategy(cfg, num_nodes, device, on_round_end, harness, simulation)
        strategy.run_key = run_key
        params = 0 if not len(arrays) else sum(a.numpy().size for a in arrays.values())
        log(INFO, "%d client nodes; denoiser parameters: %d; research harness %s", num_nodes, params,
            "on" if harness else "off")
        resume = {}
        if ckpt:
            with ck.applying(cfg.resume_from):
                strategy.load_state_dict(ckpt["strategy"])
            arrays = ckpt["arrays"] if len(ckpt["arrays"]) else arrays
            resume = {"start_round": ckpt["round"] + 1, "result": ckpt["result"]}

        def checkpoint(server_round: int, arrays_now: ArrayRecord, result) -> None:
            ck.save_checkpoint(out, strategy, server_round, arrays_now, result, cfg.to_flwr(), run_key)

        result = strategy.start(grid=PollingGrid(grid), initial_arrays=arrays, num_rounds=cfg.num_server_rounds,
                                timeout=cfg.round_timeout, checkpoint_fn=checkpoint, **resume)
        finalize(cfg, strategy, result, out, run_key, num_nodes, started, params, harness)
        engine_exit.armed = False
    except BaseException as exc:  # keep what was measured, say why it stopped, then fail the run
        engine_exit.armed = False
        status = "stopped" if isinstance(exc, (KeyboardInterrupt, SystemExit)) or engine_exit.exiting else "failed"
        write_json(out / "results.json", {**header, "status": status, "error": repr(exc),
                                          "traceback": traceback.format_exc()})
        log(INFO, "collafuse-flwr: results in %s", Path(out))  # the launcher finds a failed run's folder too
        raise
    log(INFO, "collafuse-flwr: results in %s", Path(out))
