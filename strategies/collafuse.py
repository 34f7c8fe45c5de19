"""The CollaFuse strategy (Flower Message API): clients train their low-noise share and upload
x_{t_c}; the server trains the shared high-noise denoiser on those uploads.

Round r:
1. configure_train: every node gets the cut step t_c, local steps, batch size and how many
   x_{t_c} to upload. No weights go down: the server model is never shared. The node checks
   these against its own settings and refuses a request that would lower its privacy.
2. aggregate_train: each upload is validated (shape, dtype, finite, within the range an x_{t_c}
   can take, within the node's budget, and image by image statistically what an x_{t_c} at that
   node's noise level looks like: `robust.UploadCheck`) before it joins the server's bounded
   buffer; every client gets the same share of the server's minibatch rows
   (`robust.balanced_batches`), whatever it uploaded; the server
   denoiser (the strategy's global ArrayRecord) owes `server_steps` steps on t > t_c ("auto":
   local_steps per node whose upload was accepted, the same total as centralized training).
   With `overlap` those steps run while the nodes train round r + 1 (see `while_nodes_train`);
   before an evaluation, and in the last round, they run at once.
3. configure_evaluate (every `eval_every` rounds and at the end): the server runs x_T -> x_{t_c}
   once per node and sends those x_{t_c}; the node finishes x_{t_c} -> x_0 privately.

Use it in any ServerApp::

    strategy = CollaFuse(server_model, (1, 28, 28), diffusion_steps=1000, cut_ratio=0.2, local_steps=200)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(server_model.state_dict()),
                            num_rounds=10)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from logging import WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log
from torch import nn

from collafuse_flwr import protocol as P
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.training import make_optimizer, server_share_loss, train_steps

from .base import DiffusionStrategy
from .robust import UploadCheck, balanced_batches


#: |x_tc| <= sqrt(abar_c) + UPLOAD_Z sqrt(1 - abar_c) for data in [-1, 1]. A Gaussian pixel
#: passes 8 sigma but with probability 1e-15, so an honest upload (even 64 x 3 x 64 x 64 pixels
#: a round for years) is never refused, while a 1e30 or 100-sigma poisoned pixel always is.
UPLOAD_Z = 8.0

HarnessPayload = Callable[["CollaFuse", int, np.ndarray], ArrayRecord | None]


class CollaFuse(DiffusionStrategy):
    """CollaFuse's server side.

    Parameters
    ----------
    server_model : nn.Module
        The shared denoiser eps(x_t, t[, client]); a `collafuse_flwr.core.models.Denoiser` with
        `num_classes` = number of client slots is conditioned on the client index.
    image_shape : (C, H, W)
        Shape of one image; uploads of any other shape are refused.
    diffusion_steps, beta_schedule
        T and the noise schedule, the same on every node.
    cut_ratio / cut_step
        c (t_c = round(c T)) or t_c itself; exactly one of them.
    node_cuts : bool
        Let each data owner choose its own cut: a node runs at the cut step its first-contact
        reply declares (node_config `cut-ratio`, or its entry of run-config `client-cut-ratios`),
        and the server trains its shared model on t > t_c,k for that node's uploads and hands
        it x_{t_c,k} at inference. False (the paper): every node must run at `cut_ratio`, and a
        node that declares another cut is not admitted. Nodes that declare none use `cut_ratio`.
    server_target : "exact" | "renoise"
        Exact sub-diffusion from x_{t_c}, or the authors' re-noising (ablation).
    server_steps : "auto" | int
        Server optimizer steps per round on the upload buffer. "auto" (default) = `local_steps`
        x the nodes whose upload was accepted this round: the server, the compute-rich party,
        serves every node and gets the budget centralized training would have. An int is a
        fixed budget whatever the number of nodes (the ablation; it starves the server as the
        federation grows).
    local_steps : int
        Optimizer steps each node takes per round (its own setting; only read by "auto").
    overlap : bool
        Run the steps a round owes while the next round's train messages are out, so the server
        trains while the nodes train instead of while they wait. Which uploads a step may use:
        a step owed by round r runs during round r + 1 on the buffer as it was after round r
        (every upload from rounds <= r, validated; never a round r + 1 upload, which has not
        arrived). Steps owed before an evaluation round, and by the last round, run at once,
        so the evaluated model has taken exactly the budget of every round. With an
        `evaluate_fn` (which sees the model after every round) every round runs its steps at
        once: overlap is then off.
    overlap_threads : int | None
        torch CPU threads for the overlapped steps (None: unchanged). Where the nodes train on
        the server's own cores (a simulation), give the server what they leave free: two
        multi-thread teams on the same cores spin against each other (measured on a 2-core VM:
        0.69 s per step each instead of 0.07-0.09 s; one thread each, no slowdown).
    batch_size, learning_rate
        Server minibatch and Adam's learning rate.
    uploads_per_round : int
        x_{t_c} images each node uploads per round (its budget: more are refused).
    buffer_size : int | None
        Most uploads the server keeps (oldest of the client with the most go first); None = all.
    harness_payload : callable(strategy, client, last_upload) -> ArrayRecord | None
        Research harness hook: extra measurement-only record sent at evaluation (disclosure).
    seed, device, count_flops, flops_every_pass
        Server RNG, where the server model runs, FLOP counting of server passes.
    **common
        `DiffusionStrategy` arguments (min_available_nodes, min_available_fraction, eval_every, ...).
    """

    method = P.COLLAFUSE
    checkpoint_attrs = ("buffer", "last_upload", "skipped_steps", "owed_steps", "client_cut")

    def __init__(self, server_model: nn.Module, image_shape: tuple[int, int, int], *,
                 diffusion_steps: int = 1000, beta_schedule: str = "cosine",
                 cut_ratio: float | None = None, cut_step: int | None = None, node_cuts: bool = False,
                 server_target: str = "exact",
                 server_steps: int | str = "auto", local_steps: int = 40, overlap: bool = True,
                 overlap_threads: int | None = None,
                 batch_size: int = 32, learning_rate: float = 2e-3,
                 uploads_per_round: int = 64, buffer_size: int | None = None,
                 harness_payload: HarnessPayload | None = None, seed: int = 0,
                 device: torch.device | str | None = None, count_flops: bool = False,
                 flops_every_pass: bool = False, **common: Any) -> None:
        if (cut_ratio is None) == (cut_step is None):
            raise ValueError("give exactly one of cut_ratio (c in [0, 1]) or cut_step (t_c in 0..T)")
        common.setdefault("capacity", getattr(server_model, "num_classes", 0) or None)
        super().__init__(**common)
        self.sched = D.make_schedule(diffusion_steps, beta_schedule)  # type: ignore[arg-type]
        T = self.sched.T
        self.t_c = D.cut_step(cut_ratio, T) if cut_ratio is not None else int(cut_step)  # type: ignore[arg-type]
        if not 0 <= self.t_c <= T:
            raise ValueError(f"cut_step must be in 0..{T}, got {self.t_c}")
        self.t_start = D.client_start_step(self.t_c / T, T, server_target)  # type: ignore[arg-type]
        self.server_target = server_target
        self.image_shape = tuple(image_shape)
        if server_steps != "auto" and (isinstance(server_steps, bool) or not isinstance(server_steps, int)
                                       or server_steps < 0):
            raise ValueError(f'server_steps must be "auto" or an int >= 0, got {server_steps!r}')
        if local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {local_steps}")
        self.server_steps, self.local_steps, self.overlap = server_steps, local_steps, overlap
        self.overlap_threads = overlap_threads
        self.batch_size = batch_size
        self.owed_steps = 0  # server steps earned by finished rounds and not yet taken (overlap)
        self._overlap_metrics: dict[str, float] = {}
        self.uploads_per_round = uploads_per_round
        self.buffer_size = buffer_size
        self.harness_payload = harness_payload
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = server_model.to(self.device)
        self.optimizer = make_optimizer(self.model, learning_rate)
        self.meter = FlopMeter(every_pass=flops_every_pass) if count_flops else None
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.seed = seed
        self._checks: dict[int, UploadCheck] = {}  # cut step -> what an honest upload at it looks like
        self.client_budget: dict[int, int] = {}  # client -> uploads a round, at most its node's budget
        self.buffer: dict[int, list[torch.Tensor]] = {}  # client -> its uploads, oldest first
        self.last_upload: dict[int, np.ndarray] = {}  # client -> its last upload (harness only)
        self.node_cuts = node_cuts
        self.client_cut: dict[int, int] = {}  # client -> the cut step its node declared (node_cuts)
        self.skipped_steps = 0
        self._served = 0  # images whose server half ran since the last evaluation
        if self.t_c == 0 and not node_cuts:
            log(WARNING, "cut-ratio=0: clients upload their RAW training images (x_0) - this is the "
                "server-only extreme and discloses the data completely")
        if self.t_c == T and not node_cuts:
            log(WARNING, "cut-ratio=1: clients train alone and upload nothing (local-only extreme)")


    # -- first contact and each node's cut ----------------------------------------------------
    def accept_hello(self, node_id: int, info: dict[str, Any]) -> str:
        node_cut = info.get(P.CUT_STEP)
        if node_cut is None or int(node_cut) == self.t_c:
            return ""
        if not self.node_cuts:
            return (f"the node's own cut step is {int(node_cut)}, the server's is {self.t_c}: the data owner "
                    f"sets c (run-config cut-ratio or node_config cut-ratio); start both with the same c, or "
                    f"let each node choose (run-config client-cut-ratios / CollaFuse(node_cuts=True))")
        if int(node_cut) != node_cut or not 0 <= int(node_cut) <= self.sched.T:
            return f"the node's cut step {node_cut} is not a whole step in 0..{self.sched.T}"
        return ""

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

    @property
    def server_share(self) -> bool:
        """The server has a share of some admitted (or the default) client's chain."""
        return any(t < self.sched.T for t in (*self.client_cut.values(), self.t_c))

    def upload_bound(self, client: int) -> float:
        return D.anchor_bound(self.sched, self.cut_for(client), UPLOAD_Z)

    def upload_check(self, client: int) -> UploadCheck:
        """The statistics every image of an honest upload at this client's cut satisfies."""
        t_c = self.cut_for(client)
        if t_c not in self._checks:
            self._checks[t_c] = UploadCheck(float(self.sched.alpha_bars[t_c]), self.image_shape)  # type: ignore[arg-type]
        return self._checks[t_c]

    # -- training ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        def extra(node_id: int) -> dict[str, int]:
            client = self.client_of(node_id)
            t_c = self.cut_for(client)
            return {P.CUT_STEP: t_c, P.UPLOADS_ASKED: self.uploads_for(client)}

        return self._send(self._participants(grid),
                          lambda n: RecordDict({P.CONFIG: self._config(config, server_round, n, **extra(n))}),
                          "train")

    def _client_start(self, t_c: int) -> int:
        return D.client_start_step(t_c / self.sched.T, self.sched.T, self.server_target)  # type: ignore[arg-type]

    def validate_reply(self, phase: str, client: int, msg: Message) -> str:
        if phase == "evaluate":
            cut = msg.content[P.METRICS].get(P.CUT_STEP)
            if cut is not None and cut != self.cut_for(client):
                return f"{P.CUT_STEP}: the node says it finished from step {cut}, it was admitted at {self.cut_for(client)}"
            return ""
        if phase != "train" or P.UPLOAD not in msg.content.array_records:
            return ""
        rec = msg.content[P.UPLOAD]
        if list(rec.keys()) != [P.X_TC]:
            return f"upload: expected exactly the array '{P.X_TC}', got {list(rec.keys())}"
        arr = rec[P.X_TC]
        if arr.dtype != "float32":
            return f"upload dtype: expected float32, got {arr.dtype}"
        if tuple(arr.shape[1:]) != self.image_shape or len(arr.shape) != 4:
            return f"upload shape: expected (n, {', '.join(map(str, self.image_shape))}), got {tuple(arr.shape)}"
        if not self.serves(client) or arr.shape[0] > self.uploads_for(client):
            return f"upload budget: {arr.shape[0]} images, at most {self.uploads_for(client)}"
        x = arr.numpy()
        if not np.isfinite(x).all():
            return "upload values: not all finite (NaN or Inf)"
        peak = float(np.abs(x).max()) if x.size else 0.0
        bound = self.upload_bound(client)
        if peak > bound:
            return (f"upload range: |x| reaches {peak:.3g}, an x_tc at t_c={self.cut_for(client)} stays within "
                    f"{bound:.3g}")
        return self.upload_check(client)(x)

    def steps_for(self, contributors: int) -> int:
        """The server steps one round earns: fixed, or local_steps x the nodes it served."""
        return self.server_steps if isinstance(self.server_steps, int) else self.local_steps * contributors

    def while_nodes_train(self, server_round: int) -> None:
        """Take the steps earlier rounds earned while this round's nodes train (overlap)."""
        if self.owed_steps:
            threads = torch.get_num_threads()
            if self.overlap_threads:
                torch.set_num_threads(self.overlap_threads)
            try:
                self._overlap_metrics = self._train_server(self.owed_steps, server_round)
            finally:
                torch.set_num_threads(threads)
            self._overlap_metrics["server-train-overlapped-seconds"] = self._overlap_metrics.pop("server-train-seconds")
            self.owed_steps = 0

    def _train_server(self, steps: int, server_round: int) -> dict[str, float]:
        """`steps` guarded Adam steps on the whole (validated) buffer; what they cost."""
        out: dict[str, float] = {"server-steps": 0}
        if not (self.server_share and self.buffer and steps > 0):
            return out
        t0 = time.perf_counter()
        data, labels = self.buffer_tensors()
        cuts = {self.cut_for(int(c)) for c in labels.unique()}
        row_cuts = None
        if len(cuts) == 1:  # one cut for all (the paper's setting)
            t_c: int | torch.Tensor = cuts.pop()
        else:  # nodes chose their cuts: each row trains on t > its own node's cut
            row_cuts = torch.tensor([self.cut_for(c) for c in range(int(labels.max()) + 1)])[labels]
        stats: dict[str, int] = {}
        batches = balanced_batches(labels, self.batch_size, steps, self.gen)  # None: shares already equal
        loss_fn = (server_share_loss(self.model, self.sched, t_c, self.server_target, self.gen) if row_cuts is None  # type: ignore[arg-type]
                   else lambda x_tc, c: D.server_loss(self.model, self.sched, x_tc, c, self.server_target, self.gen))  # type: ignore[arg-type]
        loss = train_steps(self.model, self.optimizer, loss_fn, data, steps, self.batch_size, self.gen, self.device,
                           self.meter, "server-train", labels=labels, guard=True, stats=stats, row_args=row_cuts,
                           batches=batches)
        skipped = stats.get("skipped", 0)
        self.skipped_steps += skipped
        out.update({"server-steps": steps, "server-train-seconds": time.perf_counter() - t0})
        if not math.isnan(loss):
            out["server-train-loss"] = loss
        if skipped:
            out["server-steps-skipped"] = skipped
            log(WARNING, "round %d: %d server step(s) skipped (non-finite loss or gradients); the model and "
                "optimizer were left as they were", server_round, skipped)
        if self.meter is not None:
            out["server-train-flops"] = float(self.meter.totals.pop("server-train", 0))
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord, MetricRecord]:
        ok = self._accept(server_round, replies, "train")
        n_new, contributors = 0, 0
        for m in ok:
            if P.UPLOAD in m.content.array_records:
                x = m.content[P.UPLOAD][P.X_TC].numpy()
                client = self.client_of(m.metadata.src_node_id)
                self.buffer.setdefault(client, []).append(torch.from_numpy(x.copy()))
                self.last_upload[client] = x
                self.recorder.client_stats[client].update(
                    {f"upload-{k}": v for k, v in self.upload_check(client).summary(x).items()})
                n_new += x.shape[0]
                contributors += x.shape[0] > 0
        self._trim_buffer()
        self.owed_steps += self.steps_for(contributors)  # nodes the server serves are the ones that upload
        metrics = self.mean_metrics(ok)
        ran = self._overlap_metrics
        self._overlap_metrics = {}
        if not self.overlap or self.model_measured_after(server_round):
            now = self._train_server(self.owed_steps, server_round)
            self.owed_steps = 0
            if ran:  # steps taken in both places this round: one record of each, summed where additive
                for k in ("server-steps", "server-train-flops", "server-steps-skipped"):
                    if k in ran or k in now:
                        now[k] = ran.get(k, 0) + now.get(k, 0)
                ran = {k: v for k, v in ran.items() if k not in now}
            ran = {**ran, **now}
        for k, v in ran.items():
            metrics[k] = v
        if ran.get("server-steps"):
            self._client_losses(server_round)
        metrics["server-steps-owed"] = self.owed_steps
        metrics["uploads-received"] = n_new
        metrics["server-buffer-size"] = sum(t.shape[0] for ts in self.buffer.values() for t in ts)
        self.recorder.record(server_round, **dict(metrics))
        self._progress(server_round, "train", **{k: float(v) for k, v in metrics.items()
                                                 if k in (P.TRAIN_LOSS, "server-train-loss", "uploads-received")})
        return ArrayRecord(self.model.state_dict()), metrics

    @torch.no_grad()
    def _client_losses(self, server_round: int, rows: int = 64) -> None:
        """The server's loss on each client's newest upload, for the report (results.json
        `robustness.client_stats`): how well the shared model fits what each client sent. Its
        own generator, so training draws stay as they were (an honest run is unchanged)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 + server_round)
        was_training = self.model.training
        self.model.eval()
        try:
            for client in sorted(self.buffer):
                if not self.buffer[client] or not self.serves(client):
                    continue
                x = self.buffer[client][-1][:rows].to(self.device)
                if hasattr(self.model, "condition"):
                    self.model.condition(client)
                loss = D.server_loss(self.model, self.sched, x, self.cut_for(client), self.server_target, gen)  # type: ignore[arg-type]
                self.recorder.client_stats[client]["server-loss"] = float(loss)
        finally:
            self.model.train(was_training)

    def buffer_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The buffer as one tensor, with each row's client index (in client order)."""
        parts = [(c, t) for c in sorted(self.buffer) for t in self.buffer[c]]
        data = torch.cat([t for _, t in parts])
        labels = torch.cat([torch.full((t.shape[0],), c, dtype=torch.long) for c, t in parts])
        return data, labels

    def _trim_buffer(self) -> None:
        """Keep at most `buffer_size` uploads: drop the oldest rows of whichever client holds the
        most, so a client that uploads more cannot push the others out."""
        if self.buffer_size is None:
            return
        sizes = {c: sum(t.shape[0] for t in ts) for c, ts in self.buffer.items()}
        while sum(sizes.values()) > self.buffer_size:
            c = max(sorted(sizes), key=sizes.__getitem__)
            excess = min(sum(sizes.values()) - self.buffer_size, self.buffer[c][0].shape[0])
            head = self.buffer[c][0][excess:]
            self.buffer[c] = ([head] if head.shape[0] else []) + self.buffer[c][1:]
            sizes[c] -= excess

    # -- evaluation ---------------------------------------------------------------------------
    def server_half(self, n: int, client: int) -> torch.Tensor:
        """x_T -> x_{t_c,k} with the shared model for one client (what that node receives)."""
        t_c = self.cut_for(client)
        s_srv, _ = D.split_step_budget(self.sampling_steps, self.sched.T, t_c)
        self._served += n
        self.model.eval()
        if hasattr(self.model, "condition"):
            self.model.condition(client)
        eps_model = self.meter.wrap(self.model, "server-infer") if self.meter is not None else self.model
        with torch.no_grad():
            x = D.server_sample(eps_model, self.sched, (n, *self.image_shape), t_c,  # type: ignore[arg-type]
                                self.server_target, s_srv, self.gen, self.device)  # type: ignore[arg-type]
        return x.cpu()

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        n = self.num_eval_samples

        def content(node_id: int, conf: ConfigRecord) -> RecordDict:
            client = self.client_of(node_id)
            t_c = self.cut_for(client)
            _, s_cli = D.split_step_budget(self.sampling_steps, self.sched.T, t_c)
            conf[P.CLIENT_START_STEP], conf[P.CLIENT_SAMPLING_STEPS] = self._client_start(t_c), s_cli or 0
            rd = RecordDict({P.CONFIG: conf})
            if self.serves(client):
                rd[P.HANDOFF] = ArrayRecord({P.X_TC: Array(self.server_half(n, client).float().numpy())})
            if self.harness_payload is not None and client in self.last_upload:
                payload = self.harness_payload(self, client, self.last_upload[client])
                if payload is not None:
                    rd[P.HARNESS] = payload
            return rd

        return self._eval_messages(server_round, grid, config, content, harness=(P.HARNESS,))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        if self.meter is not None and self._served:
            flops = float(self.meter.totals.pop("server-infer", 0))
            self.recorder.record(server_round, **{"server-infer-flops-per-image": flops / self._served})
        self._served = 0
        return super().aggregate_evaluate(server_round, replies)


