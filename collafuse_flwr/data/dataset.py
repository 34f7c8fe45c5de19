"""The one image type every loader returns, and the conversions all of them share. Nothing here
imports a loader (`load.py` picks them), so the data layer has no import circle."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

HF_PREFIX = "hf:"
GRAY_MODES = ("1", "L", "I", "I;16", "F")  # PIL modes read as single-channel
#: Each built-in dataset's own channels (`hf:` and `imagefolder` data are read to find out).
NATIVE_CHANNELS = {"digits": 1, "mnist5k": 1, "mnist": 1, "fashion-mnist": 1, "cifar10": 3, "celeba": 3, "awa2": 3}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
_EMBEDDED = ("digits", "mnist5k")
_DOWNLOADABLE = ("mnist", "fashion-mnist", "cifar10", "celeba")  # torchvision can fetch these
DEFAULT_JPEG_SIZE = 64  # the usual working size for CelebA/AwA2 diffusion
_RESIZE_CHUNK = 4096  # bounds the float32 working memory of converting MNIST-sized sets


@dataclass
class ImageDataset:
    """uint8 images (so even CelebA fits in memory), labels indexing `class_names` (0 without classes),
    and optional per-image binary attributes (CelebA's 40, AwA2's 85) for by-attribute partitioning."""

    images: Tensor
    labels: Tensor
    name: str
    class_names: list[str]
    attributes: Tensor | None = None
    attribute_names: list[str] | None = None

    def __post_init__(self) -> None:
        n, attrs = self.images.shape[0], self.attributes
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be a uint8 tensor N x C x H x W, got {self.images.dtype} "
                             f"with shape {tuple(self.images.shape)}; convert with to_uint8()")
        if self.labels.shape != (n,):
            raise ValueError(f"labels must have shape ({n},) to match the images, got {tuple(self.labels.shape)}")
        if attrs is not None and (attrs.dim() != 2 or attrs.shape[0] != n):
            raise ValueError(f"attributes must have shape ({n}, A), got {tuple(attrs.shape)}")
        if attrs is not None and (self.attribute_names is None or len(self.attribute_names) != attrs.shape[1]):
            raise ValueError(f"attribute_names must name each of the {attrs.shape[1]} attribute "
                             f"columns, got {self.attribute_names!r}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, idx: Sequence[int] | np.ndarray | Tensor) -> ImageDataset:
        """A copy restricted to `idx`, as each client keeps only its own partition."""
        index = torch.as_tensor(np.asarray(idx), dtype=torch.long).reshape(-1)
        return ImageDataset(self.images[index], self.labels[index], self.name, list(self.class_names),
                            None if self.attributes is None else self.attributes[index],
                            None if self.attribute_names is None else list(self.attribute_names))

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    @property
    def image_size(self) -> int:
        """Height in pixels; every loader returns square images."""
        return int(self.images.shape[2])


def canonical_name(name: str) -> str:
    """'Fashion_MNIST' -> 'fashion-mnist'; 'hf:...' is kept as given (a Hub id is case-sensitive)."""
    if not isinstance(name, str):
        raise ValueError(f"dataset must be a string, got {name!r}")
    if name.startswith(HF_PREFIX):
        return name
    key = name.strip().lower().replace("_", "-")
    return {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "mnist-5k": "mnist5k"}.get(key, key)


def round_robin(labels: Sequence[int], limit: int | None) -> list[int]:
    """Row indices, the k-th of every class before any (k+1)-th, cut at `limit` (None: all): a cap drops no class."""
    counters: defaultdict[int, itertools.count] = defaultdict(itertools.count)
    return [i for _, _, i in sorted((next(counters[c]), c, i) for i, c in enumerate(labels))[:limit]]


def resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear with antialias, so downscaling averages pixels rather than aliasing."""
    return torch.cat([F.interpolate(chunk.to(torch.float32), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False).round().clamp(0, 255).to(torch.uint8)
                      for chunk in images.split(_RESIZE_CHUNK)])  # split gives >= 1 chunk, even of 0 images


def convert_channels(images: Tensor, channels: int) -> Tensor:
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, the weights PIL's convert("L") uses.
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return torch.cat([(c.to(torch.float32) * weights).sum(1, keepdim=True).round().clamp(0, 255)
                      for c in images.split(_RESIZE_CHUNK)]).to(torch.uint8)


def square_uint8(img: Image.Image, size: int, mode: str) -> np.ndarray:
    """C x H x W uint8 of a center square crop (CelebA's 178x218 -> 178x178), bicubic-resized."""
    img = img.convert(mode)
    side = min(img.size)
    if img.size != (side, side):
        img = TF.center_crop(img, [side, side])
    if side != size:
        img = TF.resize(img, [size, size], interpolation=InterpolationMode.BICUBIC)
    return TF.pil_to_tensor(img).numpy()
