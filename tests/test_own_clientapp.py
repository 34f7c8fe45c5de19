"""A ClientApp written only with `collafuse_flwr.node`'s functions runs a whole CollaFuse job
against the strategy (the hello step included: without it every node is refused)."""

import importlib.util
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from collafuse_flwr.core.models import shared_denoiser
from inprocess import InProcessGrid
from strategies import CollaFuse, ServerTrainer

ROOT = Path(__file__).resolve().parent.parent


def _own_app():
    spec = importlib.util.spec_from_file_location("my_client_app", ROOT / "examples/own_clientapp/my_client_app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_users_own_clientapp_runs_collafuse():
    mod = _own_app()
    model = shared_denoiser(8, 1, "tiny", "client", 2)
    strategy = CollaFuse(ServerTrainer(model, server_steps=2, batch_size=16), (1, 8, 8), diffusion_steps=mod.T,
                         cut_step=mod.CUT, uploads_per_round=mod.BUDGET, num_eval_samples=4, capacity=2)
    grid = InProcessGrid(mod.app, {}, 2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=2)
    assert len(strategy.registry.index) == 2 and not strategy.recorder.rejected and not strategy.recorder.failures
    assert sum(t.shape[0] for ts in strategy.buffer.values() for t in ts) == 2 * 2 * mod.BUDGET
    images = strategy.recorder.evals[2].metrics
    assert set(images) == {0, 1} and all(m["num-examples"] == 4 for m in images.values())
    assert result.arrays is not None and torch.isfinite(torch.tensor(float(strategy.recorder.rounds[2].values[
        "server-train-loss"])))
