"""The ClientApp: one function per protocol action, wiring the node's policy, data and work.

Whether a node runs a method, and what it sends back, comes from its operator's policy (`node/policy.py`),
never from the server's run-config: collafuse uploads only x_{t_c} with fresh secret noise at least as
strong as the node's floor, each image at most K times in the node's life; samples, scores and losses
go back only where the policy shares research measurements. Every failure becomes an Error reply
without local paths (`node.refusal`).
"""

from collafuse_flwr.imports import LOCK

with LOCK:  # the ServerApp may be loading in another thread (collafuse_flwr/imports.py)
    import dataclasses
    import functools
    import logging
    import math
    import time
    from collections.abc import Callable
    from dataclasses import dataclass
    from pathlib import Path

    import numpy as np
    import torch
    from flwr.app import Array, ArrayRecord, Context, Message
    from flwr.clientapp import ClientApp

    from collafuse_flwr import protocol as P
    from collafuse_flwr.config import BOOKKEEPING_KEYS, ConfigError, RunConfig, parse_config
    from collafuse_flwr.core import diffusion as D
    from collafuse_flwr.core.dp import DPPlan, UploadLedger, plan_uploads
    from collafuse_flwr.core.flops import FlopMeter
    from collafuse_flwr.core.images import to_uint8
    from collafuse_flwr.core.models import (build_denoiser, client_preset, count_parameters, default_device,
                                            shared_denoiser, use_torch_threads)
    from collafuse_flwr.core.training import generate, make_optimizer
    from collafuse_flwr.data.client_data import ClientData, client_data, own_folder_data
    from collafuse_flwr.node import ledger, randomness, scoring, state
    from collafuse_flwr.node import steps as N
    from collafuse_flwr.node.files import private_dir
    from collafuse_flwr.node.policy import NodePolicy, node_policy

app = ClientApp()
_LOG = logging.getLogger("collafuse_flwr.node")
#: phases of the node's keyed draws (a trusting node's reproducible streams)
_TRAIN, _UPLOAD, _EVAL = "draws-train", "draws-upload", "draws-evaluate"


@functools.lru_cache(maxsize=4)
def _config(items: tuple) -> RunConfig:
    return parse_config(dict(items))


@dataclass(frozen=True)
class Node:
    """One node as a message finds it: the run's settings, its operator's policy, its data."""

    cfg: RunConfig
    policy: NodePolicy
    data: ClientData
    sched: D.Schedule
    device: torch.device
    context: Context
    fingerprint: str

    @property
    def num_train(self) -> int:
        return int(self.data.train.shape[0])

    def upload_cap(self) -> int:
        """Uploads of one image allowed in the ledger's scope (huge: a trusting node without a cap or DP)."""
        return self.policy.max_uploads_per_image or (1 << 62)

    def upload_step(self) -> tuple[int, DPPlan | None]:
        """(the step uploads are made at, the DP plan): the DP plan's t_u >= the cut, when on. K of the
        guarantee is the node's cap, or (trusting, unset) the most the run can ask."""
        t_c, pol = node_cut_step(self.cfg, self.policy, self.data.partition_id, self.sched), self.policy
        if pol.upload_epsilon <= 0 or t_c >= self.sched.T:
            return t_c, None
        k = pol.max_uploads_per_image or max(1, math.ceil(
            self.cfg.num_server_rounds * pol.uploads_per_round / max(self.num_train, 1)))
        plan = _dp_plan(self.cfg.diffusion_steps, self.cfg.beta_schedule, t_c, pol.upload_epsilon,
                        pol.upload_delta, k, int(np.prod(self.data.image_shape)), pol.upload_clip)
        return plan.t_upload, plan

    def generator(self, client: int, server_round: int, phase: str, counter: int = 0) -> torch.Generator:
        """Fresh OS entropy, or (a trusting node) keyed by secret, run, client, round, phase, counter."""
        if not self.policy.reproducible:
            return randomness.fresh_generator()
        secret = randomness.node_secret(private_dir(self.policy.state_dir))
        return randomness.keyed_generator(secret, self.fingerprint, client, server_round, phase, counter)

    def meter(self) -> FlopMeter | None:
        return FlopMeter(every_pass=self.cfg.flops_every_pass) if self.cfg.count_flops else None


def node_cut_step(cfg: RunConfig, policy: NodePolicy, partition_id: int, sched: D.Schedule | None = None) -> int:
    """Where a node cuts (before DP): the first step of the run's schedule noisy enough for its
    floor, or the run-config's own c for this node (its client-cut-ratios entry) where noisier."""
    sched = sched or D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    return policy.cut_step(sched, D.cut_step(cfg.cut_ratio_for(partition_id), sched.T))


@functools.lru_cache(maxsize=32)
def _dp_plan(T: int, schedule: str, t_c: int, eps: float, delta: float, k: int, d: int,  # noqa: N803
             clip: float) -> DPPlan:
    try:
        return plan_uploads(D.make_schedule(T, schedule), t_c, eps, delta,  # type: ignore[arg-type]
                            max_uploads_per_image=k, image_dim=d, clip=clip or None)
    except ValueError as exc:
        raise ConfigError(f"upload-epsilon={eps}: {exc}") from exc


def _node(context: Context) -> Node:
    try:
        cfg = _config(tuple(sorted(context.run_config.items())))
    except ConfigError as exc:
        raise ConfigError(f"this node cannot accept the run-config: {exc}") from exc
    use_torch_threads(cfg.torch_threads)
    nc = dict(context.node_config)
    policy = node_policy(nc, cfg, int(nc.get(P.NODE_PARTITION_ID, -1)))
    data = node_data(policy.data_config(cfg, nc), nc)
    if not policy.trusts_run_config:  # no file the server names is read: loading FID weights runs a pickle
        cfg = dataclasses.replace(cfg, fid_weights="")
    private_dir(policy.state_dir)
    return Node(cfg, policy, data, D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule), default_device(),
                context, randomness.run_fingerprint(dict(context.run_config), ignore=BOOKKEEPING_KEYS))


def node_data(cfg: RunConfig, nc: dict) -> ClientData:
    """The node's data from its node_config: its own folder, or its partition of a shared dataset."""
    folder = str(nc.get(P.NODE_DATA_DIR, "") or "")
    pid = int(nc.get(P.NODE_PARTITION_ID, -1))
    if folder:
        return own_folder_data(cfg, folder, str(nc.get(P.NODE_DATASET, "") or cfg.dataset), pid)
    return client_data(cfg, max(pid, 0), int(nc.get(P.NODE_NUM_PARTITIONS, 1)))


def action(category: str, method: str, serves: str = "") -> Callable:
    """Register `fn(node, msg) -> (metrics, records)` for `<category>.<method>` with every check a
    message needs where it enters: the records it may carry, the node's policy (does it serve
    `serves or method`), and an Error reply (no local paths; the full error stays in the node's log)."""

    def wrap(fn: Callable[[Node, Message], tuple[dict, dict]]) -> Callable[[Message, Context], Message]:
        @functools.wraps(fn)
        def handler(msg: Message, context: Context) -> Message:
            try:
                extra = P.unexpected_records(msg, "down", category, method)
                if extra:
                    raise N.Refused(f"{category}.{method} carries records {extra} this node did not ask for")
                node = _node(context)
                if not node.policy.serves(serves or method):
                    raise N.Refused(f"this node serves only {sorted(node.policy.methods)} (its operator's "
                                    f"node_config '{P.NODE_METHODS}'), not method={serves or method!r}")
                metrics, records = fn(node, msg)
            except Exception as exc:  # noqa: BLE001 - every failure becomes a clear Error reply
                if isinstance(exc, P.ProtocolError):  # a malformed server config: refused, not failed
                    exc = N.Refused(str(exc))
                elif not isinstance(exc, N.Refused):
                    _LOG.exception("%s.%s failed", category, method)
                return N.refusal(msg, exc, context.node_config)
            return N.reply(msg, metrics, **records)

        return handler

    return wrap


def _conf(node: Node, msg: Message) -> tuple[int, int, int]:
    """(server round, client index, run key) from the server's config, each checked."""
    conf = msg.content[P.CONFIG]
    rnd = P.read_int(conf, P.SERVER_ROUND, 1, node.cfg.num_server_rounds)
    num = P.read_int(conf, P.NUM_CLIENTS, 0, 1 << 20, default=0)
    client = P.read_int(conf, P.CLIENT_INDEX, 0, max(num - 1, 0) if num else 1 << 20,
                        default=max(node.data.partition_id, 0))
    return rnd, client, P.read_int(conf, P.RUN_KEY, 0, (1 << 64) - 1, default=0)  # Flower run ids are uint64


def private_model_size(cfg: RunConfig, method: str) -> str:
    """`client-model-size` for CollaFuse (its low-noise share needs less capacity), else `model-size`."""
    return client_preset(cfg.model_size, cfg.client_model_size) if method == P.COLLAFUSE else cfg.model_size


@functools.lru_cache(maxsize=8)
def private_param_count(cfg: RunConfig, channels: int, method: str) -> int:
    return count_parameters(build_denoiser(cfg.image_size, channels, private_model_size(cfg, method)))


@app.query(P.HELLO)
def hello(msg: Message, context: Context) -> Message:
    """First contact: whether this node serves the server's method, and what it will do."""
    conf = msg.content[P.CONFIG] if P.CONFIG in msg.content.config_records else {}
    method = str(conf.get(P.METHOD, ""))
    if method not in P.METHODS:
        return N.refusal(msg, N.Refused(f"unknown method {method!r}; this protocol knows {list(P.METHODS)}"))
    return action(P.QUERY, P.HELLO, serves=method)(lambda node, m: (_hello(node, method), {}))(msg, context)


def _hello(node: Node, method: str) -> dict:
    info: dict = {P.PARTITION_ID: node.data.partition_id, P.NUM_EXAMPLES: node.num_train,
                  P.IMAGE_CHANNELS: node.data.image_shape[0], P.SHARE_HARNESS: int(node.policy.share_harness)}
    if method in (P.COLLAFUSE, P.LOCAL):
        info[P.CLIENT_PARAMS] = private_param_count(node.cfg, node.data.image_shape[0], method)
    if method == P.COLLAFUSE:
        t_u, plan = node.upload_step()
        info.update({P.CUT_STEP: t_u, P.UPLOAD_BUDGET: node.policy.uploads_per_round,
                     **(plan.metrics(P.DP_PREFIX) if plan else {})})
        if node.policy.lifetime_ledger:
            used = ledger.lifetime_counts(node.policy.state_dir, ledger.image_keys(node.data.train_uint8),
                                          node.data.image_shape)
            info[P.UPLOADS_LEFT] = int(np.clip(node.upload_cap() - used, 0, None).sum())
    return info


def init_private_denoiser(cfg: RunConfig, client: int, channels: int, device: torch.device,
                          method: str = P.COLLAFUSE) -> torch.nn.Module:
    """A client's denoiser before its first round, seeded by (seed, client) alone: the actor's
    global RNG is shared between nodes. (Initial weights touch no data, so they need no secret.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + client)
        return build_denoiser(cfg.image_size, channels, private_model_size(cfg, method)).to(device)


def _private_model(node: Node, method: str, client: int, server_round: int, run_key: int):
    """The node's denoiser and optimizer as they were after round `server_round - 1`."""
    model = init_private_denoiser(node.cfg, client, node.data.image_shape[0], node.device, method)
    opt = make_optimizer(model, node.cfg.learning_rate)
    state.recover(node.context.state, _state_file(node, client, run_key), server_round)
    state.restore_private(node.context.state, model, opt)
    return model, opt


def _state_file(node: Node, client: int, run_key: int, suffix: str = "pt") -> Path:
    """Per run (a resumed run names the first) and run-config; "finished": the final evaluation's marker.
    A deployed node's state folder is its own (docs): one private model a run, whatever client index
    the server sends, so the server cannot have it write a file per index."""
    run = f"run-{run_key or node.context.run_id}-{node.fingerprint}"
    return node.policy.state_dir / run / f"{f'client-{client}' if node.policy.trusts_run_config else 'node'}.{suffix}"


def _new_run_file(node: Node, client: int, run_key: int, suffix: str = "pt") -> Path:
    """`_state_file`, its run folder made; a deployed node first drops all but its newest runs' folders."""
    path = _state_file(node, client, run_key, suffix)
    if not node.policy.trusts_run_config:
        state.prune_runs(path)
    private_dir(path.parent)
    return path


def _scored_file(node: Node, client: int, run_key: int) -> Path:
    """Which uploads were scored: a deployed node's one file, so no run key a message names finds it empty."""
    if node.policy.trusts_run_config:
        return _state_file(node, client, run_key, "scored")
    return node.policy.state_dir / "scored-uploads.json"


def _train(node: Node, model: torch.nn.Module, opt: torch.optim.Optimizer, t_max: int, client: int, rnd: int,
           metrics: dict) -> None:
    """Steps of `model` on t in 1..t_max; its loss is data-dependent (membership inference): harness only."""
    meter = node.meter()
    if t_max > 0:
        loss = N.train_share(model, opt, node.data.train, node.sched, t_max, node.cfg.local_steps,
                             node.cfg.batch_size, node.generator(client, rnd, _TRAIN), node.device, meter)
        if node.policy.share_harness:
            metrics[P.TRAIN_LOSS] = loss
    if meter is not None:
        metrics[P.CLIENT_TRAIN_FLOPS] = float(meter.totals.get("train", 0.0))


def _train_private(node: Node, msg: Message, method: str, t_max: int,
                   upload: Callable[[int, int, dict], dict] | None = None) -> tuple[dict, dict]:
    """A round of the private denoiser, then `upload(client, round, metrics) -> records`, then persist."""
    t0 = time.perf_counter()
    metrics: dict = {P.NUM_EXAMPLES: node.num_train}
    rnd, client, run_key = _conf(node, msg)
    if _state_file(node, client, run_key, "finished").exists():
        raise N.Refused("this run's final evaluation is done on this node; it trains no more for it")
    model, opt = _private_model(node, method, client, rnd, run_key)
    _train(node, model, opt, t_max, client, rnd, metrics)
    state.save_private(node.context.state, model, opt, rnd)
    records = upload(client, rnd, metrics) if upload else {}
    state.persist(node.context.state, _new_run_file(node, client, run_key))
    metrics[P.TRAIN_SECONDS] = time.perf_counter() - t0
    return metrics, records


@app.train(P.COLLAFUSE)
@action(P.TRAIN, P.COLLAFUSE)
def train_collafuse(node: Node, msg: Message) -> tuple[dict, dict]:
    t_u, plan = node.upload_step()
    n_up = N.check_train_request(msg.content[P.CONFIG], cut_step=t_u, upload_budget=node.policy.uploads_per_round)
    # renoise starts the client's chain above t_c (the authors' patch), so it trains up there too
    t_max = D.client_start_step(t_u / node.sched.T, node.sched.T, node.cfg.server_target)
    return _train_private(node, msg, P.COLLAFUSE, t_max,
                          lambda client, rnd, metrics: _upload(node, client, rnd, metrics, t_u, plan, n_up))


def _upload(node: Node, client: int, rnd: int, metrics: dict, t_u: int, plan: DPPlan | None, n: int) -> dict:
    """At most n images chosen under the cap (counted before they leave) and diffused to t_u."""
    metrics.update(plan.metrics(P.DP_PREFIX) if plan is not None else {})
    if n <= 0 or t_u >= node.sched.T:
        return {}
    st = node.context.state
    counts = state.upload_counts(st, node.num_train)
    gen = node.generator(client, rnd, _UPLOAD, int(counts.sum()))  # the run's upload count only grows
    cap = plan.max_uploads_per_image if plan is not None else node.upload_cap()
    if node.policy.lifetime_ledger:
        idx = ledger.reserve(node.policy.state_dir, ledger.image_keys(node.data.train_uint8), cap, n, gen,
                             node.data.image_shape)
    else:
        idx = UploadLedger(node.num_train, cap, counts).choose(n, gen)
    if idx.size == 0:
        _LOG.warning("client %d: every image reached its upload cap (%d); nothing uploaded", client, cap)
        return {}
    state.remember_upload(st, idx, node.num_train)
    metrics[P.NUM_UPLOADED] = int(idx.size)
    x_tc = N.diffuse_upload(node.data.train[torch.from_numpy(idx)], node.sched, t_u, gen, plan)
    return {P.UPLOAD: ArrayRecord({P.X_TC: Array(x_tc.numpy())})}


@app.train(P.LOCAL)
@action(P.TRAIN, P.LOCAL)
def train_local(node: Node, msg: Message) -> tuple[dict, dict]:
    return _train_private(node, msg, P.LOCAL, node.sched.T)


def _global_model(node: Node, msg: Message, client: int) -> torch.nn.Module:
    """FedAvg's global model from the message, conditioned on this client's index."""
    num = P.read_int(msg.content[P.CONFIG], P.NUM_CLIENTS, 0, 1 << 20, default=0) or client + 1
    model = shared_denoiser(node.cfg.image_size, node.data.image_shape[0], node.cfg.model_size,
                            node.cfg.conditioning, num)
    if P.ARRAYS not in msg.content.array_records:
        raise N.Refused(f"no '{P.ARRAYS}' record: FedAvg sends the global model")
    try:
        model.load_state_dict(msg.content[P.ARRAYS].to_torch_state_dict())
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise N.Refused(f"the global model does not fit this node's settings (num-clients={num}, "
                        f"model-size={node.cfg.model_size!r}): {str(exc)[:200]}") from None
    if not all(torch.isfinite(p).all() for p in model.parameters()):
        raise N.Refused("the global model has non-finite weights")
    return model.to(node.device).condition(client)


@app.train(P.FEDAVG)
@action(P.TRAIN, P.FEDAVG)
def train_fedavg(node: Node, msg: Message) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    rnd, client, _ = _conf(node, msg)
    model = _global_model(node, msg, client)
    metrics: dict = {P.NUM_EXAMPLES: node.num_train}
    _train(node, model, make_optimizer(model, node.cfg.learning_rate), node.sched.T, client, rnd, metrics)
    metrics[P.TRAIN_SECONDS] = time.perf_counter() - t0
    return metrics, {P.ARRAYS: ArrayRecord(model.state_dict())}


@app.train(P.CENTRALIZED)
@action(P.TRAIN, P.CENTRALIZED)
def train_centralized(node: Node, msg: Message) -> tuple[dict, dict]:
    """The reference that pools raw data: the training images themselves, once."""
    _conf(node, msg)
    return {P.NUM_EXAMPLES: node.num_train}, {P.UPLOAD: ArrayRecord({P.X0: Array(node.data.train.numpy())})}


def _eval_request(node: Node, msg: Message) -> tuple[int, int, int, int, int | None]:
    """(round, client, run key, images to generate, DDIM steps or None), each checked."""
    rnd, client, run_key = _conf(node, msg)
    conf = msg.content[P.CONFIG]
    n = min(P.read_int(conf, P.NUM_SAMPLES, 1, 1 << 20), max(node.cfg.num_eval_samples, 1))
    # a DDIM budget above the node's own T means "every step" (FedAvg does not know T)
    steps = min(P.read_int(conf, P.CLIENT_SAMPLING_STEPS, 0, 1 << 20, default=0), node.sched.T) or None
    return rnd, client, run_key, n, steps


def _evaluated(node: Node, msg: Message, method: str, images: torch.Tensor, seconds: float, client: int,
               run_key: int, meter: FlopMeter | None, model: torch.nn.Module | None,
               t_c: int) -> tuple[dict, dict]:
    """The evaluation reply: counts and costs always; samples and scores only under the policy.
    After the run's final evaluation the node drops that run's private state and trains no more."""
    metrics: dict = {P.NUM_EXAMPLES: int(images.shape[0]), P.INFER_SECONDS: seconds}
    if model is not None:
        metrics[P.CLIENT_PARAMS] = count_parameters(model)
    if method == P.COLLAFUSE:
        metrics[P.CUT_STEP] = t_c
    if meter is not None:
        metrics[P.CLIENT_INFER_FLOPS_PER_IMAGE] = float(meter.totals.get("infer", 0.0)) / max(1, images.shape[0])
    records: dict = {}
    if node.policy.share_harness:  # research measurements, only where the node's operator allows them
        metrics[P.CHECKSUM] = float(images.double().mean())
        scored = _scored_file(node, client, run_key)
        metrics.update(scoring.client_metrics(node.cfg, images, node.data, msg.content, node.context.state,
                                              t_c if method == P.COLLAFUSE else None, scored))
        records[P.SAMPLES] = ArrayRecord({P.IMAGES: Array(images.numpy().astype(np.uint8))})
    if msg.content[P.CONFIG].get(P.FINAL_ROUND, 0) == 1 and method in (P.COLLAFUSE, P.LOCAL):
        state.discard(_state_file(node, client, run_key))
        _new_run_file(node, client, run_key, "finished").touch(mode=0o600)  # also where it never trained
    return metrics, records


@app.evaluate(P.COLLAFUSE)
@action(P.EVALUATE, P.COLLAFUSE)
def evaluate_collafuse(node: Node, msg: Message) -> tuple[dict, dict]:
    return _evaluate(node, msg, P.COLLAFUSE)


@app.evaluate(P.LOCAL)
@action(P.EVALUATE, P.LOCAL)
def evaluate_local(node: Node, msg: Message) -> tuple[dict, dict]:
    return _evaluate(node, msg, P.LOCAL)


@app.evaluate(P.FEDAVG)
@action(P.EVALUATE, P.FEDAVG)
def evaluate_fedavg(node: Node, msg: Message) -> tuple[dict, dict]:
    return _evaluate(node, msg, P.FEDAVG)


def _evaluate(node: Node, msg: Message, method: str) -> tuple[dict, dict]:
    """Generate with FedAvg's global model, or finish the server's hand-off (or pure noise) privately."""
    rnd, client, run_key, n, steps = _eval_request(node, msg)
    t_start = t_c = node.sched.T
    if method == P.COLLAFUSE:
        t_c, _ = node.upload_step()
        t_start = D.client_start_step(t_c / node.sched.T, node.sched.T, node.cfg.server_target)
        asked = msg.content[P.CONFIG].get(P.CLIENT_START_STEP, t_start)
        if asked != t_start:
            raise N.Refused(f"the server asked to start sampling at step {asked}, this node's is {t_start}")
    t0 = time.perf_counter()
    gen, meter, shape = node.generator(client, rnd, _EVAL), node.meter(), node.data.image_shape
    if method == P.FEDAVG:
        model = _global_model(node, msg, client)
        images = to_uint8(generate(model, node.sched, n, shape, steps, gen, node.device, meter))
    else:
        model, _ = _private_model(node, method, client, rnd + 1, run_key)  # as it was after this round
        if P.HANDOFF in msg.content.array_records and P.X_TC in msg.content[P.HANDOFF]:
            x = N.check_handoff(msg.content[P.HANDOFF][P.X_TC].numpy(), image_shape=shape, max_samples=n)
        elif t_start < node.sched.T:
            raise N.Refused(f"no '{P.HANDOFF}' record: this node starts at step {t_start}, below T={node.sched.T}")
        else:  # local-only or c = 1: the client starts from pure noise
            x = torch.randn((n, *shape), generator=gen)
        images = N.finish(model, node.sched, x, t_start, steps, gen, node.device, meter)
    return _evaluated(node, msg, method, images, time.perf_counter() - t0, client, run_key, meter, model, t_c)


@app.evaluate(P.CENTRALIZED)
@action(P.EVALUATE, P.CENTRALIZED)
def evaluate_centralized(node: Node, msg: Message) -> tuple[dict, dict]:
    """The server generated this node's images; the node only scores them (under its policy)."""
    _, client, run_key, n, _ = _eval_request(node, msg)
    if P.GENERATED not in msg.content.array_records or P.IMAGES not in msg.content[P.GENERATED]:
        raise N.Refused(f"no '{P.GENERATED}/{P.IMAGES}' array: centralized sends the generated images")
    arr = msg.content[P.GENERATED][P.IMAGES].numpy()
    if arr.dtype != np.uint8 or arr.ndim != 4 or tuple(arr.shape[1:]) != node.data.image_shape or not 0 < len(arr) <= n:
        raise N.Refused(f"generated images must be uint8 (1..{n}, {node.data.image_shape}), got {arr.dtype}{arr.shape}")
    return _evaluated(node, msg, P.CENTRALIZED, torch.from_numpy(arr.copy()), 0.0, client, run_key, None, None, 0)
