"""`dataset = "hf:..."`: Hugging Face datasets through flwr-datasets' FederatedDataset.

Local copies are built here in the forms users have them (save_to_disk folders, parquet, image
files); the Hub path is exercised for real with HF_HUB_OFFLINE=1 and an empty cache, where it
must fail with one line that says what to do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

datasets = pytest.importorskip("datasets")

from collafuse_flwr.data.load import load_dataset  # noqa: E402
from collafuse_flwr.data.partition import partition_dataset  # noqa: E402

COLORS = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}  # class -> colour of its images


@pytest.fixture(autouse=True)
def hf_cache(monkeypatch, tmp_path):
    """Keep Hugging Face's cache of converted local files out of the user's home."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    return cache


def make_table(n: int = 12, size: tuple[int, int] = (10, 12)) -> datasets.Dataset:
    """n RGB images of 3 classes (each a solid colour), plus a boolean attribute column."""
    labels = [i % 3 for i in range(n)]
    images = [Image.new("RGB", size, COLORS[c]) for c in labels]
    features = datasets.Features({"img": datasets.Image(), "fine": datasets.ClassLabel(names=["r", "g", "b"]),
                                  "Smiling": datasets.Value("bool"), "note": datasets.Value("string")})
    return datasets.Dataset.from_dict({"img": images, "fine": labels, "Smiling": [i % 2 == 0 for i in range(n)],
                                       "note": [f"row {i}" for i in range(n)]}, features=features)


def _check_colours(ds) -> None:
    for img, label in zip(ds.images, ds.labels.tolist()):
        want = np.array(COLORS[label], dtype=np.int64)
        assert np.abs(img.numpy().reshape(3, -1).mean(1) - want).max() < 2


def test_save_to_disk_dataset_dict_with_splits(tmp_path):
    table = make_table()
    datasets.DatasetDict({"train": table, "test": table.select(range(3))}).save_to_disk(str(tmp_path / "dd"))
    ds = load_dataset(f"hf:{tmp_path / 'dd'}", image_size=8)
    assert ds.images.shape == (12, 3, 8, 8) and ds.name == f"hf:{tmp_path / 'dd'}"
    assert ds.class_names == ["r", "g", "b"] and ds.labels.tolist() == [i % 3 for i in range(12)]
    assert ds.attribute_names == ["Smiling"] and ds.attributes[:, 0].tolist() == [1, 0] * 6
    _check_colours(ds)
    test = load_dataset(f"hf:{tmp_path / 'dd'}", image_size=8, split="test", channels=1)
    assert test.images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="no split 'valid'"):
        load_dataset(f"hf:{tmp_path / 'dd'}", split="valid")
    (tmp_path / "dd" / "train" / "._data-00000-of-00001.arrow").write_bytes(b"\0\5\26\7 AppleDouble")  # a macOS copy
    assert load_dataset(f"hf:{tmp_path / 'dd'}", image_size=8).images.shape == (12, 3, 8, 8)


def test_single_dataset_parquet_and_image_folder(tmp_path):
    table = make_table()
    table.save_to_disk(str(tmp_path / "one"))
    table.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for c, colour in COLORS.items():  # load_dataset's imagefolder layout: one sub-folder per class
        for i in range(2):
            (tmp_path / "imgs" / f"class{c}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 6), colour).save(tmp_path / "imgs" / f"class{c}" / f"{i}.png")
    for source in ("one", "pq", "pq/train.parquet"):
        ds = load_dataset(f"hf:{tmp_path / source}", image_size=8, max_samples=5)
        assert ds.images.shape == (5, 3, 8, 8) and ds.labels.tolist() == [0, 1, 2, 0, 1]
        _check_colours(ds)
    folder = load_dataset(f"hf:{tmp_path / 'imgs'}")  # native 6 px, square
    assert folder.images.shape == (6, 3, 6, 6) and folder.class_names == ["class0", "class1", "class2"]
    _check_colours(folder)


def test_columns_named_or_detected(tmp_path):
    table = make_table().rename_column("fine", "label")  # "label" is picked before other columns
    table.save_to_disk(str(tmp_path / "t"))
    src = f"hf:{tmp_path / 't'}"
    assert load_dataset(src, image_size=4).class_names == ["r", "g", "b"]
    by_note = load_dataset(src, image_size=4, label_column="note")  # plain values: sorted distinct
    assert len(by_note.class_names) == 12 and by_note.class_names[0] == "row 0"
    with pytest.raises(ValueError, match="image-column='photo' is not a column.*img, label, Smiling, note"):
        load_dataset(src, image_column="photo")
    with pytest.raises(ValueError, match="label-column='y' is not a column"):
        load_dataset(src, label_column="y")


def test_hf_partitions_with_the_project_partitioners(tmp_path):
    make_table(30).save_to_disk(str(tmp_path / "t"))
    ds = load_dataset(f"hf:{tmp_path / 't'}", image_size=4)
    by_class = partition_dataset(ds, 3, scheme="by-class", seed=0, test_fraction=0.2)
    for k, split in enumerate(by_class):
        idx = np.concatenate([split.train_idx, split.test_idx])
        assert set(ds.labels[idx].tolist()) == {k} and len(idx) == 10
    by_attr = partition_dataset(ds, 1, scheme="by-attribute", groups=[["Smiling"]], test_fraction=0.2)
    idx = np.concatenate([by_attr[0].train_idx, by_attr[0].test_idx])
    assert sorted(idx.tolist()) == list(range(0, 30, 2))


def test_local_path_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*save_to_disk"):
        load_dataset(f"hf:{tmp_path / 'absent'}")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read a '.txt' file"):
        load_dataset(f"hf:{tmp_path / 'x.txt'}")
    make_table().save_to_disk(str(tmp_path / "t"))
    with pytest.raises(ValueError, match="download=true is for the torchvision datasets"):
        load_dataset(f"hf:{tmp_path / 't'}", download=True)


def test_hub_offline_fails_with_one_clear_line(tmp_path):
    """The real Hub code path, not mocked: offline and not cached, it says what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_DATASETS_CACHE", None)
    code = "from collafuse_flwr.data.load import load_dataset; load_dataset('hf:ylecun/mnist', image_size=8)"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ConnectionError: dataset='hf:ylecun/mnist': HF_HUB_OFFLINE is set")
    assert "Go online once to cache it" in last and "save_to_disk" in last


def _local_hf(folder: Path, mode: str, n: int = 40) -> Path:
    """A save_to_disk dataset of n `mode` images ("L" or "RGB") in 4 classes."""
    rng = np.random.default_rng(0)
    labels = [i % 4 for i in range(n)]
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3) if mode == "RGB" else (8, 8), dtype=np.uint8), mode)
              for _ in labels]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("abcd"))})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=feats).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGB", 3)])
def test_channels_come_from_the_data_not_the_name(tmp_path, tiny_config, mode, channels):
    """Naively the channel count was guessed from the dataset's name: a gray X-ray set trained
    as RGB, and anything called "...mnist..." as gray. A gray `hf:` dataset now trains with one
    channel and an RGB one with three, whatever they are called; the nodes declare theirs."""
    import torch

    from collafuse_flwr.client_app import app
    from collafuse_flwr.config import parse_config
    from collafuse_flwr.data.client_data import run_channels
    from collafuse_flwr.server.build import build_strategy
    from inprocess import InProcessGrid
    from strategies import NotAdmitted

    name = "fake-mnist-rgb" if mode == "RGB" else "xray-scans"  # a name that would have fooled the guess
    rc = tiny_config(dataset=f"hf:{_local_hf(tmp_path / name, mode)}", num_server_rounds=1, partitioning="iid",
                     count_flops=False, cut_ratio=0.5)
    cfg = parse_config(rc)
    assert run_channels(cfg) == channels
    strategy, arrays = build_strategy(cfg, 2, torch.device("cpu"), harness=False)
    assert strategy.image_shape == (channels, 8, 8)
    grid = InProcessGrid(app, rc, 2)
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    assert len(strategy.registry.index) == 2 and not strategy.recorder.rejected
    x = next(iter(strategy.buffer.values()))[0]
    assert x.shape[1] == channels
    # a node with the other channel count is refused at first contact, naming the fix
    other = 3 if channels == 1 else 1
    with pytest.raises(NotAdmitted, match=f"image-channels={channels}"):
        strategy.accept_hello(1, {"image-channels": other})
