"""Per-round overhead of a tiny CollaFuse job in the local deployment (`collafuse-deploy`: a
SuperLink and 3 SuperNodes on 127.0.0.1, TLS, SuperNode authentication), per isolation mode.

    python -m benchmarks.deploy_overhead                    # every mode, 3 nodes, 5 rounds (~12 min)
    python -m benchmarks.deploy_overhead --modes process --rounds 4

Overhead: a middle round's wall time (metrics.csv) minus the clients' and the server's training time;
also a fresh ClientApp process's imports (`python -X importtime`). Target: <= 3 s.
"""

from __future__ import annotations

import argparse
import csv
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from collafuse_flwr.config import preset, run_config_text
from collafuse_flwr.tools.deploy import ISOLATIONS, LocalDeployment
from collafuse_flwr.tools.launch import APP_DIR

from .common import RESULTS_DIR, print_checks, write_result

RUN_CONFIG = {**preset("tiny"), "torch-threads": 1}  # 3 nodes training at once on 2 cores: one thread each
TARGET_S = 3.0


def round_overheads(rows: list[dict[str, str]]) -> list[dict[str, float]]:
    """Per middle round of metrics.csv's rows: wall, client and server compute, and wall minus compute (seconds)."""
    out = []
    for prev, row in zip(rows[:-2], rows[1:-1]):  # rounds 2 .. R-1 (prev is the round before)
        wall = float(row["elapsed-s"]) - float(prev["elapsed-s"])
        client, server = float(row.get("train-seconds") or 0.0), float(row.get("server-train-seconds") or 0.0)
        out.append({"round": int(row["round"]), "wall_s": round(wall, 3), "client_train_s": round(client, 3),
                    "server_train_s": round(server, 3), "overhead_s": round(wall - client - server, 3)})
    return out


def import_time(module: str = "collafuse_flwr.client_app", repeats: int = 3) -> dict[str, object]:
    """Wall time of a fresh interpreter importing `module`, and its slowest imports (-X importtime)."""
    walls, heavy = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                             capture_output=True, text=True, cwd=str(APP_DIR), check=True)
        walls.append(time.perf_counter() - t0)
        for m in re.finditer(r"import time:\s+\d+ \|\s+(\d+) \|( {0,3})(\S+)", res.stderr):  # 2 levels deep
            heavy[m.group(3)] = max(heavy.get(m.group(3), 0), int(m.group(1)))
    top = sorted(heavy.items(), key=lambda kv: -kv[1])[:10]
    median = round(statistics.median(walls), 2)
    return {"module": module, "wall_s": [round(w, 2) for w in walls], "median_wall_s": median,
            "slowest_cumulative_s": {k: round(v / 1e6, 2) for k, v in top}}


def measure(mode: str, rounds: int, nodes: int, workdir: Path, app: Path = APP_DIR) -> dict[str, object]:
    """One tiny CollaFuse job in a fresh local deployment in `mode`; its per-round overheads."""
    t0 = time.perf_counter()
    with LocalDeployment(workdir / mode, num_nodes=nodes, isolation=mode, quiet=True) as dep:
        started = time.perf_counter() - t0
        out = dep.run(app, run_config=run_config_text({**RUN_CONFIG, "num-server-rounds": rounds}), stream=False,
                      timeout=1500)
    if not out.ok or out.output_dir is None:
        raise RuntimeError(f"{mode}: run ended {out.status} (rc {out.returncode}); logs in {workdir / mode}/logs")
    with open(out.output_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_round = round_overheads(rows)
    return {"mode": mode, "status": out.status, "deployment_start_s": round(started, 1),
            "first_round_s": float(rows[0]["elapsed-s"]), "rounds": per_round,
            "median_overhead_s": statistics.median(r["overhead_s"] for r in per_round),
            "median_round_s": statistics.median(r["wall_s"] for r in per_round)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.deploy_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=ISOLATIONS, default=list(ISOLATIONS))
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 4: rounds 2..R-1 are measured)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder to run (default: this checkout)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "deploy_overhead.json")
    a = p.parse_args(argv)
    if a.rounds < 4:
        p.error(f"--rounds {a.rounds}: need >= 4 (round 1 has the start-up, the last the evaluation)")
    modes, tmp = {}, Path(tempfile.mkdtemp(prefix="deploy-overhead-"))  # kept when a run fails: its logs are there
    imports = import_time()
    for mode in a.modes:
        modes[mode] = m = measure(mode, a.rounds, a.nodes, tmp, a.app)
        print(f"{mode}: median overhead {m['median_overhead_s']:.2f} s per round (median round "
              f"{m['median_round_s']:.2f} s, first round {m['first_round_s']:.1f} s)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    ok = {k: m["median_overhead_s"] <= TARGET_S for k, m in modes.items()}
    print_checks({f"{k}: median overhead {modes[k]['median_overhead_s']:.2f} s (target <= {TARGET_S} s)": good
                  for k, good in ok.items()})
    write_result(a.out, {"app": str(a.app.resolve()), "nodes": a.nodes, "rounds": a.rounds,
                         "measured_rounds": f"2..{a.rounds - 1}", "run_config": run_config_text(RUN_CONFIG),
                         "target_overhead_s": TARGET_S, "import": imports, "modes": modes, "pass": ok})
    return 0 if any(ok.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
