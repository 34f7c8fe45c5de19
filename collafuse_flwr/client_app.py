"""The ClientApp: one node's side of every method.

What a node sends back, per method (the tests check it):
- collafuse: x_{t_c} of some of its training images (fresh noise) and metrics; never x_0, never
  the noise, never its private denoiser (kept in `context.state`).
- fedavg: its locally trained copy of the global denoiser and metrics.
- local: metrics only.
- centralized (a reference, not a private method): its raw training images, once.
At evaluation every node returns the images it generated and its metrics.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import diffusion as D
from .client_data import ClientData, client_data
from .config import RunConfig, parse_config
from .data import to_uint8
from .evaluation import client_metrics
from .metrics.flops import FlopMeter
from .models import build_denoiser, default_device, shared_denoiser, use_torch_threads
from .state import remember_upload, restore_private, save_private
from .training import client_share_loss, generate, make_optimizer, train_steps

app = ClientApp()


@lru_cache(maxsize=4)
def _config(items: tuple) -> RunConfig:
    return parse_config(dict(items))


def _setup(context: Context) -> tuple[RunConfig, ClientData, D.Schedule, torch.device, int]:
    cfg = _config(tuple(sorted(context.run_config.items())))
    use_torch_threads(cfg.torch_threads)
    pid = int(context.node_config.get("partition-id", 0))
    num = int(context.node_config.get("num-partitions", 1))
    data = client_data(cfg, pid, num)
    return cfg, data, D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule), default_device(), num


def _global_model(cfg: RunConfig, data: ClientData, num: int, msg: Message, device: torch.device):
    """FedAvg's global model from the message, conditioned on this client's index."""
    model = shared_denoiser(cfg.image_size, data.image_shape[0], cfg.model_size, cfg.conditioning, num)
    try:
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    except RuntimeError as exc:
        raise RuntimeError(f"the global model does not fit this node's settings (num-partitions={num}, "
                           f"model-size={cfg.model_size!r}): the server must build it for the same "
                           f"number of clients") from exc
    return model.to(device).condition(data.partition_id)


def init_private_denoiser(cfg: RunConfig, pid: int, channels: int, device: torch.device):
    """A client's denoiser before its first round, seeded by (seed, client) alone: the actor's
    global RNG is shared between nodes, and benchmarks/overhead.py must draw the same init."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed * 1_000_003 + pid)
        return build_denoiser(cfg.image_size, channels, cfg.model_size).to(device)


def _private_model(cfg: RunConfig, data: ClientData, context: Context, device: torch.device):
    """The node's denoiser: restored from context.state, or initialised from (seed, client)."""
    model = init_private_denoiser(cfg, data.partition_id, data.image_shape[0], device)
    opt = make_optimizer(model, cfg.learning_rate)
    restore_private(context.state, model, opt)
    return model, opt


def _generator(cfg: RunConfig, pid: int, server_round: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + pid * 10_007 + server_round * 101 + salt)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg, data, sched, device, num = _setup(context)
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    meter = FlopMeter(every_pass=cfg.flops_every_pass) if cfg.count_flops else None
    gen = _generator(cfg, data.partition_id, rnd, 0)
    metrics: dict[str, float | int] = {"num-examples": int(data.train.shape[0]),
                                       "partition-id": data.partition_id}
    content = RecordDict()
    t0 = time.perf_counter()

    if cfg.method == "centralized":
        # The reference that shares raw data: send the training images once.
        content["upload"] = ArrayRecord({"x0": Array(data.train.numpy())})
    elif cfg.method == "fedavg":
        model = _global_model(cfg, data, num, msg, device)
        opt = make_optimizer(model, cfg.learning_rate)
        metrics["train-loss"] = train_steps(model, opt, client_share_loss(model, sched, sched.T, gen),
                                            data.train, cfg.local_steps, cfg.batch_size, gen, device, meter)
        content["arrays"] = ArrayRecord(model.state_dict())
    else:  # collafuse and local train a private model on their share of the chain
        t_c = int(conf["cut-step"]) if cfg.method == "collafuse" else sched.T
        t_max = int(conf.get("client-max-step", t_c))
        model, opt = _private_model(cfg, data, context, device)
        if t_max > 0:
            metrics["train-loss"] = train_steps(model, opt, client_share_loss(model, sched, t_max, gen),
                                                data.train, cfg.local_steps, cfg.batch_size, gen, device, meter)
            save_private(context.state, model, opt)
        n_up = int(conf.get("uploads", 0)) if cfg.method == "collafuse" else 0
        if n_up > 0 and t_c < sched.T:
            idx = torch.randperm(data.train.shape[0], generator=gen)[:n_up]
            x_tc = D.upload(sched, data.train[idx], t_c, torch.randn(data.train[idx].shape, generator=gen))
            content["upload"] = ArrayRecord({"x_tc": Array(x_tc.float().numpy())})
            remember_upload(context.state, idx.numpy(), data.train.shape[0])
            metrics["num-uploaded"] = int(n_up)

    metrics["train-seconds"] = time.perf_counter() - t0
    if meter is not None:
        metrics["client-train-flops"] = float(meter.totals.get("train", 0.0))
    content["metrics"] = MetricRecord(metrics)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg, data, sched, device, num = _setup(context)
    conf = msg.content["config"]
    rnd = int(conf["server-round"])
    n = int(conf["num-samples"])
    num_steps = int(conf.get("client-sampling-steps", 0)) or None
    meter = FlopMeter(every_pass=cfg.flops_every_pass) if cfg.count_flops else None
    gen = _generator(cfg, data.partition_id, rnd, 1)
    t0 = time.perf_counter()

    if cfg.method == "centralized":  # the server generated them; they arrive as uint8 already
        gen_uint8 = torch.from_numpy(msg.content["generated"]["images"].numpy())
    elif cfg.method == "fedavg":
        model = _global_model(cfg, data, num, msg, device)
        gen_uint8 = to_uint8(generate(model, sched, n, data.image_shape, num_steps, gen, device, meter))
    else:
        model, _ = _private_model(cfg, data, context, device)
        model.eval()
        t_start = int(conf["client-start-step"])
        if "x_tc" in msg.content.array_records:
            x = torch.from_numpy(msg.content["x_tc"]["x_tc"].numpy()).to(device)
        else:  # local-only or c = 1: the client starts from pure noise
            x = torch.randn((n, *data.image_shape), generator=gen).to(device)
        eps_model = meter.wrap(model, "infer") if meter is not None else model
        gen_uint8 = to_uint8(D.client_finish(eps_model, sched, x, t_start, num_steps, gen).cpu())
    seconds = time.perf_counter() - t0

    metrics: dict[str, float | int] = {
        "num-examples": int(gen_uint8.shape[0]),
        "partition-id": data.partition_id,
        "infer-seconds": seconds,
        "checksum": float(gen_uint8.double().mean()),
    }
    if meter is not None:
        metrics["client-infer-flops-per-image"] = float(meter.totals.get("infer", 0.0)) / max(1, n)
    metrics.update(client_metrics(cfg, gen_uint8, data, msg.content, context.state))
    content = RecordDict({
        "samples": ArrayRecord({"images": Array(gen_uint8.numpy().astype(np.uint8))}),
        "metrics": MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)
