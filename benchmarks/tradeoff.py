"""Beyond the paper (issue 17): what a DP guarantee and per-client cuts cost and buy.

    python -m benchmarks.tradeoff --out benchmarks/results/tradeoff-cpu --seeds 0 1   # ~20 min a seed, 2 CPU cores
    python -m benchmarks.tradeoff --out /tmp/t --extra "num-server-rounds=2 model-size='tiny'"  # a smoke run
    python -m benchmarks.tradeoff --out benchmarks/results/tradeoff-gpu --engine inprocess       # a lent GPU

Runs, on digits at the comparison sweep's settings (app defaults, 5 rounds: c = 0.2, 5 clients,
non-IID by class, fair server budget), each through `flwr run` with the sweep's bookkeeping
(`benchmarks.sweep.run_sweep`: one folder per run and seed, finished runs skipped on a re-run,
so an interrupted report resumes where it stopped):
- `collafuse-c0.2` (no DP), `eps10`, `eps4`, `eps1`: upload-epsilon with every image uploaded at
  most once (max-uploads-per-image = 1; at K = 2 epsilon = 1 cannot be met at all on 8x8 digits);
- `mixed`: client-cut-ratios = 0.1,0.1,0.2,0.3,0.3, the same mean cut (so the same mean client
  FLOPs) as all-0.2, with the data owners choosing different shares;
- `half`: client-model-size = half (the FID cost of a client net with ~1/4 the FLOPs).
Per run (mean and spread over seeds): per-client FID, the server's re-identification rate and
reconstruction PSNR (its own model and the reference attacker), the realised epsilon, the upload
steps and the client's inference FLOPs; in OUT/tradeoff.json, OUT/tradeoff.md, OUT/tradeoff.png.
No target: it is a measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from collafuse_flwr.harness.outputs import write_json

from .common import command_line, machine_info, parse_overrides

#: every run is CollaFuse at the paper's c; each names what it changes
BASE: dict[str, Any] = {"method": "collafuse", "cut-ratio": 0.2}
RUNS: dict[str, dict[str, Any]] = {  # in order of importance: a run cut off at a time limit loses the last
    "collafuse-c0.2": {},
    "eps4": {"upload-epsilon": 4.0, "max-uploads-per-image": 1},
    "mixed": {"client-cut-ratios": "0.1,0.1,0.2,0.3,0.3"},
    "half": {"client-model-size": "half"},
    "eps10": {"upload-epsilon": 10.0, "max-uploads-per-image": 1},
    "eps1": {"upload-epsilon": 1.0, "max-uploads-per-image": 1},
}
#: the comparison sweep's CPU settings (its collafuse-c0.2 runs are the same setting, under older code)
SETTINGS: dict[str, Any] = {"dataset": "digits", "num-server-rounds": 5}


def run_all(tags: list[str], out: Path, seeds: list[int], extra: dict[str, Any], clients: int,
            engine: str) -> dict[str, list[dict[str, Any]]]:
    """Run what is not recorded yet (finished runs are skipped), then `collect` them all."""
    from .sweep import SweepConfig, run_sweep

    configs = [SweepConfig(t, {**BASE, **RUNS[t]}) for t in tags]
    runs = out / "runs"
    if engine == "flwr":
        run_sweep(configs, out, seeds=seeds, run_config=SETTINGS, extra=extra, num_clients=clients,
                  report=False, command=command_line())
    else:  # the in-process engine (a GPU box without Flower's server stack)
        from .inprocess import run_inprocess

        for seed in seeds:
            for c in configs:
                rc = {**SETTINGS, **extra, **c.overrides, "seed": seed}
                try:
                    res = run_inprocess(rc, clients, runs / f"{c.tag}-s{seed}")
                except Exception as exc:  # noqa: BLE001 - record and go on: the others still answer
                    res = {"status": "failed", "error": str(exc)[:300]}
                write_json(runs / f"{c.tag}-s{seed}" / "results.json", res)
    return collect(tags, out, seeds)


def collect(tags: list[str], out: Path, seeds: list[int]) -> dict[str, list[dict[str, Any]]]:
    """Each (run, seed)'s results.json, or why it has none."""
    runs = out / "runs"
    found: dict[str, list[dict[str, Any]]] = {t: [] for t in tags}
    for t in tags:
        for seed in seeds:
            d = runs / f"{t}-s{seed}"
            path = d / "results.json"  # the sweep copies a failed run's too, with the app's own error
            r = json.loads(path.read_text()) if path.is_file() else {}
            if r.get("status") != "ok":  # keep why it failed: an impossible epsilon is a finding
                rec = d / "sweep.json"
                r = {"status": "failed", "error": r.get("error") or
                     (json.loads(rec.read_text()).get("error") if rec.is_file() else "did not run")}
            found[t].append(r)
    return found


def _short(error: str) -> str:
    """The sentence that says why, out of a run's error (a node's refusal carries its fix)."""
    for key in ("cannot be met", "refused"):
        if key in error:
            i = error.find("upload epsilon") if "upload epsilon" in error else error.find(key)
            return error[max(0, i):].split(";")[0][:240]
    return error[:240]


def _mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


def summarize(tag: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One row: means over the seeds that finished (FID with its spread)."""
    failed = [r for r in results if r.get("status") != "ok"]
    results = [r for r in results if r.get("status") == "ok"]
    row: dict[str, Any] = {"run": tag, "seeds": len(results), "changes": RUNS.get(tag, {}),
                           "errors": [str(r.get("error"))[:1500] for r in failed]}
    if not results:
        why = _short(row["errors"][0]) if row["errors"] else "no run"
        return {**row, "fid": None, "fid_sd": None, "status": f"no finished run: {why}"}

    def disclosure(key: str) -> list[Any]:
        return [r["final"]["disclosure"].get(key) for r in results]

    def realised(r: dict[str, Any]) -> float | None:
        dp = r["final"]["disclosure"].get("dp_per_client") or {}
        if dp:
            return max(p.get("epsilon_realised") or 0.0 for p in dp.values())
        return r["final"]["disclosure"].get("epsilon")  # no DP: the diffusion noise's own accounting

    row["fid"], row["fid_sd"] = _mean_sd([r["final"].get("fid") for r in results])
    for key in ("reid_server", "reid_reference", "psnr_server", "psnr_reference"):
        row[key] = _mean_sd(disclosure(key))[0]
    row["epsilon_realised"] = _mean_sd([realised(r) for r in results])[0]
    row["upload_step_per_client"] = results[0].get("cut_step_per_client")
    row["client_infer_flops_per_image"] = _mean_sd([r["final"].get("client_infer_flops_per_image")
                                                   for r in results])[0]
    row["uploads"] = _mean_sd([sum((r["final"].get("uploads_per_client") or {}).values()) for r in results])[0]
    row["status"] = "ok"
    return row


def table(rows: list[dict[str, Any]]) -> str:
    def g(v: Any) -> str:
        return "–" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    head = ("| run | seeds | per-client FID ↓ | re-id (server / reference) | PSNR dB (server / reference) | "
            "realised ε | upload step per client | client infer GFLOP / image | images uploaded |")
    out = [head, "|" + "---|" * 9]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['run']} | 0 | {r['status']} |" + " |" * 6)
            continue
        steps = ",".join(str(v) for v in (r["upload_step_per_client"] or {}).values())
        fl = r["client_infer_flops_per_image"]
        fid = g(r["fid"]) + (f" ± {r['fid_sd']:.2g}" if r["fid_sd"] is not None else "")
        out.append(f"| {r['run']} | {r['seeds']} | {fid} | {g(r['reid_server'])} / {g(r['reid_reference'])} | "
                   f"{g(r['psnr_server'])} / {g(r['psnr_reference'])} | {g(r['epsilon_realised'])} | {steps} | "
                   f"{g(fl / 1e9 if fl else None)} | {g(r['uploads'])} |")
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Quality, disclosure and the client's compute side by side: what each setting buys and costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(12, 3.6))
    names = [r["run"] for r in rows]
    ax[0].bar(names, [r["fid"] or 0 for r in rows], yerr=[r["fid_sd"] or 0 for r in rows], color="tab:blue")
    ax[0].set_title("per-client FID (lower is better)", fontsize=10)
    ax[1].bar(names, [r["reid_reference"] or 0 for r in rows], color="tab:red")
    ax[1].set_title("uploads re-identified (reference attacker)", fontsize=10)
    ax[1].set_ylim(0, 1)
    ax[2].bar(names, [(r["client_infer_flops_per_image"] or 0) / 1e9 for r in rows], color="tab:gray")
    ax[2].set_title("client inference GFLOP per image", fontsize=10)
    for a in ax:
        a.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tradeoff", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--engine", choices=("flwr", "inprocess"), default="flwr")
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--extra", default="", help="run-config overrides for every run")
    p.add_argument("--report-only", action="store_true", help="rebuild the table and plot from the recorded runs")
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    found = (collect(a.only, a.out, a.seeds) if a.report_only
             else run_all(a.only, a.out, a.seeds, parse_overrides(a.extra), a.clients, a.engine))
    rows = [summarize(t, found[t]) for t in a.only]
    write_json(a.out / "tradeoff.json", {"command": command_line(), "engine": a.engine, "seeds": a.seeds,
                                         "settings": {**SETTINGS, **parse_overrides(a.extra)}, "rows": rows,
                                         "machine": machine_info(), "seconds": time.time() - t0})
    (a.out / "tradeoff.md").write_text(table(rows) + "\n")
    plot([r for r in rows if r["fid"] is not None], a.out / "tradeoff.png")
    print(table(rows))
    return 0 if all(r["status"] == "ok" and r["seeds"] == len(a.seeds) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
