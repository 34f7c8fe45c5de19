"""`collafuse-run`: one `flwr run` on the simulation engine, checked first, isolated, cleaned up.

Why a wrapper: `flwr run .` leaves a background SuperLink on fixed ports, `uv sync`s on every run,
checks the run-config only after a minute, and `--stream` may exit 0 on a failed run. This checks
the run-config first (exit 2), gives each invocation its own FLWR_HOME and ports, switches the sync
off, reads the real status with `flwr list`, and stops every process the run started, also on
Ctrl-C or SIGTERM (exit 130 or 143): `flwr stop` first (the ServerApp marks results.json "stopped"
on its way out), then every process left, then results.json if the ServerApp could not mark it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from collafuse_flwr.config import preset, preset_names, run_config_text
from collafuse_flwr.tools import processes
from collafuse_flwr.tools.precheck import RunConfigError, app_table, check_run_config, parse_overrides
from collafuse_flwr.tools.processes import MARK

APP_DIR = Path(__file__).resolve().parents[2]  # the checkout: collafuse_flwr/tools/launch.py


@dataclass
class Outcome:
    """What one `flwr run` did (Flower's record of its status, and where its outputs went)."""

    run_id: int | None
    status: str
    returncode: int
    output_dir: Path | None
    log: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status.endswith("completed")


@dataclass
class RunOutcome(Outcome):
    http_port: int
    control_port: int


class RunStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run and everything it started; a KeyboardInterrupt, so a sweep
    calling run_flower stops as on Ctrl-C."""

    def __init__(self, signum: int, outcome: RunOutcome, summary: str) -> None:
        super().__init__(summary)
        self.signum, self.outcome, self.summary = signum, outcome, summary


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: Path, extra: dict[str, str]) -> dict[str, str]:
    """Every Flower process's environment: a private FLWR_HOME, no per-run `uv sync`, no update check."""
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1", **extra}
    # flwr starts flower-superlink, flwr-clientapp ... from PATH: this interpreter's, venv activated or not
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def read_into(proc: subprocess.Popen, lines: list[str], echo: Callable[[], bool]) -> threading.Thread:
    """A started daemon thread appending `proc`'s output to `lines`, echoed while `echo()` is true."""

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo():
                sys.stdout.write(line)
                sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    return reader


def flwr_bin() -> str:
    """The `flwr` next to this interpreter (venv activated or not)."""
    exe = Path(sys.executable).with_name("flwr")
    return str(exe) if exe.exists() else "flwr"


class Interrupted(BaseException):
    """SIGINT/SIGTERM arrived while a run was on (not an Exception, so no `except Exception` eats it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class StopSignals:
    """While a run is on, SIGINT and SIGTERM raise in the main thread (SIGTERM would otherwise leave the
    whole run behind); a second one during the clean-up is only acknowledged. Off the main thread: no-op."""

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
    """`flwr stop` the run and wait briefly for flwr-simulation to exit by itself.
    Returns (run id or None, whether flwr stop succeeded); the caller stops what is left."""
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
    # flwr-simulation notices the stop within ~10 s and exits through the ServerApp's handler; a SIGTERM
    # would make it hang in its shutdown, so wait until that handler ran or it is gone.
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


def _said(log: str, marker: str, end: str = "\n", *, last: bool = False, also: str = "") -> str | None:
    """What the first (or last) log line holding `marker` (and `also`) says after it, up to `end`."""
    said = [line.split(marker, 1)[1].split(end, 1)[0].strip() for line in log.splitlines()
            if marker in line and also in line]
    return (said[-1] if last else said[0]) if said else None


def announced_dir(log: str) -> Path | None:
    """The run folder the ServerApp names at start ("outputs go to <dir> (on the machine ...")."""
    said = _said(log, "; outputs go to ", " (on the machine", also="collafuse-flwr: method=")
    return Path(said) if said else None


def started_run_id(log: str) -> int | None:
    said = _said(log, "Successfully started run ")
    return int(said) if said and said.isdecimal() and said.isascii() else None


def find_run_dir(run_config: str, app_dir: Path, run_id: int) -> Path | None:
    """The run folder (`<output-dir>/<...>-<run id>`) when the log did not name it."""
    try:
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


def run_flower(run_config: dict[str, object] | str = "", num_clients: int = 5, app_dir: Path = APP_DIR,
               flwr_home: Path | None = None, timeout: float = 3600, stream: bool = True, client_cpus: int = 1,
               client_gpus: float = 0.0) -> RunOutcome:
    """Run the app once through `flwr run` on a private local SuperLink and clean up after it.

    client_cpus: CPUs (and torch threads) per virtual client; 1 by default, since two multi-thread
    teams on the same cores spin against each other (2-core VM: 0.69 s per step instead of 0.09 s).
    After `timeout` s the run is stopped and the outcome says "timed-out"; SIGINT/SIGTERM (main
    thread) stop it, mark results.json "stopped" and raise RunStopped.
    """
    if num_clients < 1:
        raise ValueError(f"num-clients must be >= 1, got {num_clients}")
    if isinstance(client_cpus, bool) or int(client_cpus) != client_cpus or client_cpus < 1:
        # Flower's federation config carries whole CPUs (uint32); "1.0" fails the run late
        raise ValueError(f"client_cpus must be a whole number of CPUs >= 1, got {client_cpus!r}")
    client_cpus = int(client_cpus)
    app_dir = Path(app_dir).expanduser().resolve()
    run_config = run_config if isinstance(run_config, str) else run_config_text(run_config)
    http_port, control_port = free_port(), free_port()  # before a private home exists: nothing to leak if it fails
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="collafuse-flwr-home-")) if own_home else Path(flwr_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    ports = [http_port, control_port]  # Flower 1.42's local SuperLink serves the Control API on the HTTP port
    token = uuid.uuid4().hex
    env = flwr_env(home, {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
                          "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
                          MARK: token})  # every process of the run inherits MARK: how the launcher finds them all
    # the simulation imports the app from its FAB copy; make sure `strategies` resolves too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH", "")]))
    fed = f"num-supernodes={num_clients} client-resources-num-cpus={client_cpus}"
    if client_gpus > 0:  # Ray hides GPUs from actors that ask for none
        fed += f" client-resources-num-gpus={client_gpus}"
    cmd = [flwr_bin(), "run", str(app_dir), "--federation-config", fed]
    if run_config:
        cmd += ["--run-config", run_config]
    cmd.append("--stream")  # flwr run then returns when the run ends; `stream` only echoes it
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    print(f"collafuse-run: FLWR_HOME={home}, SuperLink ports {http_port} (HTTP) and {control_port} (control)",
          flush=True)
    log_lines: list[str] = []
    rc, run_id, status, proc, halted, flwr_stopped = 1, None, "unknown", None, "", False
    echo = threading.Event()
    if stream:
        echo.set()
    with StopSignals() as signals:
        try:
            # its own session: a terminal's Ctrl-C reaches only the launcher, which stops the run in order
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    cwd=str(app_dir), start_new_session=True)
            if _follow(proc, log_lines, echo, timeout):
                rc = proc.wait()
                run_id, status = _run_status(env, app_dir)
            else:
                signals.hold()
                halted, status = "timeout", "timed-out"
                run_id, flwr_stopped = stop_engine(flwr_bin(), env, app_dir, "".join(log_lines), ports)
        except (Interrupted, KeyboardInterrupt) as exc:
            signals.hold()
            echo.clear()  # the run's shutdown noise would bury the one line that says what was stopped
            halted, status = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name, "stopped"
            run_id, flwr_stopped = stop_engine(flwr_bin(), env, app_dir, "".join(log_lines), ports)
        finally:
            signals.hold()  # a signal now would cut the clean-up short
            live = [proc.pid] if proc is not None and proc.poll() is None else []
            marks = [f"{MARK}={token}"] + ([f"FLWR_HOME={home}"] if own_home else [])  # a private home marks it too
            names, left = processes.stop_run(marks, ports, trees=live, groups=[proc.pid] if proc is not None else [])
            if own_home:
                shutil.rmtree(home, ignore_errors=True)
        log = "".join(log_lines)
        out = RunOutcome(run_id, status, rc, _output_dir(log) or announced_dir(log), log, http_port, control_port)
        if not halted:
            return out
        if out.output_dir is None and run_id is not None:
            out.output_dir = find_run_dir(run_config, app_dir, run_id)
        note = mark_stopped(out.output_dir, halted)
        summary = (f"collafuse-run: {halted}: stopped run {run_id or '(not started yet)'}"
                   f"{' (flwr stop)' if flwr_stopped else ''} and {len(names)} processes "
                   f"({processes.summarize(names) or 'none running'}); "
                   f"{'none left' if not left else f'STILL ALIVE: pids {left}'}; {note}")
        if halted == "timeout":
            out.log += summary + "\n"
            print(summary, flush=True)
            return out
        raise RunStopped(getattr(signal.Signals, halted), out, summary)


def _follow(proc: subprocess.Popen, log_lines: list[str], echo: threading.Event, timeout: float) -> bool:
    """Collect the run's output until it ends (True) or `timeout` s pass (False); a reader thread keeps
    `log_lines` current whenever a signal or the timeout stops the wait."""
    reader = read_into(proc, log_lines, echo.is_set)
    deadline = time.time() + timeout
    while reader.is_alive() and time.time() < deadline:
        reader.join(timeout=0.5)
    if not reader.is_alive():
        return True
    log_lines.append(f"collafuse-run: timed out after {timeout:.0f}s\n")
    if echo.is_set():
        print(log_lines[-1], end="", flush=True)
    return False


def _output_dir(log: str) -> Path | None:
    said = _said(log, "collafuse-flwr: results in ", last=True)
    return Path(said) if said else None


def parse_runs(stdout: str) -> dict[int, str] | None:
    """run id -> status from `flwr list --format json`; None when the SuperLink did not answer."""
    try:
        runs = json.loads(stdout)["runs"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    return {int(r["run-id"]): str(r.get("status", "unknown")) for r in runs}


def final_status(list_runs: Callable[[], dict[int, str] | None], tries: int,
                 before: set[int] | None = None) -> tuple[int | None, str]:
    """(run id, status) once final (`flwr run --stream` can exit 0 on a failed run): of the newest run,
    or with `before`, of the one run not in it (deployment run ids are random, not ordered)."""
    for _ in range(tries):
        runs = list_runs() or {}
        if before is not None:
            runs = {k: v for k, v in runs.items() if k not in before}
        if runs and (before is None or len(runs) == 1):
            run_id = max(runs)
            if not runs[run_id].startswith(("pending", "starting", "running")):
                return run_id, runs[run_id]
        time.sleep(1.0)
    return None, "unknown"


def _run_status(env: dict[str, str], app_dir: Path) -> tuple[int | None, str]:
    cmd = [flwr_bin(), "list", "--format", "json"]
    return final_status(lambda: parse_runs(subprocess.run(cmd, env=env, capture_output=True, text=True,
                                                          cwd=str(app_dir)).stdout), 20)


def common_args(p: argparse.ArgumentParser, example: str, timeout: float) -> None:
    """The options collafuse-run and collafuse-deploy share."""
    p.add_argument("--run-config", default="", help=f'overrides, e.g. "{example}"')
    p.add_argument("--preset", choices=preset_names(), default=None,
                   help="a named setting (collafuse_flwr/presets/NAME.toml); --run-config's keys win over it")
    p.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder (has pyproject.toml)")
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds before the run is stopped and marked timed-out (default {timeout:g})")


def with_preset(name: str, run_config: str) -> str:
    """The preset's keys, then the run-config's over them."""
    return run_config_text({**preset(name), **parse_overrides(run_config)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collafuse-run", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-clients", type=int, default=5, help="virtual clients (num-supernodes)")
    common_args(p, "cut-ratio=0.4 method='fedavg'", timeout=3600)
    p.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to use (default: a fresh temp dir)")
    p.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per virtual client (e.g. 0.2)")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs (and torch threads) per virtual client")
    a = p.parse_args(argv)
    app = a.app.expanduser().resolve()  # once, against the folder the user typed it in
    if not (app / "pyproject.toml").is_file():
        p.error(f"--app {a.app} ({app}) has no pyproject.toml; point it at a Flower app folder, e.g. the "
                f"collafuse-flwr checkout or examples/custom_serverapp")
    if a.num_clients < 1:
        p.error(f"--num-clients must be >= 1, got {a.num_clients}")
    if a.client_cpus < 1:
        p.error(f"--client-cpus must be >= 1, got {a.client_cpus}")
    if a.client_gpus < 0 or (a.client_gpus > 0 and not _cuda_available()):
        p.error(f"--client-gpus {a.client_gpus}: torch sees no CUDA GPU here (Flower's engine would fail with "
                f"'ActorPool is empty'); leave it at 0 to run the clients on CPUs" if a.client_gpus > 0 else
                f"--client-gpus must be >= 0, got {a.client_gpus}")
    run_config = a.run_config.strip()
    if run_config.endswith(".toml") and len(run_config.split()) == 1:  # flwr reads it from the app folder
        run_config = str(Path(run_config).expanduser().resolve())
    try:
        if a.preset:
            run_config = with_preset(a.preset, run_config)
        check_run_config(app, run_config, a.num_clients)
    except RunConfigError as exc:
        print(f"collafuse-run: bad run-config: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while the config was being checked: nothing runs yet
        print("\ncollafuse-run: SIGINT: stopped before anything was started", flush=True)
        return 128 + signal.SIGINT
    try:
        out = run_flower(run_config, a.num_clients, app, a.flwr_home, a.timeout, stream=not a.quiet,
                         client_cpus=a.client_cpus, client_gpus=a.client_gpus)
    except RunStopped as stop:
        print(f"\n{stop.summary}", flush=True)
        return 128 + stop.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    print(f"\nrun {out.run_id}: {out.status}; outputs: {out.output_dir}")
    why = _recorded_error(out.output_dir) if not out.ok else ""
    if why:  # the reason, also under --quiet, where no log showed it
        print(f"why: {why}", flush=True)
    return 0 if out.ok else 1


def _cuda_available() -> bool:
    import torch  # here: the launcher does not pay torch's import otherwise

    return torch.cuda.is_available()


def _recorded_error(output_dir: Path | None) -> str:
    """The one-line error the ServerApp recorded in results.json, or "" where there is none."""
    try:
        return " ".join(str(json.loads((output_dir / "results.json").read_text())["error"]).split())[:600]
    except (TypeError, OSError, ValueError, KeyError):
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
