"""A user's own ServerApp: CollaFuse's strategy from collafuse-flwr, everything else its own.

It builds the shared denoiser and `strategies.CollaFuse` from plain arguments, adds its own
server-side measure through Flower's `evaluate_fn`, and writes the `Result` as JSON. The nodes
run collafuse-flwr's ClientApp on the same run-config; a node refuses another cut step.

    flwr run examples/custom_serverapp --federation-config "num-supernodes=3" --stream
"""

from __future__ import annotations

import json
import time
from logging import INFO
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from collafuse_flwr.core.models import shared_denoiser
from strategies import CollaFuse, ServerTrainer

app = ServerApp()


def parameter_norm(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """My own server-side measure of the shared denoiser (Flower's `evaluate_fn` hook)."""
    norm = sum(float((a.numpy().astype("float64") ** 2).sum()) for a in arrays.values()) ** 0.5
    return MetricRecord({"server-param-norm": norm})


def wait_for_nodes(grid: Grid, timeout: float = 120.0) -> int:
    t0 = time.time()
    while not (n := len(list(grid.get_node_ids()))):
        if time.time() - t0 > timeout:
            raise RuntimeError(f"no node connected within {timeout:.0f}s")
        time.sleep(0.5)
    return n


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    size, steps = int(rc["image-size"]), int(rc["diffusion-steps"])
    num_nodes = wait_for_nodes(grid)
    torch.manual_seed(0)
    # one class slot per node: the shared model is conditioned on the client index
    model = shared_denoiser(size, 1, str(rc["model-size"]), "client", num_nodes)
    trainer = ServerTrainer(model, server_steps=int(rc["server-steps"]), batch_size=int(rc["batch-size"]))
    strategy = CollaFuse(trainer, (1, size, size), diffusion_steps=steps, cut_ratio=float(rc["cut-ratio"]),
                         uploads_per_round=int(rc["uploads-per-round"]),
                         num_eval_samples=int(rc["num-eval-samples"]), capacity=num_nodes)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()),
                            num_rounds=int(rc["num-server-rounds"]), evaluate_fn=parameter_norm)
    out = Path(str(rc["output-dir"]) or Path.home() / "collafuse-runs") / f"custom-serverapp-{context.run_id}"
    out.mkdir(parents=True, exist_ok=True)
    summary = {"cut_step": strategy.t_c, "num_nodes": num_nodes, "final_arrays": len(result.arrays),
               **{k: {r: dict(m) for r, m in getattr(result, k).items()} for k in
                  ("train_metrics_clientapp", "evaluate_metrics_clientapp", "evaluate_metrics_serverapp")}}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    log(INFO, "my-collafuse-server: summary in %s", out / "summary.json")
