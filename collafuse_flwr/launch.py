"""`collafuse-run`: one `flwr run` on the simulation engine, isolated and cleaned up.

Why a wrapper: `flwr run .` starts a background SuperLink under $FLWR_HOME on fixed ports and
leaves it running, `uv sync`s the app's dependencies on every run (slow, and impossible
offline), and `--stream` may exit 0 when the run failed. This wrapper gives each invocation its
own FLWR_HOME and free ports, switches the dependency sync off, checks the run's real status with
`flwr list --format json`, and stops the SuperLink (and anything under it) by pid.

    collafuse-run --num-clients 5 --run-config "cut-ratio=0.4 num-server-rounds=3"
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
import time
from dataclasses import dataclass
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent


@dataclass
class RunOutcome:
    run_id: int | None
    status: str
    returncode: int
    output_dir: Path | None
    log: str
    http_port: int
    control_port: int

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.status.endswith("completed")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_listening_on(port: int) -> list[int]:
    """pids of processes holding a listening socket on `port` (read from /proc, Linux)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(parts[9])
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    pids.append(int(proc.name))
                    break
        except OSError:
            continue
    return pids


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(proc.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (read from /proc, Linux)."""
    return [pid, *_descendants(pid)]


def stop_pids(pids: list[int], grace: float = 10.0,
              signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)) -> list[int]:
    """Send each signal in turn to `pids`, waiting up to `grace` s for them to go; returns `pids`."""
    for sig in signals:
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and
                                             "Z" not in _state(p) for p in pids):
            time.sleep(0.2)
    return pids


def stop_superlink(port: int, grace: float = 10.0) -> list[int]:
    """Stop the SuperLink listening on `port` and its process tree; returns the pids stopped."""
    return stop_pids([p for r in _pids_listening_on(port) for p in tree(r)], grace)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def _flwr_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
    })
    # the simulation imports the app from its FAB copy; make sure `strategies` resolves too
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH", "")]))
    # flwr starts `flower-superlink` from PATH: use this interpreter's, venv activated or not
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def flwr_bin() -> str:
    """The `flwr` next to this interpreter (venv activated or not)."""
    exe = Path(sys.executable).with_name("flwr")
    return str(exe) if exe.exists() else "flwr"


def run_flower(
    run_config: dict[str, object] | str = "",
    num_clients: int = 5,
    app_dir: Path = APP_DIR,
    flwr_home: Path | None = None,
    timeout: float = 3600,
    stream: bool = True,
    client_cpus: int = 1,
    client_gpus: float = 0.0,
) -> RunOutcome:
    """Run the app once through `flwr run` on a private local SuperLink and clean up after it.

    client_cpus: CPUs Ray reserves per virtual client; it also sets the client's torch threads.
    1 (default): as many clients train at once as there are cores, one thread each, and the
    CollaFuse server trains beside them on one thread (server-overlap). Two multi-thread teams on
    the same cores spin against each other: on the 2-core VM a 2-thread client next to a 2-thread
    server took 0.69 s per step instead of 0.07-0.09 s; one thread each, 0.09-0.10 s (both).

    stream: echo the run's log to stdout as it comes (it is captured in the outcome either way).
    """
    if num_clients < 1:
        raise ValueError(f"num-clients must be >= 1, got {num_clients}")
    if isinstance(client_cpus, bool) or int(client_cpus) != client_cpus or client_cpus < 1:
        # Flower's federation config carries whole CPUs (uint32); "1.0" fails the run late
        raise ValueError(f"client_cpus must be a whole number of CPUs >= 1, got {client_cpus!r}")
    client_cpus = int(client_cpus)
    if isinstance(run_config, dict):
        parts = [f"{k}={json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in run_config.items()]
        run_config = " ".join(parts)
    own_home = flwr_home is None
    home = Path(tempfile.mkdtemp(prefix="collafuse-flwr-home-")) if own_home else Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    http_port, control_port = free_port(), free_port()
    env = _flwr_env(home, http_port, control_port)
    fed = f"num-supernodes={num_clients} client-resources-num-cpus={client_cpus}"
    if client_gpus > 0:  # Ray hides GPUs from actors that ask for none
        fed += f" client-resources-num-gpus={client_gpus}"
    cmd = [flwr_bin(), "run", str(app_dir), "--federation-config", fed]
    if run_config:
        cmd += ["--run-config", run_config]
    cmd.append("--stream")  # flwr run then returns when the run ends; `stream` only echoes it
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    log_lines: list[str] = []
    rc = 1
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=str(app_dir))
        t0 = time.time()
        assert proc.stdout is not None
        for line in proc.stdout:
            log_lines.append(line)
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            if time.time() - t0 > timeout:
                proc.kill()
                log_lines.append(f"collafuse-run: timed out after {timeout:.0f}s\n")
                break
        rc = proc.wait()
        run_id, status = _run_status(env, app_dir)
    finally:
        stop_superlink(control_port)
        stop_superlink(http_port)
        if own_home:
            shutil.rmtree(home, ignore_errors=True)
    log = "".join(log_lines)
    return RunOutcome(run_id, status, rc, _output_dir(log), log, http_port, control_port)


def _run_status(env: dict[str, str], app_dir: Path) -> tuple[int | None, str]:
    """The latest run's real status (`flwr run --stream` can exit 0 on a failed run)."""
    for _ in range(20):
        res = subprocess.run([flwr_bin(), "list", "--format", "json"], env=env, capture_output=True,
                             text=True, cwd=str(app_dir))
        try:
            runs = json.loads(res.stdout).get("runs", [])
        except json.JSONDecodeError:
            runs = []
        if runs:
            latest = max(runs, key=lambda r: int(r.get("run-id", 0)))
            status = str(latest.get("status", "unknown"))
            if not status.startswith(("pending", "starting", "running")):
                return int(latest.get("run-id", 0)), status
        time.sleep(1.0)
    return None, "unknown"


def _output_dir(log: str) -> Path | None:
    for line in reversed(log.splitlines()):
        if "collafuse-flwr: results in " in line:
            return Path(line.split("collafuse-flwr: results in ", 1)[1].strip())
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collafuse-run", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-clients", type=int, default=5, help="virtual clients (num-supernodes)")
    p.add_argument("--run-config", default="", help='overrides, e.g. "cut-ratio=0.4 method=\'fedavg\'"')
    p.add_argument("--app", type=Path, default=APP_DIR, help="Flower app folder (has pyproject.toml)")
    p.add_argument("--flwr-home", type=Path, default=None, help="FLWR_HOME to use (default: a fresh temp dir)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    p.add_argument("--client-gpus", type=float, default=0.0, help="GPU share per virtual client (e.g. 0.2)")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs (and torch threads) per virtual client")
    a = p.parse_args(argv)
    if not (a.app / "pyproject.toml").is_file():
        p.error(f"--app {a.app} has no pyproject.toml; point it at the collafuse-flwr checkout")
    out = run_flower(a.run_config, a.num_clients, a.app, a.flwr_home, a.timeout, stream=not a.quiet,
                     client_cpus=a.client_cpus, client_gpus=a.client_gpus)
    print(f"\nrun {out.run_id}: {out.status}; outputs: {out.output_dir}")
    return 0 if out.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
