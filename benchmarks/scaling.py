"""Scaling in the number of virtual clients: wall time and peak memory of one Flower round.

    python -m benchmarks.scaling                      # 10, 30, 100 clients (~5 min on 2 cores)
    python -m benchmarks.scaling --clients 10 30 100 300 --mem-limit-gb 12

Checks: every run ok with every client; the peak memory of the process tree below --mem-limit-gb;
time no worse than linear (the largest point within --tolerance of the line through the two smallest).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from collafuse_flwr.config import preset
from collafuse_flwr.tools.launch import run_flower
from collafuse_flwr.tools.processes import tree

from .common import (RESULTS_DIR, BenchmarkError, fmt_seconds, parse_overrides, print_checks, pyplot, read_json,
                     save_figure, validate_overrides, write_result)


def _tree_memory(root: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, processes) of root and its descendants (flwr run's SuperLink, Ray, ...).
    Summed RSS counts shared pages once per process (conservative: the limit is checked on it); PSS once."""
    pids, rss, pss = tree(root), 0, 0
    for pid in pids:
        try:
            kb = dict(ln.split()[:2] for ln in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
            rss, pss = rss + int(kb["Rss:"]) * 1024, pss + int(kb["Pss:"]) * 1024
        except (OSError, KeyError, ValueError):
            continue
    return rss, pss, len(pids)


class MemorySampler:
    """The peak summed RSS and PSS of this process's tree, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval, self.peak_rss, self.peak_pss, self.peak_procs, self.samples = interval, 0, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)

    def sample(self) -> None:
        rss, pss, procs = _tree_memory(os.getpid())
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_procs, self.samples = max(self.peak_procs, procs), self.samples + 1

    def _loop(self) -> None:
        while not self._stop.wait(0 if not self.samples else self.interval):
            self.sample()

    def __enter__(self) -> MemorySampler:
        if not Path("/proc/self/smaps_rollup").exists():
            raise BenchmarkError("memory sampling reads /proc: it needs Linux")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: the tiny preset, one round, IID, FLOP counting off (what 100 clients on 2 cores allow)
SCALING_CONFIG: dict[str, Any] = {**preset("tiny"), "method": "collafuse", "cut-ratio": 0.2, "num-server-rounds": 1,
                                  "partitioning": "iid", "uploads-per-round": 4, "count-flops": False,
                                  "attack-reference-steps": 10}
GB = 1e9  # decimal, as the 12 GB limit is stated


def measure(n: int, overrides: dict[str, Any], timeout: float, interval: float) -> dict[str, Any]:
    """One Flower run with n clients under the memory sampler."""
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        cfg = {**overrides, "output-dir": str(Path(tmp) / "out")}
        t0 = time.perf_counter()
        with MemorySampler(interval=interval) as mem:
            res = run_flower(cfg, num_clients=n, flwr_home=Path(tmp) / "home", timeout=timeout, stream=False)
        call_s = time.perf_counter() - t0
        results = read_json(res.output_dir / "results.json") if res.output_dir is not None else {}
    ok = res.ok and results.get("status") == "ok"
    return {
        "clients": n, "ok": ok, "status": res.status, "call_seconds": call_s,
        "wall_seconds": float(results.get("wall_seconds", float("nan"))), "clients_seen": results.get("num_clients"),
        "failed_replies": results.get("final", {}).get("failed_replies"), "peak_rss_bytes": mem.peak_rss,
        "peak_pss_bytes": mem.peak_pss, "peak_processes": mem.peak_procs, "memory_samples": mem.samples,
        "log_tail": None if ok else "\n".join(res.log.splitlines()[-25:])}


def linear_fit(ns: list[int], ts: list[float]) -> tuple[float, float]:
    """Least-squares t = a + b n; returns (a, b)."""
    b, a = np.polyfit(np.asarray(ns, float), np.asarray(ts, float), 1)
    return float(a), float(b)


def superlinearity(ns: list[int], ts: list[float]) -> float:
    """Largest point's time / the line through the two smallest points, extrapolated (1 = linear)."""
    order = np.argsort(ns)[[0, 1, -1]]
    (n0, n1, nk), (t0, t1, tk) = np.asarray(ns, float)[order], np.asarray(ts, float)[order]
    predicted = t1 + (t1 - t0) / (n1 - n0) * (nk - n1)
    return float(tk / predicted) if predicted > 0 else float("inf")


def plot(points: list[dict[str, Any]], path: Path) -> None:
    ns = [p["clients"] for p in points]
    fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4.3))
    for key, name, color in (("call_seconds", "whole flwr run call", "tab:blue"),
                             ("wall_seconds", "inside the ServerApp", "tab:orange")):
        ax1.plot(ns, [p[key] for p in points], "o", color=color, label=name)
        if len(ns) >= 2:
            a, b = linear_fit(ns, [p[key] for p in points])
            ax1.plot([0, max(ns)], [a, a + b * max(ns)], "--", color=color, label=f"fit {a:.1f} s + {b:.2f} s/client")
    for key, name, mark in (("peak_rss_bytes", "peak summed RSS", "o-"), ("peak_pss_bytes", "peak summed PSS", "s-")):
        ax2.plot(ns, [p[key] / GB for p in points], mark, label=name)
    ax1.set(ylabel="wall time (s)", title="Time vs number of clients")
    ax2.set(ylabel="memory of the process tree (GB)", title="Peak memory vs number of clients", ylim=(0, None))
    for ax in (ax1, ax2):
        ax.set_xlabel("virtual clients (one round each)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100])
    p.add_argument("--extra", default="", help="run-config overrides on top of the scaling configuration")
    p.add_argument("--mem-limit-gb", type=float, default=12.0)
    p.add_argument("--tolerance", type=float, default=0.25, help="allowed excess over linear growth")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling period (s)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for scaling.json / scaling.png")
    a = p.parse_args(argv)
    overrides, ns = {**SCALING_CONFIG, **parse_overrides(a.extra)}, sorted(set(a.clients))
    validate_overrides(overrides)  # BenchmarkError names a bad key now, not 40 s into a run
    if ns[0] < 1:
        p.error("--clients must be >= 1")
    points, t_start = [], time.perf_counter()
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
    gn = [pt["clients"] for pt in good]
    checks = {"all runs ok": len(good) == len(points),
              "every client took part": all(pt["clients_seen"] == pt["clients"] and not pt["failed_replies"]
                                            for pt in good)}
    summary: dict[str, Any] = {}
    if good:
        biggest = max(good, key=lambda pt: pt["clients"])
        checks[f"memory at {biggest['clients']} clients < {a.mem_limit_gb:g} GB"] = \
            biggest["peak_rss_bytes"] < a.mem_limit_gb * GB
    if len(good) >= 2:
        for key in ("wall_seconds", "call_seconds", "peak_rss_bytes"):
            summary[key] = dict(zip(("fixed", "per_client"), linear_fit(gn, [pt[key] for pt in good])))
        w, c, m = (summary[k] for k in ("wall_seconds", "call_seconds", "peak_rss_bytes"))
        print(f"fit: ServerApp {w['fixed']:.1f} s + {w['per_client']:.3f} s/client; whole call {c['fixed']:.1f} s + "
              f"{c['per_client']:.3f} s/client; memory {m['fixed'] / GB:.2f} GB + {m['per_client'] / 1e6:.1f} "
              f"MB/client")
    if len(good) >= 3:
        sl = {k: superlinearity(gn, [pt[f"{k}_seconds"] for pt in good]) for k in ("wall", "call")}
        summary["superlinearity"] = sl
        print(f"largest point / the line through the two smallest: ServerApp x{sl['wall']:.2f}, whole call "
              f"x{sl['call']:.2f}")
        checks[f"time growth no worse than linear (ServerApp, +{a.tolerance:.0%} allowed)"] = \
            sl["wall"] <= 1 + a.tolerance
    ok = print_checks(checks)
    write_result(a.out / "scaling.json", {"benchmark": "scaling", "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                          "run_config": overrides, "mem_limit_gb": a.mem_limit_gb,
                                          "tolerance": a.tolerance, "points": points, "fit": summary, "checks": checks})
    if good:
        plot(good, a.out / "scaling.png")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
