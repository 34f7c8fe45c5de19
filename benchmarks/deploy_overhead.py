"""Per-round overhead of a tiny CollaFuse run in the local deployment (`collafuse-deploy`).

Why: a deployment round costs more than its compute: the message waits at the SuperNode's poll,
a ClientApp process starts, imports torch and the app and reloads the node's data, and the
reply waits for the next poll. This measures, for each isolation mode of
`collafuse_flwr.tools.deploy.LocalDeployment`, the middle rounds' wall time (metrics.csv
`elapsed-s` differences; round 1 carries the start-up, the last round the evaluation) minus the
round's compute: the clients' training (`train-seconds`, the mean over nodes, which run in
parallel) and the server's (`server-train-seconds`). It also times what a fresh ClientApp
process pays before any work: `python -X importtime -c "import collafuse_flwr.client_app"`.

    python -m benchmarks.deploy_overhead                    # both modes, 3 nodes, 5 rounds
    python -m benchmarks.deploy_overhead --modes warm --rounds 4
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

from benchmarks.common import RESULTS_DIR, machine_info, write_result
from collafuse_flwr.tools.deploy import ISOLATIONS, LocalDeployment
from collafuse_flwr.tools.launch import APP_DIR

TINY = ("dataset='digits' model-size='tiny' image-size=8 diffusion-steps=20 local-steps=2 server-steps=2 "
        "uploads-per-round=8 num-eval-samples=4 batch-size=16 attack-reference-steps=5 torch-threads=1")
TARGET_S = 3.0


def round_overheads(metrics_csv: Path) -> list[dict[str, float]]:
    """Per middle round: wall, client and server compute, and wall minus compute (seconds)."""
    rows = list(csv.DictReader(open(metrics_csv)))
    out = []
    for prev, row in zip(rows[:-2], rows[1:-1]):  # rounds 2 .. R-1 (prev is the round before)
        wall = float(row["elapsed-s"]) - float(prev["elapsed-s"])
        client = float(row.get("train-seconds") or 0.0)
        server = float(row.get("server-train-seconds") or 0.0)
        out.append({"round": int(row["round"]), "wall_s": round(wall, 3), "client_train_s": round(client, 3),
                    "server_train_s": round(server, 3), "overhead_s": round(wall - client - server, 3)})
    return out


def import_time(module: str = "collafuse_flwr.client_app", repeats: int = 3) -> dict[str, object]:
    """Wall time of a fresh interpreter importing `module`, and its ten slowest imports (-X importtime)."""
    walls, heavy = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                             capture_output=True, text=True, cwd=str(APP_DIR), check=True)
        walls.append(time.perf_counter() - t0)
        for line in res.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if m and len(m.group(3)) <= 3:  # top-level and first-level imports
                heavy[m.group(4)] = max(heavy.get(m.group(4), 0), int(m.group(2)))
    top = sorted(heavy.items(), key=lambda kv: -kv[1])[:10]
    return {"module": module, "wall_s": [round(w, 2) for w in walls], "median_wall_s": round(statistics.median(walls), 2),
            "slowest_cumulative_s": {k: round(v / 1e6, 2) for k, v in top}}


def measure(mode: str, rounds: int, nodes: int, workdir: Path, app: Path = APP_DIR) -> dict[str, object]:
    """One tiny CollaFuse job in a fresh local deployment in `mode`; its per-round overheads."""
    t0 = time.perf_counter()
    with LocalDeployment(workdir / mode, num_nodes=nodes, isolation=mode, quiet=True) as dep:
        started = time.perf_counter() - t0
        out = dep.run(app, run_config=f"{TINY} num-server-rounds={rounds}", stream=False, timeout=1500)
    if not out.ok or out.output_dir is None:
        raise RuntimeError(f"{mode}: run ended {out.status} (rc {out.returncode}); logs in {workdir / mode}/logs")
    per_round = round_overheads(out.output_dir / "metrics.csv")
    rows = list(csv.DictReader(open(out.output_dir / "metrics.csv")))
    return {"mode": mode, "status": out.status, "deployment_start_s": round(started, 1),
            "first_round_s": float(rows[0]["elapsed-s"]), "rounds": per_round,
            "median_overhead_s": statistics.median(r["overhead_s"] for r in per_round),
            "median_round_s": statistics.median(r["wall_s"] for r in per_round)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", nargs="+", choices=ISOLATIONS, default=list(ISOLATIONS))
    p.add_argument("--rounds", type=int, default=5, help="rounds per run (>= 4: rounds 2..R-1 are measured)")
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder to run (default: this checkout)")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "deploy_overhead.json")
    a = p.parse_args(argv)
    if a.rounds < 4:
        p.error(f"--rounds {a.rounds}: need >= 4 (round 1 has the start-up, the last the evaluation)")
    result: dict[str, object] = {"machine": machine_info(), "app": str(a.app.resolve()), "nodes": a.nodes,
                                 "rounds": a.rounds, "measured_rounds": f"2..{a.rounds - 1}",
                                 "run_config": TINY, "target_overhead_s": TARGET_S,
                                 "import": import_time(), "modes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="deploy-overhead-"))  # kept when a run fails: its logs are there
    for mode in a.modes:
        result["modes"][mode] = measure(mode, a.rounds, a.nodes, tmp, a.app)  # type: ignore[index]
        m = result["modes"][mode]  # type: ignore[index]
        print(f"{mode}: median overhead {m['median_overhead_s']:.2f} s per round "
              f"(median round {m['median_round_s']:.2f} s)", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    best = min(m["median_overhead_s"] for m in result["modes"].values())  # type: ignore[union-attr]
    result["pass"] = best <= TARGET_S
    write_result(a.out, result)
    print(("PASS" if result["pass"] else "FAIL") + f": best median overhead {best:.2f} s (target <= {TARGET_S} s)")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
