"""Helpers the benchmarks share: run-config overrides, machine facts, process-tree memory, durations.

Why a module of its own: every benchmark must talk about run-configs the way `flwr run
--run-config` does (TOML values), describe the machine the same way, and sample memory of a
process tree that includes the SuperLink, the simulation process and Ray's workers.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from collafuse_flwr.harness.outputs import write_json
from collafuse_flwr.tools.launch import APP_DIR

REPO = APP_DIR
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: the main job's settings before its defaults moved to MNIST-5k and 5 rounds: what overhead.json
#: and main_job_variants' digits rows were measured on
OLD_MAIN_JOB: dict[str, Any] = {"dataset": "digits", "num-server-rounds": 8}


class BenchmarkError(RuntimeError):
    """A benchmark cannot go on; the message says why and what to change."""


# -- run-config overrides ----------------------------------------------------------------------------
def parse_overrides(text: str | None) -> dict[str, Any]:
    """Parse `"key=value key2='str'"` the way `flwr run --run-config` does (values are TOML).

    A bare word that is not valid TOML (`method=fedavg`) is taken as a string, so quoting
    inside a shell argument is optional.
    """
    out: dict[str, Any] = {}
    if not text:
        return out
    for token in shlex.split(text):
        if "=" not in token:
            raise BenchmarkError(f"run-config override {token!r} is not key=value "
                                 f"(e.g. --extra \"local-steps=20 model-size='tiny'\")")
        key, raw = token.split("=", 1)
        key = key.strip()
        if not key:
            raise BenchmarkError(f"run-config override {token!r} has no key")
        try:
            out[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = raw
    return out


def format_overrides(cfg: dict[str, Any]) -> str:
    """The inverse of parse_overrides, for printing a command a person can paste."""
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return "'" + v.replace("'", "") + "'"
        return repr(v) if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in cfg.items())


#: Keys the benchmarks set when the app has them (newer app versions), dropped otherwise.
OPTIONAL_KEYS = ("attack-reference-steps",)


def app_keys(overrides: dict[str, Any]) -> dict[str, Any]:
    """`overrides` without the optional keys this version of the app does not know."""
    from collafuse_flwr.config import load_defaults

    known = load_defaults()
    return {k: v for k, v in overrides.items() if k not in OPTIONAL_KEYS or k in known}


def validate_overrides(overrides: dict[str, Any]):
    """Check overrides against the app's schema now, not 40 s later inside a Flower run.

    Returns the parsed RunConfig; raises BenchmarkError with the app's own message.
    """
    from collafuse_flwr.config import ConfigError, parse_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return parse_config(dict(overrides))
    except ConfigError as exc:
        raise BenchmarkError(f"bad run-config: {exc}") from None


# -- machine facts -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClientChain:
    """The steps a CollaFuse client runs at inference, as the ClientApp plans them: it restarts
    at t_start (the authors' client_start_step) and takes `client_steps` of the sampling budget;
    FedAvg's client runs the whole chain in `full_steps` (None: every step)."""

    sched: Any
    t_start: int
    client_steps: int | None
    full_steps: int | None


def client_chain(cfg: Any) -> ClientChain:
    """The client's inference chain for a validated run-config (`validate_overrides`)."""
    from collafuse_flwr.core import diffusion as D  # noqa: N812 - the project's name for it

    T = cfg.diffusion_steps  # noqa: N806 - the paper's name
    _, s_cli = D.split_step_budget(cfg.sampling_steps, T, D.cut_step(cfg.cut_ratio, T))
    return ClientChain(D.make_schedule(T, cfg.beta_schedule), D.client_start_step(cfg.cut_ratio, T, cfg.server_target), s_cli, cfg.sampling_steps or None)


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare timings: OS, CPUs usable by this process, library versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gb": _mem_total_gb(),
        "python": platform.python_version(),
    }
    for mod in ("torch", "flwr", "ray", "diffusers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # a missing optional library only leaves a field out
            pass
    try:
        import torch

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def command_line() -> str:
    """How this process was started, as a pasteable command (`python -m benchmarks.x ...`)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        mod = Path(argv[0]).resolve()
        try:
            rel = mod.relative_to(REPO).with_suffix("")
            argv[0] = "python -m " + ".".join(rel.parts)
        except ValueError:
            argv[0] = "python " + argv[0]
    return " ".join([argv[0], *map(shlex.quote, argv[1:])]) if argv else ""


def fmt_seconds(s: float | None) -> str:
    """1h02m, 3m05s, 12.3s: durations people can read at a glance."""
    if s is None or s != s:
        return "?"
    s = max(0.0, float(s))
    if s < 60:
        return f"{s:.1f}s"
    m, sec = divmod(int(round(s)), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's JSON record, into a folder that may not exist yet; says where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, result)
    print(f"wrote {path}")


# -- memory of a process tree ------------------------------------------------------------------------------
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    return children


def process_tree(root: int) -> list[int]:
    """root and all its descendants (Linux /proc). `flwr run` keeps the SuperLink, SuperExec,
    simulation process and Ray's processes below it, so this is the whole simulation."""
    children = _children_map()
    out, todo = [root], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages (Ray's object store, torch's libraries) counted once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


@dataclass
class MemorySampler:
    """Samples the summed RSS (and PSS) of this process's tree every `interval` seconds.

    RSS summed over processes counts shared pages once per process, so it overstates the
    footprint; it is the conservative number the limit is checked against. PSS is reported
    beside it as the closer estimate of what the machine really spends.
    """

    interval: float = 0.5
    root: int = field(default_factory=os.getpid)
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        pids = process_tree(self.root)
        rss = sum(_rss_bytes(p) for p in pids)
        pss = sum(_pss_bytes(p) for p in pids)
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> MemorySampler:
        if not Path("/proc/self/statm").exists():
            raise BenchmarkError("memory sampling reads /proc: it needs Linux")
        self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def now() -> float:
    return time.perf_counter()
