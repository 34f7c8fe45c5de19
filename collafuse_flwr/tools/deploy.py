"""`collafuse-deploy`: a real Flower deployment on 127.0.0.1, one job, everything stopped after.

Why: the simulation engine never exercises TLS, SuperNode authentication, a `[superlink.NAME]`
federation entry, per-node `node_config` or processes that die. This starts a SuperLink and N
SuperNodes with free ports, a private FLWR_HOME, a CA, a server certificate and registered node
keys, submits one job, reads its real status with `flwr list`, and stops every process it started
by pid (also on Ctrl-C and on failure). It prints each Flower command, as `examples/README.md` shows.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from collafuse_flwr.tools.deploy_keys import TlsFiles, make_node_key, make_tls
from collafuse_flwr.tools.launch import (APP_DIR, Outcome, common_args, final_status, flwr_bin, flwr_env, free_port,
                                         parse_runs, read_into, with_preset)
from collafuse_flwr.tools.launch import _output_dir as _said_output_dir
from collafuse_flwr.tools.processes import stop_pids, tree

FEDERATION = "collafuse-local"
ISOLATIONS = ("subprocess", "process", "warm")
#: the `warm` isolation's patches of Flower 1.42's internals: beside the repository's scripts, not in the package
WARM_SCRIPT = APP_DIR / "scripts" / "flwr142_warm.py"


@dataclass
class DeployOutcome(Outcome):
    killed_node: int | None = None


@dataclass
class LocalDeployment:
    """A SuperLink and `num_nodes` SuperNodes on 127.0.0.1, as a context manager.

    node_configs: one `--node-config` per SuperNode (default `partition-id=K num-partitions=N`);
    each node gets its own `state-dir` unless it names one. isolation: `subprocess` and `process`
    (stock Flower: a ClientApp process per message) or `warm` (WARM_SCRIPT: one long-lived worker
    per SuperNode, the SuperNode polling every 0.5 s); per-round overhead ~22 s, ~22 s, ~2 s (benchmarks/README.md).
    """

    workdir: Path
    num_nodes: int = 3
    node_configs: list[str] | None = None
    tls: bool = True
    auth: bool = True
    isolation: str = "subprocess"
    database: str | None = None
    quiet: bool = False
    superlink_port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    tls_files: TlsFiles | None = None

    def __post_init__(self) -> None:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        if self.isolation == "warm" and not WARM_SCRIPT.is_file():
            raise ValueError(f"isolation 'warm' runs {WARM_SCRIPT.relative_to(APP_DIR)} from a collafuse-flwr checkout "
                             f"(it patches Flower 1.42's internals and is not installed with the package); it is "
                             f"not at {WARM_SCRIPT}: use isolation 'subprocess' or 'process'")
        if self.auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it over --insecure); "
                             "set tls=True or auth=False")
        if self.node_configs is not None and len(self.node_configs) != self.num_nodes:
            raise ValueError(f"{len(self.node_configs)} node configs for {self.num_nodes} nodes; "
                             "give one per node")
        self.workdir = Path(self.workdir).resolve()
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"

    def env(self) -> dict[str, str]:
        poll = os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")  # SuperExec's task poll; Flower's: 1 s
        return flwr_env(self.flwr_home, {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll})

    def _say(self, cmd: list[str]) -> None:
        if not self.quiet:
            print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)

    def _spawn(self, name: str, cmd: list[str]) -> subprocess.Popen:
        self._say(cmd)
        self.logs.mkdir(parents=True, exist_ok=True)
        out = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(cmd, env=self.env(), stdout=out, stderr=subprocess.STDOUT, cwd=str(self.workdir))
        out.close()
        self.procs[name] = proc
        return proc

    def _flwr(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [flwr_bin(), *args]
        self._say(cmd)
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout,
                             cwd=str(self.workdir))
        if check and res.returncode != 0:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {res.returncode}):\n{res.stdout}\n{res.stderr}")
        return res

    def start(self, wait: float = 120.0) -> LocalDeployment:
        """Certificates, keys, SuperLink, federation entry, registered SuperNodes, all online."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.superlink_port = self.superlink_port or free_port()
        if self.tls:
            self.tls_files = make_tls(self.workdir / "certificates")
        self._start_superlink()
        self.write_federation_entry()
        self._wait_for(lambda: self.list_runs() is not None, wait, "the SuperLink to answer `flwr list`")
        for k in range(self.num_nodes):
            self._start_supernode(k)
        self._wait_for(lambda: self.online_nodes() >= self.num_nodes, wait, f"{self.num_nodes} SuperNodes to be online")
        return self

    def _start_superlink(self) -> None:
        cmd = ["flower-superlink", "--host", "127.0.0.1", "--port", str(self.superlink_port),
               "--disable-runtime-dependency-installation"]
        t = self.tls_files
        cmd += (["--ssl-ca-certfile", str(t.ca_cert), "--ssl-certfile", str(t.server_cert),
                 "--ssl-keyfile", str(t.server_key)] if t else ["--insecure"])
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        if self.database:
            cmd += ["--database", str(self.database)]
        self._spawn("superlink", cmd)

    def write_federation_entry(self) -> Path:
        """`[superlink.NAME]` in $FLWR_HOME/config.toml: the address and how to trust it."""
        lines = ["[superlink]", f'default = "{FEDERATION}"', "",
                 f"[superlink.{FEDERATION}]", f'address = "127.0.0.1:{self.superlink_port}"',
                 f'root-certificates = "{self.tls_files.ca_cert}"' if self.tls_files else "insecure = true"]
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _start_supernode(self, k: int) -> None:
        port = free_port()
        node_config = (self.node_configs[k] if self.node_configs
                       else f"partition-id={k} num-partitions={self.num_nodes}")
        if "state-dir" not in node_config:  # nodes sharing a host must not share their secret and state
            node_config += f" state-dir='{self.workdir / 'node-state' / f'node-{k}'}'"
        exe = ([sys.executable, str(WARM_SCRIPT), "supernode", "--poll", "0.5", "--"]
               if self.isolation == "warm" else ["flower-supernode"])
        cmd = [*exe, "--superlink", f"127.0.0.1:{self.superlink_port}",
               "--host", "127.0.0.1", "--port", str(port), "--node-config", node_config]
        cmd += ["--root-certificates", str(self.tls_files.ca_cert)] if self.tls_files else ["--insecure"]
        if self.auth:
            priv, pub = make_node_key(self.workdir / "keys", k)
            self._flwr("supernode", "register", str(pub), FEDERATION)
            cmd += ["--auth-supernode-private-key", str(priv)]
        if self.isolation != "subprocess":
            cmd += ["--isolation", "process"]
        node = self._spawn(f"supernode-{k}", cmd)
        runtime = ["--runtime-api-address", f"127.0.0.1:{port}", "--insecure", "--parent-pid", str(node.pid)]
        if self.isolation == "process":  # Flower's own long-lived executor (its Docker guide's SuperExec)
            self._spawn(f"clientapp-{k}", ["flower-superexec", *runtime])
        elif self.isolation == "warm":
            self._spawn(f"clientapp-{k}", [sys.executable, str(WARM_SCRIPT), "worker", *runtime])

    def online_nodes(self) -> int:
        res = self._flwr("supernode", "ls", FEDERATION, "--format", "json", check=False)
        try:
            nodes = json.loads(res.stdout).get("nodes", [])
        except json.JSONDecodeError:
            return 0
        return sum(1 for n in nodes if n.get("status") == "online")

    def _wait_for(self, ready, timeout: float, what: str) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; "
                                   f"see {self.logs}/<name>.log")
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout:.0f}s for {what}; see the logs in {self.logs}")

    def run(self, app: Path = APP_DIR, run_config: str = "", timeout: float = 1800,
            kill_node_after_round: int | None = None, stream: bool = True) -> DeployOutcome:
        """Submit one job and wait for it; optionally SIGKILL the last SuperNode after round k."""
        app = Path(app).expanduser().resolve()  # flwr runs with cwd=app: a relative path would resolve twice
        if "output-dir" not in run_config:
            run_config = f"{run_config} output-dir='{self.workdir / 'outputs'}'".strip()
        output_root = _output_root(run_config)
        before = set(self.list_runs() or {})
        cmd = [flwr_bin(), "run", str(app), FEDERATION, "--run-config", run_config, "--stream"]
        self._say(cmd)
        lines: list[str] = []
        proc = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=str(app))
        self.procs["flwr-run"] = proc
        reader = read_into(proc, lines, lambda: stream)
        killed, t0 = None, time.time()
        while proc.poll() is None:
            if time.time() - t0 > timeout:
                lines.append(f"collafuse-deploy: timed out after {timeout:.0f}s\n")
                stop_pids([proc.pid])
                break
            if (kill_node_after_round is not None and killed is None and output_root
                    and _rounds_done(output_root, since=t0) >= kill_node_after_round):
                killed = self.num_nodes - 1
                self.kill_node(killed)
                lines.append(f"collafuse-deploy: killed SuperNode {killed} after round {kill_node_after_round}\n")
            time.sleep(0.2)
        reader.join(timeout=10)
        rc = proc.wait()
        (self.logs / "flwr-run.log").write_text("".join(lines))
        run_id, status = final_status(self.list_runs, 30, before)  # run ids are random: the one not in `before`
        log = "".join(lines)
        return DeployOutcome(run_id, status, rc, _output_dir(log, output_root), log, killed)

    def kill_node(self, k: int) -> list[int]:
        """SIGKILL SuperNode k and everything under it (and its warm worker): a crashed node."""
        pids = [p for n in (f"supernode-{k}", f"clientapp-{k}") if n in self.procs for p in tree(self.procs[n].pid)]
        return stop_pids(pids, signals=(signal.SIGKILL,))

    def list_runs(self) -> dict[int, str] | None:
        """run id -> status from `flwr list --format json`; None when the SuperLink does not answer."""
        return parse_runs(self._flwr("list", FEDERATION, "--format", "json", check=False).stdout)

    def stop(self) -> list[int]:
        """Stop every process this deployment started, and their children, by pid."""
        stopped = stop_pids([p for proc in self.procs.values() for p in tree(proc.pid)])
        for proc in self.procs.values():
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)  # reap them
        return stopped

    def __enter__(self) -> LocalDeployment:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def _output_root(run_config: str) -> Path | None:
    for part in shlex.split(run_config):
        if part.startswith("output-dir="):
            value = part.split("=", 1)[1].strip("'\"")
            return Path(value) if value else None
    return None


def _rounds_done(output_root: Path, since: float = 0.0) -> int:
    """Rows in the newest metrics.csv under output_root written after `since` (one per finished round)."""
    csvs = sorted((p for p in output_root.glob("*/metrics.csv") if p.stat().st_mtime >= since),
                  key=lambda p: p.stat().st_mtime)
    if not csvs:
        return 0
    try:
        return max(0, len(csvs[-1].read_text().strip().splitlines()) - 1)
    except OSError:
        return 0


def _output_dir(log: str, output_root: Path | None) -> Path | None:
    """Where the ServerApp said it wrote its results, else the newest run folder under output_root."""
    said = _said_output_dir(log)
    if said is not None or not output_root:
        return said
    runs = sorted(output_root.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return runs[-1].parent if runs else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="collafuse-deploy", description=__doc__.split("\n\n")[0])
    p.add_argument("--num-nodes", type=int, default=3, help="SuperNodes to start (default 3)")
    common_args(p, "num-server-rounds=2 cut-ratio=0.4", timeout=1800)
    p.add_argument("--workdir", type=Path, default=None,
                   help="folder for FLWR_HOME, certificates, keys, logs and outputs (default: a new temp dir, kept)")
    p.add_argument("--node-config", action="append", default=None,
                   help="one per node, in order; or once, for every node, after the default "
                        "partition-id=K num-partitions=N (e.g. \"methods='collafuse,local,fedavg'\")")
    p.add_argument("--per-node-data", action="store_true",
                   help="write each node its own digits image folder and start it with "
                        "--node-config \"data-dir='<its folder>' dataset='imagefolder'\"")
    p.add_argument("--isolation", choices=ISOLATIONS, default="subprocess",
                   help="subprocess, process: stock Flower (a ClientApp process per message); warm: scripts/"
                        "flwr142_warm.py, one long-lived worker per SuperNode (rounds ~20 s faster; Flower 1.42)")
    p.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    p.add_argument("--no-auth", action="store_true", help="TLS but no SuperNode authentication")
    p.add_argument("--database", default=None, help="SuperLink --database file (default: in memory)")
    p.add_argument("--kill-node-after-round", type=int, default=None,
                   help="SIGKILL the last SuperNode once this many rounds are in metrics.csv")
    p.add_argument("--quiet", action="store_true",
                   help="do not stream the run's log (the commands are still printed; the log is in logs/flwr-run.log)")
    a = p.parse_args(argv)
    if not (a.app / "pyproject.toml").is_file():
        p.error(f"--app {a.app} has no pyproject.toml; point it at a Flower app folder")
    if a.preset:
        a.run_config = with_preset(a.preset, a.run_config)
    given = a.node_config or []
    if len(given) not in (0, 1, a.num_nodes):
        p.error(f"{len(given)} --node-config for {a.num_nodes} nodes: give one per node, or one for every node")
    if len(given) == 1 < a.num_nodes and "state-dir" in given[0]:
        p.error("one --node-config for every node names state-dir: the nodes would share their secret, upload "
                "ledger and private state; give one per node, or leave state-dir out (each gets its own)")
    workdir = (a.workdir or Path(tempfile.mkdtemp(prefix="collafuse-deploy-"))).resolve()
    node_configs = given or None
    if a.per_node_data:
        from collafuse_flwr.tools.node_folders import write_node_folders
        folders = write_node_folders(workdir / "node-data", a.num_nodes)
        extra = given if len(given) == a.num_nodes else given * a.num_nodes or [""] * a.num_nodes
        node_configs = [f"data-dir='{f}' dataset='imagefolder' {e}".strip() for f, e in zip(folders, extra)]
        if "dataset=" not in a.run_config:  # the folders hold scikit-learn digits: score them as digits
            a.run_config = f"dataset='digits' {a.run_config}".strip()
    elif len(given) == 1 < a.num_nodes:  # one for all: each node keeps its own partition
        node_configs = [f"partition-id={k} num-partitions={a.num_nodes} {given[0]}" for k in range(a.num_nodes)]
    dep = LocalDeployment(workdir, a.num_nodes, node_configs, tls=not a.insecure,
                          auth=not (a.insecure or a.no_auth), isolation=a.isolation, database=a.database)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with dep:
            out = dep.run(a.app, a.run_config, a.timeout, a.kill_node_after_round, stream=not a.quiet)
    except KeyboardInterrupt:
        print("\ncollafuse-deploy: interrupted; every process it started is stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\nrun {out.run_id}: {out.status}")
    print(f"outputs: {out.output_dir}")
    print(f"logs, certificates, keys, FLWR_HOME: {workdir}")
    return 0 if out.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
