"""The disclosure harness's reference attacker: a full-chain denoiser trained on data of the same kind as
the clients' (the pooled held-out test splits), not on the images it attacks. Trained at the first evaluation,
while the clients are idle: a thread from the ServerApp's start slowed round 1's clients more than it saved."""

from __future__ import annotations

import numpy as np
import torch

from collafuse_flwr.config import RunConfig
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.images import to_model_range
from collafuse_flwr.core.models import Denoiser, build_denoiser
from collafuse_flwr.core.training import client_share_loss, make_optimizer, train_steps
from collafuse_flwr.data.client_data import all_splits, dataset_for


def train_reference_denoiser(cfg: RunConfig, num_clients: int, device: torch.device) -> Denoiser | None:
    """An unconditional full-chain denoiser on the pooled test splits (None when steps = 0)."""
    if cfg.attack_reference_steps <= 0:
        return None
    ds = dataset_for(cfg)
    idx = np.concatenate([s.test_idx for s in all_splits(cfg, num_clients)])
    data = to_model_range(ds.images[idx])
    with torch.random.fork_rng(devices=[]):  # seed the init without touching the caller's RNG
        torch.manual_seed(cfg.seed + 4242)
        model = build_denoiser(cfg.image_size, data.shape[1], cfg.model_size).to(device)
    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    gen = torch.Generator().manual_seed(cfg.seed + 4242)  # the only randomness of the training
    train_steps(model, make_optimizer(model, cfg.learning_rate), client_share_loss(model, sched, sched.T, gen), data,
                cfg.attack_reference_steps, cfg.batch_size, gen, device)
    return model.eval()
