"""CollaFuse's node-side protocol, as functions a Flower user's own ClientApp can call.

Each takes the tensors, models and privacy settings it needs; the node checks every server request
against its own settings and refuses, with a reason, what would lower its privacy. A whole ClientApp
built from these alone: `examples/own_clientapp/my_client_app.py`.
"""

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app.error import Error
from torch import Tensor, nn

from collafuse_flwr import protocol as P
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.dp import DPPlan, UploadLedger, dp_upload
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.images import to_uint8
from collafuse_flwr.core.training import client_share_loss, train_steps

REFUSED, FAILED = P.REFUSED, P.FAILED
#: a local path (two or more segments; a drive letter only alone), or a web URL, which is kept (file:// is a path)
_PATH = re.compile(r"((?:https?|ftp)://[^\s'\",;()\[\]]+)|(?:(?<![\w.-])[A-Za-z]:)?(?:/[^\s'\":,;()\[\]]+){2,}")


class Refused(Exception):
    """The node will not do what the server asked; the message says what and why."""


def scrub_paths(text: str, known: Iterable[Any] = ()) -> str:
    """`text` without local file paths: an error reply must not tell the server where the node keeps
    its data, state or code. `known` (the node_config's values, relative ones too) go first, with the
    rest of the name up to a quote, colon or line end: a pattern cannot tell where a path with spaces
    (a file named after a patient, say) ends."""
    paths = {v for v in known if isinstance(v, str) and ("/" in v or v.startswith("~"))}
    paths |= {str(Path(v).expanduser().resolve()) for v in paths}
    for path in sorted({p.rstrip("/") for p in paths} - {""}, key=len, reverse=True):
        text = re.sub(re.escape(path) + r"[^'\":\n]*", "<local path>", text)
    return _PATH.sub(lambda m: m.group(1) or "<local path>", text)


def refusal(msg: Message, exc: Exception, node_config: Mapping[str, Any] | None = None) -> Message:
    """The Error reply to a refused request (REFUSED) or a failure (FAILED), without local paths."""
    known = (node_config or {}).values()
    if isinstance(exc, Refused):
        return Message(Error(code=REFUSED, reason=scrub_paths(f"refused: {exc}", known)), reply_to=msg)
    return Message(Error(code=FAILED, reason=scrub_paths(f"{type(exc).__name__}: {exc}", known)[:1000]), reply_to=msg)


def check_train_request(conf: ConfigRecord, *, cut_step: int, upload_budget: int) -> int:
    """How many x_tc this node will upload; Refused where the server asks for another cut step (a
    smaller t_c means less noise, 0 raw images) or more uploads than the node's per-round budget."""
    try:
        asked_cut, asked = P.read_int(conf, P.CUT_STEP, 0, 1 << 30), P.read_int(conf, P.UPLOADS_ASKED, 0, 1 << 62)
    except P.ProtocolError as exc:
        raise Refused(str(exc)) from None
    if asked_cut != cut_step:
        raise Refused(f"the server asked for cut step {asked_cut}, this node's is {cut_step} "
                      f"(set by its cut-ratio); nothing was uploaded")
    if asked > upload_budget:
        raise Refused(f"the server asked for {asked} uploads, this node's budget is {upload_budget} "
                      f"per round; nothing was uploaded")
    return asked


def check_handoff(x_tc: np.ndarray, *, image_shape: tuple[int, ...], max_samples: int) -> Tensor:
    """The server's x_{t_c} for inference, checked: shape, count and finite values."""
    if x_tc.ndim != 4 or tuple(x_tc.shape[1:]) != tuple(image_shape):
        raise Refused(f"hand-off shape {tuple(x_tc.shape)} is not (n, {image_shape})")
    if not 0 < x_tc.shape[0] <= max_samples:
        raise Refused(f"hand-off of {x_tc.shape[0]} images; this node generates at most {max_samples}")
    if not np.isfinite(x_tc).all():
        raise Refused("hand-off has non-finite values")
    return torch.from_numpy(np.ascontiguousarray(x_tc, dtype=np.float32))


def train_share(model: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, sched: D.Schedule,
                t_max: int, steps: int, batch_size: int, generator: torch.Generator,
                device: torch.device, meter: FlopMeter | None = None) -> float:
    """`steps` optimizer steps of the private denoiser on t ~ U{1..t_max} (images in [-1, 1])."""
    if t_max <= 0:
        return float("nan")
    return train_steps(model, optimizer, client_share_loss(model, sched, t_max, generator), images,
                       steps, batch_size, generator, device, meter)


def make_upload(images: Tensor, sched: D.Schedule, cut_step: int, n: int,
                generator: torch.Generator, *, ledger: UploadLedger | None = None,
                plan: DPPlan | None = None) -> tuple[np.ndarray, Tensor]:
    """(indices, x_tc) of n training images diffused with fresh secret noise: only x_tc leaves the node.
    A `ledger` picks only images below its cap K (fewer than n once few are left); a DP `plan` (needs
    such a ledger) clips and uploads at its t_upload >= cut_step (`dp.dp_upload`)."""
    if plan is not None:
        if ledger is None or ledger.max_uploads_per_image > plan.max_uploads_per_image:
            raise ValueError("a DP plan needs an UploadLedger whose cap is at most the plan's "
                             f"max_uploads_per_image={plan.max_uploads_per_image}: the guarantee "
                             "counts on it")
        if plan.t_cut != cut_step:
            raise ValueError(f"the DP plan is for cut step {plan.t_cut}, not {cut_step}")
    if n <= 0 or cut_step >= sched.T:
        idx = torch.zeros(0, dtype=torch.int64)
    elif ledger is None:
        idx = torch.randperm(images.shape[0], generator=generator)[:n]
    elif ledger.num_images != images.shape[0]:
        raise ValueError(f"the ledger counts {ledger.num_images} images, the node has {images.shape[0]}")
    else:
        idx = torch.from_numpy(ledger.choose(n, generator))
    if idx.numel() == 0:
        return np.zeros(0, dtype=np.int64), torch.zeros((0, *images.shape[1:]))
    return idx.numpy(), diffuse_upload(images[idx], sched, cut_step, generator, plan)


def diffuse_upload(x0: Tensor, sched: D.Schedule, cut_step: int, generator: torch.Generator,
                   plan: DPPlan | None = None) -> Tensor:
    """x0 (chosen, and counted by the node's ledger) -> x_{t_c} with fresh secret noise, or with a DP
    plan the clipped x_{t_u} (`dp.dp_upload`). float32."""
    if plan is not None:
        return dp_upload(x0, sched, plan, generator)
    return D.upload(sched, x0, cut_step, torch.randn(x0.shape, generator=generator)).float()


def finish(model: nn.Module, sched: D.Schedule, x_start: Tensor, t_start: int, num_steps: int | None,
           generator: torch.Generator, device: torch.device, meter: FlopMeter | None = None) -> Tensor:
    """x_{t_start} -> x_0 with the private denoiser; returns uint8 images N x C x H x W."""
    model.eval()
    eps_model = meter.wrap(model, "infer") if meter is not None else model
    return to_uint8(D.client_finish(eps_model, sched, x_start.to(device), t_start, num_steps, generator).cpu())


def finite_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Drop metrics that are not finite numbers (the server refuses replies that carry them)."""
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}


def reply(msg: Message, metrics: dict[str, Any], **records: Any) -> Message:
    """The reply to `msg`: `records` plus the finite `metrics` under the protocol's metrics record."""
    content = RecordDict(records)
    content[P.METRICS] = MetricRecord(finite_metrics(metrics))
    return Message(content=content, reply_to=msg)
