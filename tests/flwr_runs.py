"""One tiny `flwr run` (simulation engine) for the end-to-end tests, checked the same way each
time: the run finished ok by Flower's own record, its results folder is where we asked, and the
SuperLink the launcher started is no longer listening."""

from __future__ import annotations

import json
from pathlib import Path

from collafuse_flwr.config import preset, run_config_text
from collafuse_flwr.tools.launch import run_flower
from collafuse_flwr.tools.precheck import parse_overrides
from collafuse_flwr.tools.processes import pids_listening_on


def tiny_run_config(extra: str = "") -> str:
    """The tiny preset (collafuse_flwr/presets/tiny.toml) with `extra`'s keys added or replaced, as
    `--run-config` text (a key given twice would be a TOML error to Flower)."""
    return run_config_text({**preset("tiny"), **parse_overrides(extra)})


def run_tiny(tmp_path: Path, extra: str, num_clients: int = 2) -> tuple[Path, dict]:
    """`flwr run` the tiny preset with `extra`'s keys added or replaced; (run folder, results.json)."""
    out = run_flower(f"{tiny_run_config(extra)} output-dir='{tmp_path}'", num_clients=num_clients,
                     flwr_home=tmp_path / "flwr-home", timeout=600, stream=False)
    assert out.ok, f"run failed: status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    assert out.output_dir is not None and out.output_dir.parent == tmp_path
    assert not pids_listening_on(out.control_port) and not pids_listening_on(out.http_port)
    res = json.loads((out.output_dir / "results.json").read_text())
    assert res["status"] == "ok", res.get("error")
    return out.output_dir, res
