"""Local-only: every node trains its own full denoiser on its own data; nothing but metrics
crosses the network. Run through Flower like the others so the accounting is identical.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from collafuse_flwr.config import RunConfig

from .base import HarnessMixin


class LocalOnly(HarnessMixin, Strategy):
    def __init__(self, cfg: RunConfig, min_nodes: int = 1, on_round_end=None) -> None:
        self._init_harness(cfg, min_nodes, on_round_end)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        conf = self._base_config(server_round)
        msgs = self._messages(self._sample(grid), lambda _: RecordDict({"config": conf}), MessageType.TRAIN)
        return self._count_down(msgs, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = self._split_replies(server_round, replies, "train")
        metrics = self._mean_metrics(ok)
        self._record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items() if k == "train-loss"})
        return None, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        T = self.cfg.diffusion_steps
        conf = self._base_config(server_round, **{"num-samples": self.cfg.num_eval_samples,
                                                  "client-start-step": T,
                                                  "client-sampling-steps": self.cfg.sampling_steps})
        return self._evaluate_messages(server_round, grid, lambda _: RecordDict({"config": conf}))
