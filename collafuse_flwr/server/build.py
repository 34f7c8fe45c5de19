"""This project's run-config -> a strategy: the one place that maps `RunConfig` keys onto the
strategies' plain constructor arguments, so `strategies/` depends on protocol and core only."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from collafuse_flwr import protocol as P
from collafuse_flwr.config import RunConfig
from collafuse_flwr.core.models import shared_denoiser
from collafuse_flwr.data.client_data import run_channels
from collafuse_flwr.harness.disclosure_probe import DisclosureProbe
from strategies import Centralized, CollaFuse, FedAvgDiffusion, LocalOnly, ServerTrainer
from strategies.base import DiffusionStrategy

TRAINER_ARGS = tuple(inspect.signature(ServerTrainer).parameters)[1:]  # all but the model (the seed: both)


def from_config(cfg: RunConfig, model: nn.Module | None = None,
                image_shape: tuple[int, int, int] | None = None, **kwargs: Any) -> DiffusionStrategy:
    """cfg.method's strategy; `kwargs` (strategy or trainer arguments) win over the run-config's.
    CollaFuse and centralized train `model` on the server; FedAvg and local-only hold no model."""
    shape = image_shape or (run_channels(cfg), cfg.image_size, cfg.image_size)
    common = dict(min_available_nodes=cfg.min_nodes, min_available_fraction=cfg.min_available_fraction,
                  fraction_train=cfg.fraction_train, fraction_evaluate=cfg.fraction_evaluate, seed=cfg.seed,
                  num_eval_samples=cfg.num_eval_samples, eval_every=cfg.eval_every,
                  sampling_steps=cfg.sampling_steps, connect_timeout=cfg.round_timeout)
    if cfg.method == P.LOCAL:
        return LocalOnly(image_shape=shape, **{**common, "diffusion_steps": cfg.diffusion_steps, **kwargs})
    if cfg.method == P.FEDAVG:
        return FedAvgDiffusion(image_shape=shape, **{**common, "aggregation": cfg.fedavg_aggregation, **kwargs})
    if model is None:
        raise ValueError(f"method={cfg.method!r} trains a server model: pass model=")
    args = dict(common, diffusion_steps=cfg.diffusion_steps, beta_schedule=cfg.beta_schedule,
                local_steps=cfg.local_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                count_flops=cfg.count_flops, flops_every_pass=cfg.flops_every_pass)
    if cfg.method == P.COLLAFUSE:
        args.update(cut_ratio=cfg.cut_ratio, server_target=cfg.server_target,
                    node_cuts=bool(cfg.client_cut_ratios) or cfg.upload_epsilon > 0,  # DP moves a node's cut
                    server_steps=cfg.server_steps, overlap=cfg.server_overlap, uploads_per_round=cfg.uploads_per_round,
                    buffer_size=cfg.server_buffer_size or None)
    args.update(kwargs)
    trained = {k: args.pop(k) for k in TRAINER_ARGS if k in args and k != "seed"}
    trainer = ServerTrainer(model, seed=args["seed"], **trained)
    return (CollaFuse if cfg.method == P.COLLAFUSE else Centralized)(trainer, shape, **args)


def build_strategy(cfg: RunConfig, num_clients: int, device: torch.device, on_round_end=None,
                   harness: bool = True, simulation: bool = False) -> tuple[DiffusionStrategy, ArrayRecord]:
    """The method's strategy and its initial global ArrayRecord.

    simulation: the nodes train on this machine's cores, so CollaFuse's overlapped server steps
    run on one thread (unless torch-threads says otherwise) beside the one-thread clients."""
    shape = (run_channels(cfg), cfg.image_size, cfg.image_size)
    common = {"on_round_end": on_round_end, "capacity": num_clients}
    if cfg.method == P.LOCAL:
        return from_config(cfg, image_shape=shape, **common), ArrayRecord()
    torch.manual_seed(cfg.seed)
    model = shared_denoiser(cfg.image_size, shape[0], cfg.model_size, cfg.conditioning, num_clients)
    arrays = ArrayRecord(model.state_dict())
    if cfg.method == P.COLLAFUSE:
        if not simulation and not harness:  # a deployment: each node's operator sets its noise floor in its
            common["node_cuts"] = True  # node_config, which the server cannot see; a noisier cut is taken
        shared_cores = simulation and device.type == "cpu" and cfg.torch_threads == 0
        common.update(harness_payload=DisclosureProbe(cfg, num_clients, device) if harness else None,
                      overlap_threads=1 if shared_cores else None)
    if cfg.method in (P.COLLAFUSE, P.CENTRALIZED):
        common["device"] = device
    return from_config(cfg, model, shape, **common), arrays
