"""Formal epsilon of uploads as a Gaussian mechanism, on a real schedule and cut."""

import math

import pytest

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.metrics.privacy import gaussian_upload_epsilon, sensitivity_note, upload_noise_multiplier

T = 200
DIM = 16 * 16  # one 16x16 grayscale image
SCHED = D.make_schedule(T, "cosine")


def abar(c: float) -> float:
    return float(SCHED.alpha_bars[D.cut_step(c, T)])


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_falls_as_the_cut_grows(accountant):
    eps = [gaussian_upload_epsilon(abar(c), 10, DIM, accountant=accountant) for c in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)]
    assert all(math.isfinite(e) and e > 0 for e in eps)
    assert all(a > b for a, b in zip(eps, eps[1:]))


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_epsilon_grows_with_uploads(accountant):
    eps = [gaussian_upload_epsilon(abar(0.9), k, DIM, accountant=accountant) for k in (1, 4, 16, 64)]
    assert all(a < b for a, b in zip(eps, eps[1:]))


def test_edge_cases():
    assert gaussian_upload_epsilon(abar(0.5), 0, DIM) == 0.0
    assert gaussian_upload_epsilon(1.0, 0, DIM) == 0.0
    assert abar(0.0) == 1.0
    assert gaussian_upload_epsilon(abar(0.0), 1, DIM) == math.inf  # c = 0 uploads raw images
    assert gaussian_upload_epsilon(0.0, 5, DIM) == 0.0  # pure noise carries nothing
    assert upload_noise_multiplier(0.0, DIM) == math.inf


def test_noise_multiplier_and_sensitivity():
    a = abar(0.8)
    assert upload_noise_multiplier(a, DIM) == pytest.approx(math.sqrt(1 - a) / (math.sqrt(a) * 2 * 16))
    loose = gaussian_upload_epsilon(a, 3, DIM)
    assert gaussian_upload_epsilon(a, 3, DIM, l2_sensitivity=2 * 16) == loose  # the default is 2 sqrt(d)
    assert gaussian_upload_epsilon(a, 3, DIM, l2_sensitivity=4.0) < loose  # clipping tightens


def test_pld_is_tight_and_below_rdp():
    # One Gaussian with noise multiplier z = 1: check delta(eps) against the closed form
    # delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), mu = 1/z (Balle & Wang 2018).
    dim, sens = 4, 4.0  # default sensitivity 2 sqrt(4) = 4
    a = 1.0 / (1.0 + sens**2)  # makes z = sqrt(1-a)/(sqrt(a) * sens) = 1
    assert upload_noise_multiplier(a, dim) == pytest.approx(1.0)
    delta = 1e-5
    eps = gaussian_upload_epsilon(a, 1, dim, delta, accountant="pld")
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    closed = phi(-eps + 0.5) - math.exp(eps) * phi(-eps - 0.5)
    assert closed == pytest.approx(delta, rel=1e-3)
    assert eps < gaussian_upload_epsilon(a, 1, dim, delta, accountant="rdp")
    # k uploads with z = 1 equal one upload with z = 1/sqrt(k).
    assert gaussian_upload_epsilon(a, 4, dim, delta, accountant="pld") == pytest.approx(
        gaussian_upload_epsilon(1.0 / (1.0 + sens**2 / 4), 1, dim, delta, accountant="pld"), rel=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alpha_bar_c"):
        gaussian_upload_epsilon(1.5, 1, DIM)
    with pytest.raises(ValueError, match="num_uploads"):
        gaussian_upload_epsilon(0.5, -1, DIM)
    with pytest.raises(ValueError, match="dim"):
        gaussian_upload_epsilon(0.5, 1, 0)
    with pytest.raises(ValueError, match="delta"):
        gaussian_upload_epsilon(0.5, 1, DIM, delta=0.0)
    with pytest.raises(ValueError, match="l2_sensitivity"):
        gaussian_upload_epsilon(0.5, 1, DIM, l2_sensitivity=0.0)
    with pytest.raises(ValueError, match="accountant"):
        gaussian_upload_epsilon(0.5, 1, DIM, accountant="moments")


def test_sensitivity_note_states_the_assumption():
    a = abar(0.8)
    note = sensitivity_note(a, 12, DIM)
    eps = gaussian_upload_epsilon(a, 12, DIM)
    assert f"epsilon={eps:.6g}" in note and "delta=1e-05" in note
    assert "2*sqrt(d)" in note and "d=256" in note and "12 upload" in note and "RDP" in note
    assert "user-supplied" in sensitivity_note(a, 12, DIM, l2_sensitivity=3.0)
