"""A node's own data, train and held-out test: all of its own folder (`data-dir` in node_config, how
a deployment's data owners take part) or its share of a dataset every node partitions alike
(`partition-id`/`num-partitions`). Cached per process, as Ray actors serve many virtual nodes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from collafuse_flwr.config import ConfigError, RunConfig
from collafuse_flwr.core.images import to_model_range
from collafuse_flwr.data.dataset import NATIVE_CHANNELS, ImageDataset, canonical_name
from collafuse_flwr.data.load import load_dataset
from collafuse_flwr.data.splits import ClientSplit, memoised_splits
from collafuse_flwr.imports import load


@dataclass(frozen=True)
class ClientData:
    partition_id: int
    train_uint8: Tensor  # N x C x H x W, 0..255
    test_uint8: Tensor
    train: Tensor  # float in [-1, 1], what the models see

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.shape[1:])  # type: ignore[return-value]


@lru_cache(maxsize=4)
def _load(name: str, data_dir: str, image_size: int, max_samples: int, channels: int, download: bool,
          image_column: str, label_column: str) -> ImageDataset:
    return load_dataset(name, data_dir or None, image_size=image_size, max_samples=max_samples or None,
                        channels=channels or None, download=download, image_column=image_column,
                        label_column=label_column)


def dataset_for(cfg: RunConfig, name: str | None = None, data_dir: str | None = None) -> ImageDataset:
    """The dataset as the run-config asks for it: image-channels when set, else the data's own."""
    return _load(name or cfg.dataset, cfg.data_dir if data_dir is None else data_dir, cfg.image_size,
                 cfg.max_samples, cfg.image_channels, cfg.download, cfg.image_column, cfg.label_column)


@lru_cache(maxsize=4)
def all_splits(cfg: RunConfig, num_partitions: int) -> tuple[ClientSplit, ...]:
    ds = dataset_for(cfg)
    # one dict is both the memo key and the partitioner's arguments, so they cannot drift apart
    params = {"scheme": cfg.partitioning, "seed": cfg.seed, "alpha": cfg.dirichlet_alpha,
              "test_fraction": cfg.test_fraction, "groups": cfg.client_groups}

    def compute() -> list[ClientSplit]:
        # loaded here: flwr-datasets costs seconds to import and a memo hit does not need it
        partition = load("collafuse_flwr.data.partition")
        groups = partition.parse_groups(cfg.client_groups) or None
        return partition.partition_dataset(ds, num_partitions, **{**params, "groups": groups})

    return tuple(memoised_splits(ds, num_partitions, params, compute))


def run_channels(cfg: RunConfig) -> int:
    """The channels every model of the run sees: image-channels when set, a built-in dataset's own,
    else read from the data (`hf:`, `imagefolder`; the server can read it only in a simulation)."""
    native = cfg.image_channels or NATIVE_CHANNELS.get(canonical_name(cfg.dataset))
    if native:
        return native
    try:
        return dataset_for(cfg).channels
    except Exception as exc:  # noqa: BLE001 - whatever stops the read, the fix is the same
        raise ConfigError(f"image-channels=0 (the data's own) but the ServerApp cannot read dataset="
                          f"{cfg.dataset!r} to find out ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                          f"set image-channels=1 (gray) or 3 (RGB) in the run-config") from None


@lru_cache(maxsize=4)
def own_folder_data(cfg: RunConfig, folder: str, dataset: str, partition_id: int = -1) -> ClientData:
    """All images in the node's own folder, split train/test by `test-fraction` (seeded).
    partition_id: the operator's claim (-1 = none; the server assigns the client index)."""
    if not os.path.isabs(folder):
        raise ValueError(f"node_config data-dir must be an absolute path, got {folder!r}")
    ds = dataset_for(cfg, dataset, folder)
    n = ds.images.shape[0]
    if n < 2:
        raise ValueError(f"node_config data-dir={folder!r} holds {n} image(s); a node needs at least 2 "
                         f"(one to train on, one to test against)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed))
    n_test = min(n - 1, max(1, int(round(cfg.test_fraction * n))))
    train, test = ds.images[perm[n_test:]], ds.images[perm[:n_test]]
    return ClientData(partition_id, train, test, to_model_range(train))


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; "
                         f"set node_config partition-id/num-partitions consistently")
    ds = dataset_for(cfg)
    split = all_splits(cfg, num_partitions)[partition_id]
    train = ds.images[np.asarray(split.train_idx)]
    return ClientData(partition_id, train, ds.images[np.asarray(split.test_idx)], to_model_range(train))
