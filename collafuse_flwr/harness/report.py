"""Turn a finished strategy's records into results.json, samples.* and the printed summary."""

from __future__ import annotations

import math
import time
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.supercore import log

from collafuse_flwr import protocol as P
from collafuse_flwr.config import RunConfig
from collafuse_flwr.core.diffusion import make_schedule
from collafuse_flwr.core.presets import client_preset
from collafuse_flwr.data.client_data import all_splits, dataset_for
from collafuse_flwr.harness.outputs import save_samples, summary_table, write_json
from collafuse_flwr.metrics.features import resolve_backbone
from collafuse_flwr.metrics.fid import compute_fid_kid
from collafuse_flwr.metrics.privacy import sensitivity_note


def _per_client(metrics: dict[int, dict[str, float]], key: str) -> dict[str, float]:
    return {str(pid): m[key] for pid, m in sorted(metrics.items()) if key in m}


def _by_client(records: dict[int, Any]) -> dict[str, dict]:
    return {str(c): dict(v) for c, v in sorted(records.items())}


def _mean(values) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def pooled_quality(cfg: RunConfig, images: dict[int, np.ndarray], num_nodes: int) -> dict[str, Any]:
    """FID of all generated images against all clients' held-out test images: simulation only (it
    reloads the test splits in the ServerApp, which a deployment's server cannot do)."""
    try:
        backbone = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
        if backbone == "none" or not images:
            return {}
        ds = dataset_for(cfg)
        test_idx = np.concatenate([s.test_idx for s in all_splits(cfg, num_nodes)])
        fake = torch.from_numpy(np.concatenate([images[k] for k in sorted(images)]))
        r = compute_fid_kid(ds.images[test_idx], fake, backbone, cfg.fid_weights or None)
        return {"fid_pooled": r["fid"], "kid_pooled": r["kid"], "fid_backbone": backbone}
    except Exception as exc:  # the per-client figures still stand
        log(INFO, "pooled FID skipped: %s", exc)
        return {}


def run_status(rec, num_nodes: int, per_client: dict[int, dict[str, float]], evaluated: bool,
               clients: list[int] | None = None) -> tuple[str, list[str]]:
    """"ok" only when no reply was rejected or failed, no robustness check acted and every client gave
    finite samples; else "degraded", with reasons naming the clients (`clients`: the admitted ones)."""
    reasons = []
    if rec.failures:
        reasons.append(f"{rec.failures} failed or missing replies (rounds {sorted(rec.missing) or 'n/a'})")
    reasons += [f"client {c}: {sum(why.values())} error reply(s) ({'; '.join(sorted(why))[:300]})"
                for c, why in sorted(rec.failed_by_client.items())]
    reasons += [f"client {c}: {sum(why.values())} reply(s) rejected ({', '.join(sorted(why))})"
                for c, why in sorted(rec.rejected_by_client.items())]
    unblamed = sum(rec.rejected.values()) - sum(sum(v.values()) for v in rec.rejected_by_client.values())
    if unblamed > 0:
        reasons.append(f"{unblamed} rejected replies no client is blamed for: {dict(rec.rejected)}")
    reasons += [f"client {c}: {', '.join(kinds)} (see final.robustness)" for c, kinds in rec.flagged().items()]
    reasons += [f"round {server_round}: {what}" for server_round, what in rec.incidents]
    if evaluated and len(per_client) < num_nodes:
        missing = sorted(set(clients or range(num_nodes)) - set(per_client))
        reasons.append(f"only {len(per_client)} of {num_nodes} clients returned their final evaluation"
                       + (f" (missing: clients {missing})" if missing else ""))
    bad = [c for c, m in per_client.items() if P.CHECKSUM in m and not math.isfinite(m[P.CHECKSUM])]
    if bad:
        reasons.append(f"non-finite samples from clients {bad}")
    return ("degraded" if reasons else "ok"), reasons


def run_notes(rec, per_client: dict[int, dict[str, float]]) -> list[str]:
    """What a reader should know that is not a fault (skipped FIDs, claims capped within natural noise)."""
    notes = []
    skipped = fid_skipped_clients(per_client)
    if skipped:
        notes.append(f"FID skipped for clients {skipped}: too few held-out test images for a Frechet distance; "
                     f"the mean FID is over the others")
    for c, items in sorted(rec.flags.items()):
        kinds = sorted({k.removeprefix("note:") for _, k, _ in items if k.startswith("note:")})
        if kinds:
            notes.append(f"client {c}: {', '.join(kinds)} (see final.robustness)")
    return notes


def fid_skipped_clients(per_client: dict[int, dict[str, float]]) -> list[int]:
    return sorted(c for c, m in per_client.items() if m.get(P.FID_SKIPPED) == 1)


def consistent_images(images: dict[int, np.ndarray]) -> tuple[dict[int, np.ndarray], list[int]]:
    """The clients' sample arrays that stack (uint8 N x C x H x W of the commonest shape) and the clients
    left out: the last line of defence, so one client's data never costs the run its report."""
    ok = {c: a for c, a in images.items()
          if isinstance(a, np.ndarray) and a.dtype == np.uint8 and a.ndim == 4 and a.shape[0] > 0}
    shapes = [a.shape[1:] for a in ok.values()]
    common = max(sorted(set(shapes)), key=shapes.count, default=None)
    ok = {c: a for c, a in ok.items() if a.shape[1:] == common}
    return ok, sorted(set(images) - set(ok))


def finalize(cfg: RunConfig, strategy, result, out: Path, run_id: int, num_nodes: int, started: float,
             params: int, harness: bool = True) -> dict[str, Any]:
    """Write results.json and the sample grid; `wall_seconds` runs from `started` until the outputs
    are written. harness: whether the ServerApp may reload client data (pooled FID): simulation only."""
    rec = strategy.recorder
    rounds, evals = rec.rounds, rec.evals
    last = evals[max(evals)] if evals else None
    per_client = last.metrics if last else {}
    images, dropped = consistent_images(last.images if last else {})
    flops = float(sum(float(m.get(P.CLIENT_TRAIN_FLOPS, 0.0)) for m in result.train_metrics_clientapp.values()))
    b, n_rounds = rec.bytes, cfg.num_server_rounds
    bytes_up = b.get("up-train", 0.0)
    bytes_down = b.get("down-train", 0.0) + b.get("down-eval", 0.0)
    trained = sorted(rec.train_totals.items())

    def avg(key: str) -> float:
        return _mean(m.get(key) for m in per_client.values())

    final: dict[str, Any] = {
        "fid": avg(P.FID), "fid_per_client": _per_client(per_client, P.FID),
        "fid_skipped_clients": fid_skipped_clients(per_client),
        "kid": avg(P.KID), "kid_per_client": _per_client(per_client, P.KID),
        "precision": avg("precision"), "recall": avg("recall"), "fid_backbone": None,
        "client_train_flops": flops, "client_train_flops_per_round": flops / n_rounds,
        "client_train_flops_per_client_round": flops / max(1, sum(v.get("train-replies", 0) for _, v in trained)),
        "client_infer_flops_per_image": avg(P.CLIENT_INFER_FLOPS_PER_IMAGE),
        "client_infer_flops_per_image_per_client": _per_client(per_client, P.CLIENT_INFER_FLOPS_PER_IMAGE),
        "client_parameters_per_client": _per_client(per_client, P.CLIENT_PARAMS),
        "client_train_flops_per_client": {str(c): v.get(P.CLIENT_TRAIN_FLOPS, 0.0) for c, v in trained},
        "uploads_per_client": {str(c): int(v.get(P.NUM_UPLOADED, 0)) for c, v in trained},
        "server_train_flops": float(sum(r.values.get("server-train-flops", 0.0) or 0.0 for r in rounds.values())),
        "server_infer_flops_per_image": _mean(r.values.get("server-infer-flops-per-image") for r in rounds.values()),
        "bytes_up": bytes_up, "bytes_down": bytes_down,
        "bytes_up_per_round": bytes_up / n_rounds, "bytes_down_per_round": bytes_down / n_rounds,
        "bytes_per_client": _by_client(rec.bytes_by_client),
        "bytes_harness": {"down": b.get("down-harness", 0.0), "up_eval": b.get("up-eval", 0.0)},
        "failed_replies": rec.failures, "rejected_replies": dict(rec.rejected),
        "rejected_replies_by_client": _by_client(rec.rejected_by_client),
        "failed_replies_by_client": _by_client(rec.failed_by_client),
        "robustness": {  # who the robustness checks acted on, each client's upload / server-loss figures
            "rejected_replies_by_client": _by_client(rec.rejected_by_client),
            "flags": {str(c): [{"round": r, "kind": k.removeprefix("note:"), "serious": not k.startswith("note:"),
                                "detail": d} for r, k, d in v] for c, v in sorted(rec.flags.items())},
            "incidents": [{"round": r, "what": w} for r, w in rec.incidents],
            "client_stats": _by_client(rec.client_stats), "aggregation": getattr(strategy, "aggregation", None)},
        "missing_clients_by_round": {str(k): v for k, v in sorted(rec.missing.items())},
        "infer_seconds_per_client": avg(P.INFER_SECONDS),
    }
    if harness:
        final.update(pooled_quality(cfg, images, num_nodes))
    if final["fid_backbone"] is None and per_client:
        final["fid_backbone"] = resolve_backbone(cfg.fid_backbone, cfg.dataset, cfg.fid_weights or None)
    shape = strategy.image_shape  # CollaFuse's model's (also when no node shared images)
    final["disclosure"] = _disclosure(cfg, per_client, int(np.prod(shape)) if shape else 0)
    # each admitted node's DP plan as its first-contact reply declared it, beside the epsilon its uploads realised
    reg = strategy.registry
    dp = {str(reg.index[n]): {**{k.removeprefix(P.DP_PREFIX).replace("-", "_"): v for k, v in info.items()
                                 if k.startswith(P.DP_PREFIX)},
                              "epsilon_realised": per_client.get(reg.index[n], {}).get(P.EPSILON)}
          for n, info in sorted(reg.info.items(), key=lambda kv: reg.index.get(kv[0], -1))
          if n in reg.index and any(k.startswith(P.DP_PREFIX) for k in info)}
    if dp:
        final["disclosure"]["dp_per_client"] = dp
    status, reasons = run_status(rec, num_nodes, per_client, bool(evals), sorted(reg.index.values()))
    if dropped:
        reasons.append(f"samples of clients {dropped} left out of samples.* and pooled FID (not uint8 images of "
                       f"the others' shape)")
        status = "degraded"
    cf = cfg.method == "collafuse"
    results = {
        "status": status, "status_reasons": reasons, "status_notes": run_notes(rec, per_client),
        "method": cfg.method, "cut_ratio": cfg.cut_ratio if cf else None, "cut_step": cfg.cut_step if cf else None,
        # each node's own cut (client-cut-ratios / node_config cut-ratio), as the server ran it
        "cut_step_per_client": {str(c): t for c, t in sorted(strategy.client_cut.items())} if cf else None,
        "cut_ratio_per_client": {str(c): t / cfg.diffusion_steps for c, t in sorted(strategy.client_cut.items())}
                                if cf else None,
        "server_target": cfg.server_target if cf else None,
        "dataset": cfg.dataset, "num_clients": num_nodes, "num_rounds": cfg.num_server_rounds, "seed": cfg.seed,
        "diffusion_steps": cfg.diffusion_steps, "denoiser_parameters": params,
        # the preset each client ran: its private denoiser's (collafuse), FedAvg's global or local's own
        "client_model_size": (client_preset(cfg.model_size, cfg.client_model_size) if cf
                              else None if cfg.method == "centralized" else cfg.model_size),
        "wall_seconds": None,  # set last, once everything else is done
        "run_id": run_id, "config": cfg.to_flwr(), "final": final,
        "per_client": {str(k): v for k, v in sorted(per_client.items())},
    }
    save_samples(out, images)
    results["wall_seconds"] = time.time() - started
    write_json(out / "results.json", results)
    log(INFO, "\n%s", summary_table(_summary_rows(results)))
    log(INFO, "outputs: %s", out)
    return results


def _disclosure(cfg: RunConfig, per_client: dict[int, dict[str, float]], image_dim: int) -> dict[str, Any]:
    keys = sorted({k for m in per_client.values() for k in m if k.startswith(P.DISCLOSURE_PREFIX)})
    d: dict[str, Any] = {k.removeprefix(P.DISCLOSURE_PREFIX).replace("-", "_"):
                         _mean(m.get(k) for m in per_client.values()) for k in keys}
    eps = [m[P.EPSILON] for m in per_client.values() if P.EPSILON in m]
    if cfg.method == "collafuse":
        k = int(max((m.get(P.MAX_UPLOADS_PER_IMAGE, 0) for m in per_client.values()), default=0))
        abar_c = float(make_schedule(cfg.diffusion_steps, cfg.beta_schedule).alpha_bars[cfg.cut_step])
        # raw uploads (t_c = 0) have no finite epsilon, and replies carry only finite metrics
        d["epsilon"] = (float("inf") if cfg.cut_step == 0 else max(eps) if eps
                        else 0.0 if cfg.cut_step == cfg.diffusion_steps else None)
        d.update(delta=1e-5, max_uploads_per_image=k, epsilon_assumption=sensitivity_note(abar_c, k, image_dim))
    elif cfg.method == "centralized":
        d.update({"note": "raw training images are sent to the server: complete disclosure",
                  "epsilon": float("inf"), "reid_server": 1.0})
    elif cfg.method == "local":
        d.update({"note": "nothing but metrics leaves a client", "epsilon": 0.0})
    else:
        d.update({"note": "model weights leave the client every round; image disclosure through "
                          "weights is not measured here", "epsilon": None})
    return d


def _summary_rows(r: dict[str, Any]) -> list[tuple[str, Any]]:
    f = r["final"]
    rows: list[tuple[str, Any]] = [("method", r["method"])]
    if r["cut_ratio"] is not None:
        rows.append(("cut ratio c / t_c", f"{r['cut_ratio']} / {r['cut_step']} of {r['diffusion_steps']}"))
    rows += [
        ("clients x rounds", f"{r['num_clients']} x {r['num_rounds']}"),
        (f"FID ({f.get('fid_backbone')}) mean per client", f["fid"]),
        ("FID pooled", f.get("fid_pooled", float("nan"))), ("KID mean per client", f["kid"]),
        ("client train FLOPs (total)", f["client_train_flops"]),
        ("client infer FLOPs / image", f["client_infer_flops_per_image"]),
        (f"client model ({r.get('client_model_size')}) parameters",
         _mean(f.get("client_parameters_per_client", {}).values())),
        ("server train FLOPs (total)", f["server_train_flops"]),
        ("bytes up / round", f["bytes_up_per_round"]), ("bytes down / round", f["bytes_down_per_round"]),
    ]
    d = f["disclosure"]
    rows += [(f"disclosure {k}", d[k]) for k in ("reid_server", "psnr_server", "reid_reference", "psnr_reference",
                                                 "upload_fid", "epsilon") if k in d]
    return [*rows, ("wall time (s)", r["wall_seconds"])]
