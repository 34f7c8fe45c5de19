"""Beyond the paper (issue 17): what a DP guarantee and per-client cuts cost and buy.

    python -m benchmarks.tradeoff --out benchmarks/results/tradeoff-gpu --engine inprocess  # the lent GPU
    python -m benchmarks.tradeoff --out /tmp/t --engine flwr --extra "num-server-rounds=2"    # through flwr run

Runs, on digits at the app defaults (c = 0.2, 5 clients, non-IID by class):
- `c0.2` (no DP), `eps10`, `eps4`, `eps1`: upload-epsilon with every image uploaded at most once
  (max-uploads-per-image = 1; at K = 2 epsilon = 1 cannot be met at all on 8x8 digits);
- `mixed`: client-cut-ratios = 0.1,0.1,0.2,0.3,0.3, the same mean cut (so the same mean client
  FLOPs) as all-0.2, with the data owners choosing different shares;
- `half`: client-model-size = half (the FID cost of a client net with ~1/4 the FLOPs).
Each run's per-client FID, the server's re-identification rate and reconstruction PSNR (its own
model and the reference attacker), the realised epsilon and the client's inference FLOPs go to
OUT/tradeoff.json, OUT/tradeoff.md and OUT/tradeoff.png. No target: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from collafuse_flwr.outputs import write_json

from .common import command_line, machine_info, parse_overrides

RUNS: dict[str, dict[str, Any]] = {  # in order of importance: a run cut off at a time limit loses the last
    "c0.2": {},
    "eps4": {"upload-epsilon": 4.0, "max-uploads-per-image": 1},
    "mixed": {"client-cut-ratios": "0.1,0.1,0.2,0.3,0.3"},
    "half": {"client-model-size": "half"},
    "eps10": {"upload-epsilon": 10.0, "max-uploads-per-image": 1},
    "eps1": {"upload-epsilon": 1.0, "max-uploads-per-image": 1},
}


def _run(engine: str, rc: dict[str, Any], clients: int, out: Path) -> dict[str, Any]:
    if engine == "inprocess":
        from .inprocess import run_inprocess

        return run_inprocess(rc, clients, out)
    from collafuse_flwr.launch import run_flower

    res = run_flower(rc, num_clients=clients, stream=False, timeout=3600)
    if not res.ok or res.output_dir is None:
        raise RuntimeError(f"run failed: {res.status}\n{res.log[-2000:]}")
    return json.loads((res.output_dir / "results.json").read_text())


def summarize(tag: str, r: dict[str, Any]) -> dict[str, Any]:
    f, d = r["final"], r["final"]["disclosure"]
    dp = d.get("dp_per_client") or {}
    return {"run": tag, "fid": f.get("fid"), "fid_pooled": f.get("fid_pooled"),
            "reid_server": d.get("reid_server"), "reid_reference": d.get("reid_reference"),
            "psnr_server": d.get("psnr_server"), "psnr_reference": d.get("psnr_reference"),
            "epsilon_realised": max((p.get("epsilon_realised") or 0.0 for p in dp.values()), default=d.get("epsilon")),
            "upload_step_per_client": r.get("cut_step_per_client"),
            "client_infer_flops_per_image": f.get("client_infer_flops_per_image"),
            "uploads": sum((f.get("uploads_per_client") or {}).values()), "status": r["status"]}


def table(rows: list[dict[str, Any]]) -> str:
    def g(v: Any) -> str:
        return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    head = "| run | FID ↓ | re-id (server / reference) | PSNR dB (server / reference) | realised ε | upload step t_u per client | client infer GFLOP / image | images uploaded |"
    out = [head, "|" + "---|" * 8]
    for r in rows:
        steps = ",".join(str(v) for v in (r["upload_step_per_client"] or {}).values())
        fl = r["client_infer_flops_per_image"]
        out.append(f"| {r['run']} | {g(r['fid'])} | {g(r['reid_server'])} / {g(r['reid_reference'])} | "
                   f"{g(r['psnr_server'])} / {g(r['psnr_reference'])} | {g(r['epsilon_realised'])} | {steps} | "
                   f"{g(fl / 1e9 if fl else None)} | {r['uploads']} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [r["run"] for r in rows]
    ax[0].bar(names, [r["fid"] or 0 for r in rows], color="tab:blue")
    ax[0].set_ylabel("per-client FID (lower is better)")
    ax[1].bar(names, [r["reid_reference"] or 0 for r in rows], color="tab:red")
    ax[1].set_ylabel("re-identified uploads (reference attacker)")
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--engine", choices=("flwr", "inprocess"), default="flwr")
    p.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--extra", default="", help="run-config overrides for every run")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    rows, t0 = [], time.time()
    for tag in a.only:
        rc = {**parse_overrides(a.extra), **RUNS[tag], "method": "collafuse"}
        print(f"[{time.time() - t0:6.0f}s] {tag}: {rc}", flush=True)
        try:
            r = _run(a.engine, rc, a.clients, a.out / "runs" / tag)
            rows.append(summarize(tag, r))
        except Exception as exc:  # noqa: BLE001 - record and go on: the others still answer
            rows.append({"run": tag, "status": f"failed: {str(exc)[:300]}", "fid": None, "reid_server": None,
                         "reid_reference": None, "psnr_server": None, "psnr_reference": None,
                         "epsilon_realised": None, "upload_step_per_client": None,
                         "client_infer_flops_per_image": None, "uploads": 0})
        print(f"[{time.time() - t0:6.0f}s] {rows[-1]}", flush=True)
        write_json(a.out / "tradeoff.json", {"command": command_line(), "engine": a.engine, "rows": rows,
                                             "machine": machine_info(), "seconds": time.time() - t0})
        (a.out / "tradeoff.md").write_text(table(rows) + "\n")
    plot([r for r in rows if r["fid"] is not None], a.out / "tradeoff.png")
    print(table(rows))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
