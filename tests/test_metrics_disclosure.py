"""Empirical leakage of uploads x_tc: reconstruction, PSNR/SSIM, re-identification, upload FID."""

import math

import pytest
import torch

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.metrics.digits_cnn import digits_training_images
from collafuse_flwr.metrics.disclosure import (
    PSNR_CAP_DB,
    chance_reidentification,
    psnr_ssim,
    reconstruct,
    reidentification_rate,
    ssim_kernel_size,
    upload_fid,
)

T = 200


@pytest.fixture(scope="module")
def sched():
    return D.make_schedule(T, "cosine")


@pytest.fixture(scope="module")
def digits():
    """300 scikit-learn digits, 8x8, in the model range [-1, 1]."""
    images, _ = digits_training_images()
    return images[:300].float() / 127.5 - 1.0


def _upload(sched, x0, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g)
    return D.upload(sched, x0, D.cut_step(c, T), noise), noise


def test_cut_zero_returns_the_raw_upload(sched, digits):
    up, _ = _upload(sched, digits, 0.0)
    rec = reconstruct(up, sched, 0)
    assert torch.equal(rec, digits) and rec is not up


def test_oracle_denoiser_reconstructs_exactly(sched, digits):
    t_c = D.cut_step(0.5, T)
    up, noise = _upload(sched, digits, 0.5)

    def oracle(x_t, t):
        assert x_t is up and torch.all(t == t_c)
        return noise

    torch.testing.assert_close(reconstruct(up, sched, t_c, oracle), digits, atol=1e-5, rtol=0)


def test_oracle_with_relative_anchor(sched, digits):
    # A server-style model: its chain's clean data is x_a (here noise-free, sqrt(abar_a) x0), and
    # it predicts the noise of x_tc = sqrt(abar_c/abar_a) x_a + sqrt(1 - abar_c/abar_a) eps'.
    a, t_c = 20, 120
    ab = D.relative_alpha_bar(sched, t_c, a).float()
    x_a = sched.alpha_bars[a].float().sqrt() * digits
    eps = torch.randn(digits.shape, generator=torch.Generator().manual_seed(4))
    x_tc = ab.sqrt() * x_a + (1 - ab).sqrt() * eps
    rec = reconstruct(x_tc, sched, t_c, lambda x, t: eps, relative_anchor=a)
    torch.testing.assert_close(rec, digits, atol=1e-5, rtol=0)


def test_model_free_estimate_degrades_as_the_cut_grows(sched, digits):
    scores = []
    for c in (0.05, 0.3, 0.6, 0.9):
        up, _ = _upload(sched, digits, c)
        rec = reconstruct(up, sched, D.cut_step(c, T))
        assert rec.min() >= -1 and rec.max() <= 1
        scores.append(psnr_ssim(rec, digits))
    psnrs = [s["psnr"] for s in scores]
    ssims = [s["ssim"] for s in scores]
    assert psnrs == sorted(psnrs, reverse=True) and psnrs[0] > psnrs[-1] + 10
    assert ssims == sorted(ssims, reverse=True)
    # Noise-free upload: the model-free estimate is exact.
    t_c = D.cut_step(0.5, T)
    clean = D.upload(sched, digits, t_c, torch.zeros_like(digits))
    torch.testing.assert_close(reconstruct(clean, sched, t_c), digits, atol=1e-5, rtol=0)


def test_psnr_known_value_and_cap(digits):
    x = digits.clamp(-0.9, 0.9)
    assert psnr_ssim(x + 0.1, x)["psnr"] == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    same = psnr_ssim(x, x.clone())
    assert same["psnr"] == PSNR_CAP_DB and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert psnr_ssim(noise, x)["ssim"] < 0.2


def test_ssim_window_fits_small_images():
    assert [ssim_kernel_size(s, s) for s in (3, 4, 8, 9, 16, 28)] == [3, 3, 7, 9, 11, 11]
    with pytest.raises(ValueError, match="3x3"):
        ssim_kernel_size(2, 8)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert psnr_ssim(x, x)["ssim"] == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        psnr_ssim(x, x[:2])


def test_reidentification(sched, digits):
    idx = torch.arange(digits.shape[0])
    assert reidentification_rate(digits, idx, digits) == 1.0  # c = 0: uploads are the images
    low, _ = _upload(sched, digits, 0.1)
    high, _ = _upload(sched, digits, 1.0)
    rate_low = reidentification_rate(reconstruct(low, sched, D.cut_step(0.1, T)), idx, digits)
    rate_high = reidentification_rate(reconstruct(high, sched, T), idx, digits)
    assert rate_low > 0.9
    assert rate_high < 10 * chance_reidentification(digits.shape[0])  # 300 images: chance is 1/300
    shuffled = idx.roll(1)
    assert reidentification_rate(digits, shuffled, digits) == 0.0
    with pytest.raises(ValueError, match="index train_images"):
        reidentification_rate(digits[:2], torch.tensor([0, 300]), digits)
    with pytest.raises(ValueError, match="entries"):
        reidentification_rate(digits[:2], idx[:3], digits)


def test_upload_fid_rises_with_the_cut(sched, digits):
    up0, _ = _upload(sched, digits, 0.0)
    assert upload_fid(up0, digits, "digits-cnn")["fid"] < 1e-6
    fids = [upload_fid(_upload(sched, digits, c)[0], digits, "digits-cnn")["fid"] for c in (0.1, 0.5, 1.0)]
    assert fids == sorted(fids) and fids[-1] > 10 * fids[0]


def test_bad_cut_and_anchor(sched, digits):
    with pytest.raises(ValueError, match="t_c must be"):
        reconstruct(digits, sched, T + 1)
    with pytest.raises(ValueError, match="relative_anchor"):
        reconstruct(digits, sched, 10, lambda x, t: x, relative_anchor=10)
