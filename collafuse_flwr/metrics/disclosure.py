r"""What an honest-but-curious server can learn about a client's images from its uploads
x_{t_c} = sqrt(abar_c) x_0 + sqrt(1 - abar_c) eps: the empirical leakage, beside :mod:`.privacy`'s
formal bound. Images are float tensors in [-1, 1], N x C x H x W, as the diffusion models see them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from collafuse_flwr.core.diffusion import EpsModel, Schedule, predict_anchor
from collafuse_flwr.imports import load
from collafuse_flwr.metrics.features import to_uint8
from collafuse_flwr.metrics.fid import compute_fid_kid

#: Per-image PSNR cap (dB), so means and JSON stay finite; far above 8-bit quantisation's ~48 dB, it hides nothing.
PSNR_CAP_DB = 100.0
DATA_RANGE = 2.0  # images live in [-1, 1]


@torch.no_grad()
def reconstruct(uploads: Tensor, sched: Schedule, t_c: int, eps_model: EpsModel | None = None,
                relative_anchor: int | None = None) -> Tensor:
    r"""One-step estimate of x_0 from uploads x_{t_c}, clamped to [-1, 1]: Tweedie's step with the
    attacker's denoiser, else the model-free x_tc / sqrt(abar_c). relative_anchor a: eps_model's clean
    data is x_a, so its estimate is rescaled by 1 / sqrt(abar_a). t_c = 0: a copy (raw images)."""
    if not isinstance(t_c, int) or not 0 <= t_c <= sched.T:
        raise ValueError(f"t_c must be an integer in [0, T={sched.T}], got {t_c!r}")
    if uploads.dim() != 4:
        raise ValueError(f"uploads must be N x C x H x W, got shape {tuple(uploads.shape)}")
    if t_c == 0:
        return uploads.clone()
    anchor = 0 if relative_anchor is None else relative_anchor
    if not isinstance(anchor, int) or not 0 <= anchor < t_c:
        raise ValueError(f"relative_anchor must be an integer in [0, t_c={t_c}), got {relative_anchor!r}")
    abar_c = sched.alpha_bars[t_c].to(device=uploads.device, dtype=uploads.dtype)
    if eps_model is None:
        return (uploads / abar_c.sqrt()).clamp(-1.0, 1.0)
    t = torch.full((uploads.shape[0],), t_c, dtype=torch.long, device=uploads.device)
    eps = eps_model(uploads, t)
    x_anchor = predict_anchor(sched, uploads, t_c, eps, anchor, relative=True)
    abar_a = sched.alpha_bars[anchor].to(device=uploads.device, dtype=uploads.dtype)
    return (x_anchor / abar_a.sqrt()).clamp(-1.0, 1.0)


def ssim_kernel_size(height: int, width: int) -> int:
    """The largest odd Gaussian window <= 11 that fits the image (11 is SSIM's standard)."""
    side = min(height, width)
    if side < 3:
        raise ValueError(f"SSIM needs images of at least 3x3 pixels, got {height}x{width}")
    return min(11, side if side % 2 == 1 else side - 1)


@torch.no_grad()
def psnr_ssim(x_hat: Tensor, x0: Tensor) -> dict[str, float]:
    """Mean per-image PSNR (dB, capped at ``PSNR_CAP_DB``) and mean SSIM, range [-1, 1]. The SSIM
    window shrinks to fit small images; values for different window sizes are not comparable."""
    tm = load("torchmetrics.image")
    if x_hat.shape != x0.shape or x_hat.dim() != 4:
        raise ValueError(f"x_hat and x0 must both be N x C x H x W of the same shape, got "
                         f"{tuple(x_hat.shape)} and {tuple(x0.shape)}")
    x_hat, x0 = x_hat.detach().float().cpu(), x0.detach().float().cpu()
    psnr = tm.PeakSignalNoiseRatio(data_range=DATA_RANGE, dim=(1, 2, 3), reduction="none")(x_hat, x0)
    psnr = torch.nan_to_num(psnr, posinf=PSNR_CAP_DB).clamp(max=PSNR_CAP_DB)
    k = ssim_kernel_size(x0.shape[-2], x0.shape[-1])
    ssim = tm.StructuralSimilarityIndexMeasure(data_range=DATA_RANGE, kernel_size=k)(x_hat, x0)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim)}


@torch.no_grad()
def reidentification_rate(x_hat: Tensor, true_idx: Tensor, train_images: Tensor, chunk: int = 1024) -> float:
    """Fraction of estimates whose nearest training image (L2, pixel space) is their true source
    (chance: 1 / len(train_images))."""
    true_idx = torch.as_tensor(true_idx, dtype=torch.long).reshape(-1).cpu()
    if x_hat.shape[0] != true_idx.shape[0]:
        raise ValueError(f"x_hat has {x_hat.shape[0]} images but true_idx has {true_idx.shape[0]} entries")
    if x_hat.shape[1:] != train_images.shape[1:]:
        raise ValueError(f"x_hat images {tuple(x_hat.shape[1:])} and train_images "
                         f"{tuple(train_images.shape[1:])} differ in shape")
    n_train = train_images.shape[0]
    if x_hat.shape[0] == 0:
        raise ValueError("x_hat is empty: nothing to re-identify")
    if true_idx.min() < 0 or true_idx.max() >= n_train:
        raise ValueError(f"true_idx must index train_images (0..{n_train - 1}), got range "
                         f"{int(true_idx.min())}..{int(true_idx.max())}")
    bank = train_images.detach().reshape(n_train, -1).double().cpu()
    queries = x_hat.detach().reshape(x_hat.shape[0], -1).double().cpu()
    nearest = torch.cat([torch.cdist(q, bank).argmin(dim=1) for q in queries.split(chunk)])
    return float((nearest == true_idx).double().mean())


def upload_fid(uploads: Tensor, train_images: Tensor, backbone: str, weights_path: str | None = None,
               kid_subset_size: int | None = None) -> dict[str, float]:
    """The CollaFuse paper's measure: FID/KID between the uploads (rendered as a viewer would, the
    overshooting noise clamped) and the client's real training images (high = unlike the data)."""
    return compute_fid_kid(to_uint8(train_images), to_uint8(uploads), backbone, weights_path, kid_subset_size)


def chance_reidentification(num_train: int) -> float:
    """The re-identification rate of a blind guess, to report beside the measured one."""
    if num_train < 1:
        raise ValueError(f"num_train must be >= 1, got {num_train}")
    return 1.0 / num_train
