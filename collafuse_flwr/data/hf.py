"""`dataset = "hf:<Hub id or local path>"`: a Hugging Face dataset, loaded through flwr-datasets
(from the Hub, its cache with HF_HUB_OFFLINE=1, a `save_to_disk` folder or parquet/csv/image files),
then partitioned by `partition.py` like every other dataset. Columns ("" = detect): the first
`datasets.Image` one; "label" or the first `ClassLabel` (none: label 0); bools become attributes."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from collafuse_flwr.data.dataset import DEFAULT_JPEG_SIZE, GRAY_MODES, HF_PREFIX, ImageDataset, square_uint8
from collafuse_flwr.imports import load

_LOCAL_HINT = ("a local copy: dataset='hf:/abs/path' to a folder written by datasets.save_to_disk, "
               "or to parquet/csv/image files")


def _source(source: str) -> dict[str, Any]:
    """FederatedDataset's `dataset` and `data_files` for a Hub id or a local path."""
    if not (source.startswith(("/", ".", "~")) or os.path.exists(source)):
        return {"dataset": source}
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"dataset='{HF_PREFIX}{source}': {path} does not exist; give {_LOCAL_HINT}, "
                                f"or a Hugging Face Hub id such as 'hf:ylecun/mnist'")
    if path.is_file():
        builder = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json",
                   ".arrow": "arrow"}.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"dataset='{HF_PREFIX}{source}': cannot read a {path.suffix!r} file; give {_LOCAL_HINT}")
        return {"dataset": builder, "data_files": {"train": str(path)}}
    if (path / "dataset_dict.json").is_file():  # save_to_disk of a DatasetDict: one folder per split
        splits = [d.name for d in sorted(path.iterdir()) if (d / "state.json").is_file()]
        return {"dataset": "arrow", "data_files": {s: _arrow_files(path / s) for s in splits}}
    if (path / "state.json").is_file():  # save_to_disk of one Dataset
        return {"dataset": "arrow", "data_files": {"train": _arrow_files(path)}}
    return {"dataset": str(path)}


def _arrow_files(folder: Path) -> list[str]:
    """The shards save_to_disk wrote, without hidden files (a copy from macOS adds `._*.arrow`)."""
    return sorted(str(p) for p in folder.glob("*.arrow") if not p.name.startswith("."))


@contextlib.contextmanager
def _hub_errors(source: str) -> Iterator[None]:
    """An unreachable or unknown Hub dataset as one line saying what to do."""
    try:
        yield
    except ConnectionError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        state = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else \
            "the Hugging Face Hub cannot be reached and it is not in the local cache"
        raise ConnectionError(f"dataset='{HF_PREFIX}{source}': {state} ({' '.join(str(exc).split())}). "
                              f"Go online once to cache it (later runs work with HF_HUB_OFFLINE=1), or use "
                              f"{_LOCAL_HINT}") from exc
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"dataset='{HF_PREFIX}{source}' was not found ({' '.join(str(exc).split())}); "
                                f"check the Hub id, or use {_LOCAL_HINT}") from exc


def check_hf_source(source: str) -> None:
    """Start-of-run check (metadata only) that an hf: dataset can be had, with loading's one-line errors."""
    kwargs = _source(source)  # a local path: checked for existence here
    if "data_files" in kwargs or Path(kwargs["dataset"]).exists():
        return
    with _hub_errors(source):
        load("datasets").load_dataset_builder(kwargs["dataset"])


def _columns(table, image_column: str, label_column: str, source: str) -> tuple[str, str | None]:
    datasets = load("datasets")
    feats = table.features
    where = f"dataset='{HF_PREFIX}{source}' (columns: {', '.join(feats)})"
    for arg, column in (("image-column", image_column), ("label-column", label_column)):
        if column and column not in feats:
            raise ValueError(f"{arg}={column!r} is not a column of {where}")
    if not image_column:
        images = [c for c, f in feats.items() if isinstance(f, datasets.Image)]
        if not images:
            raise ValueError(f"no column with the datasets.Image feature in {where}; set image-column")
        image_column = images[0]
    if label_column or "label" in feats:
        return image_column, label_column or "label"
    labels = [c for c, f in feats.items() if isinstance(f, datasets.ClassLabel)]
    return image_column, labels[0] if labels else None


def load_hf(source: str, split: str, limit: int | None, image_size: int | None, mode: str,
            image_column: str = "", label_column: str = "") -> ImageDataset:
    """The first `limit` rows of `split`, decoded to uint8 squares of PIL `mode` ("": the first image's)."""
    datasets = load("datasets")
    iid = load("flwr_datasets.partitioner").IidPartitioner(num_partitions=1)  # partition.py splits later
    fds = load("flwr_datasets").FederatedDataset(partitioners={split: iid}, shuffle=False, **_source(source))
    with _hub_errors(source):
        try:
            table = fds.load_split(split)
        except ValueError as exc:
            if "split" in str(exc).lower():
                raise ValueError(f"dataset='{HF_PREFIX}{source}' has no split {split!r} ({exc})") from exc
            raise
    image_column, label_column = _columns(table, image_column, label_column, source)
    if limit is not None:
        table = table.select(range(min(limit, table.num_rows)))
    if table.num_rows == 0:
        raise ValueError(f"dataset='{HF_PREFIX}{source}' split {split!r} has no rows")
    pil = table[image_column]
    mode = mode or ("L" if pil[0].mode in GRAY_MODES else "RGB")
    size = image_size or (pil[0].size[0] if pil[0].size[0] == pil[0].size[1] else DEFAULT_JPEG_SIZE)
    images = torch.from_numpy(np.stack([square_uint8(im, size, mode) for im in pil]))
    if label_column is None:
        labels, class_names = np.zeros(table.num_rows, dtype=np.int64), ["all"]
    elif isinstance(table.features[label_column], datasets.ClassLabel):
        labels, class_names = np.asarray(table[label_column], dtype=np.int64), table.features[label_column].names
    else:  # plain values: classes are the sorted distinct values
        uniq, labels = np.unique(np.asarray(table[label_column]), return_inverse=True)
        class_names = [str(v) for v in uniq]
    flags = [c for c, f in table.features.items()
             if isinstance(f, datasets.Value) and f.dtype == "bool" and c != label_column]
    attributes = torch.from_numpy(np.stack([np.asarray(table[c], dtype=np.int8) for c in flags], 1)) if flags else None
    return ImageDataset(images=images, labels=torch.as_tensor(labels, dtype=torch.int64),
                        name=f"{HF_PREFIX}{source}", class_names=list(class_names),
                        attributes=attributes, attribute_names=flags or None)
