"""Which feature network FID/KID use. ``inception``: torchmetrics' FID Inception-v3, always handed a weights
file (``fid-weights`` or torch hub's cache), fetched by torch-fidelity only with ``fid-download = true``, once,
at start. ``digits-cnn`` / ``mnist-cnn``: the offline nets of :mod:`.digits_cnn`, honest only for digits.
``auto``: Inception when its weights are there, else the digit net for digit datasets and ``none`` (one
warning) for others: no offline net has seen faces or photos, so its distance would only look like FID."""

from __future__ import annotations

import importlib.util
import os
import urllib.error
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from collafuse_flwr.core.images import to_uint8 as _core_to_uint8
from collafuse_flwr.imports import load
from collafuse_flwr.metrics.digits_cnn import DigitsCNNFeatures, load_feature_net

BACKBONES = ("auto", "inception", "digits-cnn", "mnist-cnn", "none")
DIGIT_DATASETS = ("digits", "mnist", "mnist5k", "hf:ylecun/mnist", "hf:mnist")
#: pytorch-fid's, then torch-fidelity's name for the same FID Inception weights (torch hub's cache names).
INCEPTION_WEIGHT_NAMES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_FEATURES = 2048


def to_uint8(images: Tensor) -> Tensor:
    """The core conversion, passing uint8 through: FID's callers hand in either."""
    return images if images.dtype == torch.uint8 else _core_to_uint8(images.detach())


def hub_inception_paths() -> list[Path]:
    """Where torch hub would have cached the FID Inception weights (honours $TORCH_HOME)."""
    ckpt = Path(torch.hub.get_dir()) / "checkpoints"
    return [ckpt / name for name in INCEPTION_WEIGHT_NAMES]


def _missing_weights_message(given: str | None) -> str:
    where = f"no file at {given}" if given else "no Inception FID weights found at " + " or ".join(
        str(p) for p in hub_inception_paths())
    name = INCEPTION_WEIGHT_NAMES[0]
    return (f"{where}. Set fid-download=true to let torch-fidelity fetch them into that cache, put {name} (pytorch-fid"
            f" / torch-fidelity's FID Inception weights) there, or pass fid-weights=/abs/path/to/{name}, or choose "
            f"fid-backbone=digits-cnn (digit datasets) or fid-backbone=none")


def find_inception_weights(weights_path: str | os.PathLike[str] | None = None) -> Path | None:
    """The weights file to use, or None. A path the user names must exist (a typo must not silently
    fall back to another file); without one, torch hub's checkpoint cache is searched."""
    if weights_path is not None and str(weights_path) != "":
        p = Path(weights_path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(_missing_weights_message(str(p)))
        return p.resolve()
    return next((p for p in hub_inception_paths() if p.is_file()), None)


def torch_fidelity_available() -> bool:
    """torchmetrics builds its Inception from torch-fidelity's module definition."""
    return importlib.util.find_spec("torch_fidelity") is not None


def _need_torch_fidelity() -> None:
    if not torch_fidelity_available():
        raise ModuleNotFoundError(
            "fid-backbone=inception needs the torch-fidelity package (torchmetrics builds its "
            "Inception-v3 from it): `pip install torch-fidelity`, or use fid-backbone=digits-cnn")


def _inception_weights(weights_path: str | None) -> Path:
    """The Inception weights fid-backbone=inception loads, or an error naming the fix."""
    weights = find_inception_weights(weights_path)
    if weights is None:
        raise FileNotFoundError(_missing_weights_message(None))
    _need_torch_fidelity()
    return weights


#: Datasets already warned about falling back to ``none`` (one line per process, not per evaluation).
_FALLBACK_WARNED: set[str] = set()


def resolve_backbone(name: str, dataset: str, weights_path: str | None) -> str:
    """The run config's ``fid-backbone`` as ``inception``, ``digits-cnn``, ``mnist-cnn`` or ``none``.
    Weights on disk without torch-fidelity stay an error: the user meant Inception; the fix is an install."""
    return _resolve(name, dataset, weights_path, None)


def _resolve(name: str, dataset: str, weights_path: str | None, fetch_error: str | None) -> str:
    if name not in BACKBONES:
        raise ValueError(f"fid-backbone must be one of {BACKBONES}, got {name!r}")
    if name == "none":
        return "none"
    if name == "inception":
        _inception_weights(weights_path)
        return "inception"
    if name == "digits-cnn":
        if dataset not in DIGIT_DATASETS:
            raise ValueError(f"fid-backbone=digits-cnn only means something for digit images "
                             f"{DIGIT_DATASETS}, got dataset={dataset!r}; use fid-backbone=inception "
                             f"with fid-weights=/abs/path/to/{INCEPTION_WEIGHT_NAMES[0]}")
        return "digits-cnn"
    if name == "mnist-cnn":  # trained on mnist_5k rows the mnist5k clients never get
        if dataset != "mnist5k":
            raise ValueError(f"fid-backbone=mnist-cnn is for dataset=mnist5k, got {dataset!r}; use digits-cnn")
        return "mnist-cnn"
    # auto
    found = find_inception_weights(weights_path)
    if found is not None and torch_fidelity_available():
        return "inception"
    if dataset in DIGIT_DATASETS:
        choice = "mnist-cnn" if dataset == "mnist5k" else "digits-cnn"
        if fetch_error is not None:
            warnings.warn(f"fid-backbone=auto: {fetch_error}; falling back to {choice}", stacklevel=3)
        return choice
    if found is not None:
        _need_torch_fidelity()
    if fetch_error is not None or dataset not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(dataset)
        why = fetch_error or f"no Inception FID weights in {hub_inception_paths()[0].parent}"
        warnings.warn(f"fid-backbone=auto: {why}, and dataset={dataset!r} is not a digit dataset (the offline "
                      f"digits-cnn/mnist-cnn mean nothing there): falling back to none, FID is skipped. For "
                      f"FID pass fid-weights=/abs/path/to/{INCEPTION_WEIGHT_NAMES[0]} or set fid-download=true",
                      stacklevel=3)
    return "none"


def fetch_inception_weights() -> Path:
    """torch-fidelity's own download of the FID Inception weights into torch hub's cache (building its
    extractor without a weights path fetches them, hash-checked); offline, one line says what to do."""
    _need_torch_fidelity()
    tfi = load("torch_fidelity.feature_extractor_inceptionv3")
    cache = hub_inception_paths()[1].parent
    try:
        tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except (OSError, urllib.error.URLError, RuntimeError) as exc:
        why = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise ConnectionError(f"fid-download=true could not fetch the FID Inception weights from {tfi.URL_INCEPTION_V3}"
                              f" into {cache} ({why}); go online, or put {INCEPTION_WEIGHT_NAMES[0]} there or at "
                              f"fid-weights=/abs/path, or choose fid-backbone=auto (falls back: digit nets for digit "
                              f"datasets, else none), digits-cnn or none") from exc
    found = find_inception_weights(None)
    if found is None:
        raise FileNotFoundError(f"torch-fidelity reported no error but no weights are in {cache}")
    return found


def prepare_backbone(name: str, dataset: str, weights_path: str | None = None, download: bool = False) -> str:
    """Once at a run's start: the backbone FID will use, its weights fetched now (``download``) so a run
    that cannot have them fails at start; ``auto`` falls back with one warning, later resolves silently."""
    wants_inception = name == "inception" or (name == "auto" and torch_fidelity_available())
    fetch_error = None
    if download and wants_inception and find_inception_weights(weights_path) is None:
        try:
            fetch_inception_weights()
        except (ConnectionError, FileNotFoundError) as exc:
            if name == "inception":
                raise
            fetch_error = str(exc)
    choice = _resolve(name, dataset, weights_path, fetch_error)
    if fetch_error is not None:  # warned above with the fetch error: later resolves stay quiet
        _FALLBACK_WARNED.add(dataset)
    return choice


class InceptionFeatures(nn.Module):
    """torchmetrics' FID Inception with grayscale repeated to RGB (the net only takes 3 channels)."""

    num_features = INCEPTION_FEATURES

    def __init__(self, weights: Path) -> None:
        super().__init__()
        tm_fid = load("torchmetrics.image.fid")
        try:
            self.net = tm_fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(INCEPTION_FEATURES)],
                                                 feature_extractor_weights_path=str(weights))
        except Exception as err:  # wrong or corrupt file: torch.load / load_state_dict errors vary
            raise RuntimeError(f"could not load Inception FID weights from {weights}: {err}. Expected "
                               f"{INCEPTION_WEIGHT_NAMES[0]} (pytorch-fid / torch-fidelity)") from err

    def forward(self, images_uint8: Tensor) -> Tensor:
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] not in (1, 3):
            raise ValueError(f"Inception features need uint8 N x C x H x W with C in (1, 3), got "
                             f"{images_uint8.dtype} {tuple(images_uint8.shape)}")
        if images_uint8.shape[1] == 1:
            images_uint8 = images_uint8.expand(-1, 3, -1, -1)
        return self.net(images_uint8)


def feature_extractor(backbone: str, weights_path: str | None = None) -> nn.Module:
    """The network mapping uint8 N x C x H x W images to feature rows for a resolved backbone."""
    if backbone == "inception":
        return InceptionFeatures(_inception_weights(weights_path))
    if backbone in ("digits-cnn", "mnist-cnn"):
        return DigitsCNNFeatures(load_feature_net(backbone))
    raise ValueError(f"backbone must be 'inception' or 'digits-cnn' (resolve 'auto' first with "
                     f"resolve_backbone), got {backbone!r}")


@torch.no_grad()
def extract_features(net: nn.Module, images_uint8: Tensor, batch_size: int = 128) -> Tensor:
    """Features in float64, batched so thousands of 299x299 Inception inputs fit in memory."""
    if images_uint8.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 0..255, got {images_uint8.dtype}; convert [-1, 1] "
                        "floats with collafuse_flwr.metrics.features.to_uint8")
    rows = [net(chunk).reshape(chunk.shape[0], -1).double() for chunk in images_uint8.split(batch_size)]
    return torch.cat(rows) if rows else torch.zeros(0, getattr(net, "num_features", 0), dtype=torch.float64)
