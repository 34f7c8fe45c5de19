"""On-disk image datasets through torchvision's dataset classes (download=True uses its mirrors and
checksums), plus AwA2. Laxer than torchvision, so accepted layouts keep working: IDX files may sit in
data_dir itself and be gzipped only; CIFAR-10/CelebA files need no MD5 match (re-packed copies); the
dataset folder may be data_dir itself or torchvision's sub-folder."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from collafuse_flwr.data.dataset import _DOWNLOADABLE, GRAY_MODES, ImageDataset, round_robin, square_uint8
from collafuse_flwr.imports import load

_IDX_LAYOUT = ("{} expects train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] "
               "and t10k-labels-idx1-ubyte[.gz] in {{d}}/{}/raw (torchvision's layout) or in {{d}} itself")
LAYOUTS = {
    "mnist": _IDX_LAYOUT.format("MNIST", "MNIST"),
    "fashion-mnist": _IDX_LAYOUT.format("Fashion-MNIST", "FashionMNIST"),
    "cifar10": ("CIFAR-10 expects the python version: {d}/cifar-10-batches-py/ (or {d} itself) holding data_batch_1 "
                ".. data_batch_5, test_batch and batches.meta (the extracted cifar-10-python.tar.gz)"),
    "celeba": ("CelebA expects torchvision's layout: {d}/celeba/ (or {d} itself) holding img_align_celeba/*.jpg, "
               "list_attr_celeba.txt, list_eval_partition.txt, identity_CelebA.txt, list_bbox_celeba.txt "
               "and list_landmarks_align_celeba.txt"),
    "awa2": ("AwA2 expects {d}/JPEGImages/<class>/*.jpg, optionally {d}/classes.txt and, for attributes, "
             "{d}/predicates.txt with {d}/predicate-matrix-binary.txt (the same under {d}/Animals_with_Attributes2/ "
             "is accepted)"),
    "imagefolder": "imagefolder expects {d}/<class name>/<image>.png|jpg|jpeg|bmp, one sub-folder per class",
}


def missing(key: str, root: Path | str, what: str) -> FileNotFoundError:
    hint = ("; or set download=true to let torchvision fetch it" if key in _DOWNLOADABLE
            else "; this dataset is not downloadable, put the files there yourself")
    return FileNotFoundError(f"{what}. {LAYOUTS[key].format(d=root)}{hint}")


def _fetch(key: str, root: Path, make: Callable[[], object]) -> None:
    """torchvision's download; offline (or any failed fetch) becomes one line saying what to do."""
    try:
        make()
    except (OSError, RuntimeError, ImportError, urllib.error.URLError) as exc:
        raise ConnectionError(f"download=true could not fetch {key} into {root} ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}); go online, or put the files there yourself and set "
                              f"download=false. {LAYOUTS[key].format(d=root)}") from exc


def load_images(paths: Sequence[str | Path], size: int, mode: str) -> Tensor:
    """uint8 N x C x H x W squares; mode "L", "RGB", or "" for the first file's own (never guessed)."""
    if not mode and len(paths):
        with Image.open(paths[0]) as first:
            mode = "L" if first.mode in GRAY_MODES else "RGB"
    mode = mode or "RGB"
    out = np.empty((len(paths), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                out[i] = square_uint8(img, size, mode)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read image {path}: {exc}") from exc
    return torch.from_numpy(out)


def load_mnist_like(key: str, root: Path, split: str, limit: int | None, download: bool) -> ImageDataset:
    base = getattr(load("torchvision.datasets"), {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}[key])
    if download:
        _fetch(key, root, lambda: base(str(root), train=split == "train", download=True))
    names = [Path(url).stem for url, _ in base.resources]  # train-images-idx3-ubyte, ...
    candidates = (root / base.__name__ / "raw", root)
    raw = next((d for d in candidates if all((d / n).is_file() or (d / f"{n}.gz").is_file() for n in names)), None)
    if raw is None:
        raise missing(key, root, f"{' / '.join(names)} not all found in {candidates[0]} or {root}")
    for n in names:
        if not (raw / n).is_file():  # gzipped only: extract as torchvision's download would
            try:
                load("torchvision.datasets.utils").extract_archive(str(raw / f"{n}.gz"), str(raw))
            except (OSError, EOFError) as exc:
                raise ValueError(f"cannot extract {raw / n}.gz into {raw} ({exc}); re-download it "
                                 f"or extract it yourself") from exc
    at_raw = type(base.__name__, (base,), {"raw_folder": str(raw)})
    try:
        tv = at_raw(str(root), train=split == "train")
    except (AssertionError, ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
        first = 0 if split == "train" else 2  # names: train images, labels, then t10k's
        for n, magic, kind in zip(names[first:first + 2], (0x803, 0x801), ("images", "labels")):
            got = int.from_bytes((raw / n).read_bytes()[:4], "big")
            if got != magic:
                raise ValueError(f"{raw / n} has IDX magic 0x{got:08x}, expected 0x{magic:08x} for uint8 {kind}; "
                                 f"the file is corrupt or not an MNIST-style IDX file, re-download it") from exc
        raise ValueError(f"torchvision cannot read the {key} {split} files in {raw} ({exc!r}); "
                         "re-download them") from exc
    if len(tv.data) != len(tv.targets):
        raise ValueError(f"{raw} holds {len(tv.data)} {split} images but {len(tv.targets)} labels; re-download it")
    return ImageDataset(images=tv.data[:limit].unsqueeze(1).contiguous(),
                        labels=tv.targets[:limit].to(torch.int64), name=key,
                        class_names=[c.split(" - ")[0] for c in tv.classes])  # MNIST's "0 - zero" -> "0"


def load_cifar10(root: Path, split: str, limit: int | None, download: bool) -> ImageDataset:
    CIFAR10 = load("torchvision.datasets").CIFAR10  # noqa: N806
    if download:
        _fetch("cifar10", root, lambda: CIFAR10(str(root), train=split == "train", download=True))
    folder = root / CIFAR10.base_folder if (root / CIFAR10.base_folder).is_dir() else root
    files = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    absent = [n for n in files if not (folder / n).is_file()]
    if absent:
        raise missing("cifar10", root, f"missing {', '.join(absent)} in {folder}")
    unchecked = type("CIFAR10", (CIFAR10,), {"base_folder": folder.name, "meta": {**CIFAR10.meta, "md5": None},
                                              "train_list": [[n, None] for n, _ in CIFAR10.train_list],
                                              "test_list": [[n, None] for n, _ in CIFAR10.test_list]})
    # The official format is a pickle: only load CIFAR files you trust.
    try:
        tv = unchecked(str(folder.parent), train=split == "train")
    except (KeyError, ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{folder} does not hold CIFAR-10 python batches torchvision can read ({exc!r}); "
                         f"re-download cifar-10-python.tar.gz") from exc
    images = torch.from_numpy(np.ascontiguousarray(tv.data[:limit].transpose(0, 3, 1, 2)))
    return ImageDataset(images=images, labels=torch.as_tensor(tv.targets[:limit], dtype=torch.int64),
                        name="cifar10", class_names=list(tv.classes))


def load_celeba(root: Path, split: str, limit: int | None, size: int, mode: str, download: bool) -> ImageDataset:
    CelebA = load("torchvision.datasets").CelebA  # noqa: N806
    if download:
        _fetch("celeba", root, lambda: CelebA(str(root), split=split, download=True))
    folder = root if (root / "list_attr_celeba.txt").is_file() else root / CelebA.base_folder
    needed = [fn for _, _, fn in CelebA.file_list if not fn.endswith(".zip")]
    absent = [fn for fn in needed if not (folder / fn).is_file()]
    if not (folder / "img_align_celeba").is_dir():
        absent.insert(0, "img_align_celeba/")
    if absent:
        raise missing("celeba", root, f"missing {', '.join(absent)} in {folder}")
    unchecked = type("CelebA", (CelebA,), {
        "base_folder": folder.name, "file_list": [(i, None, fn) for i, _, fn in CelebA.file_list]})
    try:
        tv = unchecked(str(folder.parent), split=split, target_type="attr")
    except (ValueError, IndexError, RuntimeError) as exc:
        raise ValueError(f"torchvision cannot parse the CelebA lists in {folder} ({exc!r}); re-download them") from exc
    paths = [folder / "img_align_celeba" / fn for fn in tv.filename[:limit]]
    absent_images = [p for p in paths if not p.is_file()]
    if absent_images:
        raise missing("celeba", root, f"{len(absent_images)} listed images are missing, e.g. {absent_images[0]}")
    return ImageDataset(images=load_images(paths, size, mode), labels=torch.zeros(len(paths), dtype=torch.int64),
                        name="celeba", class_names=["face"], attributes=tv.attr[:limit].to(torch.int8),
                        attribute_names=[a for a in tv.attr_names if a])  # a trailing space gives ''


def _from_samples(name: str, samples: list[tuple[str, int]], class_names: list[str], limit: int | None,
                  size: int, mode: str) -> ImageDataset:
    chosen = sorted((samples[i] for i in round_robin([c for _, c in samples], limit)), key=lambda s: (s[1], s[0]))
    return ImageDataset(images=load_images([p for p, _ in chosen], size, mode), name=name, class_names=class_names,
                        labels=torch.tensor([c for _, c in chosen], dtype=torch.int64))


def load_imagefolder(root: Path, limit: int | None, size: int, mode: str) -> ImageDataset:
    ImageFolder = load("torchvision.datasets").ImageFolder  # noqa: N806
    try:
        tv = ImageFolder(str(root), allow_empty=True)
    except FileNotFoundError as exc:
        raise missing("imagefolder", root, f"no class sub-folder found in {root} ({exc})") from exc
    # Empty class folders are dropped: a class without images would leave a client empty.
    used = sorted({c for _, c in tv.samples})
    if not used:
        raise missing("imagefolder", root, f"no class sub-folder with images found in {root}")
    remap = {old: new for new, old in enumerate(used)}
    samples = [(p, remap[c]) for p, c in tv.samples]
    return _from_samples("imagefolder", samples, [tv.classes[c] for c in used], limit, size, mode)


def _read_indexed_names(path: Path) -> list[str]:
    """Lines like '1\tantelope' -> ['antelope', ...] in file order."""
    names = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if parts and len(parts) != 2:
            raise ValueError(f"{path} line {lineno}: expected '<number> <name>', got {line.strip()!r}")
        names += parts[1:]
    return names


def load_awa2(root: Path, limit: int | None, size: int, mode: str) -> ImageDataset:
    make_dataset = load("torchvision.datasets.folder").make_dataset
    nested = root / "Animals_with_Attributes2"
    base = nested if not (root / "JPEGImages").is_dir() and (nested / "JPEGImages").is_dir() else root
    img_root = base / "JPEGImages"
    if not img_root.is_dir():
        raise missing("awa2", root, f"JPEGImages folder not found under {root}")
    dirs = sorted(p.name for p in img_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes_txt = base / "classes.txt"
    class_names = _read_indexed_names(classes_txt) if classes_txt.is_file() else dirs
    unknown = sorted(set(dirs) - set(class_names))
    if unknown:
        raise ValueError(f"JPEGImages folders {unknown} are not listed in {classes_txt}; "
                         "add them or remove the folders")
    matrix = attr_names = None
    matrix_path, pred_path = base / "predicate-matrix-binary.txt", base / "predicates.txt"
    if matrix_path.is_file() or pred_path.is_file():
        if not (matrix_path.is_file() and pred_path.is_file() and classes_txt.is_file()):
            raise missing("awa2", root, "per-class attributes need classes.txt, predicates.txt and "
                          "predicate-matrix-binary.txt together")
        attr_names = _read_indexed_names(pred_path)
        matrix = np.loadtxt(matrix_path, dtype=np.int64, ndmin=2)
        if matrix.shape != (len(class_names), len(attr_names)) or not np.isin(matrix, (0, 1)).all():
            raise ValueError(f"{matrix_path} must be a {len(class_names)} x {len(attr_names)} matrix of 0/1 "
                             f"(classes x predicates), got shape {matrix.shape}")
    samples = make_dataset(str(img_root), {c: i for i, c in enumerate(class_names)},
                           extensions=(".png", ".jpg", ".jpeg", ".bmp"), allow_empty=True)
    if not samples:
        raise missing("awa2", root, f"no images found in {img_root}")
    ds = _from_samples("awa2", samples, list(class_names), limit, size, mode)
    if matrix is not None:
        ds.attributes, ds.attribute_names = torch.from_numpy(matrix[ds.labels.numpy()].astype(np.int8)), attr_names
    return ds
