"""A node's own data: its partition of the configured dataset, train and held-out test.

Every node loads and partitions the same dataset with the same seed, then keeps only its own
partition. Results are cached per process, because Ray actors serve many virtual nodes, and
the index sets are memoised on disk (`splits.py`) so a worker start need not recompute them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from torch import Tensor

from .config import RunConfig
from .data import ImageDataset, load_dataset, to_model_range
from .splits import ClientSplit, memoised_splits


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
def _dataset(name: str, data_dir: str, image_size: int, max_samples: int) -> ImageDataset:
    return load_dataset(name, data_dir or None, image_size=image_size, max_samples=max_samples or None)


@lru_cache(maxsize=4)
def _splits(cfg: RunConfig, num_partitions: int) -> tuple[ClientSplit, ...]:
    ds = _dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.max_samples)
    # one dict is both the memo key and the partitioner's arguments, so they cannot drift apart
    params = {"scheme": cfg.partitioning, "seed": cfg.seed, "alpha": cfg.dirichlet_alpha,
              "test_fraction": cfg.test_fraction, "groups": cfg.client_groups}

    def compute() -> list[ClientSplit]:
        # imported here: flwr-datasets costs seconds to import and a memo hit does not need it
        from .partition import parse_groups, partition_dataset

        return partition_dataset(ds, num_partitions, **{**params, "groups": parse_groups(cfg.client_groups) or None})

    return tuple(memoised_splits(ds, num_partitions, params, compute))


def dataset_for(cfg: RunConfig) -> ImageDataset:
    return _dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.max_samples)


def all_splits(cfg: RunConfig, num_partitions: int) -> tuple[ClientSplit, ...]:
    return _splits(cfg, num_partitions)


def client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}; "
                         f"set node_config partition-id/num-partitions consistently")
    ds = dataset_for(cfg)
    split = _splits(cfg, num_partitions)[partition_id]
    train = ds.images[np.asarray(split.train_idx)]
    test = ds.images[np.asarray(split.test_idx)]
    return ClientData(partition_id, train, test, to_model_range(train))
