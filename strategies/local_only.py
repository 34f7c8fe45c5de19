"""Local-only: every node trains its own full denoiser on its own data; nothing but metrics
crosses the network. Run through Flower like the others so the accounting is identical.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from collafuse_flwr import protocol as P

from .base import DiffusionStrategy


class LocalOnly(DiffusionStrategy):
    """Local-only training. `diffusion_steps`: T (the node starts sampling there)."""

    method = P.LOCAL

    def __init__(self, *, diffusion_steps: int = 1000, **common: Any) -> None:
        super().__init__(**common)
        self.diffusion_steps = diffusion_steps

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._train_messages(server_round, grid, config)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[None, MetricRecord]:
        return None, self._train_done(server_round, self._accept(server_round, replies, "train"))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self._eval_messages(server_round, grid, config,
                                   lambda n, conf: RecordDict({P.CONFIG: conf}),
                                   **{P.CLIENT_START_STEP: self.diffusion_steps,
                                      P.CLIENT_SAMPLING_STEPS: self.sampling_steps})
