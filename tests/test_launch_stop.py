"""Ctrl-C or SIGTERM to collafuse-run stops the whole run: the SuperLink, SuperExec,
flwr-simulation and Ray's processes (gcs_server, raylet, agents, actors), all of which outlived
the launcher before; the launcher exits 130 or 143 and the run's results.json says "stopped".

The launcher runs as the user runs it (`python -m collafuse_flwr.tools.launch`), in its own session,
on a run far longer than the test; the signal comes once round 1 has started."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collafuse_flwr.tools.launch import APP_DIR
from collafuse_flwr.tools.processes import alive, marked, name, pids_listening_on

pytestmark = pytest.mark.e2e

LONG = ("dataset='digits' model-size='tiny' image-size=8 num-server-rounds=50 local-steps=2 uploads-per-round=8 "
        "num-eval-samples=4 batch-size=16 attack-reference-steps=5")


def _session(sid: int) -> list[int]:
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3]) == sid:
                    out.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                continue
    return [p for p in out if alive(p)]


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        log = path.read_text()
        if text in log:
            return log
        if proc.poll() is not None:
            pytest.fail(f"the launcher exited ({proc.returncode}) before {text!r}:\n{log[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {text!r} within {timeout:.0f}s:\n{path.read_text()[-3000:]}")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_every_process_of_the_run(tmp_path, sig, code):
    home = tmp_path / "flwr-home"  # every process of the run inherits FLWR_HOME=<home>: how the test finds them
    log_path = tmp_path / "launcher.log"
    cmd = [sys.executable, "-m", "collafuse_flwr.tools.launch", "--num-clients", "2", "--flwr-home", str(home),
           "--run-config", f"{LONG} output-dir='{tmp_path}'"]
    with open(log_path, "w") as log_file:
        launcher = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, cwd=APP_DIR,
                                    start_new_session=True)
    run_pids: list[int] = []
    try:
        log = _wait_for(log_path, "[ROUND 1/", launcher, timeout=300)
        ports = [int(p) for p in re.search(r"SuperLink ports (\d+) \(HTTP\) and (\d+)", log).groups()]
        run_pids = marked(f"FLWR_HOME={home}")
        names = {name(p) for p in run_pids}
        assert {"flower-superlink", "flower-superexec", "flwr-simulation", "gcs_server"} <= names, names
        launcher.send_signal(sig)
        t0 = time.time()
        rc = launcher.wait(timeout=120)
        took = time.time() - t0
        print(f"{sig.name}: launcher exited {rc} after {took:.1f} s")  # measured, not asserted
        out = log_path.read_text()
        assert rc == code, out[-3000:]
        summary = [line for line in out.splitlines() if line.startswith(f"collafuse-run: {sig.name}: stopped run")]
        assert len(summary) == 1 and "none left" in summary[0], out[-3000:]
        # nothing of the run survives: not its session, not the processes it started, not Ray's
        assert not _session(launcher.pid), [(p, name(p)) for p in _session(launcher.pid)]
        left = [(p, name(p)) for p in marked(f"FLWR_HOME={home}") + run_pids if alive(p)]
        assert not left, left
        assert not any(pids_listening_on(p) for p in ports)
        results = list(tmp_path.glob("*/results.json"))
        assert len(results) == 1, out[-3000:]
        res = json.loads(results[0].read_text())
        assert res["status"] == "stopped", res
    finally:
        for p in [*marked(f"FLWR_HOME={home}"), *run_pids, *_session(launcher.pid)]:
            try:
                os.kill(p, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
