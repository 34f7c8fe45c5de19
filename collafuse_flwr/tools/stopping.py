"""How `collafuse-run` stops a run that is still going (Ctrl-C, SIGTERM, its timeout).

In order, so that the run's records say what happened: `flwr stop <run-id>` first (Flower marks
the run stopped, and flwr-simulation exits through its own exit handlers, where the ServerApp
marks results.json "stopped"), then every process left is stopped (processes.stop_run), then
results.json is marked "stopped" by the launcher if the ServerApp could not do it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from pathlib import Path

from collafuse_flwr.tools import processes


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived while a run was on (not an Exception, so no `except Exception` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """While a run is on, SIGINT and SIGTERM raise in the main thread (SIGTERM would otherwise
    end the launcher at once and leave the whole run behind); a second signal during the
    clean-up is only acknowledged, so the clean-up finishes. Off the main thread: no-op."""

    def __enter__(self) -> StopSignals:
        self.old: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.old[sig] = signal.signal(sig, self._interrupt)
        return self

    def _interrupt(self, signum: int, _frame: object) -> None:
        self.hold()
        raise Interrupted(signum)

    def hold(self) -> None:
        """From now on only acknowledge the signals (the run is being stopped anyway)."""
        for sig in self.old:
            signal.signal(sig, self._busy)

    def _busy(self, signum: int, _frame: object) -> None:
        print(f"collafuse-run: {signal.Signals(signum).name} again: still stopping the run", flush=True)

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]


def stop_engine(flwr: str, env: dict[str, str], app_dir: Path, log: str, ports: list[int]) -> tuple[int | None, bool]:
    """`flwr stop` the run, so Flower records it as stopped and flwr-simulation exits through its
    own exit handlers (where the ServerApp marks results.json "stopped"); wait for it briefly.
    Returns (run id or None, whether flwr stop succeeded). The caller then stops what is left."""
    run_id = started_run_id(log)
    if run_id is None or not any(processes.pids_listening_on(p) for p in ports):  # no SuperLink: nothing to ask
        return run_id, False
    try:
        res = subprocess.run([flwr, "stop", str(run_id)], env=env, capture_output=True, text=True,
                             timeout=20, cwd=str(app_dir), start_new_session=True)
    except subprocess.TimeoutExpired:
        return run_id, False
    if res.returncode != 0:
        return run_id, False
    # flwr-simulation notices the stop by itself within ~10 s and leaves through flwr_exit, whose
    # exit handlers include the ServerApp's (results.json: "stopped"). A SIGTERM instead would make
    # it hang in its shutdown until our grace ran out, so wait until that handler ran or it is gone.
    deadline = time.time() + 15
    mark = f"{processes.MARK}={env[processes.MARK]}"
    results = announced_dir(log)
    while time.time() < deadline and any(processes.name(p) == "flwr-simulation" for p in processes.marked(mark)):
        if results is not None and _status(results / "results.json") not in ("running", None):
            break
        time.sleep(0.3)
    return run_id, True


def _status(path: Path) -> str | None:
    try:
        return str(json.loads(path.read_text()).get("status"))
    except (OSError, ValueError):
        return None


def announced_dir(log: str) -> Path | None:
    """The run folder the ServerApp names at start ("outputs go to <dir> (on the machine ...")."""
    for line in log.splitlines():
        if "collafuse-flwr: method=" in line and "; outputs go to " in line:
            return Path(line.split("; outputs go to ", 1)[1].split(" (on the machine", 1)[0].strip())
    return None


def started_run_id(log: str) -> int | None:
    for line in log.splitlines():
        if "Successfully started run " in line:
            try:
                return int(line.split()[-1])
            except ValueError:
                return None
    return None


def find_run_dir(run_config: str, app_dir: Path, run_id: int) -> Path | None:
    """The run folder (`<output-dir>/<...>-<run id>`, config.run_dir) when the log did not name it."""
    try:
        from collafuse_flwr.tools.precheck import app_table, parse_overrides

        root = str({**app_table(app_dir)[0], **parse_overrides(run_config)}.get("output-dir", "") or "")
    except Exception:  # noqa: BLE001 - best effort: the run-config was checked before, if at all
        return None
    found = sorted((Path(root) if root else Path.home() / "collafuse-runs").glob(f"*-{run_id}"))
    return found[-1] if found else None


def mark_stopped(run_dir: Path | None, signame: str) -> str:
    """Write status "stopped" into results.json if the ServerApp could not; says what it found."""
    path = run_dir / "results.json" if run_dir else None
    if path is None or not path.is_file():
        return f"no results.json{f' in {run_dir}' if run_dir else ''} (the ServerApp wrote none)"
    try:
        res = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return f"{path} unreadable ({exc})"
    if res.get("status") == "running":
        from collafuse_flwr.harness.outputs import write_json

        write_json(path, {**res, "status": "stopped", "error": f"stopped by collafuse-run on {signame}"})
        return f'{path} marked "stopped" by the launcher'
    return f'{path} says "{res.get("status")}"'
