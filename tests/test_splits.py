"""The on-disk memo of partitions returns exactly what partitioning computes, and only for the
same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse_flwr.data.dataset import ImageDataset
from collafuse_flwr.data.load import load_dataset
from collafuse_flwr.data.partition import partition_dataset
from collafuse_flwr.data.splits import cache_dir, memoised_splits, split_key

PARAMS = {"scheme": "dirichlet", "seed": 3, "alpha": 0.5, "test_fraction": 0.2, "groups": ""}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAFUSE_FLWR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "splits"


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits", image_size=8)


def _compute(ds, calls):
    def compute():
        calls.append(1)
        return partition_dataset(ds, 4, "dirichlet", seed=3, alpha=0.5, test_fraction=0.2)
    return compute


def test_second_call_reads_the_stored_result_unchanged(cache, digits):
    calls: list[int] = []
    first = memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    second = memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    assert calls == [1]
    assert len(list(cache.glob("*.npz"))) == 1
    for a, b in zip(first, second):
        assert a.client_id == b.client_id
        np.testing.assert_array_equal(a.train_idx, b.train_idx)
        np.testing.assert_array_equal(a.test_idx, b.test_idx)
        assert b.train_idx.dtype == np.int64


def test_any_input_change_changes_the_key(digits):
    base = split_key(digits, 4, PARAMS)
    assert split_key(digits, 5, PARAMS) != base
    assert split_key(digits, 4, {**PARAMS, "seed": 4}) != base
    assert split_key(digits, 4, {**PARAMS, "alpha": 0.6}) != base
    labels = digits.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    relabelled = ImageDataset(digits.images, labels, digits.name, digits.class_names)
    assert split_key(relabelled, 4, PARAMS) != base
    with_attrs = ImageDataset(digits.images, digits.labels, digits.name, digits.class_names,
                              torch.zeros(len(digits), 2, dtype=torch.uint8), ["a", "b"])
    assert split_key(with_attrs, 4, PARAMS) != base


def test_a_corrupt_entry_is_recomputed_and_replaced(cache, digits):
    calls: list[int] = []
    good = memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    (entry,) = cache.glob("*.npz")
    entry.write_bytes(b"not an npz")
    again = memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    assert calls == [1, 1]
    np.testing.assert_array_equal(again[2].train_idx, good[2].train_idx)
    assert memoised_splits(digits, 4, PARAMS, _compute(digits, calls))[2].test_idx.tolist() == \
        good[2].test_idx.tolist() and calls == [1, 1]


def test_off_switch_and_unwritable_cache_still_compute(tmp_path, monkeypatch, digits):
    monkeypatch.setenv("COLLAFUSE_FLWR_CACHE", "off")
    assert cache_dir() is None
    calls: list[int] = []
    memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    assert calls == [1, 1]
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("COLLAFUSE_FLWR_CACHE", str(blocker))
    out = memoised_splits(digits, 4, PARAMS, _compute(digits, calls))
    assert len(out) == 4 and calls == [1, 1, 1]
