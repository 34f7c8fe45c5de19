"""What every method's strategy shares: node sampling, failure counting, byte accounting,
per-round records and the evaluation harness.

Each method only decides what goes into its train/evaluate messages and what the server does
with the replies; the bookkeeping that makes methods comparable lives here once.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from collafuse_flwr import diffusion as D
from collafuse_flwr.config import RunConfig
from collafuse_flwr.metrics.flops import FlopMeter
from collafuse_flwr.training import make_optimizer
from collafuse_flwr.metrics.comm import message_nbytes, recorddict_nbytes


# Totals across nodes rather than example-weighted means.
SUM_KEYS = ("num-examples", "num-uploaded", "client-train-flops")


@dataclass
class EvalResult:
    """Everything the nodes returned from one evaluation round."""

    server_round: int
    images: dict[int, np.ndarray] = field(default_factory=dict)  # partition-id -> N x C x H x W uint8
    metrics: dict[int, dict[str, float]] = field(default_factory=dict)


@dataclass
class RoundRecord:
    server_round: int
    values: dict[str, float] = field(default_factory=dict)


class HarnessMixin:
    """Bookkeeping shared by all strategies. Call `_init_harness` in __init__."""

    cfg: RunConfig

    def _init_harness(self, cfg: RunConfig, min_nodes: int, on_round_end=None) -> None:
        self.cfg = cfg
        self.min_nodes = min_nodes
        self.bytes: dict[str, float] = defaultdict(float)  # totals by direction and phase
        self.bytes_by_node: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.rounds: dict[int, RoundRecord] = {}
        self.evals: dict[int, EvalResult] = {}
        self.failures = 0
        self._t0 = time.perf_counter()
        self._on_round_end = on_round_end
        self.node_to_partition: dict[int, int] = {}

    def _init_server_model(self, model, image_shape: tuple[int, int, int], device) -> None:
        """For strategies that train a denoiser on the server (CollaFuse, centralized)."""
        self.model = model.to(device)
        self.device = device
        self.image_shape = image_shape
        self.sched = D.make_schedule(self.cfg.diffusion_steps, self.cfg.beta_schedule)
        self.optimizer = make_optimizer(self.model, self.cfg.learning_rate)
        self.meter = FlopMeter(every_pass=self.cfg.flops_every_pass) if self.cfg.count_flops else None
        self.gen = torch.Generator().manual_seed(self.cfg.seed + 7919)

    # -- sampling ---------------------------------------------------------------------------
    def _sample(self, grid: Grid) -> list[int]:
        """All connected nodes (every client takes part every round, as in the papers), in
        partition order once the nodes have said their partition (see `_partition_order`)."""
        n_all = len(list(grid.get_node_ids()))
        node_ids, _ = sample_nodes(grid, self.min_nodes, max(n_all, self.min_nodes))
        return self._partition_order(node_ids)

    def _partition_order(self, node_ids: Iterable[int]) -> list[int]:
        """Node ids sorted by partition id (unknown ones last, by node id).

        Why: Flower draws node ids at random each run and replies arrive in whatever order the
        engine finishes them. Anything that consumes the server's RNG per node (the server half
        of sampling) or stacks data per node (the upload buffer, weighted sums) must follow the
        partition order, or the same seed gives a different result each run.
        """
        return sorted(node_ids, key=self._partition_key)

    def _partition_key(self, node_id: int) -> tuple[float, int]:
        return self.node_to_partition.get(node_id, float("inf")), node_id

    # -- accounting ---------------------------------------------------------------------------
    def _record(self, server_round: int, **values: float) -> None:
        rec = self.rounds.setdefault(server_round, RoundRecord(server_round))
        rec.values.update(values)

    def _count_down(self, messages: list[Message], phase: str, harness: Iterable[str] = ()) -> list[Message]:
        """Count bytes server -> client; `harness` keys are measurement-only and counted apart."""
        for m in messages:
            n_harness = sum(recorddict_nbytes(RecordDict({k: m.content[k]})) for k in harness if k in m.content)
            n = message_nbytes(m)
            node = m.metadata.dst_node_id
            self.bytes[f"down-{phase}"] += n - n_harness
            self.bytes["down-harness"] += n_harness
            self.bytes_by_node[node][f"down-{phase}"] += n - n_harness
        return messages

    def _split_replies(self, server_round: int, replies: Iterable[Message], phase: str) -> list[Message]:
        """Count bytes client -> server and drop failed replies (counted, not fatal)."""
        ok, failed = [], 0
        for m in replies:
            if m.has_error():
                failed += 1
                log(WARNING, "round %d %s: node %d failed: %s", server_round, phase,
                    m.metadata.src_node_id, m.error.reason)
                continue
            n = message_nbytes(m)
            key = "up-eval" if phase == "evaluate" else "up-train"
            self.bytes[key] += n
            self.bytes_by_node[m.metadata.src_node_id][key] += n
            if "metrics" in m.content.metric_records and "partition-id" in m.content["metrics"]:
                self.node_to_partition[m.metadata.src_node_id] = int(m.content["metrics"]["partition-id"])
            ok.append(m)
        self.failures += failed
        if failed:
            self._record(server_round, **{f"failed-{phase}": failed})
        return sorted(ok, key=lambda m: self._partition_key(m.metadata.src_node_id))  # arrival order varies

    @staticmethod
    def _messages(node_ids: list[int], content_for, message_type: str) -> list[Message]:
        return [Message(content=content_for(nid), message_type=message_type, dst_node_id=nid)
                for nid in node_ids]

    def _base_config(self, server_round: int, **extra: Any) -> ConfigRecord:
        return ConfigRecord({"server-round": server_round, **extra})

    # -- aggregation of metrics -------------------------------------------------------------------
    def _mean_metrics(self, replies: list[Message], weight_key: str = "num-examples") -> MetricRecord:
        """Example-weighted mean of every numeric metric the replies share (Flower's convention)."""
        recs = [m.content["metrics"] for m in replies if "metrics" in m.content.metric_records]
        if not recs:
            return MetricRecord()
        keys = set.intersection(*(set(r.keys()) for r in recs)) - {"partition-id"}
        w = np.array([float(r.get(weight_key, 1.0)) for r in recs])
        w = w / w.sum() if w.sum() > 0 else np.full(len(recs), 1 / len(recs))
        out = {}
        for k in sorted(keys):
            vals = [r[k] for r in recs]
            if all(isinstance(v, (int, float)) for v in vals):
                arr = np.array(vals, dtype=float)
                out[k] = float(arr.sum()) if k in SUM_KEYS else float(np.nansum(arr * w))
                if k.endswith("-seconds"):  # the round's busy time on all nodes, next to the mean
                    out[f"{k}-total"] = float(np.nansum(arr))
        return MetricRecord(out)

    def _collect_eval(self, server_round: int, replies: list[Message]) -> MetricRecord | None:
        res = EvalResult(server_round)
        for m in replies:
            met = dict(m.content["metrics"])
            pid = int(met["partition-id"])
            res.metrics[pid] = met
            res.images[pid] = m.content["samples"]["images"].numpy()
        self.evals[server_round] = res
        agg = self._mean_metrics(replies) if replies else None
        if agg is not None:
            self._record(server_round, **{f"eval-{k}": v for k, v in agg.items()})
        return agg

    def _progress(self, server_round: int, phase: str, **figures: float) -> None:
        elapsed = time.perf_counter() - self._t0
        shown = "  ".join(f"{k}={v:.4g}" for k, v in figures.items() if v == v)
        log(INFO, "[%s] round %d/%d %s  %s  (elapsed %.1fs)", self.cfg.method, server_round,
            self.cfg.num_server_rounds, phase, shown, elapsed)

    def summary(self) -> None:
        log(INFO, "\t├──> method=%s rounds=%d min-nodes=%d", self.cfg.method,
            self.cfg.num_server_rounds, self.min_nodes)

    # -- shared evaluation for methods whose client generates alone ------------------------------
    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Flower calls this every round; it is also where a round ends (for metrics.csv)."""
        agg = None
        if self.cfg.is_eval_round(server_round):
            ok = self._split_replies(server_round, replies, "evaluate")
            agg = self._collect_eval(server_round, ok)
            figs = {k: float(v) for k, v in (agg or {}).items() if k in ("fid", "kid", "infer-seconds")}
            self._progress(server_round, "evaluate", **figs)
        if self._on_round_end is not None:
            self._on_round_end(self, server_round)
        return agg

    def _evaluate_messages(self, server_round: int, grid: Grid, content_for,
                           harness: Iterable[str] = ()) -> list[Message]:
        if not self.cfg.is_eval_round(server_round):
            return []
        msgs = self._messages(self._sample(grid), content_for, MessageType.EVALUATE)
        return self._count_down(msgs, "eval", harness)
