"""A node's research measurements: quality of what it generated, and what the server learned from it.
Only the node holds its test split and training images; it scores the server's reconstructions (the
evaluate message's `harness` record) only where its policy shares measurements, and returns scores.
"""

from pathlib import Path
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
from collafuse_flwr.node.state import first_scoring, last_upload, upload_counts
from collafuse_flwr.node.steps import Refused

#: fewest real and generated images for a Frechet distance (one has no covariance): fewer -> `fid-skipped`
MIN_FID_IMAGES = 2


def _quality(cfg: RunConfig, backbone: str, gen_uint8: torch.Tensor, data: ClientData) -> dict[str, float]:
    if backbone == "none":
        return {}
    if min(len(data.test_uint8), len(gen_uint8)) < MIN_FID_IMAGES:
        return {P.FID_SKIPPED: 1}
    r = compute_fid_kid(data.test_uint8, gen_uint8, backbone, cfg.fid_weights or None)
    return {P.FID: r[P.FID], P.KID: r[P.KID], P.KID_STD: r["kid_std"],
            **{k: r[k] for k in (P.PRECISION, P.RECALL) if k in r}}


def _disclosure(cfg: RunConfig, backbone: str, data: ClientData, content: RecordDict, state: RecordDict,
                t_c: int | None, scored: Path) -> dict[str, float]:
    idx = last_upload(state)
    if t_c is None or idx is None:
        return {}
    counts = upload_counts(state, data.train.shape[0])
    abar = float(make_schedule(cfg.diffusion_steps, cfg.beta_schedule).alpha_bars[t_c])
    out = {P.EPSILON: gaussian_upload_epsilon(abar, int(counts.max()), int(np.prod(data.image_shape))),
           P.MAX_UPLOADS_PER_IMAGE: float(counts.max())}
    if P.HARNESS not in content.array_records:
        return out
    h, x0 = content[P.HARNESS], data.train[idx]
    unexpected = sorted(set(h.keys()) - set(P.RECON_NAMES) - {P.UPLOADS})
    if unexpected or any(tuple(h[k].shape) != tuple(x0.shape) for k in h.keys()):
        raise Refused(f"disclosure harness: refusing to score {unexpected or 'them'} - only "
                      f"{list(P.RECON_NAMES)} of the last upload's shape {tuple(x0.shape)} are scored")
    if not first_scoring(state, scored):
        raise Refused("disclosure harness: this upload's reconstructions were scored already; each upload is "
                      "scored once (scores asked for again and again would reveal the uploaded images)")
    for name in [k for k in P.RECON_NAMES if k in h.keys()]:
        x_hat = torch.from_numpy(h[name].numpy())
        ps, key = psnr_ssim(x_hat, x0), name.removeprefix("recon-")
        reid = reidentification_rate(x_hat, torch.from_numpy(idx), data.train)
        out.update({f"{P.DISCLOSURE_PREFIX}{m}-{key}": v for m, v in {**ps, "reid": reid}.items()})
    if backbone != "none" and P.UPLOADS in h:
        seen = [("upload-", h[P.UPLOADS])]
        if P.HANDOFF in content.array_records:
            seen.append(("inference-", content[P.HANDOFF][P.X_TC]))
        for what, arr in seen:
            r = upload_fid(torch.from_numpy(arr.numpy()), data.train_uint8, backbone, cfg.fid_weights or None)
            out.update({f"{P.DISCLOSURE_PREFIX}{what}{k}": r[k] for k in (P.FID, P.KID)})
    return out


def client_metrics(cfg: RunConfig, gen_uint8: torch.Tensor, data: ClientData, content: RecordDict,
                   state: RecordDict, t_c: int | None, scored: Path) -> dict[str, Any]:
    """Research measurements on the node's private data; t_c: its own upload step (whatever the server
    says), None for methods that upload no x_tc; scored: the file naming the uploads already scored."""
    backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    return {**_quality(cfg, backbone, gen_uint8, data),
            **_disclosure(cfg, backbone, data, content, state, t_c, scored)}
