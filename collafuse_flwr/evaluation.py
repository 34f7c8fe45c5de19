"""A node's evaluation metrics: quality of what it generated, and what the server learned from it.

Runs on the node, because only the node holds its test split and its training images. The
server's reconstructions arrive under the measurement-only "harness" key of the evaluate
message; they are scored here and only the scores go back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict

from .client_data import ClientData
from .config import RunConfig
from .diffusion import make_schedule
from .node import Refused
from .state import LAST_UPLOAD_KEY, upload_counts


def _quality(cfg: RunConfig, gen_uint8: torch.Tensor, data: ClientData) -> dict[str, float]:
    from .metrics.features import resolve_backbone
    from .metrics.fid import compute_fid_kid

    backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    if backbone == "none":
        return {}
    r = compute_fid_kid(data.test_uint8, gen_uint8, backbone, cfg.fid_weights or None)
    out = {"fid": r["fid"], "kid": r["kid"], "kid-std": r["kid_std"]}
    out.update({k: r[k] for k in ("precision", "recall") if k in r})  # k-NN precision/recall, same features
    return out


#: The only arrays a node scores: the server's reconstructions of the node's own last upload.
#: A fixed, small set of names and the upload's exact shape, so the scores cannot be turned into
#: an oracle (the server sending ~1,000 crafted arrays and solving for the images from the PSNRs).
RECON_NAMES = ("recon-server", "recon-scaled", "recon-reference")


def _disclosure(cfg: RunConfig, data: ClientData, content: RecordDict, state: RecordDict,
                t_c: int) -> dict[str, float]:
    from .metrics.disclosure import psnr_ssim, reidentification_rate, upload_fid
    from .metrics.features import resolve_backbone
    from .metrics.privacy import gaussian_upload_epsilon

    out: dict[str, float] = {}
    sched = make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
    if cfg.method == "collafuse" and LAST_UPLOAD_KEY in state.array_records:
        counts = upload_counts(state, data.train.shape[0])
        d = int(np.prod(data.image_shape))
        eps_max = gaussian_upload_epsilon(float(sched.alpha_bars[t_c]), int(counts.max()), d)
        out["epsilon"] = eps_max
        out["max-uploads-per-image"] = float(counts.max())
    if "harness" in content.array_records and LAST_UPLOAD_KEY in state.array_records:
        h = content["harness"]
        idx = state.array_records[LAST_UPLOAD_KEY]["indices"].numpy()
        x0 = data.train[idx]
        unexpected = sorted(set(h.keys()) - set(RECON_NAMES) - {"uploads"})
        if unexpected or any(tuple(h[k].shape) != tuple(x0.shape) for k in h.keys()):
            raise Refused(f"disclosure harness: refusing to score {unexpected or 'arrays'} - only "
                             f"{list(RECON_NAMES)} of the last upload's shape {tuple(x0.shape)} are scored")
        for name in [k for k in RECON_NAMES if k in h.keys()]:
            x_hat = torch.from_numpy(h[name].numpy())
            ps = psnr_ssim(x_hat, x0)
            key = name.removeprefix("recon-")
            out[f"disclosure-psnr-{key}"] = ps["psnr"]
            out[f"disclosure-ssim-{key}"] = ps["ssim"]
            out[f"disclosure-reid-{key}"] = reidentification_rate(x_hat, torch.from_numpy(idx), data.train)
        backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
        if backbone != "none" and "uploads" in h:
            uploads = torch.from_numpy(h["uploads"].numpy())
            r = upload_fid(uploads, data.train_uint8, backbone, cfg.fid_weights or None)
            out["disclosure-upload-fid"] = r["fid"]
            out["disclosure-upload-kid"] = r["kid"]
            if "x_tc" in content.array_records:
                r = upload_fid(torch.from_numpy(content["x_tc"]["x_tc"].numpy()), data.train_uint8,
                               backbone, cfg.fid_weights or None)
                out["disclosure-inference-fid"] = r["fid"]
                out["disclosure-inference-kid"] = r["kid"]
    return out


def client_metrics(cfg: RunConfig, gen_uint8: torch.Tensor, data: ClientData, content: RecordDict,
                   state: RecordDict, t_c: int) -> dict[str, Any]:
    """Research measurements on the node's private data (sent only under its sharing policy).

    t_c: the node's own cut step (its uploads were made at it, whatever the server says).
    """
    out: dict[str, Any] = {}
    out.update(_quality(cfg, gen_uint8, data))
    out.update(_disclosure(cfg, data, content, state, t_c))
    return out

