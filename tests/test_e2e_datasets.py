"""The dataset routes end to end through `flwr run`: a local Hugging Face dataset (`hf:<path>`,
written here with `datasets.save_to_disk`), the embedded MNIST-5k (with DP uploads) and the Hub
offline. Tiny on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flwr_runs import tiny_run_config

from collafuse_flwr.tools.launch import run_flower

pytestmark = pytest.mark.e2e

#: over the tiny preset: one short round, CollaFuse at c = 0.3, by class
SHORTER = ("num-server-rounds=1 diffusion-steps=10 local-steps=1 server-steps=1 uploads-per-round=4 batch-size=8 "
           "attack-reference-steps=0 method='collafuse' cut-ratio=0.3 partitioning='by-class'")
NUM_CLIENTS = 2


def _run(tmp_path: Path, extra: str) -> tuple[Path, dict]:
    out = run_flower(f"{tiny_run_config(SHORTER + ' ' + extra)} output-dir='{tmp_path / 'runs'}'",
                     num_clients=NUM_CLIENTS,
                     flwr_home=tmp_path / "flwr-home", timeout=600, stream=False)
    assert out.ok, f"run failed: status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    assert out.output_dir.parent == tmp_path / "runs"  # an hf: path or id makes no nested folders
    return out.output_dir, json.loads((out.output_dir / "results.json").read_text())


def test_hf_local_dataset_through_flwr_run(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))  # the Flower processes inherit it
    rng = np.random.default_rng(0)
    labels = [i % 2 for i in range(24)]
    # class 0 reddish, class 1 bluish, with noise so FID-free runs still see distinct images
    images = [Image.fromarray(np.clip(rng.normal(0, 20, (8, 8, 3)) + (200 * (1 - c), 40, 200 * c), 0, 255)
                              .astype(np.uint8)) for c in labels]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["red", "blue"])})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)}
                         ).save_to_disk(str(tmp_path / "hf-local"))

    run_dir, res = _run(tmp_path, f"dataset='hf:{tmp_path / 'hf-local'}' fid-backbone='none'")
    assert res["status"] == "ok" and res["config"]["dataset"] == f"hf:{tmp_path / 'hf-local'}"
    samples = np.load(run_dir / "samples.npz")
    assert samples["images"].shape == (NUM_CLIENTS * 4, 8, 8, 3)
    assert sorted(set(samples["client"].tolist())) == list(range(NUM_CLIENTS))


def test_mnist5k_with_dp_uploads_through_flwr_run(tmp_path):
    """The embedded MNIST-5k, by class, with every node holding its uploads to epsilon = 4: each
    node uploads at its plan's step t_u (above the run's t_c = 40 of T = 200) and the server
    follows it."""
    extra = ("dataset='mnist5k' max-samples=64 client-groups='0,1,2,3;4,5,6,7' partitioning='by-class' "
             "method='collafuse' diffusion-steps=200 sampling-steps=20 upload-epsilon=4.0 attack-reference-steps=0")
    out = run_flower(f"{tiny_run_config(extra)} output-dir='{tmp_path / 'runs'}'", num_clients=NUM_CLIENTS,
                     flwr_home=tmp_path / "flwr-home", timeout=600, stream=False)
    assert out.ok, f"run failed: status={out.status} rc={out.returncode}\n{out.log[-4000:]}"
    run_dir, res = out.output_dir, json.loads((out.output_dir / "results.json").read_text())
    assert res["status"] == "ok" and res["config"]["dataset"] == "mnist5k"
    final = res["final"]
    from collafuse_flwr.metrics.features import resolve_backbone

    assert final["fid_backbone"] == resolve_backbone("auto", "mnist5k", None)  # a digit net, offline
    assert len(final["fid_per_client"]) == NUM_CLIENTS and all(v > 0 for v in final["fid_per_client"].values())
    assert np.isfinite(final["fid"])
    assert np.load(run_dir / "samples.npz")["images"].shape == (NUM_CLIENTS * 4, 8, 8, 1)
    dp = final["disclosure"]["dp_per_client"]
    assert set(dp) == {"0", "1"}
    for c, plan in dp.items():
        assert plan["target_epsilon"] == 4.0 and plan["epsilon"] <= 4.0
        assert plan["epsilon_realised"] is not None and plan["epsilon_realised"] <= 4.0
        assert res["cut_step_per_client"][c] == plan["t_upload"] > plan["t_cut"] == 40


def test_hub_dataset_offline_stops_the_run_at_start(tmp_path, monkeypatch):
    """The real Hub path, offline and uncached: the ServerApp's start check fails the run before
    any round, with the loader's one-line message in the log."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_DATASETS_CACHE", raising=False)
    rc = tiny_run_config(SHORTER + " dataset='hf:ylecun/mnist'")
    out = run_flower(f"{rc} output-dir='{tmp_path / 'runs'}'", num_clients=NUM_CLIENTS,
                     flwr_home=tmp_path / "flwr-home", timeout=300, stream=False)
    assert not out.ok
    assert "dataset='hf:ylecun/mnist': HF_HUB_OFFLINE is set and it is not in the local cache" in out.log
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.split("-collafuse-c0.3-")[1].startswith("hf-mnist-s0")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "Go online once" in results["error"]
    metrics = run_dir / "metrics.csv"
    assert not metrics.exists() or len(metrics.read_text().splitlines()) <= 1  # no round ran
