"""Client partitions: coverage, disjointness, determinism, scheme semantics and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse_flwr.data.dataset import ImageDataset
from collafuse_flwr.data.partition import (
    CELEBA_PAPER_GROUPS,
    PARTITIONINGS,
    ClientSplit,
    parse_groups,
    partition_dataset,
)


def _toy(n: int = 200, num_classes: int = 10, attributes: list[str] | None = None, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    attrs = None
    if attributes is not None:
        attrs = torch.from_numpy(rng.integers(0, 2, size=(n, len(attributes))).astype(np.int8))
    return ImageDataset(
        images=torch.zeros(n, 1, 4, 4, dtype=torch.uint8),
        labels=torch.from_numpy(np.arange(n) % num_classes).long(),
        name="toy",
        class_names=[f"c{i}" for i in range(num_classes)] if num_classes != 10 else [str(i) for i in range(10)],
        attributes=attrs,
        attribute_names=attributes,
    )


def _all(splits: list[ClientSplit]) -> np.ndarray:
    return np.concatenate([np.concatenate([s.train_idx, s.test_idx]) for s in splits])


def _same(a: list[ClientSplit], b: list[ClientSplit]) -> bool:
    return all(
        np.array_equal(x.train_idx, y.train_idx) and np.array_equal(x.test_idx, y.test_idx) for x, y in zip(a, b)
    )


def test_parse_groups():
    assert parse_groups("0,1;2,3") == [["0", "1"], ["2", "3"]]
    assert parse_groups("") == [] and parse_groups("  ") == []
    assert parse_groups(" Black_Hair , Blond_Hair ; Eyeglasses") == [["Black_Hair", "Blond_Hair"], ["Eyeglasses"]]
    with pytest.raises(ValueError, match="group 1"):
        parse_groups("0,1;;2")
    with pytest.raises(ValueError, match="empty entry"):
        parse_groups("0,,1")


def test_iid_balanced_disjoint_covering():
    ds = _toy(203)
    splits = partition_dataset(ds, 4, "iid", seed=1)
    sizes = [len(s.train_idx) + len(s.test_idx) for s in splits]
    assert max(sizes) - min(sizes) <= 1
    everything = _all(splits)
    assert sorted(everything.tolist()) == list(range(203))
    for s in splits:
        assert s.train_idx.dtype == np.int64 and s.test_idx.dtype == np.int64
        assert not set(s.train_idx) & set(s.test_idx)
        assert len(s.test_idx) == round(0.2 * (len(s.train_idx) + len(s.test_idx)))
    assert [s.client_id for s in splits] == [0, 1, 2, 3]


def test_iid_determinism_and_seed():
    ds = _toy(100)
    a = partition_dataset(ds, 3, "iid", seed=5)
    assert _same(a, partition_dataset(ds, 3, "iid", seed=5))
    assert not _same(a, partition_dataset(ds, 3, "iid", seed=6))


@settings(max_examples=20, deadline=None)
@given(num_clients=st.integers(1, 12), seed=st.integers(0, 2**16), n=st.integers(12, 60))
def test_iid_property_exact_cover(num_clients, seed, n):
    splits = partition_dataset(_toy(n), num_clients, "iid", seed=seed)
    assert len(splits) == num_clients
    assert sorted(_all(splits).tolist()) == list(range(n))
    for s in splits:
        if len(s.train_idx) + len(s.test_idx) >= 2:
            assert len(s.train_idx) >= 1 and len(s.test_idx) >= 1


def test_dirichlet_deterministic_and_non_iid():
    ds = _toy(500)
    a = partition_dataset(ds, 4, "dirichlet", seed=3, alpha=0.1)
    assert _same(a, partition_dataset(ds, 4, "dirichlet", seed=3, alpha=0.1))
    assert sorted(_all(a).tolist()) == list(range(500))
    labels = ds.labels.numpy()
    hists = np.stack(
        [np.bincount(labels[np.concatenate([s.train_idx, s.test_idx])], minlength=10) for s in a]
    ).astype(float)
    hists /= hists.sum(axis=1, keepdims=True)
    # With alpha = 0.1 label mixes differ a lot from the uniform 0.1 per class.
    assert np.abs(hists - 0.1).max() > 0.2


def test_by_class_default_groups_contiguous():
    ds = _toy(200)
    splits = partition_dataset(ds, 5, "by-class")
    labels = ds.labels.numpy()
    for k, s in enumerate(splits):
        held = set(labels[np.concatenate([s.train_idx, s.test_idx])].tolist())
        assert held == {2 * k, 2 * k + 1}
    assert sorted(_all(splits).tolist()) == list(range(200))


def test_by_class_explicit_groups_names_and_indices():
    ds = _toy(120, num_classes=4)
    splits = partition_dataset(ds, 2, "by-class", groups=[["c0", "2"], ["c1", "c2"]], seed=7)
    labels = ds.labels.numpy()
    held = [set(labels[np.concatenate([s.train_idx, s.test_idx])].tolist()) for s in splits]
    assert held[0] <= {0, 2} and held[1] <= {1, 2}
    assert 0 in held[0] and 1 in held[1]
    everything = _all(splits)
    assert len(everything) == len(set(everything.tolist()))  # shared class 2 split, not duplicated
    assert 3 not in set(labels[everything].tolist())  # unclaimed class left out
    assert _same(splits, partition_dataset(ds, 2, "by-class", groups=[["c0", "2"], ["c1", "c2"]], seed=7))


def test_by_class_more_clients_than_classes():
    ds = _toy(60, num_classes=3)
    splits = partition_dataset(ds, 6, "by-class")
    labels = ds.labels.numpy()
    for k, s in enumerate(splits):
        assert set(labels[np.concatenate([s.train_idx, s.test_idx])].tolist()) == {k % 3}


def test_by_attribute_groups():
    names = ["A", "B", "C", "D"]
    ds = _toy(300, attributes=names)
    attrs = ds.attributes.numpy().astype(bool)
    groups = [["A", "B"], ["C"], ["D"]]
    splits = partition_dataset(ds, 3, "by-attribute", groups=groups, seed=2)
    for s, group in zip(splits, groups):
        own = np.concatenate([s.train_idx, s.test_idx])
        cols = [names.index(a) for a in group]
        assert attrs[own][:, cols].any(axis=1).all()
        assert not set(s.train_idx) & set(s.test_idx)
    everything = _all(splits)
    assert len(everything) == len(set(everything.tolist()))
    claimed = attrs.any(axis=1)
    assert set(everything.tolist()) == set(np.flatnonzero(claimed).tolist())
    assert _same(splits, partition_dataset(ds, 3, "by-attribute", groups=groups, seed=2))


def test_by_attribute_celeba_default_groups():
    names = sorted({a for g in CELEBA_PAPER_GROUPS for a in g} | {"Smiling"})
    ds = _toy(400, attributes=names)
    splits = partition_dataset(ds, 5, "by-attribute")
    assert len(splits) == 5 and all(len(s.train_idx) > 0 for s in splits)
    with pytest.raises(ValueError, match="default groups only for CelebA"):
        partition_dataset(ds, 4, "by-attribute")


def test_test_fraction_zero_and_tiny_clients():
    ds = _toy(10)
    splits = partition_dataset(ds, 5, "iid", test_fraction=0.0)
    assert all(len(s.test_idx) == 0 and len(s.train_idx) == 2 for s in splits)
    splits = partition_dataset(ds, 5, "iid", test_fraction=0.01)
    assert all(len(s.test_idx) == 1 and len(s.train_idx) == 1 for s in splits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "random"}, "unknown partitioning 'random'.*by-attribute"),
        ({"num_clients": 0}, "num_clients must be"),
        ({"num_clients": 21}, "exceeds the 20 images"),
        ({"test_fraction": 1.0}, r"test_fraction must be in \[0, 1\)"),
        ({"test_fraction": -0.1}, "test_fraction"),
        ({"alpha": 0.0, "scheme": "dirichlet"}, "alpha"),
        ({"seed": -1}, "seed"),
        ({"scheme": "by-class", "groups": [["0"], ["1"]]}, "2 groups for 3 clients"),
        ({"scheme": "by-class", "groups": [["0"], ["1"], ["cat"]]}, "unknown class 'cat'.*0, 1, 2"),
        ({"scheme": "by-class", "groups": [["0"], ["1"], ["10"]]}, "unknown class '10'"),
        ({"scheme": "by-attribute"}, "needs per-image attributes"),
        ({"scheme": "iid", "groups": [["0"], ["1"], ["2"]]}, "only apply to by-class"),
    ],
)
def test_errors(kwargs, match):
    args = {"num_clients": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition_dataset(_toy(20), **args)


def test_error_unknown_attribute_lists_valid():
    ds = _toy(50, attributes=["A", "B"])
    with pytest.raises(ValueError, match="unknown attribute 'Z'.*A, B"):
        partition_dataset(ds, 2, "by-attribute", groups=[["A"], ["Z"]])


def test_error_empty_client_names_it():
    ds = _toy(50, num_classes=5)
    # class 4 exists in class_names but no image has it -> client 1 is empty
    ds.labels[ds.labels == 4] = 3
    with pytest.raises(ValueError, match="client 1 gets no images.*change the groups"):
        partition_dataset(ds, 2, "by-class", groups=[["c0"], ["c4"]])


def test_schemes_listed():
    assert PARTITIONINGS == ("iid", "dirichlet", "by-class", "by-attribute")


def test_error_dirichlet_unsatisfiable():
    with pytest.raises(ValueError, match="raise alpha, use fewer clients"):
        partition_dataset(_toy(20), 9, "dirichlet", alpha=0.01)
