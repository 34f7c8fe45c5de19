"""One tiny `flwr run` (simulation engine) for the end-to-end tests, checked the same way each
time: the run finished ok by Flower's own record, its results folder is where we asked, and the
SuperLink the launcher started is no longer listening."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

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


def check_outputs(run_dir: Path, res: dict, method: str, num_clients: int, rounds: int = 2) -> dict:
    """What every finished simulation writes: results.json's final figures (FID on the digit net,
    per client), one metrics.csv row per round, every client's samples and their grid; the final
    figures."""
    assert res["status"] == "ok" and res["method"] == method
    assert res["num_clients"] == num_clients and res["num_rounds"] == rounds and res["diffusion_steps"] == 20
    f = res["final"]
    for key in ("fid", "fid_per_client", "fid_backbone", "kid", "client_train_flops",
                "client_infer_flops_per_image", "server_train_flops", "bytes_up", "bytes_down", "disclosure"):
        assert key in f, key
    assert f["fid_backbone"] == "digits-cnn"
    assert len(f["fid_per_client"]) == num_clients and all(v > 0 for v in f["fid_per_client"].values())
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert [r["round"] for r in rows] == [str(r) for r in range(1, rounds + 1)]
    s = np.load(run_dir / "samples.npz")
    samples = preset("tiny")["num-eval-samples"]
    assert s["images"].dtype == np.uint8 and s["images"].shape == (num_clients * samples, 8, 8, 1)
    assert sorted(set(s["client"].tolist())) == list(range(num_clients))
    assert (run_dir / "samples.png").stat().st_size > 1000
    return f
