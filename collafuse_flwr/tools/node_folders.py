"""Each deployment node its own digits folder (ImageFolder layout, `<root>/node-K/<class>/<i>.png`),
non-IID by class, from scikit-learn's bundled digits: a real node holds only its own images, and
the deployment recipe and its test must not download anything.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def class_blocks(num_nodes: int, num_classes: int = 10) -> list[list[int]]:
    """Contiguous class blocks, one per node, covering every class once (needs num_nodes <= classes)."""
    if not 1 <= num_nodes <= num_classes:
        raise ValueError(f"num_nodes must be in 1..{num_classes} to give each node its own classes, "
                         f"got {num_nodes}")
    return [list(b) for b in np.array_split(np.arange(num_classes), num_nodes)]


def write_node_folders(root: Path, num_nodes: int, max_per_class: int = 0) -> list[Path]:
    """One folder per node with only that node's digits; returns the folders (absolute)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images / 16.0 * 255.0, 0, 255).astype(np.uint8)  # 8x8, 0..16 -> 0..255
    folders = []
    for k, classes in enumerate(class_blocks(num_nodes)):
        node = (Path(root) / f"node-{k}").resolve()
        for c in classes:
            idx = np.flatnonzero(digits.target == c)
            if max_per_class:
                idx = idx[:max_per_class]
            (node / str(c)).mkdir(parents=True, exist_ok=True)
            for i in idx:
                Image.fromarray(images[i]).save(node / str(c) / f"{i:04d}.png")
        folders.append(node)
    return folders
