"""Per-image DP uploads (collafuse_flwr.core.dp): accounting, the plan, the upload, the cap."""

import math
import re

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant

from collafuse_flwr import node as N
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.dp import (
    DPPlan,
    UploadLedger,
    clip_images,
    dp_upload,
    epsilon_for,
    noise_multiplier_at,
    plan_uploads,
)
from collafuse_flwr.metrics.privacy import gaussian_upload_epsilon

T, T_C, DIM = 200, 40, 64  # digits: 8x8, T = 200 cosine, c = 0.2
SCHED = D.make_schedule(T, "cosine")


def plan(eps, k, clip=None, t_cut=T_C, sched=SCHED, dim=DIM):
    return plan_uploads(sched, t_cut, eps, max_uploads_per_image=k, image_dim=dim, clip=clip)


# -- accounting ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("z,k", [(0.02, 1), (0.5, 4), (1.0, 8), (3.0, 1), (10.0, 50)])
def test_epsilon_for_is_dp_accountings_rdp(z, k):
    acc = RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    assert epsilon_for(z, k, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    # and the same as the figure results.json already reports for plain uploads
    ab = 1.0 / (1.0 + (z * 2 * math.sqrt(DIM)) ** 2)  # the abar whose z is this one at C = sqrt(d)
    assert epsilon_for(z, k) == pytest.approx(gaussian_upload_epsilon(ab, k, DIM), rel=1e-6)


def test_epsilon_for_falls_with_noise_and_grows_with_compositions():
    zs = [0.05, 0.2, 0.5, 1, 2, 5, 20]
    eps = [epsilon_for(z, 4) for z in zs]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    ks = [1, 2, 4, 8, 32]
    eps_k = [epsilon_for(1.0, k) for k in ks]
    assert all(a < b for a, b in zip(eps_k, eps_k[1:]))
    assert epsilon_for(1.0, 0) == 0.0 and epsilon_for(math.inf, 5) == 0.0 and epsilon_for(0.0, 1) == math.inf
    with pytest.raises(ValueError, match="compositions"):
        epsilon_for(1.0, -1)
    with pytest.raises(ValueError, match="delta"):
        epsilon_for(1.0, 1, 0.0)


# -- the plan --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [1.0, 4.0, 10.0, 50.0])
@pytest.mark.parametrize("k", [1, 4, 8])
def test_plan_picks_the_smallest_sufficient_step(target, k):
    clip = 4.0  # every (target, K) here is feasible at this clip
    p = plan(target, k, clip)
    z = noise_multiplier_at(SCHED, p.t_upload, clip)
    assert p.noise_multiplier == pytest.approx(z)
    assert p.epsilon == pytest.approx(epsilon_for(z, k)) and p.epsilon <= target
    assert T_C < p.t_upload <= T - 1  # t_c = 40 is never enough (epsilon in the thousands)
    # one step earlier would break the target
    assert epsilon_for(noise_multiplier_at(SCHED, p.t_upload - 1, clip), k) > target
    # and a linear scan agrees
    assert p.t_upload == next(t for t in range(T_C, T) if epsilon_for(noise_multiplier_at(SCHED, t, clip), k) <= target)
    ab_c, ab_u = float(SCHED.alpha_bars[T_C]), float(SCHED.alpha_bars[p.t_upload])
    assert p.extra_noise_std == pytest.approx(math.sqrt(1 - ab_u / ab_c))
    # x_tc's noise carried forward plus the extra noise is exactly x_tu's noise
    assert (ab_u / ab_c) * (1 - ab_c) + p.extra_noise_std**2 == pytest.approx(1 - ab_u)
    assert p.extra_noise_std_at_cut == pytest.approx(math.sqrt(ab_c / ab_u - 1))
    assert (p.t_cut, p.clip, p.delta, p.max_uploads_per_image, p.target_epsilon) == (T_C, clip, 1e-5, k, target)


def test_plan_is_monotone_in_epsilon_k_and_clip():
    targets = [1, 2, 4, 10, 30, 100]
    for k in (1, 4, 8):
        t = [plan(e, k, 4.0).t_upload for e in targets]
        assert all(a >= b for a, b in zip(t, t[1:])) and t[0] > t[-1]
    for e in (4, 10):
        t = [plan(e, k, 4.0).t_upload for k in (1, 2, 4, 8, 16)]
        assert all(a <= b for a, b in zip(t, t[1:])) and t[0] < t[-1]
    t = [plan(10, 4, c).t_upload for c in (8.0, 4.0, 2.0, 1.0)]
    assert all(a >= b for a, b in zip(t, t[1:])) and t[0] > t[-1]


def test_off_and_huge_epsilon_upload_at_the_cut_with_honest_epsilon():
    for off in (math.inf, 0.0):
        p = plan(off, 8)
        assert p.t_upload == T_C and p.extra_noise_std == 0.0 and not p.enabled
        assert p.epsilon == pytest.approx(gaussian_upload_epsilon(float(SCHED.alpha_bars[T_C]), 8, DIM))
        assert p.epsilon > 1000  # digits at c = 0.2: the uploads protect almost nothing
    p = plan(1e6, 8)
    assert p.t_upload == T_C and p.extra_noise_std == 0.0 and p.enabled and p.epsilon <= 1e6
    assert p.clip == 8.0  # default clip: sqrt(d)
    local = plan(4.0, 8, t_cut=T)  # c = 1: nothing is uploaded
    assert local.t_upload == T and local.epsilon == 0.0
    assert plan(4.0, 0).epsilon == 0.0 and plan(4.0, 0).t_upload == T_C


def test_impossible_target_says_what_to_change():
    with pytest.raises(ValueError) as err:
        plan(1.0, 8)
    msg = str(err.value)
    assert "epsilon=1" in msg and "K=8" in msg and "fewer uploads per image" in msg
    assert "larger epsilon" in msg and "clip" in msg
    # the fixes it names really work
    k_ok = int(re.search(r"K <= (\d+) meets it", msg).group(1))
    assert k_ok >= 1 and plan(1.0, k_ok).epsilon <= 1.0
    with pytest.raises(ValueError):
        plan(1.0, k_ok + 1)
    clip_ok = float(re.search(r"clip <= ([0-9.]+)", msg).group(1))
    assert plan(1.0, 8, clip_ok * 0.999).epsilon <= 1.0
    eps_ok = float(re.search(r"larger epsilon \(>= ([0-9.e+]+)\)", msg).group(1))
    assert plan(eps_ok * 1.01, 8).t_upload == T - 1


def test_digits_numbers_in_the_docstring():
    """The table in dp.py's docstring (t_u for digits, C = 8)."""
    table = {10: (185, 193, 195), 4: (194, 197, 198), 1: (199, None, None)}
    for eps, row in table.items():
        for k, t_u in zip((1, 4, 8), row):
            if t_u is None:
                with pytest.raises(ValueError, match="cannot be met"):
                    plan(eps, k)
            else:
                assert plan(eps, k).t_upload == t_u


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="t_cut"):
        plan(4, 1, t_cut=T + 1)
    with pytest.raises(ValueError, match="epsilon"):
        plan(-1, 1)
    with pytest.raises(ValueError, match="clip"):
        plan(4, 1, clip=0.0)
    with pytest.raises(ValueError, match="image_dim"):
        plan(4, 1, dim=0)


def test_plan_metrics_and_description():
    p = plan(10, 4)
    m = p.metrics("dp-")
    assert m["dp-t-upload"] == 193 and m["dp-epsilon"] == pytest.approx(p.epsilon)
    assert all(math.isfinite(v) for v in m.values())
    assert "dp-target-epsilon" not in plan(math.inf, 4).metrics("dp-")  # inf is left out
    text = p.describe()
    assert "t_u=193" in text and "RDP" in text and "no subsampling amplification" in text


# -- the upload ---------------------------------------------------------------------------------------------
def test_clip_bounds_the_norm_and_keeps_small_images():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 1, 8, 8, generator=g) * torch.rand(500, 1, 1, 1, generator=g) * 3
    y = clip_images(x, 4.0)
    norms_x, norms_y = x.flatten(1).norm(dim=1), y.flatten(1).norm(dim=1)
    assert (norms_y <= 4.0 * (1 + 1e-6)).all()
    assert (norms_x > 4.5).any() and (norms_x < 3.5).any()
    small = norms_x <= 4.0
    assert torch.equal(y[small], x[small])
    big = ~small
    assert torch.allclose(norms_y[big], torch.full_like(norms_y[big], 4.0), rtol=1e-6)
    cos = torch.nn.functional.cosine_similarity(x[big].flatten(1), y[big].flatten(1))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-6)
    pix = torch.rand(100, 1, 8, 8, generator=g) * 2 - 1  # valid images: the default clip is a no-op
    assert torch.equal(clip_images(pix, math.sqrt(DIM)), pix)


def test_dp_upload_has_the_moments_of_x_tu():
    p = plan(10, 4, clip=0.5)  # a smaller clip puts t_u mid-chain, where the mean is visible
    assert 60 < p.t_upload < 190
    ab = float(SCHED.alpha_bars[p.t_upload])
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(1, 1, 8, 8, generator=g) * 2 - 1)
    x0c = clip_images(x0, 0.5)
    assert x0c.norm() == pytest.approx(0.5, rel=1e-6)  # this image is clipped
    n = 40_000
    x = dp_upload(x0.expand(n, -1, -1, -1), SCHED, p, torch.Generator().manual_seed(2))
    assert x.dtype == torch.float32 and x.shape == (n, 1, 8, 8)
    resid = x - math.sqrt(ab) * x0c
    se = math.sqrt((1 - ab) / n)
    assert resid.mean(0).abs().max() < 5 * se  # mean sqrt(abar_u) * clip(x0), per pixel
    # the unclipped image's mean is far off (the test can tell clipped from unclipped)
    assert (x.mean(0) - math.sqrt(ab) * x0[0]).abs().max() > 20 * se
    var = resid.var(0)
    assert var.mean().item() == pytest.approx(1 - ab, rel=0.01)  # 64 x 40k samples: se ~ 0.1 %
    assert (var / (1 - ab) - 1).abs().max() < 0.05
    # the noise is the generator's: same seed, same upload; another seed, another
    a = dp_upload(x0, SCHED, p, torch.Generator().manual_seed(3))
    b = dp_upload(x0, SCHED, p, torch.Generator().manual_seed(3))
    c = dp_upload(x0, SCHED, p, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_dp_upload_refuses_a_plan_for_other_images():
    with pytest.raises(ValueError, match="d=64"):
        dp_upload(torch.zeros(2, 3, 8, 8), SCHED, plan(10, 4), torch.Generator())


# -- the ledger ------------------------------------------------------------------------------------------------
def test_ledger_never_exceeds_the_cap():
    n_img, k, per_round = 37, 3, 10
    led = UploadLedger(n_img, k)
    g = torch.Generator().manual_seed(0)
    sizes = []
    for _ in range(20):
        eligible = int((led.counts < k).sum())
        idx = led.choose(per_round, g)
        assert len(set(idx.tolist())) == idx.size  # distinct within a round
        assert idx.size == min(per_round, eligible)  # fewer only when fewer are left
        sizes.append(idx.size)
        assert led.counts.max() <= k
    assert led.counts.sum() == n_img * k == sum(sizes) and led.remaining == 0
    assert sizes[:10] == [10] * 10 and 0 < sizes[11] < 10 and sizes[-1] == 0  # full, fewer, then none
    assert led.choose(5, g).size == 0


def test_ledger_chooses_uniformly_among_eligible():
    led = UploadLedger(10, 10**6, counts=np.array([0] * 5 + [10**6] * 5))
    g = torch.Generator().manual_seed(0)
    hits = np.zeros(10, dtype=np.int64)
    for _ in range(4000):
        np.add.at(hits, led.choose(2, g), 1)
    assert hits[5:].sum() == 0  # capped images are never chosen
    assert np.abs(hits[:5] / 8000 - 0.2).max() < 0.02  # each of the 5 left: 1/5 of the picks


def test_ledger_state_round_trip_continues_identically():
    a = UploadLedger(50, 2)
    ga = torch.Generator().manual_seed(5)
    for _ in range(3):
        a.choose(12, ga)
    state = a.state_dict()
    b = UploadLedger(50, 2)
    b.load_state_dict(state)
    assert np.array_equal(a.counts, b.counts) and b.total_uploads == 36
    gb = torch.Generator().manual_seed(0)
    gb.set_state(ga.get_state())
    for _ in range(10):
        assert np.array_equal(a.choose(12, ga), b.choose(12, gb))
    assert b.counts.max() <= 2 and b.remaining == 0
    state["counts"][:] = 0  # the state dict is a copy, not a view
    assert b.counts.sum() == 100
    with pytest.raises(ValueError, match="50 integers"):
        b.load_state_dict({"counts": np.zeros(49, dtype=np.int64)})


# -- make_upload -----------------------------------------------------------------------------------------------
def _images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1


def test_make_upload_without_ledger_is_unchanged():
    images = _images(30)
    idx, x = N.make_upload(images, SCHED, T_C, 8, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the old code, inline
    ref_idx = torch.randperm(30, generator=g)[:8]
    ref = D.upload(SCHED, images[ref_idx], T_C, torch.randn((8, 1, 8, 8), generator=g)).float()
    assert np.array_equal(idx, ref_idx.numpy()) and torch.equal(x, ref)


def test_make_upload_with_plan_uploads_x_tu_of_the_ledgers_choice():
    images = _images(30)
    p = plan(10, 4)
    led = UploadLedger(30, 4)
    idx, x = N.make_upload(images, SCHED, T_C, 8, torch.Generator().manual_seed(7), ledger=led, plan=p)
    assert idx.size == 8 and led.counts.sum() == 8 and (led.counts[idx] == 1).all()
    g = torch.Generator().manual_seed(7)
    UploadLedger(30, 4).choose(8, g)
    assert torch.equal(x, dp_upload(images[idx], SCHED, p, g))  # x_{t_u}, not x_{t_c}
    with pytest.raises(ValueError, match="UploadLedger"):
        N.make_upload(images, SCHED, T_C, 8, torch.Generator(), plan=p)
    with pytest.raises(ValueError, match="UploadLedger"):
        N.make_upload(images, SCHED, T_C, 8, torch.Generator(), ledger=UploadLedger(30, 5), plan=p)
    with pytest.raises(ValueError, match="cut step"):
        N.make_upload(images, SCHED, T_C + 1, 8, torch.Generator(), ledger=led, plan=p)


def test_attack_a_greedy_server_gets_at_most_k_uploads_of_any_image():
    """The server asks for far more uploads than the cap allows, round after round, and counts
    how often it sees each image, from the uploads alone: with almost no noise (t_c = 1 on a
    linear schedule, a huge epsilon) each upload matches its source image by nearest neighbour."""
    sched = D.make_schedule(200, "linear")
    n_img, k = 40, 3
    images = _images(n_img, seed=1)
    p = plan_uploads(sched, 1, 1e9, max_uploads_per_image=k, image_dim=DIM)
    assert p.t_upload == 1

    def seen(ledger):
        counts = np.zeros(n_img, dtype=np.int64)
        for rnd in range(25):
            _, x = N.make_upload(images, sched, 1, 10**6, torch.Generator().manual_seed(rnd),
                                 ledger=ledger, plan=p if ledger is not None else None)
            if x.shape[0]:
                d = torch.cdist(x.flatten(1) / math.sqrt(float(sched.alpha_bars[1])), images.flatten(1))
                np.add.at(counts, d.argmin(1).numpy(), 1)
        return counts

    capped = seen(UploadLedger(n_img, k))
    assert capped.max() <= k and capped.sum() == n_img * k  # every image exactly K times, never more
    uncapped = seen(None)  # the attack works on a node without the ledger
    assert uncapped.max() == 25 > k


def test_plan_is_frozen():
    p = plan(10, 4)
    with pytest.raises(Exception):
        p.t_upload = 1  # type: ignore[misc]
    assert isinstance(p, DPPlan)
