"""The server's own training: the shared model, its optimizer, RNG, FLOP meter and the images it
trains on (CollaFuse's x_tc uploads, centralized's pooled raw images), by client."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.training import make_optimizer, train_steps

from .robust import balanced_batches


class ServerTrainer:
    """What the server trains and with what. server_steps: a CollaFuse round's budget ("auto":
    local_steps x nodes served; an int: fixed, the ablation that starves a growing federation).
    buffer_size: most rows kept (None: all). overlap: CollaFuse trains while the next round's nodes
    do; overlap_threads: torch threads then (two multi-thread teams on shared cores spin against
    each other: 0.69 s a step instead of 0.07-0.09 s on a 2-core VM)."""

    def __init__(self, model: nn.Module, *, batch_size: int = 32, learning_rate: float = 2e-3,
                 server_steps: int | str = "auto", buffer_size: int | None = None, overlap: bool = True,
                 overlap_threads: int | None = None, device: torch.device | str | None = None, seed: int = 0,
                 count_flops: bool = False, flops_every_pass: bool = False) -> None:
        if server_steps != "auto" and (isinstance(server_steps, bool) or not isinstance(server_steps, int)
                                       or server_steps < 0):
            raise ValueError(f'server_steps must be "auto" or an int >= 0, got {server_steps!r}')
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model.to(self.device)
        self.optimizer = make_optimizer(self.model, learning_rate)
        self.meter = FlopMeter(every_pass=flops_every_pass) if count_flops else None
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.seed, self.batch_size, self.buffer_size = seed, batch_size, buffer_size
        self.server_steps, self.overlap, self.overlap_threads = server_steps, overlap, overlap_threads
        self.buffer: dict[int, list[Tensor]] = {}  # client -> its rows, oldest first

    def rows(self) -> int:
        return sum(t.shape[0] for ts in self.buffer.values() for t in ts)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The buffer as one tensor, with each row's client index (in client order)."""
        parts = [(c, t) for c in sorted(self.buffer) for t in self.buffer[c]]
        data = torch.cat([t for _, t in parts])
        labels = torch.cat([torch.full((t.shape[0],), c, dtype=torch.long) for c, t in parts])
        return data, labels

    def trim(self) -> None:
        """Keep at most `buffer_size` rows: drop the oldest of whichever client holds the most (one
        that uploads more cannot push the others out)."""
        if self.buffer_size is None:
            return
        sizes = {c: sum(t.shape[0] for t in ts) for c, ts in self.buffer.items()}
        while sum(sizes.values()) > self.buffer_size:
            c = max(sorted(sizes), key=sizes.__getitem__)
            excess = min(sum(sizes.values()) - self.buffer_size, self.buffer[c][0].shape[0])
            head = self.buffer[c][0][excess:]
            self.buffer[c] = ([head] if head.shape[0] else []) + self.buffer[c][1:]
            sizes[c] -= excess

    def train(self, steps: int, loss_fn: Callable[..., Tensor], data: Tensor, labels: Tensor, *,
              row_args: Tensor | None = None, balanced: bool = True) -> dict[str, float]:
        """`steps` guarded Adam steps (a non-finite step is skipped, the model kept); what they cost.
        balanced: every client gets the same share of each minibatch's rows, whatever it uploaded."""
        t0 = time.perf_counter()
        stats: dict[str, int] = {}
        batches = balanced_batches(labels, self.batch_size, steps, self.gen) if balanced else None
        loss = train_steps(self.model, self.optimizer, loss_fn, data, steps, self.batch_size, self.gen, self.device,
                           self.meter, "server-train", labels=labels, guard=True, stats=stats, row_args=row_args,
                           batches=batches)
        out = {"server-train-seconds": time.perf_counter() - t0}
        if not math.isnan(loss):
            out["server-train-loss"] = loss
        if stats.get("skipped"):
            out["server-steps-skipped"] = stats["skipped"]
        if self.meter is not None:
            out["server-train-flops"] = float(self.meter.totals.pop("server-train", 0))
        return out

    @contextlib.contextmanager
    def overlap_threading(self) -> Iterator[None]:
        threads = torch.get_num_threads()
        if self.overlap_threads:
            torch.set_num_threads(self.overlap_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "gen": self.gen.get_state(), "buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.gen.set_state(state["gen"])
        self.buffer = state["buffer"]
