"""`load_dataset`: any known dataset, by name, into one `ImageDataset`: `hf:` through flwr-datasets
(`hf.py`), files on disk through torchvision (`vision.py`) or embedded data (`embedded.py`). Bad
arguments fail before any file is read, naming the value and the fix."""

from __future__ import annotations

from pathlib import Path

from collafuse_flwr.config import DATASETS
from collafuse_flwr.data import hf as hf_loader
from collafuse_flwr.data import vision
from collafuse_flwr.data.dataset import (
    _DOWNLOADABLE,
    _EMBEDDED,
    DEFAULT_JPEG_SIZE,
    HF_PREFIX,
    NATIVE_CHANNELS,
    ImageDataset,
    canonical_name,
    convert_channels,
    resize_uint8,
)
from collafuse_flwr.data.embedded import load_digits, load_mnist5k

# Splits each dataset understands; "all" means every image the files hold.
_SPLITS: dict[str, tuple[str, ...]] = {**dict.fromkeys(("digits", "mnist5k", "awa2", "imagefolder"), ("train", "all")),
                                       **dict.fromkeys(("mnist", "fashion-mnist", "cifar10"), ("train", "test")),
                                       "celeba": ("train", "valid", "test", "all")}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


def load_dataset(name: str, data_dir: str | None = None, image_size: int | None = None, split: str = "train",
                 max_samples: int | None = None, channels: int | None = None, *, download: bool = False,
                 image_column: str = "", label_column: str = "") -> ImageDataset:
    """One of `DATASETS`, or `hf:<Hub id or local path>`, in memory. image_size None keeps the native size
    (64 for JPEG datasets, center-cropped square first); max_samples (None/0 = all) keeps the first images,
    round-robin over classes for class folders (and mnist5k) so no class is dropped; channels 1/3 converts."""
    key = _known(name)
    hf = key.startswith(HF_PREFIX)
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
    size = image_size or DEFAULT_JPEG_SIZE
    mode = {1: "L", 3: "RGB"}.get(channels or NATIVE_CHANNELS.get(key, 0), "")  # "": the files' own

    if hf:
        ds = hf_loader.load_hf(key[len(HF_PREFIX):], split, limit, image_size, mode, image_column, label_column)
    elif key in _EMBEDDED:
        ds = load_digits(limit) if key == "digits" else load_mnist5k(limit)
    else:
        if data_dir is None or not str(data_dir).strip():
            raise ValueError(f"dataset {key!r} needs data_dir (the embedded ones are {', '.join(_EMBEDDED)}). "
                             f"{vision.LAYOUTS[key].format(d='<data_dir>')}; or set download=true where "
                             f"torchvision can fetch it")
        root = Path(data_dir).expanduser().resolve()
        if download:
            root.mkdir(parents=True, exist_ok=True)
        if not root.is_dir():
            raise vision.missing(key, root, f"data_dir {root} does not exist or is not a folder")
        ds = {"mnist": lambda: vision.load_mnist_like(key, root, split, limit, download),
              "fashion-mnist": lambda: vision.load_mnist_like(key, root, split, limit, download),
              "cifar10": lambda: vision.load_cifar10(root, split, limit, download),
              "celeba": lambda: vision.load_celeba(root, split, limit, size, mode, download),
              "awa2": lambda: vision.load_awa2(root, limit, size, mode),
              }.get(key, lambda: vision.load_imagefolder(root, limit, size, mode))()

    if image_size is not None and ds.image_size != image_size:
        ds.images = resize_uint8(ds.images, image_size)
    if channels is not None and ds.channels != channels:
        ds.images = convert_channels(ds.images, channels)
    return ds


def check_dataset(name: str) -> None:
    """Cheap start-of-run check: an unknown name, or an `hf:` dataset neither reachable nor cached."""
    key = _known(name)
    if key.startswith(HF_PREFIX):
        hf_loader.check_hf_source(key[len(HF_PREFIX):])


def _known(name: str) -> str:
    key = canonical_name(name)
    if not key.startswith(HF_PREFIX) and key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, "
                         f"or {HF_PREFIX}<Hugging Face id or local path>")
    return key

