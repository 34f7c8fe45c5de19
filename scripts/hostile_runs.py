"""Honest clients' FID with and without one hostile client (issue 25), on the in-process grid.

One client's replies are rewritten after its honest ClientApp produced them (benchmarks.sweep.run_inprocess
runs the real apps), so the attack is exactly what a modified node could send.

    python scripts/hostile_runs.py --attack none constant-at-bound --method collafuse --seeds 0 1
    python scripts/hostile_runs.py --attack none claim-1e12 scale-100 --method fedavg --seeds 0 1

Attacks (client `--hostile`, default 4):
  constant-at-bound  collafuse: every upload is a constant image at 0.999 x the server's
                     magnitude bound for that node (CollaFuse.upload_bound), e.g. 3.49 vs 3.494
  claim-1e12         fedavg: num-examples = 1e12 in its hello and every train reply
  scale-100          fedavg: its returned weights x 100

Prints each run and each attack's change of the honest mean FID against the clean run of the same
seed; writes results.json per run under --out and OUT/summary.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: Quick, but long enough that the shared model matters: 5 clients by class on 8x8 digits.
QUICK = {"dataset": "digits", "image-size": 8, "model-size": "tiny", "diffusion-steps": 50, "num-server-rounds": 3,
         "local-steps": 30, "batch-size": 32, "uploads-per-round": 32, "num-eval-samples": 64,
         "attack-reference-steps": 0, "torch-threads": 1, "cut-ratio": 0.2, "harness": "on"}


def hostile_app(attack: str, hostile: int, rc: dict):
    """The real ClientApp, with partition `hostile`'s replies rewritten by `attack`."""
    from flwr.app import Array, ArrayRecord

    from collafuse_flwr import protocol as P
    from collafuse_flwr.client_app import app as real
    from collafuse_flwr.config import parse_config
    from collafuse_flwr.core import diffusion as D
    from strategies.collafuse import UPLOAD_Z

    cfg = parse_config(rc)
    sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)

    def app(msg, ctx):
        reply = real(msg, ctx)
        if attack == "none" or int(ctx.node_config["partition-id"]) != hostile or reply.has_error():
            return reply
        kind = msg.metadata.message_type.split(".")[0]
        c = reply.content
        if attack == "constant-at-bound" and kind == "train" and P.UPLOAD in c.array_records:
            x = c[P.UPLOAD][P.X_TC].numpy()
            bound = D.anchor_bound(sched, cfg.cut_step, UPLOAD_Z)
            c[P.UPLOAD] = ArrayRecord({P.X_TC: Array(np.full_like(x, 0.999 * bound))})
        elif attack == "claim-1e12" and kind in ("query", "train"):
            c[P.METRICS][P.NUM_EXAMPLES] = 1e12
        elif attack == "scale-100" and kind == "train" and P.ARRAYS in c.array_records:
            c[P.ARRAYS] = ArrayRecord({k: Array(a.numpy() * np.asarray(100, a.numpy().dtype))
                                       for k, a in c[P.ARRAYS].items()})
        return reply

    return app


def run(method: str, attack: str, seed: int, out: Path, hostile: int, clients: int, extra: dict) -> dict:
    from benchmarks.sweep import run_inprocess
    from collafuse_flwr.config import load_defaults

    folder = out / f"{method}-{attack}-s{seed}"
    rc = {**load_defaults(), **QUICK, **extra, "method": method, "seed": seed}
    t0 = time.time()
    try:
        run_inprocess(rc, clients, folder, hostile_app(attack, hostile, rc))
    except Exception as exc:  # noqa: BLE001 - a failed run is a result here
        print(f"  run raised {type(exc).__name__}: {str(exc)[:200]}")
    run_dir = run_inprocess.last_folder  # type: ignore[attr-defined]
    res = json.loads((run_dir / "results.json").read_text())
    final = res.get("final", {})
    fid = {int(k): v for k, v in (final.get("fid_per_client") or {}).items()}
    honest = [v for k, v in fid.items() if k != hostile and v is not None]
    return {"method": method, "attack": attack, "seed": seed, "status": res["status"],
            "honest_fid_mean": float(np.mean(honest)) if honest else None,
            "honest_fid_worst": float(np.max(honest)) if honest else None, "fid_per_client": fid,
            "rejected_by_client": final.get("rejected_replies_by_client"), "flagged": final.get("robustness"),
            "error": res.get("error"), "seconds": round(time.time() - t0, 1), "folder": str(run_dir)}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.common import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="collafuse")
    ap.add_argument("--attack", nargs="+", default=["none", "constant-at-bound"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--hostile", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], help="run-config overrides key=value (TOML values, as --extra)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/hostile-runs"))
    a = ap.parse_args(argv)
    extra, rows = parse_overrides(shlex.join(a.set)), []
    for seed in a.seeds:
        for attack in a.attack:
            r = run(a.method, attack, seed, a.out, a.hostile, a.clients, extra)
            rows.append(r)
            print(f"{r['method']:9s} {attack:18s} seed {seed}: honest FID mean {r['honest_fid_mean']} worst "
                  f"{r['honest_fid_worst']} status {r['status']} rejected {r['rejected_by_client']} "
                  f"({r['seconds']} s)", flush=True)
    clean = {r["seed"]: r for r in rows if r["attack"] == "none"}
    for r in rows:
        base = clean.get(r["seed"])
        if r["attack"] != "none" and base and base["honest_fid_mean"] and r["honest_fid_mean"]:
            r["honest_fid_change"] = r["honest_fid_mean"] / base["honest_fid_mean"] - 1
            print(f"{r['attack']} seed {r['seed']}: honest mean FID {100 * r['honest_fid_change']:+.1f} % vs clean")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "summary.json").write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
