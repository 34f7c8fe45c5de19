"""The split math against the paper's equations: schedule, cut, marginal identity, posterior, sampling."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from collafuse_flwr import diffusion as D

SETTINGS = settings(max_examples=40, deadline=None)


@pytest.mark.parametrize("kind,name", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_schedule_matches_diffusers(kind, name):
    ours = D.make_schedule(1000, kind)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name)
    assert ours.T == 1000
    assert ours.alpha_bars[0] == 1.0 and ours.betas[0] == 0.0
    torch.testing.assert_close(ours.betas[1:].float(), ref.betas.float(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(ours.alpha_bars[1:].float(), ref.alphas_cumprod.float(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedule_monotone_and_ends_noisy(kind):
    s = D.make_schedule(200, kind)
    ab = s.alpha_bars
    assert torch.all(ab[1:] < ab[:-1])
    assert ab[-1] < 0.01


def test_schedule_rejects_bad_input():
    with pytest.raises(ValueError, match="beta-schedule"):
        D.make_schedule(10, "quadratic")
    with pytest.raises(ValueError, match="diffusion-steps"):
        D.make_schedule(0)


@given(c=st.floats(0, 1), T=st.integers(1, 2000))
@SETTINGS
def test_cut_step_in_range(c, T):
    tc = D.cut_step(c, T)
    assert 0 <= tc <= T and tc == round(c * T)


def test_cut_step_boundaries_and_errors():
    assert D.cut_step(0.0, 100) == 0
    assert D.cut_step(1.0, 100) == 100
    assert D.cut_step(0.2, 1000) == 200
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="cut-ratio"):
            D.cut_step(bad, 100)


@given(T=st.integers(2, 1000), c=st.floats(0, 0.99), frac=st.floats(0, 1), kind=st.sampled_from(["linear", "cosine"]))
@SETTINGS
def test_sub_diffusion_marginal_identity_exact(T, c, frac, kind):
    """x_t from the sub-diffusion has exactly the coefficients of q(x_t | x_0)."""
    s = D.make_schedule(T, kind)
    tc = D.cut_step(c, T)
    if tc >= T:
        return
    t = tc + 1 + int(frac * (T - tc - 1))
    ab_c, ab_t = s.alpha_bars[tc], s.alpha_bars[t]
    rel = D.relative_alpha_bar(s, t, tc)
    # x_t = sqrt(rel) (sqrt(ab_c) x0 + sqrt(1-ab_c) eps) + sqrt(1-rel) eps'
    signal = rel.sqrt() * ab_c.sqrt()
    noise_var = rel * (1 - ab_c) + (1 - rel)
    assert torch.isclose(signal, ab_t.sqrt(), rtol=1e-10, atol=1e-12)
    assert torch.isclose(noise_var, 1 - ab_t, rtol=1e-10, atol=1e-12)


def test_sub_diffusion_marginal_monte_carlo():
    """The functions themselves (upload + sub_diffuse) produce q(x_t | x_0) in distribution."""
    torch.manual_seed(0)
    s = D.make_schedule(100, "cosine")
    tc, t = 20, 70
    n = 200_000
    x0 = torch.full((n, 1), 0.7, dtype=torch.float64)
    x_tc = D.upload(s, x0, tc)
    x_t = D.sub_diffuse(s, x_tc, tc, torch.full((n,), t), torch.randn_like(x0))
    assert abs(x_t.mean().item() - s.alpha_bars[t].sqrt().item() * 0.7) < 0.01
    assert abs(x_t.var().item() - (1 - s.alpha_bars[t]).item()) < 0.01
    # the ablation's renoise is *not* the marginal: its variance is off
    x_r = D.sub_diffuse(s, x_tc, tc, torch.full((n,), t), torch.randn_like(x0), target="renoise")
    want = (s.alpha_bars[t] * (1 - s.alpha_bars[tc]) + 1 - s.alpha_bars[t]).item()
    assert abs(x_r.var().item() - want) < 0.01
    assert abs(x_r.var().item() - (1 - s.alpha_bars[t]).item()) > 0.02


@given(T=st.integers(3, 500), c=st.floats(0, 0.95), frac=st.floats(0, 1))
@SETTINGS
def test_posterior_preserves_sub_chain_marginals(T, c, frac):
    """If x_t ~ q(x_t | x_a) then the posterior step gives x_{t-1} ~ q(x_{t-1} | x_a)."""
    s = D.make_schedule(T, "linear")
    a = D.cut_step(c, T)
    if a >= T - 1:
        return
    t = a + 1 + int(frac * (T - a - 1))
    x_a = torch.tensor([1.0], dtype=torch.float64)
    # x_t = m x_a + sd z; posterior mean = c_a x_a + c_t x_t -> linear in (x_a, z)
    probe_t = torch.tensor([0.0], dtype=torch.float64)
    c_a, var = D.posterior(s, probe_t, x_a, t, a)
    c_t = D.posterior(s, torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64), t, a)[0]
    m_t, m_prev = D.relative_alpha_bar(s, t, a).sqrt(), D.relative_alpha_bar(s, t - 1, a).sqrt()
    mean = c_a + c_t * m_t
    total_var = c_t**2 * (1 - m_t**2) + var
    assert torch.isclose(mean, m_prev, atol=1e-8).all()
    assert torch.isclose(total_var, 1 - m_prev**2, atol=1e-8).all()


def test_posterior_anchor_zero_is_standard_ddpm():
    s = D.make_schedule(50, "cosine")
    ref = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", variance_type="fixed_small")
    for t in (1, 10, 49):
        _, var = D.posterior(s, torch.zeros(1), torch.zeros(1), t, 0)
        # diffusers indexes steps from 0: its step k is our t = k + 1
        assert math.isclose(var.item(), ref._get_variance(t - 1).item(), rel_tol=1e-4, abs_tol=1e-9)


def _oracle_client(s, x0):
    """The Bayes-optimal eps-model when the data is the single point x0."""
    def eps(x, t):
        ab = s.alpha_bars[t].to(x).view(-1, *[1] * (x.dim() - 1))
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return eps


def _oracle_server(s, x0, tc):
    """Bayes-optimal eps' for the exact sub-diffusion when x_{t_c} ~ N(sqrt(ab_c) x0, (1-ab_c) I)."""
    ab_c = s.alpha_bars[tc]
    def eps(x, t):
        ab_t = s.alpha_bars[t].to(x).view(-1, *[1] * (x.dim() - 1))
        rel = ab_t / ab_c.to(x)
        m_c, m_t = ab_c.sqrt().to(x) * x0, ab_t.sqrt() * x0
        e_xc = m_c + rel.sqrt() * (1 - ab_c.to(x)) / (1 - ab_t) * (x - m_t)  # E[x_tc | x_t]
        return (x - rel.sqrt() * e_xc) / (1 - rel).sqrt()
    return eps


@pytest.mark.parametrize("num_steps", [None, 10])
def test_client_chain_with_oracle_lands_on_data(num_steps):
    s = D.make_schedule(100, "cosine")
    x0 = torch.tensor([0.5, -0.25, 0.9, -0.8], dtype=torch.float64).view(1, 1, 2, 2)
    x_tc = D.upload(s, x0.expand(8, -1, -1, -1), 40)
    out = D.client_finish(_oracle_client(s, x0), s, x_tc, 40, num_steps=num_steps)
    torch.testing.assert_close(out, x0.expand_as(out), atol=1e-6, rtol=0)


@pytest.mark.parametrize("num_steps", [None, 20])
def test_server_chain_with_oracle_produces_cut_marginal(num_steps):
    """Server sampling with the exact target yields x_{t_c} distributed as q(x_{t_c} | x_0)."""
    torch.manual_seed(1)
    s = D.make_schedule(200, "cosine")
    tc = 40
    x0 = torch.tensor(0.6, dtype=torch.float64)
    x = D.server_sample(_oracle_server(s, x0, tc), s, (20_000, 1, 1, 1), tc, num_steps=num_steps).double()
    want_mean = (s.alpha_bars[tc].sqrt() * x0).item()
    assert abs(x.mean().item() - want_mean) < 0.03
    if num_steps is None:  # DDIM (eta = 0) is deterministic and need not match the variance
        assert abs(x.var().item() - (1 - s.alpha_bars[tc]).item()) < 0.03


def test_split_sample_end_to_end_with_oracles():
    torch.manual_seed(2)
    s = D.make_schedule(100, "linear")
    x0 = torch.tensor(-0.4, dtype=torch.float64)
    c = 0.3
    tc = D.cut_step(c, s.T)
    out = D.split_sample(_oracle_server(s, x0, tc), _oracle_client(s, x0), s, (64, 1, 2, 2), c)
    torch.testing.assert_close(out.double(), torch.full((64, 1, 2, 2), -0.4, dtype=torch.float64), atol=1e-6, rtol=0)


def test_degenerate_cuts_use_one_side_only():
    s = D.make_schedule(30)
    calls = {"server": 0, "client": 0}

    def model(name):
        def eps(x, t):
            calls[name] += 1
            return torch.zeros_like(x)
        return eps

    D.split_sample(model("server"), None, s, (2, 1, 4, 4), c=0.0)
    assert calls == {"server": 30, "client": 0}
    calls.update(server=0)
    D.split_sample(None, model("client"), s, (2, 1, 4, 4), c=1.0)
    assert calls == {"server": 0, "client": 30}
    with pytest.raises(ValueError, match="client model"):
        D.split_sample(model("server"), None, s, (2, 1, 4, 4), c=0.5)


@given(n=st.integers(1, 5), ch=st.integers(1, 3), hw=st.sampled_from([2, 4, 8]), c=st.floats(0, 1),
       steps=st.sampled_from([None, 3]))
@settings(max_examples=25, deadline=None)
def test_split_sample_shapes_and_range(n, ch, hw, c, steps):
    s = D.make_schedule(12)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    out = D.split_sample(zero, zero, s, (n, ch, hw, hw), c, num_steps=steps)
    assert out.shape == (n, ch, hw, hw)
    assert out.min() >= -1 and out.max() <= 1


def test_client_pass_count_is_cut_share():
    """Client inference runs exactly t_c denoiser passes, the server T - t_c."""
    s = D.make_schedule(50)
    seen = {"s": [], "c": []}

    def rec(key):
        def eps(x, t):
            seen[key].append(int(t[0]))
            return torch.zeros_like(x)
        return eps

    D.split_sample(rec("s"), rec("c"), s, (1, 1, 2, 2), c=0.2)
    assert seen["c"] == list(range(10, 0, -1))
    assert seen["s"] == list(range(50, 10, -1))


def test_losses_touch_only_their_side_of_the_cut():
    s = D.make_schedule(100)
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 2, 2)
    D.client_loss(spy, s, x, 20, generator=g)
    assert seen[-1].min() >= 1 and seen[-1].max() <= 20
    D.server_loss(spy, s, x, 20, generator=g)
    assert seen[-1].min() >= 21 and seen[-1].max() <= 100
    assert len(set(seen[-1].tolist())) > 40  # covers the range, not a constant


def test_renoise_patch_start_step():
    assert D.client_start_step(0.2, 1000, "exact") == 200
    assert D.client_start_step(0.2, 1000, "renoise") == round((0.2 + 0.2 * 0.8) * 1000)
    assert D.client_start_step(0.0, 1000, "renoise") == 0
    with pytest.raises(ValueError, match="server-target"):
        D.client_start_step(0.2, 1000, "bogus")


def test_ddim_strides_are_descending_and_hit_ends():
    steps = D._strided_steps(200, 40, 7)
    assert steps[0] == 200 and steps[-1] == 40 and len(steps) == 8
    assert all(a > b for a, b in zip(steps, steps[1:]))
    assert D.split_step_budget(10, 100, 20) == (8, 2)
    assert D.split_step_budget(0, 100, 20) == (None, None)


def test_server_chain_stays_in_the_cut_range_with_a_poor_model():
    """Cosine's last betas (0.999) amplify model error ~30x per step unless the x_{t_c} estimate
    is clamped to the range x_{t_c} can take; a badly wrong model must not blow up."""
    torch.manual_seed(3)
    s = D.make_schedule(200, "cosine")
    tc = 40
    wrong = lambda x, t: 3 * torch.randn_like(x)  # noqa: E731
    x = D.server_sample(wrong, s, (64, 1, 4, 4), tc)
    assert x.abs().max() <= D.anchor_bound(s, tc) * 1.01
    assert D.anchor_bound(s, 0) == 1.0
