"""Which settings give CollaFuse its quality gain over local-only training: the main job's
comparison (per-client FID, CollaFuse c = 0.2 against local-only, same settings) for variants.

    python -m benchmarks.main_job_variants                       # the table in the README (~35 min)
    python -m benchmarks.main_job_variants --only mnist5k-8px    # one variant (~8 min)

Why a separate tool from `benchmarks.main_job`: that one times the unmodified command through
`flwr run` (SuperLink, Ray); this one asks a quality question for several settings, so it runs
the same ServerApp and ClientApp in-process (`benchmarks/inprocess.py`'s grid: identical
messages, no engine) with the reference attacker and FLOP counting off, which only cost time.
In-process runs reproduce the flwr runs' figures where no thread overlaps another (local-only:
per-client FID 0.783 both ways on the old digits defaults); CollaFuse's overlapped server steps
see the same buffer but run in another order against the clients, so its figures differ
slightly (0.957 in-process, 1.04 through flwr). Seed 0, 5 clients; each pair is merged into
benchmarks/results/main_job_variants.json (or --json PATH) as it ends, keeping the variants not run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import OLD_MAIN_JOB, RESULTS_DIR, command_line, machine_info, write_result
from .inprocess import run_inprocess

#: the old main job with only the dataset swapped for MNIST-5k (8 px, the app's image-size default)
_MNIST5K_8PX: dict[str, Any] = {**OLD_MAIN_JOB, "dataset": "mnist5k", "image-size": 8}
#: name -> run-config overrides; "digits" is the main job as it was before this table.
VARIANTS: dict[str, dict[str, Any]] = {
    "digits": OLD_MAIN_JOB,
    "digits-uploads256": {**OLD_MAIN_JOB, "uploads-per-round": 256},
    "digits-local-steps20": {**OLD_MAIN_JOB, "local-steps": 20},
    "mnist5k-8px": _MNIST5K_8PX,
    "mnist5k-8px-local-steps20": {**_MNIST5K_8PX, "local-steps": 20},
}
#: what only costs time here: the reference attacker and FLOP counting
QUIET = {"attack-reference-steps": 0, "count-flops": False}


def run_pair(overrides: dict[str, Any], num_clients: int, seed: int) -> dict[str, Any]:
    """CollaFuse c = 0.2 and local-only on the same settings; per-client FIDs and the gain."""
    out: dict[str, Any] = {"overrides": overrides}
    for method in ("collafuse", "local"):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            res = run_inprocess({**QUIET, **overrides, "method": method, "seed": seed}, num_clients, Path(tmp))
        if res.get("status") != "ok":  # a degraded run's FID is not the method's
            raise RuntimeError(f"{method} run ended {res.get('status')!r}: {res.get('status_reasons') or res.get('error')}")
        out[method] = {"fid": res["final"]["fid"], "fid_pooled": res["final"].get("fid_pooled"),
                       "per_client": {k: v.get("fid") for k, v in sorted(res["per_client"].items())},
                       "seconds": time.perf_counter() - t0, "config": res["config"]}
    out["gain"] = out["local"]["fid"] / out["collafuse"]["fid"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.main_job_variants", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--only", nargs="+", choices=sorted(VARIANTS), default=None, help="variants to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "main_job_variants.json")
    a = p.parse_args(argv)
    previous = json.loads(a.json.read_text()) if a.json.is_file() else {}
    if previous and (previous.get("seed"), previous.get("num_clients")) != (a.seed, a.clients):
        previous = {}  # another seed or federation: do not mix them in one table
    results: dict[str, Any] = {"benchmark": "main_job_variants", "invoked_as": command_line(), "seed": a.seed,
                               "num_clients": a.clients, "variants": previous.get("variants", {}),
                               "machine": machine_info()}
    for name in a.only or list(VARIANTS):
        r = run_pair(VARIANTS[name], a.clients, a.seed)
        results["variants"][name] = {**r, "invoked_as": command_line()}
        write_result(a.json, results)
        print(f"{name:28s} CollaFuse {r['collafuse']['fid']:.3f}  local-only {r['local']['fid']:.3f}  "
              f"gain {r['gain']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
