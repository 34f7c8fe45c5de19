"""One tiny `flwr run` (simulation engine) for the end-to-end tests, checked the same way each
time: the run finished ok by Flower's own record, its results folder is where we asked, and the
SuperLink the launcher started is no longer listening."""

from __future__ import annotations

import json
from pathlib import Path

from collafuse_flwr.tools.launch import _pids_listening_on, run_flower

#: the end-to-end tests' run-config: tiny UNet on 8x8 digits, two short rounds
TINY = ("dataset='digits' num-server-rounds=2 model-size='tiny' image-size=8 local-steps=2 uploads-per-round=8 "
        "num-eval-samples=6 batch-size=16 attack-reference-steps=5")


def tiny_run_config(extra: str) -> str:
    """TINY with `extra`'s keys added or replaced (a key given twice is a TOML error to Flower)."""
    keys = dict(kv.split("=", 1) for kv in f"{TINY} {extra}".split())  # values hold no spaces here
    return " ".join(f"{k}={v}" for k, v in keys.items())


def run_tiny(tmp_path: Path, extra: str, num_clients: int = 2) -> tuple[Path, dict]:
    """`flwr run` TINY with `extra`'s keys added or replaced; (run folder, results.json)."""
    run_config = tiny_run_config(extra)
    out = run_flower(f"{run_config} output-dir='{tmp_path}'", num_clients=num_clients,
                     flwr_home=tmp_path / "flwr-home", timeout=600, stream=False)
    assert out.ok, f"run failed: status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    assert out.output_dir is not None and out.output_dir.parent == tmp_path
    assert not _pids_listening_on(out.control_port) and not _pids_listening_on(out.http_port)
    res = json.loads((out.output_dir / "results.json").read_text())
    assert res["status"] == "ok", res.get("error")
    return out.output_dir, res
