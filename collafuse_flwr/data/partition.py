"""Split one `ImageDataset` into per-client train/test index sets.

The splits go through flwr-datasets partitioners so that they match what other Flower
baselines do for the same scheme (same Dirichlet sampler, same IID sharding). The
partitioners work on a small in-memory HuggingFace `datasets.Dataset` of row indices and
labels (plus attribute columns), never on the images themselves.

Schemes:
- "iid": shuffle with the seed, then equal contiguous shards (`IidPartitioner`).
- "dirichlet": per-class Dirichlet(alpha) shares (`DirichletPartitioner`); small alpha gives
  very different label mixes per client.
- "by-class": client k holds the classes in its group, the CollaFuse setting where each client
  generates its own kind of image. Default groups are contiguous runs of classes,
  e.g. {0,1},{2,3},... for 10 classes and 5 clients, because they read better than
  round-robin deals; with more clients than classes, client k gets class k mod C.
- "by-attribute": client k holds images having ANY attribute in its group (CelebA-style,
  as in the CollaFuse paper). Default groups are the paper's five CelebA groups.

For both group schemes an image that several groups claim goes to one of them, drawn with the
seed: first-match-wins would hand nearly all of CelebA to the hair-colour client. Images no
group claims are left out.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from collafuse_flwr.config import PARTITIONINGS
from collafuse_flwr.data.dataset import ImageDataset
from collafuse_flwr.data.splits import ClientSplit

CELEBA_PAPER_GROUPS: list[list[str]] = [
    ["Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"],
    ["Wearing_Necklace", "Wearing_Earrings"],
    ["Wavy_Hair", "Straight_Hair", "Bangs"],
    ["Bushy_Eyebrows", "Arched_Eyebrows"],
    ["Eyeglasses", "Narrow_Eyes"],
]


class GroupPartitioner(Partitioner):
    """Partition k takes the rows its group claims; flwr-datasets has no explicit-group scheme.

    Why not flwr-datasets' `PathologicalPartitioner`: it gives partition k a window of classes
    (k, k+1, ... with "first-deterministic"/"deterministic", or random ones) and cannot take the
    groups a user names ('0,1;2,3', class names, CelebA attributes); its windows overlap and
    leave classes out (measured, 5 partitions x 2 of 10 classes: "deterministic" gives
    {0,1},{1,2},{2,3},{3,4},{4,5} and drops 6..9) where CollaFuse's setting needs client k to
    own {2k, 2k+1}. Nor can it claim rows by boolean attribute columns.

    With `partition_by` set, a group lists values of that column (by-class: label indices).
    Without it, a group lists 0/1 columns and claims rows where any of them is 1
    (by-attribute). A row claimed by several groups goes to one of them, drawn uniformly
    with `seed`, so overlapping groups share rows evenly; unclaimed rows belong to nobody.
    """

    def __init__(self, groups: Sequence[Sequence[Any]], partition_by: str | None = None, seed: int = 0) -> None:
        super().__init__()
        if not groups:
            raise ValueError("GroupPartitioner needs at least one group")
        self._groups = [list(g) for g in groups]
        self._partition_by = partition_by
        self._seed = seed
        self._partition_id_to_indices: list[np.ndarray] | None = None

    @property
    def num_partitions(self) -> int:
        return len(self._groups)

    def load_partition(self, partition_id: int) -> datasets.Dataset:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id {partition_id} is out of range 0..{self.num_partitions - 1}")
        if self._partition_id_to_indices is None:
            self._partition_id_to_indices = self._assign()
        return self.dataset.select(self._partition_id_to_indices[partition_id])

    def _assign(self) -> list[np.ndarray]:
        n, k = self.dataset.num_rows, len(self._groups)
        member = np.zeros((n, k), dtype=bool)
        if self._partition_by is not None:
            values = np.asarray(self.dataset[self._partition_by])
            for j, group in enumerate(self._groups):
                member[:, j] = np.isin(values, group)
        else:
            for j, group in enumerate(self._groups):
                for column in group:
                    member[:, j] |= np.asarray(self.dataset[column]).astype(bool)
        counts = member.sum(axis=1)
        pick = np.floor(np.random.default_rng(self._seed).random(n) * counts).astype(np.int64)
        owner = np.argmax(member.cumsum(axis=1) > pick[:, None], axis=1)
        owner[counts == 0] = -1
        return [np.flatnonzero(owner == j) for j in range(k)]


def parse_groups(spec: str) -> list[list[str]]:
    """'0,1;2,3' -> [['0','1'], ['2','3']]: the run-config string form of client groups."""
    if not isinstance(spec, str):
        raise TypeError(f"groups spec must be a string like '0,1;2,3', got {type(spec).__name__}")
    if not spec.strip():
        return []
    groups = []
    for i, chunk in enumerate(spec.split(";")):
        items = [item.strip() for item in chunk.split(",")]
        if not chunk.strip() or any(not item for item in items):
            raise ValueError(
                f"group {i} of {spec!r} is empty or has an empty entry; write groups as "
                f"'a,b;c,d' (';' between clients, ',' within a client)"
            )
        groups.append(items)
    return groups


def partition_dataset(
    ds: ImageDataset,
    num_clients: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    test_fraction: float = 0.2,
    groups: list[list[str]] | None = None,
) -> list[ClientSplit]:
    """Split `ds` among `num_clients`; each client's share is then split into train/test.

    Deterministic for fixed inputs and `seed`. Each client's test part is `test_fraction` of
    its images (at least 1 train and 1 test image when it has 2 or more and test_fraction > 0).
    `groups` applies to "by-class" (class names or indices, as strings) and "by-attribute"
    (attribute names); None or [] picks the defaults described in the module docstring.
    """
    if scheme not in PARTITIONINGS:
        raise ValueError(f"unknown partitioning {scheme!r}; choose one of {', '.join(PARTITIONINGS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients = int(num_clients)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n = len(ds)
    if num_clients > n:
        raise ValueError(
            f"num_clients={num_clients} exceeds the {n} images of {ds.name}; use fewer clients or load more images"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if not alpha > 0:
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha!r}")
    groups = groups or None
    if groups is not None and scheme in ("iid", "dirichlet"):
        raise ValueError(
            f"groups={groups!r} only apply to by-class/by-attribute partitioning, not {scheme!r}; drop them"
        )

    labels = ds.labels.numpy().astype(np.int64)
    columns: dict[str, Any] = {"idx": np.arange(n, dtype=np.int64), "label": labels}
    partitioner: Partitioner
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    elif scheme == "dirichlet":
        # Enough images per client for a train/test split, without making the sampler
        # reject most draws on small datasets.
        min_size = max(2 if test_fraction > 0 else 1, min(10, n // (2 * num_clients)))
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    elif scheme == "by-class":
        class_groups = _class_groups(ds, num_clients, groups)
        partitioner = GroupPartitioner(class_groups, partition_by="label", seed=seed)
    else:
        attr_groups = _attribute_groups(ds, num_clients, groups)
        assert ds.attributes is not None and ds.attribute_names is not None
        attrs = ds.attributes.numpy()
        for name in sorted({a for g in attr_groups for a in g}):
            columns[name] = attrs[:, ds.attribute_names.index(name)].astype(bool)
        partitioner = GroupPartitioner(attr_groups, partition_by=None, seed=seed)

    table = datasets.Dataset.from_dict(columns)
    partitioner.dataset = table.shuffle(seed=seed) if scheme == "iid" else table
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            shares = [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as exc:
        if scheme != "dirichlet":
            raise
        raise ValueError(
            f"Dirichlet partitioning with alpha={alpha} could not give each of {num_clients} clients "
            f"at least {min_size} of the {n} images ({exc}); raise alpha, use fewer clients or load more images"
        ) from exc

    for client_id, share in enumerate(shares):
        if len(share) == 0:
            raise ValueError(f"client {client_id} gets no images under {scheme!r}{_empty_hint(scheme, groups)}")
    return [_split_train_test(cid, share, test_fraction, seed) for cid, share in enumerate(shares)]


def _empty_hint(scheme: str, groups: list[list[str]] | None) -> str:
    if scheme in ("by-class", "by-attribute"):
        which = "its group" if groups else "its default group"
        return f": no image matches {which} (or overlapping groups took them all); change the groups or load more images"
    return "; use fewer clients or load more images"


def _class_groups(ds: ImageDataset, num_clients: int, groups: list[list[str]] | None) -> list[list[int]]:
    num_classes = len(ds.class_names)
    if groups is None:
        if num_clients <= num_classes:
            return [chunk.tolist() for chunk in np.array_split(np.arange(num_classes), num_clients)]
        return [[k % num_classes] for k in range(num_clients)]
    _check_group_count(groups, num_clients)
    resolved = []
    for g, group in enumerate(groups):
        ids = []
        for entry in group:
            entry = str(entry).strip()
            if entry in ds.class_names:
                ids.append(ds.class_names.index(entry))
            elif entry.isdigit() and int(entry) < num_classes:
                ids.append(int(entry))
            else:
                raise ValueError(
                    f"group {g} names unknown class {entry!r}; {ds.name} classes are "
                    f"{', '.join(ds.class_names)} (or their indices 0..{num_classes - 1})"
                )
        resolved.append(sorted(set(ids)))
    return resolved


def _attribute_groups(ds: ImageDataset, num_clients: int, groups: list[list[str]] | None) -> list[list[str]]:
    if ds.attributes is None or ds.attribute_names is None:
        raise ValueError(
            f"by-attribute partitioning needs per-image attributes, which {ds.name} does not have; "
            f"use celeba or awa2 (with its predicate files), or by-class partitioning"
        )
    if groups is None:
        if num_clients != len(CELEBA_PAPER_GROUPS) or not all(
            a in ds.attribute_names for g in CELEBA_PAPER_GROUPS for a in g
        ):
            raise ValueError(
                f"by-attribute has default groups only for CelebA with {len(CELEBA_PAPER_GROUPS)} clients "
                f"(the CollaFuse paper's); give {num_clients} groups of {ds.name} attribute names, "
                f"e.g. 'Black_Hair,Blond_Hair;Eyeglasses'"
            )
        return [list(g) for g in CELEBA_PAPER_GROUPS]
    _check_group_count(groups, num_clients)
    for g, group in enumerate(groups):
        for entry in group:
            if entry not in ds.attribute_names:
                raise ValueError(
                    f"group {g} names unknown attribute {entry!r}; {ds.name} attributes are "
                    f"{', '.join(ds.attribute_names)}"
                )
    return [list(dict.fromkeys(g)) for g in groups]


def _check_group_count(groups: list[list[str]], num_clients: int) -> None:
    if len(groups) != num_clients:
        raise ValueError(
            f"got {len(groups)} groups for {num_clients} clients; give exactly one group per client "
            f"(';' separates clients in the run config)"
        )
    for g, group in enumerate(groups):
        if not group:
            raise ValueError(f"group {g} is empty; every client needs at least one class or attribute")


def _split_train_test(client_id: int, share: np.ndarray, test_fraction: float, seed: int) -> ClientSplit:
    """Seeded per client so that one client's split does not depend on the others."""
    rng = np.random.default_rng([seed, client_id])
    perm = rng.permutation(share)
    n = len(perm)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return ClientSplit(
        client_id=client_id,
        train_idx=np.sort(perm[n_test:]).astype(np.int64),
        test_idx=np.sort(perm[:n_test]).astype(np.int64),
    )
