"""Image datasets for CollaFuse, read from files the user already has.

Every loader returns one in-memory `ImageDataset` of uint8 images (a quarter of the memory of
float32, which matters for CelebA). Only `digits` works out of the box: it ships with
scikit-learn, so tests and the default run need no network. Every other dataset is read from
the standard layout its authors (or torchvision) distribute; this module never downloads, so a
run behaves the same on an offline cluster as on a laptop.

Bad arguments fail before any file is read, with a message that names the bad value and, for
missing files, the layout that is expected.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

DATASETS: tuple[str, ...] = (
    "digits",
    "mnist",
    "fashion-mnist",
    "cifar10",
    "celeba",
    "awa2",
    "imagefolder",
)

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")

# Splits each dataset understands; "all" means every image the files hold.
_SPLITS: dict[str, tuple[str, ...]] = {
    "digits": ("train", "all"),
    "mnist": ("train", "test"),
    "fashion-mnist": ("train", "test"),
    "cifar10": ("train", "test"),
    "celeba": ("train", "valid", "test", "all"),
    "awa2": ("train", "all"),
    "imagefolder": ("train", "all"),
}
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}

# Used only to upscale JPEG datasets whose size the user did not give: 64 px is the usual
# working size for CelebA/AwA2 diffusion and keeps memory modest.
_DEFAULT_JPEG_SIZE = 64
# Resizing MNIST-sized sets in chunks bounds the float32 working memory.
_RESIZE_CHUNK = 4096

_LAYOUTS = {
    "mnist": (
        "MNIST expects train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
        "(t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] for split='test') "
        "in {d} or {d}/MNIST/raw (torchvision's layout)"
    ),
    "fashion-mnist": (
        "Fashion-MNIST expects train-images-idx3-ubyte[.gz] and train-labels-idx1-ubyte[.gz] "
        "(t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz] for split='test') "
        "in {d} or {d}/FashionMNIST/raw (torchvision's layout)"
    ),
    "cifar10": (
        "CIFAR-10 expects the python version: {d}/cifar-10-batches-py/ (or {d} itself) holding "
        "data_batch_1 .. data_batch_5, test_batch and batches.meta "
        "(the extracted cifar-10-python.tar.gz)"
    ),
    "celeba": (
        "CelebA expects {d}/img_align_celeba/*.jpg and {d}/list_attr_celeba.txt, optionally "
        "{d}/list_eval_partition.txt for the train/valid/test split "
        "(the same under {d}/celeba/ is accepted)"
    ),
    "awa2": (
        "AwA2 expects {d}/JPEGImages/<class>/*.jpg, optionally {d}/classes.txt and, for "
        "attributes, {d}/predicates.txt with {d}/predicate-matrix-binary.txt "
        "(the same under {d}/Animals_with_Attributes2/ is accepted)"
    ),
    "imagefolder": (
        "imagefolder expects {d}/<class name>/<image>.png|jpg|jpeg|bmp, one sub-folder per class"
    ),
}
_NEVER_DOWNLOADS = "download them yourself, this tool never downloads"


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


def load_dataset(
    name: str,
    data_dir: str | None = None,
    image_size: int | None = None,
    split: str = "train",
    max_samples: int | None = None,
    channels: int | None = None,
) -> ImageDataset:
    """Load one of `DATASETS` into memory.

    `image_size=None` keeps the native size of digits (8), MNIST (28) and CIFAR-10 (32) and
    uses 64 for the JPEG datasets, which are center-cropped to a square first.
    `max_samples` (None or 0 = all) keeps the first images in file order, which also bounds
    how many JPEGs are decoded; for class-folder datasets (AwA2, imagefolder) the first images
    are taken round-robin over the classes so that a cap does not drop whole classes.
    `channels` (1 or 3) converts gray <-> RGB when the model expects the other.

    `digits` has no official split: `split` "train" and "all" both return all 1,797 images,
    and the partitioner makes each client's train/test split. AwA2 and imagefolder likewise
    return everything for "train"/"all". CelebA without list_eval_partition.txt counts every
    listed image as "train".
    """
    key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key == "cifar-10":
        key = "cifar10"
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    split = _SPLIT_ALIASES.get(split, split)
    if split not in _SPLITS[key]:
        hint = (
            "; it has no official split, the partitioner makes each client's train/test split"
            if "test" not in _SPLITS[key]
            else ""
        )
        raise ValueError(
            f"split {split!r} is not available for {key}; use one of {', '.join(_SPLITS[key])}{hint}"
        )
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ValueError(f"image_size must be an integer >= 4 (or None for the default), got {image_size!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 0):
        raise ValueError(f"max_samples must be a non-negative integer (0 or None = all), got {max_samples!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None (keep the dataset's own), got {channels!r}")
    limit = max_samples or None

    if key == "digits":
        ds = _load_digits(limit)
    else:
        root = _resolve_data_dir(key, data_dir)
        if key in ("mnist", "fashion-mnist"):
            ds = _load_mnist_like(key, root, split, limit)
        elif key == "cifar10":
            ds = _load_cifar10(root, split, limit)
        elif key == "celeba":
            ds = _load_celeba(root, split, limit, image_size or _DEFAULT_JPEG_SIZE, channels)
        elif key == "awa2":
            ds = _load_awa2(root, limit, image_size or _DEFAULT_JPEG_SIZE, channels)
        else:
            ds = _load_imagefolder(root, limit, image_size or _DEFAULT_JPEG_SIZE, channels)

    if image_size is not None and ds.image_size != image_size:
        ds.images = _resize_uint8(ds.images, image_size)
    if channels is not None and ds.channels != channels:
        ds.images = _convert_channels(ds.images, channels)
    return ds


# ----------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------


def _resolve_data_dir(key: str, data_dir: str | None) -> Path:
    if data_dir is None or not str(data_dir).strip():
        layout = _LAYOUTS[key].format(d="<data_dir>")
        raise ValueError(
            f"dataset {key!r} needs data_dir (only 'digits' is built in). {layout}; {_NEVER_DOWNLOADS}"
        )
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        layout = _LAYOUTS[key].format(d=root)
        raise FileNotFoundError(f"data_dir {root} does not exist or is not a folder. {layout}; {_NEVER_DOWNLOADS}")
    return root


def _missing(key: str, root: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}. {_LAYOUTS[key].format(d=root)}; {_NEVER_DOWNLOADS}")


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear with antialias, so downscaling averages pixels rather than aliasing."""
    out = []
    for chunk in images.split(_RESIZE_CHUNK):
        resized = F.interpolate(
            chunk.to(torch.float32), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        out.append(resized.round().clamp(0, 255).to(torch.uint8))
    if not out:
        return images.new_zeros((0, images.shape[1], size, size))
    return torch.cat(out)


def _convert_channels(images: Tensor, channels: int) -> Tensor:
    if channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    # ITU-R 601 luma, the weights PIL's convert("L") uses.
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    out = [(c.to(torch.float32) * weights).sum(1, keepdim=True).round().clamp(0, 255) for c in images.split(_RESIZE_CHUNK)]
    if not out:
        return images[:, :1]
    return torch.cat(out).to(torch.uint8)


def _load_pil(path: Path, size: int, mode: str) -> np.ndarray:
    """Center-crop to a square (CelebA's 178x218 -> 178x178, as is customary) and resize."""
    with Image.open(path) as img:
        img = img.convert(mode)
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
        if s != size:
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _load_images(paths: Sequence[Path], size: int, mode: str) -> Tensor:
    c = 1 if mode == "L" else 3
    out = np.empty((len(paths), c, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            out[i] = _load_pil(path, size, mode)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(out)


def _round_robin(per_class: list[list[Path]], limit: int | None) -> list[tuple[int, Path]]:
    """Class-major (label, path) list; with a cap, take files round-robin over classes."""
    if limit is None:
        return [(c, p) for c, files in enumerate(per_class) for p in files]
    chosen: list[tuple[int, Path]] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(f) for f in per_class):
        for c, files in enumerate(per_class):
            if depth < len(files) and len(chosen) < limit:
                chosen.append((c, files[depth]))
        depth += 1
    return sorted(chosen, key=lambda cp: (cp[0], cp[1].name))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------
# digits (scikit-learn, bundled)
# ----------------------------------------------------------------------------------------


def _load_digits(limit: int | None) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Values are 0..16; 255/16 maps 16 to exactly 255.
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images, labels = images[:limit], bunch.target[:limit]
    return ImageDataset(
        images=torch.from_numpy(images).unsqueeze(1).contiguous(),
        labels=torch.as_tensor(labels, dtype=torch.int64),
        name="digits",
        class_names=[str(i) for i in range(10)],
    )


# ----------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)
# ----------------------------------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803
_IDX_LABELS_MAGIC = 0x00000801


def _find_idx(key: str, root: Path, stem: str) -> Path:
    sub = "MNIST" if key == "mnist" else "FashionMNIST"
    dotted = stem.replace("-idx", ".idx")  # some mirrors ship train-images.idx3-ubyte
    for folder in (root, root / sub / "raw"):
        for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise _missing(key, root, f"{stem}[.gz] not found in {root} or {root / sub / 'raw'}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an IDX file: 4-byte big-endian magic (0x0803 images, 0x0801 labels), dims, bytes."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path} looks gzipped but cannot be decompressed ({exc}); re-download it") from exc
    if len(raw) < 4:
        raise ValueError(f"{path} is too short to be an IDX file ({len(raw)} bytes); re-download it")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        kind = "images" if magic == _IDX_IMAGES_MAGIC else "labels"
        raise ValueError(
            f"{path} has IDX magic 0x{found:08x}, expected 0x{magic:08x} for uint8 {kind}; "
            f"the file is corrupt or not an MNIST-style IDX file, re-download it"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its IDX header; re-download it")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} declares shape {dims} ({expected} bytes) but holds {len(raw) - header}; re-download it"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _load_mnist_like(key: str, root: Path, split: str, limit: int | None) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx(key, root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(key, root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels")
    images, labels = images[:limit], labels[:limit]
    class_names = FASHION_MNIST_CLASSES if key == "fashion-mnist" else [str(i) for i in range(10)]
    return ImageDataset(
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=key,
        class_names=list(class_names),
    )


# ----------------------------------------------------------------------------------------
# CIFAR-10 (python pickles)
# ----------------------------------------------------------------------------------------


def _load_cifar10(root: Path, split: str, limit: int | None) -> ImageDataset:
    folder = root / "cifar-10-batches-py"
    if not folder.is_dir():
        folder = root
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise _missing("cifar10", root, f"missing {', '.join(missing)} in {folder}")

    images, labels, count = [], [], 0
    for n in names:
        if limit is not None and count >= limit:
            break
        # The official format is a pickle: only load CIFAR files you trust.
        with open(folder / n, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        if b"data" not in batch or b"labels" not in batch:
            raise ValueError(f"{folder / n} lacks the b'data'/b'labels' keys of a CIFAR-10 python batch")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072:
            raise ValueError(f"{folder / n}: b'data' must be N x 3072 (3 planes of 32x32), got {data.shape}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
        count += len(data)

    class_names = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta"
    if meta.is_file():
        with open(meta, "rb") as f:
            names_raw = pickle.load(f, encoding="bytes").get(b"label_names")
        if names_raw:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names_raw]
    all_images = np.concatenate(images)[:limit]
    all_labels = np.concatenate(labels)[:limit]
    return ImageDataset(
        images=torch.from_numpy(np.ascontiguousarray(all_images)),
        labels=torch.from_numpy(all_labels),
        name="cifar10",
        class_names=class_names,
    )


# ----------------------------------------------------------------------------------------
# CelebA
# ----------------------------------------------------------------------------------------


def _celeba_root(root: Path) -> Path:
    for cand in (root, root / "celeba"):
        if (cand / "list_attr_celeba.txt").is_file() or (cand / "img_align_celeba").is_dir():
            return cand
    return root


def _parse_celeba_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    with open(path) as f:
        lines = [ln for ln in f.read().splitlines() if ln.strip()]
    if len(lines) < 2:
        raise ValueError(f"{path} must start with a count line and a line of attribute names")
    names = lines[1].split()
    files, rows = [], []
    for lineno, line in enumerate(lines[2:], start=3):
        parts = line.split()
        if len(parts) != len(names) + 1:
            raise ValueError(
                f"{path} line {lineno}: expected a file name and {len(names)} values of -1/1, got {len(parts) - 1} values"
            )
        files.append(parts[0])
        rows.append(parts[1:])
    values = np.asarray(rows, dtype=np.int64).reshape(len(rows), len(names))
    if not np.isin(values, (-1, 0, 1)).all():
        raise ValueError(f"{path}: attribute values must be -1 or 1")
    return files, names, (values > 0).astype(np.int8)


def _load_celeba(root: Path, split: str, limit: int | None, size: int, channels: int | None) -> ImageDataset:
    base = _celeba_root(root)
    img_dir = base / "img_align_celeba"
    if (img_dir / "img_align_celeba").is_dir():  # Kaggle's archive nests the folder
        img_dir = img_dir / "img_align_celeba"
    attr_path = base / "list_attr_celeba.txt"
    if not img_dir.is_dir():
        raise _missing("celeba", root, f"image folder img_align_celeba not found under {root}")
    if not attr_path.is_file():
        raise _missing("celeba", root, f"{attr_path} not found")
    part_path = base / "list_eval_partition.txt"
    if split in ("valid", "test") and not part_path.is_file():
        raise _missing("celeba", root, f"split {split!r} needs {part_path}, which is missing")

    files, attr_names, attrs = _parse_celeba_attrs(attr_path)
    keep = np.ones(len(files), dtype=bool)
    if split != "all" and part_path.is_file():
        part = {}
        with open(part_path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    part[parts[0]] = int(parts[1])
        wanted = {"train": 0, "valid": 1, "test": 2}[split]
        keep = np.array([part.get(fn, -1) == wanted for fn in files], dtype=bool)
    chosen = np.flatnonzero(keep)[:limit]
    paths = [img_dir / files[i] for i in chosen]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise _missing(
            "celeba", root, f"{len(absent)} images listed in {attr_path.name} are missing, e.g. {absent[0]}"
        )
    images = _load_images(paths, size, "L" if channels == 1 else "RGB")
    return ImageDataset(
        images=images,
        labels=torch.zeros(len(paths), dtype=torch.int64),
        name="celeba",
        class_names=["face"],
        attributes=torch.from_numpy(attrs[chosen]),
        attribute_names=attr_names,
    )


# ----------------------------------------------------------------------------------------
# AwA2 and generic image folders
# ----------------------------------------------------------------------------------------


def _read_indexed_names(path: Path) -> list[str]:
    """Lines like '1\tantelope' -> ['antelope', ...] in file order."""
    names = []
    with open(path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path} line {lineno}: expected '<number> <name>', got {line.strip()!r}")
            names.append(parts[1])
    return names


def _load_awa2(root: Path, limit: int | None, size: int, channels: int | None) -> ImageDataset:
    base = root
    if not (base / "JPEGImages").is_dir() and (root / "Animals_with_Attributes2" / "JPEGImages").is_dir():
        base = root / "Animals_with_Attributes2"
    img_root = base / "JPEGImages"
    if not img_root.is_dir():
        raise _missing("awa2", root, f"JPEGImages folder not found under {root}")
    dirs = sorted(p.name for p in img_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes_txt = base / "classes.txt"
    class_names = _read_indexed_names(classes_txt) if classes_txt.is_file() else dirs
    unknown = sorted(set(dirs) - set(class_names))
    if unknown:
        raise ValueError(f"JPEGImages folders {unknown} are not listed in {classes_txt}; add them or remove the folders")

    attributes = attr_names = None
    matrix_path, pred_path = base / "predicate-matrix-binary.txt", base / "predicates.txt"
    if matrix_path.is_file() or pred_path.is_file():
        if not (matrix_path.is_file() and pred_path.is_file() and classes_txt.is_file()):
            raise _missing(
                "awa2", root, "per-class attributes need classes.txt, predicates.txt and predicate-matrix-binary.txt together"
            )
        attr_names = _read_indexed_names(pred_path)
        matrix = np.loadtxt(matrix_path, dtype=np.int64, ndmin=2)
        if matrix.shape != (len(class_names), len(attr_names)) or not np.isin(matrix, (0, 1)).all():
            raise ValueError(
                f"{matrix_path} must be a {len(class_names)} x {len(attr_names)} matrix of 0/1 "
                f"(classes x predicates), got shape {matrix.shape}"
            )

    per_class = [_image_files(img_root / c) if (img_root / c).is_dir() else [] for c in class_names]
    chosen = _round_robin(per_class, limit)
    if not chosen:
        raise _missing("awa2", root, f"no images found in {img_root}")
    labels = np.array([c for c, _ in chosen], dtype=np.int64)
    if attr_names is not None:
        attributes = torch.from_numpy(matrix[labels].astype(np.int8))
    images = _load_images([p for _, p in chosen], size, "L" if channels == 1 else "RGB")
    return ImageDataset(
        images=images,
        labels=torch.from_numpy(labels),
        name="awa2",
        class_names=list(class_names),
        attributes=attributes,
        attribute_names=attr_names,
    )


def _load_imagefolder(root: Path, limit: int | None, size: int, channels: int | None) -> ImageDataset:
    # Empty class folders are skipped: a class without images would leave a client empty.
    class_names, per_class = [], []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = _image_files(d)
        if files:
            class_names.append(d.name)
            per_class.append(files)
    if not class_names:
        raise _missing("imagefolder", root, f"no class sub-folder with images found in {root}")
    chosen = _round_robin(per_class, limit)
    images = _load_images([p for _, p in chosen], size, "L" if channels == 1 else "RGB")
    return ImageDataset(
        images=images,
        labels=torch.tensor([c for c, _ in chosen], dtype=torch.int64),
        name="imagefolder",
        class_names=class_names,
    )
