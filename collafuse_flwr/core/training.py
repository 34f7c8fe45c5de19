"""Optimizer loops shared by every method and the in-process reference loop: the methods differ
only in the loss (client share, server share, or the whole chain) they pass to `train_steps`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter


def make_optimizer(model: nn.Module, lr: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=lr)


def minibatch_indices(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """Indices for `steps` minibatches, drawn by reshuffled epochs so each image is seen evenly."""
    out: list[Tensor] = []
    perm = torch.empty(0, dtype=torch.long)
    bs = min(batch_size, n)
    while len(out) < steps:
        if perm.numel() < bs:
            perm = torch.cat([perm, torch.randperm(n, generator=generator)])
        out.append(perm[:bs])
        perm = perm[bs:]
    return out


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable[[Tensor], Tensor], data: Tensor,
                steps: int, batch_size: int, generator: torch.Generator, device: torch.device,
                flops: FlopMeter | None = None, flops_key: str = "train", labels: Tensor | None = None,
                guard: bool = False, stats: dict[str, int] | None = None, row_args: Tensor | None = None,
                batches: list[Tensor] | None = None) -> float:
    """Run `steps` Adam steps of loss_fn(batch) on `data` (in model range); the mean loss (NaN if none).

    labels: bound to a conditional `Denoiser` per minibatch. batches: the caller's minibatch indices (None:
    `minibatch_indices`). row_args: a per-row value passed as loss_fn(batch, row_args[idx]) (each row's cut step).
    guard: skip a step whose loss or gradients are not finite, so one bad batch cannot destroy a shared model
    (counted in stats["skipped"])."""
    if steps <= 0 or data.shape[0] == 0:
        return float("nan")
    model.train()
    total, taken = 0.0, 0
    for idx in batches if batches is not None else minibatch_indices(data.shape[0], batch_size, steps, generator):
        batch = data[idx].to(device)
        if labels is not None:
            model.condition(labels[idx])
        with flops.count(flops_key, (tuple(batch.shape), str(device))) if flops else contextlib.nullcontext():
            loss = loss_fn(batch) if row_args is None else loss_fn(batch, row_args[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if guard and not (bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all())
                                                            for p in model.parameters() if p.grad is not None)):
            optimizer.zero_grad(set_to_none=True)
            if stats is not None:
                stats["skipped"] = stats.get("skipped", 0) + 1
            continue
        optimizer.step()
        total += float(loss.detach())
        taken += 1
    return total / taken if taken else float("nan")


def client_share_loss(model: nn.Module, sched: D.Schedule, t_max: int, generator: torch.Generator):
    """Loss on t ~ U{1..t_max}: CollaFuse's client share (t_max = t_c) or the whole chain (t_max = T)."""
    return lambda x0: D.client_loss(model, sched, x0, t_max, generator)


def server_share_loss(model: nn.Module, sched: D.Schedule, t_c: int, target: D.ServerTarget,
                      generator: torch.Generator):
    return lambda x_tc: D.server_loss(model, sched, x_tc, t_c, target, generator)


@torch.no_grad()
def generate(model: nn.Module, sched: D.Schedule, n: int, shape: tuple[int, int, int], num_steps: int | None,
             generator: torch.Generator, device: torch.device, flops: FlopMeter | None = None,
             flops_key: str = "infer", label: int | None = None) -> Tensor:
    """x_T -> x_0 with one model (FedAvg, local-only, centralized); label for conditional models."""
    model.eval()
    if label is not None:
        model.condition(label)
    eps_model = flops.wrap(model, flops_key) if flops is not None else model
    x = torch.randn((n, *shape), generator=generator).to(device)
    return D.client_finish(eps_model, sched, x, sched.T, num_steps, generator).cpu()
