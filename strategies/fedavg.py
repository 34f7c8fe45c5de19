"""FedAvg for diffusion: every node trains the whole denoiser (all T steps) for the same local
steps; Flower's Message-API `FedAvg` averages the weights, weighted by examples.

Only evaluation is added: on evaluation rounds each node receives the global model and samples
x_T -> x_0 entirely on its own device.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from collafuse_flwr.config import RunConfig

from .base import HarnessMixin


class FedAvgDiffusion(HarnessMixin, FedAvg):
    def __init__(self, cfg: RunConfig, min_nodes: int = 1, on_round_end=None) -> None:
        FedAvg.__init__(self, fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=min_nodes,
                        min_evaluate_nodes=min_nodes, min_available_nodes=min_nodes)
        self._init_harness(cfg, min_nodes, on_round_end)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        conf = self._base_config(server_round)
        msgs = self._messages(self._sample(grid), lambda _: RecordDict({"arrays": arrays, "config": conf}),
                              "train")
        return self._count_down(msgs, "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        ok = self._split_replies(server_round, replies, "train")
        arrays, _ = FedAvg.aggregate_train(self, server_round, ok)  # weighted by num-examples
        metrics = self._mean_metrics(ok)
        self._record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items() if k == "train-loss"})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config, grid: Grid) -> Iterable[Message]:
        conf = self._base_config(server_round, **{"num-samples": self.cfg.num_eval_samples,
                                                  "client-sampling-steps": self.cfg.sampling_steps})
        return self._evaluate_messages(server_round, grid,
                                       lambda _: RecordDict({"arrays": arrays, "config": conf}))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return HarnessMixin.aggregate_evaluate(self, server_round, replies)

    def summary(self) -> None:
        HarnessMixin.summary(self)
