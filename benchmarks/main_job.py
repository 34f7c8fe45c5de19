"""Time the README's main command, `collafuse-run` with its defaults, end to end.

    python -m benchmarks.main_job                  # == time collafuse-run (5 clients, pyproject defaults)
    python -m benchmarks.main_job --run-config "num-server-rounds=2"   # a variant (not the target job)

Runs `python -m collafuse_flwr.tools.launch` (what the `collafuse-run` entry point calls) as a child
process, exactly as a user would start it, streams its output, and measures the wall time from
launch to exit: SuperLink / Ray start-up, all rounds, the final evaluation and shutdown. The
run's own results.json `wall_seconds` (inside the ServerApp) is printed beside it.

Targets (issue 15), for the unmodified command on the 2-core CPU machine: <= 4 minutes, and a
per-client FID at least 1.4x better than local-only training on the same settings. The second
is measured by running the same command again with `method=local` (it is skipped with
--no-local). PASS/FAIL is printed only for the unmodified command; with --run-config or
--num-clients the figures are reported as a variant.
Writes benchmarks/results/main_job.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from collafuse_flwr.harness.outputs import write_json

from .common import REPO, RESULTS_DIR, command_line, fmt_seconds, machine_info, verdict

TARGET_S = 240.0
TARGET_FID_GAIN = 1.4  # local-only's per-client FID / CollaFuse's


def run_main_job(extra_args: list[str], log_path: Path | None = None, quiet: bool = False) -> dict[str, Any]:
    """Run the launcher as a child process; returns wall time, exit code and the run's outputs folder."""
    cmd = [sys.executable, "-m", "collafuse_flwr.tools.launch", *extra_args]
    print("$", " ".join(cmd), flush=True)
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if not quiet:
            sys.stdout.write(line)
            sys.stdout.flush()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if log_path is not None:
        log_path.write_text("".join(lines))
    out_dir = None
    for line in reversed(lines):  # the launcher's last line: "run <id>: <status>; outputs: <dir>"
        if "; outputs: " in line:
            out_dir = line.rsplit("; outputs: ", 1)[1].strip()
            break
    results: dict[str, Any] = {}
    if out_dir and out_dir != "None" and (Path(out_dir) / "results.json").is_file():
        results = json.loads((Path(out_dir) / "results.json").read_text())
    return {"command": " ".join(cmd), "returncode": rc, "wall_seconds": wall, "output_dir": out_dir,
            "serverapp_seconds": results.get("wall_seconds"), "status": results.get("status"),
            "fid": results.get("final", {}).get("fid"), "config": results.get("config")}


def local_only_args(run_config: str | None, num_clients: int | None) -> list[str]:
    """collafuse-run's arguments for local-only on the main job's settings (values are TOML,
    as `flwr run --run-config` parses them: a bare `method=local` is refused)."""
    cfg = " ".join(filter(None, [run_config, "method='local'"]))
    return ["--run-config", cfg] + (["--num-clients", str(num_clients)] if num_clients else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.main_job", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--run-config", default=None, help="overrides passed to collafuse-run (makes it a variant)")
    p.add_argument("--num-clients", type=int, default=None, help="passed to collafuse-run (makes it a variant)")
    p.add_argument("--quiet", action="store_true", help="do not stream the run's output")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "main_job.json")
    p.add_argument("--no-local", action="store_true", help="skip the local-only run on the same settings")
    a = p.parse_args(argv)
    extra: list[str] = []
    if a.run_config:
        extra += ["--run-config", a.run_config]
    if a.num_clients is not None:
        extra += ["--num-clients", str(a.num_clients)]
    variant = bool(extra)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    r = run_main_job(extra, log_path=a.json.with_suffix(".log"), quiet=a.quiet)
    ok_run = r["returncode"] == 0 and r["status"] == "ok"
    within = r["wall_seconds"] <= TARGET_S
    print()
    print(f"main job {'(variant: ' + ' '.join(extra) + ') ' if variant else ''}"
          f"{'finished' if ok_run else 'FAILED (rc ' + str(r['returncode']) + ')'}")
    print(f"wall time, launch to exit   {fmt_seconds(r['wall_seconds'])} ({r['wall_seconds']:.1f} s)")
    if r["serverapp_seconds"] is not None:
        print(f"inside the ServerApp        {fmt_seconds(r['serverapp_seconds'])}")
    local: dict[str, Any] | None = None
    gain_ok = True
    if not a.no_local and ok_run:
        local_extra = local_only_args(a.run_config, a.num_clients)
        print("\nthe same settings with method=local, for the quality target:", flush=True)
        local_log = a.json.with_name(a.json.stem + "-local.log")
        local = run_main_job(local_extra, log_path=local_log, quiet=True)
        if local["status"] != "ok" or not local["fid"] or not r["fid"]:
            gain_ok = False  # the main job's figures are still written below
            print(f"local-only run FAILED (rc {local['returncode']}, status {local['status']}; log {local_log})")
        else:
            local["fid_gain"] = local["fid"] / r["fid"]
            gain_ok = local["fid_gain"] >= TARGET_FID_GAIN
            print(f"per-client FID: main job {r['fid']:.3f}, local-only {local['fid']:.3f} "
                  f"({local['fid_gain']:.2f}x; local-only {fmt_seconds(local['wall_seconds'])})")
    if variant:
        print(f"targets (<= {fmt_seconds(TARGET_S)}, >= {TARGET_FID_GAIN}x local-only's FID) apply to the "
              f"unmodified command; not judged")
    else:
        print(f"target <= {fmt_seconds(TARGET_S)}: {verdict(ok_run and within)}")
        if local is not None:
            print(f"target FID <= local-only's / {TARGET_FID_GAIN}: {verdict(gain_ok)}")
    passed = ok_run and within and gain_ok
    write_json(a.json, {"benchmark": "main_job", "invoked_as": command_line(),
                        "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "variant": variant, "target_seconds": TARGET_S,
                        "target_fid_gain": TARGET_FID_GAIN, "pass": None if variant else passed, **r,
                        "local_only": local, "machine": machine_info()})
    print(f"wrote {a.json}")
    if not ok_run:
        return 2
    return 0 if (variant or passed) else 1


if __name__ == "__main__":
    raise SystemExit(main())
