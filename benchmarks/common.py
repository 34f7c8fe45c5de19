"""What every benchmark shares: run-config overrides read as `flwr run --run-config` reads them,
the machine a number was measured on, and the JSON record with a PASS/FAIL."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import platform
import shlex
import sys
import tomllib
import warnings
from pathlib import Path
from typing import Any

from collafuse_flwr.harness.outputs import write_json
from collafuse_flwr.tools.launch import APP_DIR

RESULTS_DIR = Path(__file__).resolve().parent / "results"


class BenchmarkError(RuntimeError):
    """A benchmark cannot go on; the message says why and what to change."""


def parse_overrides(text: str | None) -> dict[str, Any]:
    """`"key=value key2='str'"` as `flwr run --run-config` reads it (values are TOML); a bare word
    that is no TOML value (`method=fedavg`) is taken as a string, so shell quoting is optional."""
    out: dict[str, Any] = {}
    for token in shlex.split(text or ""):
        key, eq, raw = token.partition("=")
        if not eq or not key.strip():
            raise BenchmarkError(f"run-config override {token!r} is not key=value "
                                 f"(e.g. --extra \"local-steps=20 model-size='tiny'\")")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw
    return out


def validate_overrides(overrides: dict[str, Any]):
    """The app's RunConfig for `overrides` now, not 40 s into a Flower run; BenchmarkError says why."""
    from collafuse_flwr.config import ConfigError, parse_config

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return parse_config(dict(overrides))
    except ConfigError as exc:
        raise BenchmarkError(f"bad run-config: {exc}") from None


def read_json(path: Path) -> dict[str, Any]:
    """A record's content, or {} when it is missing or half-written."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def in_process_grid():
    """tests/inprocess.py's InProcessGrid (tests/ is no package: loaded by path, once)."""
    if "inprocess" not in sys.modules:
        spec = importlib.util.spec_from_file_location("inprocess", APP_DIR / "tests" / "inprocess.py")
        sys.modules["inprocess"] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    return sys.modules["inprocess"].InProcessGrid


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare timings: OS, CPU, usable cores, memory, library versions."""
    mem_kb = (_proc_field("/proc/meminfo", "MemTotal") or "0 kB").split()[0]
    info: dict[str, Any] = {"platform": platform.platform(), "processor": _proc_field("/proc/cpuinfo", "model name"),
                            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                            "memory_gb": round(int(mem_kb) / 1024**2, 1), "python": platform.python_version()}
    for mod in ("torch", "flwr", "ray", "diffusers", "numpy"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing library only leaves its field out
            pass
    if "torch" in info:
        import torch

        info.update(cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    torch_threads=torch.get_num_threads())
    return info


def _proc_field(path: str, name: str) -> str | None:
    try:
        return next(ln.split(":", 1)[1].strip() for ln in Path(path).read_text().splitlines() if ln.startswith(name))
    except (OSError, StopIteration):
        return None


def command_line() -> str:
    """How this process was started, as a command to paste (`python -m benchmarks.x ...`)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        try:
            argv[0] = "python -m " + ".".join(Path(argv[0]).resolve().relative_to(APP_DIR).with_suffix("").parts)
        except ValueError:
            argv[0] = "python " + argv[0]
    return " ".join([argv[0], *map(shlex.quote, argv[1:])]) if argv else ""


def fmt_seconds(s: float | None) -> str:
    """12.3s, 3m05s, 1h02m."""
    if s is None or not math.isfinite(s):
        return "?"
    if s < 60:
        return f"{max(0.0, s):.1f}s"
    m, sec = divmod(int(round(s)), 60)
    return f"{m}m{sec:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def print_checks(checks: dict[str, bool]) -> bool:
    """One PASS/FAIL line per check; whether all passed."""
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return all(checks.values())


def pyplot():
    """matplotlib.pyplot on the file-only backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    pyplot().close(fig)


def write_result(path: Path, result: dict[str, Any]) -> None:
    """A benchmark's JSON record (with the command and the machine), into a folder made if need be."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"command": command_line(), **result, "machine": machine_info()})
    print(f"wrote {path}")
