"""The ServerApp: validate the config once, pick the method's strategy, run it, write outputs."""

from __future__ import annotations

import time
import traceback
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from .config import RunConfig, parse_config, run_dir
from .grid import PollingGrid
from .models import default_device, shared_denoiser, use_torch_threads
from .outputs import MetricsCsv, write_json
from .report_run import finalize

app = ServerApp()

CHANNELS = {"digits": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "celeba": 3, "awa2": 3, "imagefolder": 3}


def build_strategy(cfg: RunConfig, num_nodes: int, device: torch.device, on_round_end=None):
    """The method's strategy and its initial global ArrayRecord."""
    from strategies import CollaFuse, Centralized, FedAvgDiffusion, LocalOnly

    shape = (CHANNELS[cfg.dataset], cfg.image_size, cfg.image_size)
    if cfg.method == "local":
        return LocalOnly(cfg, num_nodes, on_round_end), ArrayRecord()
    torch.manual_seed(cfg.seed)
    model = shared_denoiser(cfg.image_size, shape[0], cfg.model_size, cfg.conditioning, num_nodes)
    arrays = ArrayRecord(model.state_dict())
    if cfg.method == "collafuse":
        return CollaFuse(cfg, model, shape, device, num_nodes, on_round_end), arrays
    if cfg.method == "fedavg":
        return FedAvgDiffusion(cfg, num_nodes, on_round_end), arrays
    return Centralized(cfg, model, shape, device, num_nodes, on_round_end), arrays


def _wait_for_nodes(grid: Grid, timeout: float = 120.0, settle: float = 0.5) -> int:
    """The number of connected nodes, once it has held still for `settle` seconds.

    A simulation registers every node before the ServerApp starts, so this returns after one
    settle period; a real deployment's SuperNodes may still be connecting.
    """
    t0 = time.time()
    last, since = 0, time.time()
    while time.time() - t0 < timeout:
        n = len(list(grid.get_node_ids()))
        if n != last:
            last, since = n, time.time()
        elif n and time.time() - since >= settle:
            return n
        time.sleep(0.1)
    if last:
        return last
    raise RuntimeError(f"no client node connected within {timeout:.0f}s")


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = parse_config(context.run_config)
    out = run_dir(cfg, context.run_id)
    log(INFO, "collafuse-flwr: method=%s dataset=%s output=%s", cfg.method, cfg.dataset, out)
    started = time.time()
    csv = MetricsCsv(out / "metrics.csv")
    header = {"status": "running", "run_id": context.run_id, "config": cfg.to_flwr()}
    write_json(out / "results.json", header)
    try:
        use_torch_threads(cfg.torch_threads)
        torch.manual_seed(cfg.seed)
        num_nodes = _wait_for_nodes(grid)
        device = default_device()

        def on_round_end(strategy, server_round: int) -> None:
            rec = strategy.rounds.get(server_round)
            csv.append({"round": server_round, "elapsed-s": round(time.time() - started, 2),
                        **dict(rec.values if rec else {}),
                        **{f"bytes-total-{k}": v for k, v in strategy.bytes.items()}})

        strategy, arrays = build_strategy(cfg, num_nodes, device, on_round_end)
        params = 0 if not len(arrays) else sum(a.numpy().size for a in arrays.values())
        log(INFO, "%d client nodes; denoiser parameters: %d", num_nodes, params)
        # Flower's grid re-polls for replies only every 3 s; PollingGrid polls every 0.05 s
        strategy.start(grid=PollingGrid(grid), initial_arrays=arrays, num_rounds=cfg.num_server_rounds,
                       timeout=3600)
        finalize(cfg, strategy, out, context.run_id, num_nodes, started, params)
    except Exception as exc:  # keep what was measured, say why it stopped, then fail the run
        write_json(out / "results.json", {**header, "status": "failed", "error": repr(exc),
                                          "traceback": traceback.format_exc()})
        raise
    log(INFO, "collafuse-flwr: results in %s", Path(out))
