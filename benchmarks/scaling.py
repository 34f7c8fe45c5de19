"""Scaling in the number of virtual clients: wall time and peak memory of one Flower round.

    python -m benchmarks.scaling                      # 10, 30, 100 clients (~5 min on 2 cores)
    python -m benchmarks.scaling --clients 10 30 100 300 --mem-limit-gb 12

Each point is one `run_flower` call (CollaFuse c=0.2, one round, tiny UNet, 2 local steps,
IID partitioning; digits has 1,797 images, so 100 clients hold ~14 training and ~4 test images
each; FLOP counting off). While it runs, a sampler adds up the RSS of every process below this
one every 0.5 s (flwr run -> SuperLink -> SuperExec -> simulation -> Ray's workers, read from
/proc); the peak is checked against the limit. Summed RSS counts shared pages once per process
and so overstates; the summed PSS is printed beside it.

Checks (PASS/FAIL):
- memory: peak summed RSS at the largest client count < --mem-limit-gb (12 GB);
- growth no worse than linear: time ~ a + b*n is fitted (b = per-client cost); the largest
  point may exceed the line through the two smallest by at most --tolerance (25 %). Checked on
  the ServerApp's own wall time (fixed start-up excluded) and reported for the whole call too.

Writes benchmarks/results/scaling.json and scaling.png (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from collafuse_flwr.harness.outputs import write_json
from collafuse_flwr.tools.launch import run_flower

from .common import (
    RESULTS_DIR,
    BenchmarkError,
    MemorySampler,
    app_keys,
    command_line,
    fmt_seconds,
    machine_info,
    parse_overrides,
    validate_overrides,
    verdict,
)

SCALING_CONFIG: dict[str, Any] = {
    "method": "collafuse", "cut-ratio": 0.2, "dataset": "digits", "num-server-rounds": 1, "partitioning": "iid",
    "model-size": "tiny", "image-size": 8, "diffusion-steps": 20, "local-steps": 2, "server-steps": 2,
    "batch-size": 16, "uploads-per-round": 4, "num-eval-samples": 4, "count-flops": False,
    "attack-reference-steps": 10,
}
GB = 1e9  # decimal, as the 12 GB limit is stated


def measure(n: int, overrides: dict[str, Any], timeout: float, interval: float) -> dict[str, Any]:
    """One Flower run with n clients under the memory sampler."""
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        cfg = {**overrides, "output-dir": str(Path(tmp) / "out")}
        t0 = time.perf_counter()
        with MemorySampler(interval=interval) as mem:
            res = run_flower(cfg, num_clients=n, flwr_home=Path(tmp) / "home", timeout=timeout, stream=False)
        call_s = time.perf_counter() - t0
        results = {}
        if res.output_dir is not None and (res.output_dir / "results.json").is_file():
            results = json.loads((res.output_dir / "results.json").read_text())
    ok = res.ok and results.get("status") == "ok"
    return {
        "clients": n, "ok": ok, "status": res.status, "call_seconds": call_s,
        "wall_seconds": float(results.get("wall_seconds", float("nan"))),
        "clients_seen": results.get("num_clients"), "failed_replies": results.get("final", {}).get("failed_replies"),
        "peak_rss_bytes": mem.peak_rss, "peak_pss_bytes": mem.peak_pss, "peak_processes": mem.peak_procs,
        "memory_samples": mem.samples,
        "log_tail": None if ok else "\n".join(res.log.splitlines()[-25:]),
    }


def linear_fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b n; returns (a, b)."""
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def superlinearity(ns: list[int], ts: list[float]) -> float:
    """Largest point's time / the line through the two smallest points, extrapolated (1 = linear)."""
    order = np.argsort(ns)
    (n0, n1, nk), (t0, t1, tk) = [ns[i] for i in order[[0, 1, -1]]], [ts[i] for i in order[[0, 1, -1]]]
    slope = (t1 - t0) / (n1 - n0)
    predicted = t1 + slope * (nk - n1)
    return tk / predicted if predicted > 0 else float("inf")


def plot(points: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [p["clients"] for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.3))
    for key, name, color in (("call_seconds", "whole flwr run call", "tab:blue"),
                             ("wall_seconds", "inside the ServerApp", "tab:orange")):
        ts = [p[key] for p in points]
        ax1.plot(ns, ts, "o", color=color, label=name)
        if len(ns) >= 2:
            a, b = linear_fit(ns, ts)
            xs = np.linspace(0, max(ns) * 1.05, 50)
            ax1.plot(xs, a + b * xs, "--", color=color, alpha=0.7, label=f"fit {a:.1f} s + {b:.2f} s/client")
    ax1.set_xlabel("virtual clients (one round each)")
    ax1.set_ylabel("wall time (s)")
    ax1.set_title("Time vs number of clients")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.plot(ns, [p["peak_rss_bytes"] / GB for p in points], "o-", label="peak summed RSS")
    ax2.plot(ns, [p["peak_pss_bytes"] / GB for p in points], "s-", label="peak summed PSS")
    ax2.set_xlabel("virtual clients (one round each)")
    ax2.set_ylabel("memory of the process tree (GB)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("Peak memory vs number of clients")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--extra", default="", help="run-config overrides on top of the scaling configuration")
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed excess over linear growth")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for scaling.json / scaling.png")
    a = p.parse_args(argv)
    try:
        overrides = app_keys({**SCALING_CONFIG, **parse_overrides(a.extra)})
        validate_overrides(overrides)
        ns = sorted(set(a.clients))
        if ns[0] < 1:
            raise BenchmarkError("--clients must be >= 1")
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    points = []
    t_start = time.perf_counter()
    for k, n in enumerate(ns, 1):
        print(f"[{k}/{len(ns)}] {n} clients ... (elapsed {fmt_seconds(time.perf_counter() - t_start)})", flush=True)
        pt = measure(n, overrides, a.timeout, a.interval)
        points.append(pt)
        print(f"    {'ok' if pt['ok'] else 'FAILED ' + pt['status']}: call {pt['call_seconds']:.1f}s, ServerApp "
              f"{pt['wall_seconds']:.1f}s, peak RSS {pt['peak_rss_bytes'] / GB:.2f} GB (PSS "
              f"{pt['peak_pss_bytes'] / GB:.2f}), {pt['peak_processes']} processes", flush=True)
        if not pt["ok"]:
            print(pt["log_tail"])
    good = [pt for pt in points if pt["ok"]]
    checks: dict[str, bool] = {}
    print()
    print(f"{'clients':>8} {'call s':>8} {'ServerApp s':>12} {'peak RSS GB':>13} {'peak PSS GB':>13}")
    for pt in points:
        print(f"{pt['clients']:>8} {pt['call_seconds']:>8.1f} {pt['wall_seconds']:>12.1f} "
              f"{pt['peak_rss_bytes'] / GB:>13.2f} {pt['peak_pss_bytes'] / GB:>13.2f}")
    checks["all runs ok"] = len(good) == len(points)
    checks["every client took part"] = all(pt["clients_seen"] == pt["clients"] and not pt["failed_replies"]
                                           for pt in good)
    summary: dict[str, Any] = {}
    if good:
        biggest = max(good, key=lambda pt: pt["clients"])
        checks[f"memory at {biggest['clients']} clients < {a.mem_limit_gb:g} GB"] = \
            biggest["peak_rss_bytes"] < a.mem_limit_gb * GB
    if len(good) >= 2:
        gn = [pt["clients"] for pt in good]
        for key in ("wall_seconds", "call_seconds"):
            aa, bb = linear_fit(gn, [pt[key] for pt in good])
            summary[key] = {"fixed_seconds": aa, "seconds_per_client": bb}
        am, bm = linear_fit(gn, [pt["peak_rss_bytes"] for pt in good])
        summary["peak_rss"] = {"fixed_bytes": am, "bytes_per_client": bm}
        print(f"\nfit (ServerApp): {summary['wall_seconds']['fixed_seconds']:.1f} s + "
              f"{summary['wall_seconds']['seconds_per_client']:.3f} s/client; whole call: "
              f"{summary['call_seconds']['fixed_seconds']:.1f} s + {summary['call_seconds']['seconds_per_client']:.3f} "
              f"s/client; memory: {am / GB:.2f} GB + {bm / 1e6:.1f} MB/client")
    if len(good) >= 3:
        gn = [pt["clients"] for pt in good]
        s_app = superlinearity(gn, [pt["wall_seconds"] for pt in good])
        s_call = superlinearity(gn, [pt["call_seconds"] for pt in good])
        summary["superlinearity"] = {"serverapp": s_app, "call": s_call}
        print(f"largest point vs the line through the two smallest: ServerApp x{s_app:.2f}, whole call x{s_call:.2f}")
        checks[f"time growth no worse than linear (ServerApp, +{a.tolerance:.0%} allowed)"] = s_app <= 1 + a.tolerance
    else:
        print("(the linear-growth check needs 3 successful points)")
    print()
    for name, ok in checks.items():
        print(f"{verdict(ok)}  {name}")
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "scaling.json", {
        "benchmark": "scaling", "command": command_line(), "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "run_config": overrides, "mem_limit_gb": a.mem_limit_gb, "tolerance": a.tolerance, "points": points,
        "fit": summary, "checks": checks, "machine": machine_info()})
    if good:
        plot(good, a.out / "scaling.png")
    print(f"wrote {a.out / 'scaling.json'}" + (f" and {a.out / 'scaling.png'}" if good else ""))
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
