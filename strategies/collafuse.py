"""The CollaFuse strategy: clients train their low-noise share and upload x_{t_c} (never
receiving the server model); the server validates each upload (`robust.UploadCheck`) and trains
the shared high-noise denoiser on them, overlapping the nodes' next round where it may. At
evaluation it runs x_T -> x_{t_c} per node; the node finishes x_{t_c} -> x_0 privately.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from collafuse_flwr import protocol as P
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.training import server_share_loss

from .base import DiffusionStrategy, ImplausibleUpload, MalformedReply, NotAdmitted, OverBudget, decoded
from .robust import UploadCheck
from .trainer import ServerTrainer

#: |x_tc| <= sqrt(abar_c) + UPLOAD_Z sqrt(1 - abar_c) for data in [-1, 1]. A Gaussian pixel
#: passes 8 sigma but with probability 1e-15, so an honest upload (even 64 x 3 x 64 x 64 pixels
#: a round for years) is never refused, while a 1e30 or 100-sigma poisoned pixel always is.
UPLOAD_Z = 8.0

HarnessPayload = Callable[["CollaFuse", int, np.ndarray], ArrayRecord | None]


class CollaFuse(DiffusionStrategy):
    """CollaFuse's server side. trainer: the shared denoiser (conditioned on the client index when
    its `num_classes` = client slots) and how it trains. cut_ratio or cut_step: c or t_c = round(c T).
    node_cuts: each node runs at the cut its hello declares (else, as in the paper, such a node is
    not admitted). server_target: "exact" or the authors' "renoise" (ablation). local_steps: what
    server_steps="auto" pays per node served. harness_payload(strategy, client, last_upload): a
    measurement-only record sent at evaluation (disclosure research)."""

    method = P.COLLAFUSE
    checkpoint_attrs = ("last_upload", "owed_steps", "client_cut")

    def __init__(self, trainer: ServerTrainer, image_shape: tuple[int, int, int], *, diffusion_steps: int = 1000,
                 beta_schedule: str = "cosine", cut_ratio: float | None = None, cut_step: int | None = None,
                 node_cuts: bool = False, server_target: str = "exact", local_steps: int = 40,
                 uploads_per_round: int = 64, harness_payload: HarnessPayload | None = None, **common: Any) -> None:
        if (cut_ratio is None) == (cut_step is None):
            raise ValueError("give exactly one of cut_ratio (c in [0, 1]) or cut_step (t_c in 0..T)")
        common.setdefault("capacity", getattr(trainer.model, "num_classes", 0) or None)
        common.setdefault("seed", trainer.seed)
        super().__init__(image_shape=image_shape, **common)
        self.trainer = trainer
        self.sched = D.make_schedule(diffusion_steps, beta_schedule)  # type: ignore[arg-type]
        T = self.sched.T
        self.t_c = D.cut_step(cut_ratio, T) if cut_ratio is not None else int(cut_step)  # type: ignore[arg-type]
        if not 0 <= self.t_c <= T:
            raise ValueError(f"cut_step must be in 0..{T}, got {self.t_c}")
        if local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {local_steps}")
        D.client_start_step(self.t_c / T, T, server_target)  # type: ignore[arg-type]  # raises for another target
        self.server_target, self.node_cuts = server_target, node_cuts
        self.local_steps, self.uploads_per_round = local_steps, uploads_per_round
        self.harness_payload = harness_payload
        self.owed_steps = 0  # server steps earned by finished rounds and not yet taken (overlap)
        self._overlap_metrics: dict[str, float] = {}
        self.client_budget: dict[int, int] = {}  # client -> uploads a round, at most its node's budget
        self.last_upload: dict[int, np.ndarray] = {}  # client -> its last upload (harness only)
        self.client_cut: dict[int, int] = {}  # client -> the cut step its node declared (node_cuts)
        self._served = 0  # images whose server half ran since the last evaluation
        if self.t_c == 0 and not node_cuts:
            log(WARNING, "cut-ratio=0: clients upload their RAW training images (x_0) - this is the "
                "server-only extreme and discloses the data completely")
        if self.t_c == T and not node_cuts:
            log(WARNING, "cut-ratio=1: clients train alone and upload nothing (local-only extreme)")

    @property
    def buffer(self) -> dict[int, list[torch.Tensor]]:
        return self.trainer.buffer

    # -- first contact and each node's cut ----------------------------------------------------
    def accept_hello(self, node_id: int, info: dict[str, Any]) -> None:
        super().accept_hello(node_id, info)
        node_cut = info.get(P.CUT_STEP)
        if node_cut is None or int(node_cut) == self.t_c:
            return
        if not self.node_cuts:
            raise NotAdmitted(f"the node's own cut step is {int(node_cut)}, the server's is {self.t_c}: the data "
                              f"owner sets c (run-config cut-ratio or node_config cut-ratio); start both with the "
                              f"same c, or let each node choose (run-config client-cut-ratios / "
                              f"CollaFuse(node_cuts=True))")
        if int(node_cut) != node_cut or not 0 <= int(node_cut) <= self.sched.T:
            raise NotAdmitted(f"the node's cut step {node_cut} is not a whole step in 0..{self.sched.T}")

    def on_admit(self, node_id: int, client: int, info: dict[str, Any]) -> None:
        self.client_cut[client] = int(info[P.CUT_STEP]) if self.node_cuts and P.CUT_STEP in info else self.t_c
        budget = info.get(P.UPLOAD_BUDGET)  # a node's operator may allow fewer uploads than the run asks
        ok = isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 0
        self.client_budget[client] = min(self.uploads_per_round, int(budget)) if ok else self.uploads_per_round

    def uploads_for(self, client: int) -> int:
        """The uploads a round asks of this client: the run's, at most its node's declared budget."""
        return self.client_budget.get(client, self.uploads_per_round) if self.serves(client) else 0

    def cut_for(self, client: int) -> int:
        """The cut step t_c,k of a client's node (the server's own when the node declared none)."""
        return self.client_cut.get(client, self.t_c)

    def serves(self, client: int) -> bool:
        """Whether the server runs a share of this client's chain (t_c,k < T)."""
        return self.cut_for(client) < self.sched.T

    def upload_bound(self, client: int) -> float:
        return D.anchor_bound(self.sched, self.cut_for(client), UPLOAD_Z)

    def upload_check(self, client: int) -> UploadCheck:
        """The statistics every image of an honest upload at this client's cut satisfies."""
        abar = float(self.sched.alpha_bars[self.cut_for(client)])
        return UploadCheck(abar, self.image_shape)  # type: ignore[arg-type]

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        def content(node_id: int, conf: ConfigRecord) -> RecordDict:
            client = self.client_of(node_id)
            conf[P.CUT_STEP], conf[P.UPLOADS_ASKED] = self.cut_for(client), self.uploads_for(client)
            return RecordDict({P.CONFIG: conf})

        return self._train_messages(server_round, grid, config, content)

    def validate_reply(self, phase: str, client: int, msg: Message) -> None:
        if phase == "evaluate":
            cut = msg.content[P.METRICS].get(P.CUT_STEP)
            if cut is not None and cut != self.cut_for(client):
                raise MalformedReply(f"{P.CUT_STEP}: the node says it finished from step {cut}, it was admitted "
                                     f"at {self.cut_for(client)}")
            return
        if P.UPLOAD not in msg.content.array_records:
            return
        rec = msg.content[P.UPLOAD]
        if list(rec.keys()) != [P.X_TC]:
            raise MalformedReply(f"upload: expected exactly the array '{P.X_TC}', got {list(rec.keys())}")
        arr = rec[P.X_TC]
        if arr.dtype != "float32":
            raise MalformedReply(f"upload dtype: expected float32, got {arr.dtype}")
        if tuple(arr.shape[1:]) != self.image_shape or len(arr.shape) != 4:
            raise MalformedReply(f"upload shape: expected (n, {', '.join(map(str, self.image_shape))}), got "
                                 f"{tuple(arr.shape)}")
        if not self.serves(client) or arr.shape[0] > self.uploads_for(client):
            raise OverBudget(f"upload budget: {arr.shape[0]} images, at most {self.uploads_for(client)}")
        x = decoded(arr, f"{P.UPLOAD}/{P.X_TC}")  # the buffer takes these bytes: the budget and shape are theirs
        if not np.isfinite(x).all():
            raise ImplausibleUpload("upload values: not all finite (NaN or Inf)")
        peak = float(np.abs(x).max()) if x.size else 0.0
        bound = self.upload_bound(client)
        if peak > bound:
            raise ImplausibleUpload(f"upload range: |x| reaches {peak:.3g}, an x_tc at t_c={self.cut_for(client)} "
                                    f"stays within {bound:.3g}")
        why = self.upload_check(client)(x)
        if why:
            raise ImplausibleUpload(why)

    def steps_for(self, contributors: int) -> int:
        """The server steps one round earns: fixed, or local_steps x the nodes it served."""
        steps = self.trainer.server_steps
        return steps if isinstance(steps, int) else self.local_steps * contributors

    def while_nodes_train(self, server_round: int) -> None:
        """Take the steps earlier rounds earned while this round's nodes train (overlap): on the
        buffer as it was after those rounds, never on an upload of this round."""
        if self.owed_steps:
            with self.trainer.overlap_threading():
                self._overlap_metrics = self._train_server(self.owed_steps, server_round)
            took = self._overlap_metrics.pop("server-train-seconds", 0.0)
            self._overlap_metrics["server-train-overlapped-seconds"] = took
            self.owed_steps = 0

    def _train_server(self, steps: int, server_round: int) -> dict[str, float]:
        """`steps` guarded steps on the whole (validated) buffer, each row on t > its node's cut."""
        if not (any(t < self.sched.T for t in (*self.client_cut.values(), self.t_c)) and self.buffer and steps > 0):
            return {"server-steps": 0}
        data, labels = self.trainer.tensors()
        cuts = {self.cut_for(int(c)) for c in labels.unique()}
        if len(cuts) == 1:  # one cut for all (the paper's setting)
            row_cuts = None
            loss_fn = server_share_loss(self.model, self.sched, cuts.pop(),  # type: ignore[arg-type]
                                        self.server_target, self.trainer.gen)  # type: ignore[arg-type]
        else:
            row_cuts = torch.tensor([self.cut_for(c) for c in range(int(labels.max()) + 1)])[labels]
            loss_fn = lambda x_tc, c: D.server_loss(self.model, self.sched, x_tc, c, self.server_target,  # noqa: E731
                                                    self.trainer.gen)  # type: ignore[arg-type]
        out = {"server-steps": steps, **self.trainer.train(steps, loss_fn, data, labels, row_args=row_cuts)}
        if out.get("server-steps-skipped"):
            log(WARNING, "round %d: %d server step(s) skipped (non-finite loss or gradients); the model and "
                "optimizer were left as they were", server_round, out["server-steps-skipped"])
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        ok = self._accept(server_round, replies, "train")
        n_new, contributors = 0, 0
        for m in ok:
            x = m.content[P.UPLOAD][P.X_TC].numpy() if P.UPLOAD in m.content.array_records else None
            if x is None or not len(x):  # (0, C, H, W): what `node.make_upload` gives a node with nothing to send
                continue
            client = self.client_of(m.metadata.src_node_id)
            self.buffer.setdefault(client, []).append(torch.from_numpy(x.copy()))
            self.last_upload[client] = x
            self.recorder.client_stats[client].update(
                {f"upload-{k}": v for k, v in self.upload_check(client).summary(x).items()})
            n_new += x.shape[0]
            contributors += 1
        self.trainer.trim()
        self.owed_steps += self.steps_for(contributors)  # nodes the server serves are the ones that upload
        ran, self._overlap_metrics = self._overlap_metrics, {}
        # nothing may be owed when the model is looked at after this round (evaluation, a user's evaluate_fn)
        if not self.trainer.overlap or self.measured_every_round or self.is_eval_round(server_round):
            now = self._train_server(self.owed_steps, server_round)
            self.owed_steps = 0
            for k in ("server-steps", "server-train-flops", "server-steps-skipped"):  # taken in both places: summed
                if k in ran:
                    now[k] = ran[k] + now.get(k, 0)
            ran = {**{k: v for k, v in ran.items() if k not in now}, **now}
        if ran.get("server-steps"):
            self._client_losses(server_round)
        metrics = self._train_done(server_round, ok, **ran, **{
            "server-steps-owed": self.owed_steps, "uploads-received": n_new, "server-buffer-size": self.trainer.rows()})
        return ArrayRecord(self.model.state_dict()), metrics

    @torch.no_grad()
    def _client_losses(self, server_round: int, rows: int = 64) -> None:
        """The server's loss on each client's newest upload, for the report: how well the shared
        model fits what each client sent. Its own generator, so training draws are unchanged."""
        gen = torch.Generator().manual_seed(self.trainer.seed * 1_000_003 + 104_729 + server_round)
        was_training = self.model.training
        self.model.eval()
        try:
            for client in sorted(self.buffer):
                if not self.buffer[client] or not self.serves(client):
                    continue
                x = self.buffer[client][-1][:rows].to(self.trainer.device)
                if hasattr(self.model, "condition"):
                    self.model.condition(client)
                loss = D.server_loss(self.model, self.sched, x, self.cut_for(client),  # type: ignore[arg-type]
                                     self.server_target, gen)
                self.recorder.client_stats[client]["server-loss"] = float(loss)
        finally:
            self.model.train(was_training)

    # -- evaluation ---------------------------------------------------------------------------
    def server_half(self, n: int, client: int) -> torch.Tensor:
        """x_T -> x_{t_c,k} with the shared model for one client (what that node receives)."""
        t_c = self.cut_for(client)
        s_srv, _ = D.split_step_budget(self.sampling_steps, self.sched.T, t_c)
        self._served += n
        self.model.eval()
        if hasattr(self.model, "condition"):
            self.model.condition(client)
        t = self.trainer
        eps_model = t.meter.wrap(self.model, "server-infer") if t.meter is not None else self.model
        with torch.no_grad():
            x = D.server_sample(eps_model, self.sched, (n, *self.image_shape), t_c,  # type: ignore[arg-type]
                                self.server_target, s_srv, t.gen, t.device)  # type: ignore[arg-type]
        return x.cpu()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        def content(node_id: int, conf: ConfigRecord) -> RecordDict:
            client = self.client_of(node_id)
            T, t_c = self.sched.T, self.cut_for(client)
            _, s_cli = D.split_step_budget(self.sampling_steps, T, t_c)
            conf[P.CLIENT_START_STEP] = D.client_start_step(t_c / T, T, self.server_target)  # type: ignore[arg-type]
            conf[P.CLIENT_SAMPLING_STEPS] = s_cli or 0
            rd = RecordDict({P.CONFIG: conf})
            if self.serves(client):
                x_tc = self.server_half(self.num_eval_samples, client).float().numpy()
                rd[P.HANDOFF] = ArrayRecord({P.X_TC: Array(x_tc)})
            if self.harness_payload is not None and client in self.last_upload:  # once an upload: nodes score once
                payload = self.harness_payload(self, client, self.last_upload.pop(client))
                if payload is not None:
                    rd[P.HARNESS] = payload
            return rd

        return self._eval_messages(server_round, grid, config, content, harness=(P.HARNESS,))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.trainer.meter is not None and self._served:
            flops = float(self.trainer.meter.totals.pop("server-infer", 0))
            self.recorder.record(server_round, **{"server-infer-flops-per-image": flops / self._served})
        self._served = 0
        return super().aggregate_evaluate(server_round, replies)
