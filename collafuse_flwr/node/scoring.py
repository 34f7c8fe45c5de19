"""A node's research measurements: quality of what it generated, and what the server learned from it.
Only the node holds its test split and training images; it scores the server's reconstructions (the
evaluate message's `harness` record) only where its policy shares measurements, and returns scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from collafuse_flwr import protocol as P
from collafuse_flwr.config import RunConfig
from collafuse_flwr.core.diffusion import make_schedule
from collafuse_flwr.data.client_data import ClientData
from collafuse_flwr.metrics.disclosure import psnr_ssim, reidentification_rate, upload_fid
from collafuse_flwr.metrics.features import resolve_backbone
from collafuse_flwr.metrics.fid import compute_fid_kid
from collafuse_flwr.metrics.privacy import gaussian_upload_epsilon
from collafuse_flwr.node.state import last_upload, upload_counts
from collafuse_flwr.node.steps import Refused

#: fewest real and generated images for a Frechet distance (one has no covariance): fewer -> `fid-skipped`
MIN_FID_IMAGES = 2


def _quality(cfg: RunConfig, gen_uint8: torch.Tensor, data: ClientData) -> dict[str, float]:
    backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    if backbone == "none":
        return {}
    if min(len(data.test_uint8), len(gen_uint8)) < MIN_FID_IMAGES:
        return {P.FID_SKIPPED: 1}
    r = compute_fid_kid(data.test_uint8, gen_uint8, backbone, cfg.fid_weights or None)
    out = {P.FID: r[P.FID], P.KID: r[P.KID], P.KID_STD: r["kid_std"]}
    out.update({key: r[name] for name, key in ((P.PRECISION, P.PRECISION), (P.RECALL, P.RECALL)) if name in r})
    return out


def _disclosure(cfg: RunConfig, data: ClientData, content: RecordDict, state: RecordDict,
                t_c: int | None) -> dict[str, float]:
    out: dict[str, float] = {}
    sched = make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    idx = last_upload(state)
    if t_c is None or idx is None:
        return out
    counts = upload_counts(state, data.train.shape[0])
    out[P.EPSILON] = gaussian_upload_epsilon(float(sched.alpha_bars[t_c]), int(counts.max()),
                                             int(np.prod(data.image_shape)))
    out[P.MAX_UPLOADS_PER_IMAGE] = float(counts.max())
    if P.HARNESS not in content.array_records:
        return out
    h = content[P.HARNESS]
    x0 = data.train[idx]
    unexpected = sorted(set(h.keys()) - set(P.RECON_NAMES) - {P.UPLOADS})
    if unexpected or any(tuple(h[k].shape) != tuple(x0.shape) for k in h.keys()):
        raise Refused(f"disclosure harness: refusing to score {unexpected or 'them'} - only "
                      f"{list(P.RECON_NAMES)} of the last upload's shape {tuple(x0.shape)} are scored")
    for name in [k for k in P.RECON_NAMES if k in h.keys()]:
        x_hat = torch.from_numpy(h[name].numpy())
        ps = psnr_ssim(x_hat, x0)
        key = name.removeprefix("recon-")
        out[f"{P.DISCLOSURE_PREFIX}psnr-{key}"] = ps["psnr"]
        out[f"{P.DISCLOSURE_PREFIX}ssim-{key}"] = ps["ssim"]
        out[f"{P.DISCLOSURE_PREFIX}reid-{key}"] = reidentification_rate(x_hat, torch.from_numpy(idx), data.train)
    backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    if backbone != "none" and P.UPLOADS in h:
        r = upload_fid(torch.from_numpy(h[P.UPLOADS].numpy()), data.train_uint8, backbone, cfg.fid_weights or None)
        out[f"{P.DISCLOSURE_PREFIX}upload-fid"] = r[P.FID]
        out[f"{P.DISCLOSURE_PREFIX}upload-kid"] = r[P.KID]
        if P.HANDOFF in content.array_records:
            r = upload_fid(torch.from_numpy(content[P.HANDOFF][P.X_TC].numpy()), data.train_uint8,
                           backbone, cfg.fid_weights or None)
            out[f"{P.DISCLOSURE_PREFIX}inference-fid"] = r[P.FID]
            out[f"{P.DISCLOSURE_PREFIX}inference-kid"] = r[P.KID]
    return out


def client_metrics(cfg: RunConfig, gen_uint8: torch.Tensor, data: ClientData, content: RecordDict,
                   state: RecordDict, t_c: int | None) -> dict[str, Any]:
    """Research measurements on the node's private data; t_c: its own upload step (whatever the server
    says), None for methods that upload no x_tc."""
    return {**_quality(cfg, gen_uint8, data), **_disclosure(cfg, data, content, state, t_c)}
