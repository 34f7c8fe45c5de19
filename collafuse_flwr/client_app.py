"""The ClientApp: this project's wiring of one node's side of every method.

The protocol steps live in `node.py` (usable from any ClientApp); this file adds the project's
run-config, the node's data (`client_data.node_data`), its private state and its own settings.

What a node sends back, per method (the tests check it):
- collafuse: x_{t_c} of some of its training images (fresh secret noise) and metrics; never
  x_0, never the noise, never its private denoiser.
- fedavg: its locally trained copy of the global denoiser and metrics.
- local: metrics only.
- centralized (a reference, not a private method): its raw training images, once.
At evaluation a node returns counts, timings and FLOPs; generated images, FID/KID against its
private test split and disclosure scores only where its sharing policy allows (`NodeSettings`).

The node, not the server, owns its privacy settings (node_config overrides the run-config):
  cut-ratio           its c; a server asking for another cut step is refused
  uploads-per-round   its upload budget per round; more is refused
  share-harness       true/false: return research measurements (default: true only inside
                      the simulation engine, false in a deployment)
  state-dir           folder for its secret key and its private state, written after every
                      round so a restarted node (or a resumed run) continues; the state file is
                      removed after the run's final evaluation (default: the cache folder,
                      $COLLAFUSE_FLWR_CACHE or ~/.cache/collafuse-flwr, /node-state)
  data-dir, dataset   its own images (see client_data.py); partition-id, num-partitions
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import diffusion as D
from . import node as N
from .client_data import ClientData, node_data
from .config import ConfigError, RunConfig, parse_config
from .metrics.flops import FlopMeter
from .models import build_denoiser, client_preset, count_parameters, default_device, shared_denoiser, use_torch_threads
from .dp import DPPlan, UploadLedger, plan_uploads
from .state import persist, recover, remember_upload, restore_private, save_private, upload_counts

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> RunConfig:
    return parse_config(dict(items))


def in_simulation() -> bool:
    """True inside Flower's simulation engine (its ClientApps run in Ray workers)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@dataclass(frozen=True)
class NodeSettings:
    """What the data owner decides for this node, whatever the server asks."""

    cut_step: int
    upload_budget: int
    share_harness: bool
    state_dir: Path
    persist: bool = True  # keep the private state in a file too, so a restarted node or a resumed run goes on
    dp: DPPlan | None = None  # upload-epsilon's plan; cut_step is then its upload step t_u >= the chosen t_c


def node_settings(cfg: RunConfig, node_config: dict) -> NodeSettings:
    from .splits import cache_dir

    # the data owner's c: node_config cut-ratio (a deployment), else this client's entry of
    # client-cut-ratios (a simulation's per-client choice), else the run's cut-ratio
    c = float(node_config["cut-ratio"]) if "cut-ratio" in node_config else \
        cfg.cut_ratio_for(int(node_config.get("partition-id", -1)))
    cut = D.cut_step(c, cfg.diffusion_steps) if cfg.method == "collafuse" else cfg.diffusion_steps
    budget = int(node_config.get("uploads-per-round", cfg.uploads_per_round))
    share = node_config.get("share-harness", None)
    share_harness = in_simulation() if share is None else str(share).lower() in ("1", "true", "yes")
    default_dir = (cache_dir() or Path.home() / ".cache" / "collafuse-flwr") / "node-state"
    state_dir = Path(str(node_config.get("state-dir", "") or default_dir)).expanduser()
    return NodeSettings(cut, budget, share_harness, state_dir)


def dp_settings(cfg: RunConfig, node_config: dict, settings: NodeSettings, data: ClientData,
                sched: D.Schedule) -> NodeSettings:
    """The data owner's DP choice (run-config upload-epsilon; node_config upload-epsilon wins).

    Where the diffusion noise at t_c is not enough for (epsilon, delta) over the K uploads an
    image may have, the node diffuses its uploads further, to t_u (`dp.plan_uploads`): t_u
    becomes the node's effective cut, declared at first contact, so the server trains t > t_u
    on its uploads and hands it x_{t_u}, and its private model covers t <= t_u.
    """
    eps = float(node_config.get("upload-epsilon", cfg.upload_epsilon))
    if cfg.method != "collafuse" or eps <= 0 or settings.cut_step >= sched.T:
        return settings
    n = max(int(data.train.shape[0]), 1)
    k = cfg.max_uploads_per_image or max(1, math.ceil(cfg.num_server_rounds * settings.upload_budget / n))
    plan = _dp_plan(cfg.diffusion_steps, cfg.beta_schedule, settings.cut_step, eps, cfg.upload_delta, k,
                    int(np.prod(data.image_shape)), cfg.upload_clip)
    return dataclasses.replace(settings, cut_step=plan.t_upload, dp=plan)


@lru_cache(maxsize=32)
def _dp_plan(T: int, schedule: str, t_c: int, eps: float, delta: float, k: int, d: int,  # noqa: N803
             clip: float) -> DPPlan:
    try:
        return plan_uploads(D.make_schedule(T, schedule), t_c, eps, delta,  # type: ignore[arg-type]
                            max_uploads_per_image=k, image_dim=d, clip=clip or None)
    except ValueError as exc:
        raise ConfigError(f"upload-epsilon={eps}: {exc}") from exc


def _setup(context: Context) -> tuple[RunConfig, ClientData, D.Schedule, torch.device, NodeSettings]:
    try:
        cfg = _config(tuple(sorted(context.run_config.items())))
    except ConfigError as exc:
        raise ConfigError(f"this node cannot accept the run-config: {exc}") from exc
    use_torch_threads(cfg.torch_threads)
    data = node_data(cfg, dict(context.node_config))
    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    settings = dp_settings(cfg, dict(context.node_config), node_settings(cfg, dict(context.node_config)), data, sched)
    return cfg, data, sched, default_device(), settings


def _client_index(msg: Message, data: ClientData) -> int:
    return int(msg.content["config"].get("client-index", max(data.partition_id, 0)))


def node_generator(cfg: RunConfig, state_dir: Path, client: int, server_round: int, salt: int) -> torch.Generator:
    """The node's draws for one (round, phase): keyed by its secret, so the server cannot replay
    them; the same seed on the same node (same secret) draws the same again."""
    return N.secret_generator(N.node_secret(state_dir), cfg.seed, client, server_round, salt)


def _state_file(settings: NodeSettings, context: Context, client: int, run_key: int = 0) -> Path:
    """Per run, client and run-config: a restarted node finds its own state and nothing else.

    run_key: the run whose state to continue (a resumed run is a new Flower run that carries
    the first run's id); 0 = this run. `resume-from` is not part of the key, for the same reason.
    """
    import hashlib

    items = sorted((k, v) for k, v in context.run_config.items() if k != "resume-from")
    key = hashlib.sha256(repr(items).encode()).hexdigest()[:12]
    return settings.state_dir / f"run-{run_key or context.run_id}-{key}" / f"client-{client}.pt"


def _global_model(cfg: RunConfig, data: ClientData, msg: Message, device: torch.device, client: int):
    """FedAvg's global model from the message, conditioned on this client's index."""
    num = int(msg.content["config"].get("num-clients", 0)) or max(client + 1, 1)
    model = shared_denoiser(cfg.image_size, data.image_shape[0], cfg.model_size, cfg.conditioning, num)
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except RuntimeError as exc:
        raise N.Refused(f"the global model does not fit this node's settings (num-clients={num}, "
                        f"model-size={cfg.model_size!r}): {str(exc)[:200]}") from exc
    return model.to(device).condition(client)


def private_model_size(cfg: RunConfig) -> str:
    """The preset of this node's private denoiser: `client-model-size` for CollaFuse (its short,
    low-noise share needs less capacity than the server's), else `model-size`."""
    return client_preset(cfg.model_size, cfg.client_model_size) if cfg.method == "collafuse" else cfg.model_size


@lru_cache(maxsize=8)
def private_param_count(cfg: RunConfig, channels: int) -> int:
    """Parameters of the private denoiser (what the node's device must hold), without data."""
    return count_parameters(build_denoiser(cfg.image_size, channels, private_model_size(cfg)))


def init_private_denoiser(cfg: RunConfig, client: int, channels: int, device: torch.device):
    """A client's denoiser before its first round, seeded by (seed, client) alone: the actor's
    global RNG is shared between nodes, and benchmarks/overhead.py must draw the same init.
    (Initial weights touch no data, so they need no secret.)"""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + client)
        return build_denoiser(cfg.image_size, channels, private_model_size(cfg)).to(device)


def _private_model(cfg: RunConfig, data: ClientData, context: Context, settings: NodeSettings,
                   client: int, device: torch.device, run_key: int = 0):
    """The node's denoiser: from context.state, else from its state file (after a restart),
    else initialised from (seed, client)."""
    from .training import make_optimizer

    model = init_private_denoiser(cfg, client, data.image_shape[0], device)
    opt = make_optimizer(model, cfg.learning_rate)
    recover(context.state, _state_file(settings, context, client, run_key))
    restore_private(context.state, model, opt)
    return model, opt


def _reply(msg: Message, metrics: dict, **records) -> Message:
    content = RecordDict({k: v for k, v in records.items()})
    content["metrics"] = MetricRecord(N.finite_metrics(metrics))
    return Message(content=content, reply_to=msg)


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """First contact: what the server needs to admit this node (no data, no images)."""
    cfg, data, _, _, settings = _setup(context)
    return _reply(msg, {"partition-id": data.partition_id, "num-examples": int(data.train.shape[0]),
                        "cut-step": settings.cut_step if cfg.method == "collafuse" else -1,
                        "upload-budget": settings.upload_budget, "share-harness": int(settings.share_harness),
                        "client-params": private_param_count(cfg, data.image_shape[0])
                        if cfg.method in ("collafuse", "local") else 0,
                        **(settings.dp.metrics() if settings.dp else {})})


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data, sched, device, settings = _setup(context)
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    client = _client_index(msg, data)
    meter = FlopMeter(every_pass=cfg.flops_every_pass) if cfg.count_flops else None
    metrics: dict[str, float | int] = {"num-examples": int(data.train.shape[0])}
    records: dict = {}
    t0 = time.perf_counter()
    try:
        if cfg.method == "centralized":
            # The reference that shares raw data: send the training images once.
            records["upload"] = ArrayRecord({"x0": Array(data.train.numpy())})
        elif cfg.method == "fedavg":
            from .training import make_optimizer

            gen = node_generator(cfg, settings.state_dir, client, rnd, 0)
            model = _global_model(cfg, data, msg, device, client)
            opt = make_optimizer(model, cfg.learning_rate)
            metrics["train-loss"] = N.train_share(model, opt, data.train, sched, sched.T, cfg.local_steps,
                                                  cfg.batch_size, gen, device, meter)
            records["arrays"] = ArrayRecord(model.state_dict())
        else:  # collafuse and local train a private model on their share of the chain
            collafuse = cfg.method == "collafuse"
            n_up = N.check_train_request(conf, cut_step=settings.cut_step, upload_budget=settings.upload_budget) \
                if collafuse else 0
            t_c = settings.cut_step if collafuse else sched.T
            # renoise starts the client's chain above t_c (the authors' patch), so it trains up there too
            t_max = D.client_start_step(t_c / sched.T, sched.T, cfg.server_target) if collafuse else t_c
            gen = node_generator(cfg, settings.state_dir, client, rnd, 0)
            run_key = int(conf.get("run-key", 0))
            model, opt = _private_model(cfg, data, context, settings, client, device, run_key)
            if t_max > 0:
                metrics["train-loss"] = N.train_share(model, opt, data.train, sched, t_max, cfg.local_steps,
                                                      cfg.batch_size, gen, device, meter)
                save_private(context.state, model, opt)
            if settings.dp is not None:  # capped, clipped, diffused to t_u: (epsilon, delta) per image
                n_train = int(data.train.shape[0])
                ledger = UploadLedger(n_train, settings.dp.max_uploads_per_image,
                                      counts=upload_counts(context.state, n_train))
                # keyed by a count that only grows: a replayed round never redraws the same noise
                gen_up = N.secret_generator(N.node_secret(settings.state_dir), cfg.seed, client, "dp-upload",
                                            ledger.total_uploads)
                idx, x_tc = N.make_upload(data.train, sched, settings.dp.t_cut, n_up, gen_up, ledger=ledger,
                                          plan=settings.dp)
                metrics.update(settings.dp.metrics())
            else:
                idx, x_tc = N.make_upload(data.train, sched, t_c, n_up, gen)
            if idx.size:
                records["upload"] = ArrayRecord({"x_tc": Array(x_tc.numpy())})
                remember_upload(context.state, idx, data.train.shape[0])
                metrics["num-uploaded"] = int(idx.size)
            if settings.persist:
                persist(context.state, _state_file(settings, context, client, run_key))
    except N.Refused as exc:
        return N.refusal(msg, exc)

    metrics["train-seconds"] = time.perf_counter() - t0
    if meter is not None:
        metrics["client-train-flops"] = float(meter.totals.get("train", 0.0))
    return _reply(msg, metrics, **records)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, data, sched, device, settings = _setup(context)
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    client = _client_index(msg, data)
    n = min(int(conf["num-samples"]), max(cfg.num_eval_samples, 1))
    num_steps = int(conf.get("client-sampling-steps", 0)) or None
    meter = FlopMeter(every_pass=cfg.flops_every_pass) if cfg.count_flops else None
    gen = node_generator(cfg, settings.state_dir, client, rnd, 1)
    t0 = time.perf_counter()
    try:
        if cfg.method == "centralized":  # the server generated them; they arrive as uint8 already
            gen_uint8 = torch.from_numpy(msg.content["generated"]["images"].numpy())
        elif cfg.method == "fedavg":
            from .data import to_uint8
            from .training import generate

            model = _global_model(cfg, data, msg, device, client)
            gen_uint8 = to_uint8(generate(model, sched, n, data.image_shape, num_steps, gen, device, meter))
        else:
            model, _ = _private_model(cfg, data, context, settings, client, device, int(conf.get("run-key", 0)))
            t_start = settings.cut_step if cfg.method == "collafuse" else sched.T
            if cfg.method == "collafuse":
                t_start = D.client_start_step(t_start / sched.T, sched.T, cfg.server_target)
                asked = int(conf.get("client-start-step", t_start))
                if asked != t_start:
                    raise N.Refused(f"the server asked to start sampling at step {asked}, this node's is {t_start}")
            if "x_tc" in msg.content.array_records:
                x = N.check_handoff(msg.content["x_tc"]["x_tc"].numpy(), image_shape=data.image_shape,
                                    max_samples=n)
            else:  # local-only or c = 1: the client starts from pure noise
                x = torch.randn((n, *data.image_shape), generator=gen)
            gen_uint8 = N.finish(model, sched, x, t_start, num_steps, gen, device, meter)
        seconds = time.perf_counter() - t0
        metrics: dict[str, float | int] = {"num-examples": int(gen_uint8.shape[0]), "infer-seconds": seconds}
        if cfg.method != "centralized":  # the model this node ran (private, or FedAvg's global)
            metrics["client-params"] = count_parameters(model)
        if cfg.method == "collafuse":  # the node's own cut (it may differ from the server's default)
            metrics["cut-step"] = settings.cut_step
        if meter is not None:
            metrics["client-infer-flops-per-image"] = float(meter.totals.get("infer", 0.0)) / max(1, gen_uint8.shape[0])
        records: dict = {}
        if settings.share_harness:  # research measurements, only where the node operator allows them
            from .evaluation import client_metrics

            metrics["checksum"] = float(gen_uint8.double().mean())
            metrics.update(client_metrics(cfg, gen_uint8, data, msg.content, context.state, settings.cut_step))
            records["samples"] = ArrayRecord({"images": Array(gen_uint8.numpy().astype(np.uint8))})
    except N.Refused as exc:
        return N.refusal(msg, exc)
    if int(conf.get("final-round", 0)) and cfg.method in ("collafuse", "local"):
        # the run is over for this node: its private state file has served its purpose
        _state_file(settings, context, client, int(conf.get("run-key", 0))).unlink(missing_ok=True)
    return _reply(msg, metrics, **records)
