"""Split one `ImageDataset` into per-client train/test index sets. iid and dirichlet use flwr-datasets'
partitioners, matching other Flower baselines. The group schemes give client k the rows its group
claims, by class (default {0,1},{2,3},...; class k mod C beyond C clients) or by ANY attribute (default:
the paper's CelebA groups), which flwr-datasets' `PathologicalPartitioner` cannot (its class windows
overlap and drop classes). A row several groups claim goes to one drawn with the seed (first-match-wins
would hand nearly all of CelebA to the hair-colour client); unclaimed rows are left out."""

from __future__ import annotations

import warnings

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

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


def _group_shares(member: np.ndarray, seed: int) -> list[np.ndarray]:
    """Rows of each group (member: rows x groups, bool); overlapping groups share their rows evenly."""
    n, k = member.shape
    counts = member.sum(axis=1)
    pick = np.floor(np.random.default_rng(seed).random(n) * counts).astype(np.int64)
    owner = np.argmax(member.cumsum(axis=1) > pick[:, None], axis=1)
    owner[counts == 0] = -1
    return [np.flatnonzero(owner == j) for j in range(k)]


def parse_groups(spec: str) -> list[list[str]]:
    """'0,1;2,3' -> [['0','1'], ['2','3']]: the run-config string form of client groups."""
    if not spec.strip():
        return []
    groups = [[item.strip() for item in chunk.split(",")] for chunk in spec.split(";")]
    for i, items in enumerate(groups):
        if not all(items):
            raise ValueError(f"group {i} of {spec!r} is empty or has an empty entry; write groups as "
                             f"'a,b;c,d' (';' between clients, ',' within a client)")
    return groups


def partition_dataset(ds: ImageDataset, num_clients: int, scheme: str = "iid", seed: int = 0, alpha: float = 0.5,
                      test_fraction: float = 0.2, groups: list[list[str]] | None = None) -> list[ClientSplit]:
    """Split `ds` among `num_clients`, each share into train/test (>= 1 of each from 2 images when
    test_fraction > 0). `groups`: class names/indices or attribute names; None or [] = the defaults."""
    if scheme not in PARTITIONINGS:
        raise ValueError(f"unknown partitioning {scheme!r}; choose one of {', '.join(PARTITIONINGS)}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    num_clients = int(num_clients)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n = len(ds)
    if num_clients > n:
        raise ValueError(f"num_clients={num_clients} exceeds the {n} images of {ds.name}; "
                         f"use fewer clients or load more images")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if not alpha > 0:
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha!r}")
    groups = groups or None
    if groups is not None and scheme in ("iid", "dirichlet"):
        raise ValueError(f"groups={groups!r} only apply to by-class/by-attribute partitioning, "
                         f"not {scheme!r}; drop them")

    if scheme == "by-class":
        shares = _group_shares(_class_members(ds, num_clients, groups), seed)
    elif scheme == "by-attribute":
        shares = _group_shares(_attribute_members(ds, num_clients, groups), seed)
    else:
        shares = _flwr_shares(ds.labels.numpy().astype(np.int64), num_clients, scheme, seed, alpha, test_fraction)
    for client_id, share in enumerate(shares):
        if len(share) == 0:
            hint = (f": no image matches {'its group' if groups else 'its default group'} (or overlapping groups "
                    f"took them all); change the groups or load more images" if scheme.startswith("by-")
                    else "; use fewer clients or load more images")
            raise ValueError(f"client {client_id} gets no images under {scheme!r}{hint}")
    return [_split_train_test(cid, share, test_fraction, seed) for cid, share in enumerate(shares)]


def _flwr_shares(labels: np.ndarray, num_clients: int, scheme: str, seed: int, alpha: float,
                 test_fraction: float) -> list[np.ndarray]:
    """iid / dirichlet shares through flwr-datasets' partitioners, on a table of row indices."""
    n = len(labels)
    table = datasets.Dataset.from_dict({"idx": np.arange(n, dtype=np.int64), "label": labels})
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
        partitioner.dataset = table.shuffle(seed=seed)
        return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]
    # enough images per client for a train/test split, without rejecting most draws on small datasets
    min_size = max(2 if test_fraction > 0 else 1, min(10, n // (2 * num_clients)))
    partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=float(alpha),
                                       min_partition_size=min_size, self_balancing=False, shuffle=True, seed=seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The specified min_partition_size")
            return [np.asarray(partitioner.load_partition(i)["idx"], dtype=np.int64) for i in range(num_clients)]
    except ValueError as exc:
        raise ValueError(
            f"Dirichlet partitioning with alpha={alpha} could not give each of {num_clients} clients "
            f"at least {min_size} of the {n} images ({exc}); raise alpha, use fewer clients or load more images"
        ) from exc


def _class_members(ds: ImageDataset, num_clients: int, groups: list[list[str]] | None) -> np.ndarray:
    """rows x clients: whether the image's class is in the client's group."""
    num_classes = len(ds.class_names)

    def class_id(g: int, entry: str) -> int:
        if entry in ds.class_names:
            return ds.class_names.index(entry)
        if entry.isdigit() and int(entry) < num_classes:
            return int(entry)
        raise ValueError(f"group {g} names unknown class {entry!r}; {ds.name} classes are "
                         f"{', '.join(ds.class_names)} (or their indices 0..{num_classes - 1})")
    if groups is None:
        ids = (np.array_split(np.arange(num_classes), num_clients) if num_clients <= num_classes
               else [[k % num_classes] for k in range(num_clients)])
    else:
        _check_group_count(groups, num_clients)
        ids = [[class_id(g, str(e).strip()) for e in group] for g, group in enumerate(groups)]
    return np.stack([np.isin(ds.labels.numpy(), g) for g in ids], axis=1)


def _attribute_members(ds: ImageDataset, num_clients: int, groups: list[list[str]] | None) -> np.ndarray:
    """rows x clients: whether the image has any attribute of the client's group."""
    if ds.attributes is None or ds.attribute_names is None:
        raise ValueError(f"by-attribute partitioning needs per-image attributes, which {ds.name} does not have; "
                         f"use celeba or awa2 (with its predicate files), or by-class partitioning")
    if groups is None:
        if num_clients != len(CELEBA_PAPER_GROUPS) or not all(
                a in ds.attribute_names for g in CELEBA_PAPER_GROUPS for a in g):
            raise ValueError(
                f"by-attribute has default groups only for CelebA with {len(CELEBA_PAPER_GROUPS)} clients "
                f"(the CollaFuse paper's); give {num_clients} groups of {ds.name} attribute names, "
                f"e.g. 'Black_Hair,Blond_Hair;Eyeglasses'")
        groups = CELEBA_PAPER_GROUPS
    _check_group_count(groups, num_clients)
    for g, group in enumerate(groups):
        for entry in group:
            if entry not in ds.attribute_names:
                raise ValueError(f"group {g} names unknown attribute {entry!r}; {ds.name} attributes are "
                                 f"{', '.join(ds.attribute_names)}")
    attrs = ds.attributes.numpy().astype(bool)
    return np.stack([attrs[:, [ds.attribute_names.index(a) for a in g]].any(axis=1) for g in groups], axis=1)


def _check_group_count(groups: list[list[str]], num_clients: int) -> None:
    if len(groups) != num_clients:
        raise ValueError(f"got {len(groups)} groups for {num_clients} clients; give exactly one group per client "
                         f"(';' separates clients in the run config)")


def _split_train_test(client_id: int, share: np.ndarray, test_fraction: float, seed: int) -> ClientSplit:
    """Seeded per client so that one client's split does not depend on the others."""
    perm = np.random.default_rng([seed, client_id]).permutation(share)
    n = len(perm)
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 2:
        n_test = min(max(n_test, 1), n - 1)
    return ClientSplit(client_id=client_id, train_idx=np.sort(perm[n_test:]).astype(np.int64),
                       test_idx=np.sort(perm[:n_test]).astype(np.int64))
