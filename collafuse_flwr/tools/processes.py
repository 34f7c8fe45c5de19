"""Find and stop every process a `flwr run` started (Linux: read from /proc).

Why not a process tree: the SuperLink, SuperExec, flwr-simulation and Ray's processes start in new
sessions and re-parent to init when a parent dies first. So every process the launcher starts
inherits a token in its environment, and runs are stopped by that mark, by the SuperLink's ports
and by process tree, then checked in /proc.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

#: environment variable that marks every process of one launcher run (value: a random token)
MARK = "COLLAFUSE_RUN_TOKEN"


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _pids_where(test: Callable[[int], bool]) -> list[int]:
    """The pids `test` holds for; a process that vanished or is not ours (OSError) fails it."""
    out = []
    for pid in _all_pids():
        try:
            if test(pid):
                out.append(pid)
        except OSError:
            continue
    return out


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, ..."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a zombie has exited; only its parent's wait is due)."""
    fields = _stat(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def pids_listening_on(port: int) -> list[int]:
    """pids of processes holding a listening socket on `port`."""
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
    if not inodes:
        return []
    sockets = {f"socket:[{inode}]" for inode in inodes}
    return _pids_where(lambda pid: any(os.readlink(fd) in sockets for fd in Path(f"/proc/{pid}/fd").iterdir()))


def tree(pid: int) -> list[int]:
    """`pid` and every process below it in the parent tree, as it is now."""
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        fields = _stat(p)
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(p)
    out, todo = [pid], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def marked(*marks: str) -> list[int]:
    """Processes of this user whose environment holds any of `marks` ("KEY=value" entries)."""
    needles = {m.encode() for m in marks if m}
    return _pids_where(lambda pid: bool(needles & set(Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))))


def name(pid: int) -> str:
    """The script for Python processes, the binary otherwise, Ray's title for its workers (ray::...)."""
    try:
        argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return "?"
    if not argv:
        return "?"
    if argv[0].startswith("ray::"):
        return argv[0].split()[0]
    prog = Path(argv[0]).name
    if prog.startswith("python") and len(argv) > 1:
        script = next((a for a in argv[1:] if not a.startswith("-")), prog)
        return Path(script).name
    return prog


def summarize(names: list[str]) -> str:
    """'flower-superlink, raylet, 3 x ray::ClientAppActor' (first seen first)."""
    return ", ".join(n if c == 1 else f"{c} x {n}" for n, c in Counter(names).items())


def stop_pids(pids: list[int], grace: float = 10.0,
              signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGKILL)) -> list[int]:
    """Send each signal in turn to `pids`, waiting up to `grace` s for them to go; returns `pids`."""
    for sig in signals:
        for p in pids:
            if alive(p):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
    return pids


def find_run(marks: list[str], ports: list[int], trees: list[int] = (), groups: list[int] = ()) -> list[int]:
    """Every live process of one run: marked (and a marked raylet's agents), listening on `ports` (and
    their trees), below `trees` (only unreaped children: a reaped pid may be reused), in `groups`."""
    found: set[int] = set(marked(*marks)) if marks else set()
    # Ray's agents get a trimmed environment that drops the token but names their raylet
    raylets = [p for p in found if name(p) == "raylet"]
    if raylets:
        found.update(marked(*(f"RAY_RAYLET_PID={p}" for p in raylets)))
    for root in [p for port in ports for p in pids_listening_on(port)] + list(trees):
        found.update(tree(root))
    # a child started with start_new_session leads its own process group
    found.update(p for p in _all_pids() if (f := _stat(p)) and len(f) > 2 and int(f[2]) in groups)
    found.discard(os.getpid())
    return sorted(p for p in found if alive(p))


def stop_run(marks: list[str], ports: list[int], trees: list[int] = (), groups: list[int] = (),
             grace: float = 10.0, rounds: int = 3) -> tuple[list[str], list[int]]:
    """SIGTERM every process of the run, SIGKILL what is left after `grace` s, and look again (Ray may
    start a worker meanwhile), up to `rounds` times. Returns (names stopped, pids still alive)."""
    names: dict[int, str] = {}
    for _ in range(rounds):
        pids = find_run(marks, ports, trees, groups)
        if not pids:
            break
        for p in pids:
            names.setdefault(p, name(p))
        stop_pids(pids, grace)
        trees = [t for t in trees if alive(t)]
    return list(names.values()), find_run(marks, ports, trees, groups)
