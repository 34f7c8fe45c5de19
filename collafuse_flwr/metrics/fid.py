"""FID, KID (torchmetrics'), precision and recall (torch-fidelity's, Kynkaenniemi et al. 2019, k = 3)
between two uint8 image sets: the backbone runs once (Inception on CPU dominates) and torchmetrics gets
its features through an identity module. KID's subsets draw from a forked, fixed-seed RNG: same inputs,
same value. Small problems run on one CPU thread: on a busy 2-core machine torch's thread pool made
KID's 64 x 64 kernel products ~250x slower (measured)."""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from collafuse_flwr.imports import load
from collafuse_flwr.metrics.digits_cnn import one_thread
from collafuse_flwr.metrics.features import extract_features, feature_extractor

DEFAULT_KID_SUBSET_SIZE = 50
KID_SUBSETS = 100
KID_SEED = 0
SINGLE_THREAD_MAX_DIM = 256
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for precision/recall


def _check_images(images: Tensor, what: str) -> None:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, Tensor) else type(images).__name__
        raise TypeError(f"{what} must be a uint8 tensor (0..255), got {got}; convert [-1, 1] floats "
                        "with collafuse_flwr.metrics.features.to_uint8")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be N x C x H x W with C in (1, 3), got shape {tuple(images.shape)}")
    if images.shape[0] < 2:  # before any backbone loads or features are extracted
        raise ValueError(f"{what} has {images.shape[0]} image(s); FID and KID need at least 2 per set "
                         "(a covariance needs two samples) - generate or load more images")


def fid_kid_from_features(real: Tensor, fake: Tensor, kid_subset_size: int | None = None) -> dict[str, float]:
    """FID, KID mean and KID std from two feature matrices (rows = images)."""
    n_real, n_fake = real.shape[0], fake.shape[0]
    if n_real < 2 or n_fake < 2:
        raise ValueError(f"FID and KID need at least 2 images (feature rows) per set (a covariance needs two), "
                         f"got {n_real} real and {n_fake} fake: generate or load more")
    if kid_subset_size is None:
        kid_subset_size = min(DEFAULT_KID_SUBSET_SIZE, n_real, n_fake)
    if not 2 <= kid_subset_size <= min(n_real, n_fake):
        raise ValueError(f"kid_subset_size must be in [2, min(n_real, n_fake) = {min(n_real, n_fake)}], "
                         f"got {kid_subset_size}; pass None for min({DEFAULT_KID_SUBSET_SIZE}, n_real, n_fake)")
    tm_fid, tm_kid = load("torchmetrics.image.fid"), load("torchmetrics.image.kid")
    given = nn.Identity()  # with num_features, torchmetrics takes the precomputed features as 'images'
    given.num_features = real.shape[1]
    with one_thread() if real.shape[1] <= SINGLE_THREAD_MAX_DIM else nullcontext():
        fid = tm_fid.FrechetInceptionDistance(feature=given)
        fid.update(real.double(), real=True)
        fid.update(fake.double(), real=False)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kid = tm_kid.KernelInceptionDistance(feature=given, subsets=KID_SUBSETS, subset_size=kid_subset_size)
        kid.update(real.double(), real=True)
        kid.update(fake.double(), real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            kid_mean, kid_std = kid.compute()
        # A Frechet distance is >= 0; identical sets give about -1e-14 from float rounding.
        return {"fid": max(float(fid.compute()), 0.0), "kid": float(kid_mean), "kid_std": float(kid_std),
                **precision_recall(real, fake)}


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FID alone for two feature matrices (rows = images), with torchmetrics' own formula: for checks
    that need hundreds of distances, without KID's 100 subsets."""
    _compute_fid = load("torchmetrics.image.fid")._compute_fid
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"need at least 2 feature rows per set, got {a.shape[0]} and {b.shape[0]}")
    a, b = a.double(), b.double()
    with one_thread() if a.shape[1] <= SINGLE_THREAD_MAX_DIM else nullcontext():
        return max(float(_compute_fid(a.mean(0), torch.cov(a.T), b.mean(0), torch.cov(b.T))), 0.0)


def precision_recall(real: Tensor, fake: Tensor, neighborhood: int = PRC_NEIGHBORHOOD) -> dict[str, float]:
    """torch-fidelity's k-NN precision and recall; {} when they cannot be computed (too few rows,
    or torch-fidelity missing), so callers report FID alone rather than fail."""
    if min(real.shape[0], fake.shape[0]) <= neighborhood:
        return {}
    try:
        prc_features_to_metric = load("torch_fidelity.metric_prc").prc_features_to_metric
    except ImportError:
        return {}
    out = prc_features_to_metric(fake.double(), real.double(), prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"])}


def compute_fid_kid(real_uint8: Tensor, fake_uint8: Tensor, backbone: str, weights_path: str | None = None,
                    kid_subset_size: int | None = None) -> dict[str, float]:
    """FID and KID of fake vs real uint8 N x C x H x W images under a resolved backbone; KID's subset
    size defaults to min(50, n_real, n_fake). Digit-net values are not Inception FID."""
    _check_images(real_uint8, "real_uint8")
    _check_images(fake_uint8, "fake_uint8")
    net = feature_extractor(backbone, weights_path)
    with one_thread() if backbone in ("digits-cnn", "mnist-cnn") else nullcontext():
        real, fake = extract_features(net, real_uint8), extract_features(net, fake_uint8)
    return fid_kid_from_features(real, fake, kid_subset_size)
