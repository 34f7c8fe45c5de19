"""Measurements for CollaFuse runs: sample quality, compute, communication, and disclosure.

Each submodule has one job: ``fid`` (FID/KID), ``features`` (which backbone, offline),
``digits_cnn`` (the offline digit feature network), ``flops`` (measured FLOPs), ``comm``
(bytes of Flower messages), ``disclosure`` (empirical leakage of uploads) and ``privacy``
(formal epsilon of uploads).
"""

from .comm import array_nbytes, message_nbytes, recorddict_nbytes
from .digits_cnn import load_digits_cnn, train_digits_cnn
from .disclosure import (
    PSNR_CAP_DB,
    chance_reidentification,
    psnr_ssim,
    reconstruct,
    reidentification_rate,
    upload_fid,
)
from .features import (
    feature_extractor,
    find_inception_weights,
    resolve_backbone,
    to_uint8,
)
from .fid import compute_fid_kid, fid_kid_from_features
from .flops import FlopMeter
from .privacy import gaussian_upload_epsilon, sensitivity_note, upload_noise_multiplier

__all__ = [
    "PSNR_CAP_DB",
    "FlopMeter",
    "array_nbytes",
    "chance_reidentification",
    "compute_fid_kid",
    "feature_extractor",
    "fid_kid_from_features",
    "find_inception_weights",
    "gaussian_upload_epsilon",
    "load_digits_cnn",
    "message_nbytes",
    "psnr_ssim",
    "reconstruct",
    "recorddict_nbytes",
    "reidentification_rate",
    "resolve_backbone",
    "sensitivity_note",
    "to_uint8",
    "train_digits_cnn",
    "upload_fid",
    "upload_noise_multiplier",
]
