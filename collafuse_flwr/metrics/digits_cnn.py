"""An offline stand-in for Inception features: a small CNN trained on scikit-learn's digits.

Why it exists: the Inception-v3 FID weights are a ~100 MB download, and this project never
downloads anything. scikit-learn ships 1,797 8x8 digits, enough to train a classifier in
seconds whose penultimate layer (64-d) separates digit shapes. Frechet distances in that
feature space rank generators the way FID does (sharp, diverse, class-like digits score low;
noise and blur score high), but the numbers are on their own scale: results must label them
``fid_backbone = "digits-cnn"`` and never compare them with Inception FID.

Every input is converted to one 16x16 grayscale channel before the network, so any image
size (8x8 digits, 16x16 CollaFuse samples, 28x28 MNIST) and RGB inputs work.

Weights: ``collafuse_flwr/assets/digits_cnn.json`` (built by ``scripts/train_digits_features.py``).
They are JSON, not a ``torch.save`` file, because Flower's FAB (what ``flwr run`` ships to
simulations and deployments) only packs *.py, *.toml, *.md, *.json and *.yaml files; each
tensor is stored as its dtype, shape and the base64 of its little-endian raw bytes, so loading
is bit-exact. If that file is missing, :func:`load_digits_cnn` trains once (seconds on one CPU thread) and
caches the result, so a fresh checkout still works offline.
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Side of the square grid every image is resized to before the network.
INPUT_SIZE = 16
#: Width of the feature vector used for Frechet / kernel distances.
NUM_FEATURES = 64
ASSET_PATH = Path(__file__).resolve().parent.parent / "assets" / "digits_cnn.json"
#: Bumped whenever the architecture or training recipe changes, so stale caches are rebuilt.
FORMAT_VERSION = 1
DEFAULT_SEED = 0
DEFAULT_EPOCHS = 24


class DigitsCNN(nn.Module):
    """Three small convolutions and a 64-unit hidden layer; 26k parameters (~110 KB)."""

    num_features = NUM_FEATURES

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),  # 8x8
            nn.Conv2d(32, 16, 3, stride=2, padding=1), nn.ReLU(),  # 4x4
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, NUM_FEATURES), nn.ReLU(),
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


def prepare(images_uint8: Tensor) -> Tensor:
    """uint8 N x C x H x W -> float N x 1 x 16 x 16 in [-1, 1], the network's only input format.

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
    if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                          antialias=True)
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
        return self.net.features(prepare(images_uint8))


def digits_training_images() -> tuple[Tensor, Tensor]:
    """All 1,797 scikit-learn digits as uint8 N x 1 x 8 x 8 (0..16 scaled to 0..255) and labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().clamp(0, 255).to(torch.uint8)
    return images.unsqueeze(1).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Small random shifts (+-1.5 px), rotations (+-10 deg), scalings (0.9-1.1) and pixel noise.

    Kept small on purpose: the network should tolerate the jitter and grain of generated digits,
    yet stay sensitive to what FID must punish (blur, noise-dominated images, wrong shapes).
    """
    n = x.shape[0]
    u = lambda lo, hi: torch.rand(n, generator=generator) * (hi - lo) + lo  # noqa: E731
    angle = u(-10.0, 10.0) * math.pi / 180.0
    scale = u(0.9, 1.1)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1.5 * 2 / INPUT_SIZE)
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
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    images: Tensor | None = None,
    labels: Tensor | None = None,
) -> tuple[DigitsCNN, dict[str, Any]]:
    """Train the feature CNN reproducibly: same seed and torch build -> bitwise-equal weights.

    Runs on one CPU thread (multi-threaded reductions may reorder float sums) inside a forked
    RNG, so the caller's random state and thread setting are left untouched.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if images is None or labels is None:
        images, labels = digits_training_images()
    x_all = prepare(images)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            net = DigitsCNN()
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
            with torch.no_grad():
                acc = (net(x_all).argmax(1) == labels).float().mean().item()
                net.feature_scale.copy_(net.body(x_all).pow(2).mean().sqrt())
    finally:
        torch.set_num_threads(threads)
    info = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
            "train_accuracy": acc, "num_images": int(x_all.shape[0]),
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


def _read(path: Path) -> DigitsCNN | None:
    """The network stored at path, or None if the file is absent or from another format."""
    if not path.is_file():
        return None
    blob = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(blob, dict) or blob.get("format_version") != FORMAT_VERSION:
        return None
    net = DigitsCNN()
    net.load_state_dict({k: _tensor_from_json(v) for k, v in blob["state_dict"].items()})
    return net.eval()


def _cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "collafuse_flwr" / "digits_cnn.json"


def load_digits_cnn(path: str | os.PathLike[str] | None = None) -> DigitsCNN:
    """The shipped network; if absent, a cached one; if none, train once and cache it.

    The cache goes next to the shipped asset when that folder is writable (a source checkout),
    else to ``$XDG_CACHE_HOME/collafuse_flwr`` (an installed, read-only package).
    """
    if path is not None:
        net = _read(Path(path))
        if net is None:
            raise FileNotFoundError(f"no digits-cnn weights (format {FORMAT_VERSION}) at {path}; "
                                    "build them with `python scripts/train_digits_features.py --out PATH`")
        return net
    for candidate in (ASSET_PATH, _cache_path()):
        net = _read(candidate)
        if net is not None:
            return net
    net, info = train_digits_cnn()
    for target in (ASSET_PATH, _cache_path()):
        try:
            save_digits_cnn(net, info, target)
            break
        except OSError:
            continue
    return net
