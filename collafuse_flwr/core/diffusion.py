r"""DDPM math for CollaFuse: the noise schedule, the timestep split, and split sampling (pure torch).

Timesteps are 1-indexed, t in {1, ..., T}, with abar_0 = 1 (t = 0 is clean data):
    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s).
The chain is cut at t_c = round(c T): the client owns t <= t_c, the server t > t_c. For t > t_c,
    x_t = sqrt(abar_t / abar_c) x_{t_c} + sqrt(1 - abar_t / abar_c) eps'
has noise variance (abar_t/abar_c - abar_t) + (1 - abar_t/abar_c) = 1 - abar_t, exactly q(x_t | x_0)'s, without
x_0: the server is a DDPM whose clean data is x_{t_c} and cumulative schedule abar_t / abar_c. Both sides run
`reverse_chain`, anchored at 0 (client) or t_c (server).

The hand-off must be a *draw* of x_{t_c}, but the sub-chain posterior's variance is too small (0 at its last step), so
the server's DDPM steps use the Analytic-DPM variance (Bao et al., ICLR 2022, `reverse_variance`), exact for Gaussian
data with the optimal denoiser. DDIM (eta = 0) steps in the full chain's coordinates; for x_0 ~ N(0, s2) its hand-off
is short by 1 - prod cos^2(dtheta), tan(theta_t) = sqrt(abar_t s2 / (1 - abar_t)) (both tested). "renoise" is
the authors' public code, kept for the ablation (`sub_diffuse`, `renoise_matched_step`, `client_start_step`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from torch import Tensor

from collafuse_flwr.core.chain import (ServerTarget, client_start_step, cut_step, is_exact,  # noqa: F401
                                       split_step_budget)

BetaSchedule = Literal["linear", "cosine"]
#: q(x_{t-1} | x_t, x_anchor)'s variance (classic DDPM, 0 at the anchor), or `reverse_variance`'s.
Variance = Literal["posterior", "analytic"]
#: eps_model(x_t, t) -> predicted noise; t is a LongTensor of shape (N,) with values in 1..T.
EpsModel = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule, indexed by timestep t in 0..T (betas[0] = 0, alpha_bars[0] = 1)."""

    betas: Tensor
    alpha_bars: Tensor

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        return self.betas.shape[0] - 1


def make_schedule(T: int, kind: BetaSchedule = "linear") -> Schedule:  # noqa: N803
    """float64 (products of ~1000 factors lose precision in float32). linear: betas 1e-4..0.02 scaled
    by 1000/T (Ho et al. 2020); cosine: abar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2),
    s = 0.008, betas capped at 0.999 (Nichol & Dhariwal 2021)."""
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"diffusion-steps must be an integer >= 1, got {T!r}")
    if kind == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), T, dtype=torch.float64)
    elif kind == "cosine":
        # diffusers' float32 betas (<= 1e-7 relative error on abar_t); the cumprod is float64
        betas = betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine").to(torch.float64)
    else:
        raise ValueError(f"beta-schedule must be 'linear' or 'cosine', got {kind!r}")
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
    return Schedule(betas=betas, alpha_bars=torch.cumprod(1 - betas, dim=0))


def renoise_matched_step(sched: Schedule, t_c: int) -> int:
    """The step t* with abar_{t*} closest to abar_c^2, where the renoise hand-off lies:
    sqrt(abar_c) x_{t_c} + sqrt(1 - abar_c) eps = abar_c x_0 + N(0, (1 - abar_c^2) I)."""
    if not 0 <= t_c <= sched.T:
        raise ValueError(f"t_c must be in [0, T={sched.T}], got {t_c}")
    return int(torch.argmin((sched.alpha_bars - sched.alpha_bars[t_c] ** 2).abs()))


def relative_alpha_bar(sched: Schedule, t: Tensor | int, anchor: int, relative: bool = True) -> Tensor:
    """abar_t / abar_anchor: the cumulative schedule of the chain that starts at x_anchor (abar_t if not relative)."""
    if not relative:
        return sched.alpha_bars[t]
    return sched.alpha_bars[torch.as_tensor(t, device=sched.alpha_bars.device)] / sched.alpha_bars[anchor]


def _noised(ab: Tensor, x: Tensor, noise: Tensor) -> Tensor:
    ab = ab.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return ab.sqrt() * x + (1 - ab).sqrt() * noise


def upload(sched: Schedule, x0: Tensor, t_c: int, noise: Tensor | None = None) -> Tensor:
    """x_{t_c} = sqrt(abar_c) x_0 + sqrt(1 - abar_c) eps: the only data-derived tensor a client sends
    (t_c = 0 returns x_0: server-only CollaFuse shares raw images)."""
    noise = torch.randn_like(x0) if noise is None else noise
    return _noised(sched.alpha_bars[torch.full((x0.shape[0],), t_c, dtype=torch.long)], x0, noise)


def sub_diffuse(sched: Schedule, x_anchor: Tensor, anchor: int, t: Tensor, noise: Tensor,
                target: ServerTarget = "exact") -> Tensor:
    """Noise x_anchor up to step t > anchor. exact: x_t = sqrt(abar_t/abar_a) x_a + sqrt(1 - abar_t/abar_a) eps'
    (marginal = q(x_t|x_0)); renoise: x_t = sqrt(abar_t) x_a + sqrt(1 - abar_t) eps' (x_a as clean data)."""
    return _noised(relative_alpha_bar(sched, t.cpu(), anchor, relative=is_exact(target)), x_anchor, noise)


def sample_timesteps(n: int, low: int, high: int, generator: torch.Generator | None = None) -> Tensor:
    if not 1 <= low <= high:
        raise ValueError(f"empty timestep range [{low}, {high}]")
    return torch.randint(low, high + 1, (n,), generator=generator)


def client_loss(eps_model: EpsModel, sched: Schedule, x0: Tensor, t_c: int,
                generator: torch.Generator | None = None) -> Tensor:
    """The DDPM epsilon loss restricted to the client's steps t ~ U{1..t_c}."""
    t = sample_timesteps(x0.shape[0], 1, t_c, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = _noised(sched.alpha_bars[t.cpu()], x0, noise)
    return torch.nn.functional.mse_loss(eps_model(x_t, t), noise)


def server_loss(eps_model: EpsModel, sched: Schedule, x_tc: Tensor, t_c: int | Tensor,
                target: ServerTarget = "exact", generator: torch.Generator | None = None) -> Tensor:
    """Epsilon loss on t ~ U{t_c+1..T} from uploads x_{t_c} alone, against `sub_diffuse`'s fresh eps' (never
    the client's noise). A per-row t_c (nodes' own cuts) draws row i's t from U{t_c[i]+1..T}."""
    if isinstance(t_c, Tensor):
        t_c = t_c.long().cpu()
        if bool((t_c >= sched.T).any()) or bool((t_c < 0).any()):
            raise ValueError(f"per-row cut steps must be in 0..{sched.T - 1}")
        u = torch.rand(x_tc.shape[0], generator=generator)
        t = (t_c + 1 + (u * (sched.T - t_c)).long().clamp(max=sched.T - 1 - t_c)).to(x_tc.device)
    else:
        t = sample_timesteps(x_tc.shape[0], t_c + 1, sched.T, generator).to(x_tc.device)
    noise = torch.randn(x_tc.shape, generator=generator).to(x_tc)
    x_t = sub_diffuse(sched, x_tc, t_c, t, noise, target)  # type: ignore[arg-type]  # a per-row anchor broadcasts
    return torch.nn.functional.mse_loss(eps_model(x_t, t), noise)


def predict_anchor(sched: Schedule, x_t: Tensor, t: int, eps: Tensor, anchor: int, relative: bool = True) -> Tensor:
    """Tweedie's estimate x_a = (x_t - sqrt(1 - a'_t) eps) / sqrt(a'_t) of the chain's clean end."""
    ab = relative_alpha_bar(sched, t, anchor, relative).to(device=x_t.device, dtype=x_t.dtype)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def posterior(sched: Schedule, x_t: Tensor, x_anchor_hat: Tensor, t: int, anchor: int,
              relative: bool = True) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_anchor) for the chain anchored at `anchor`.

    mean = sqrt(a'_{t-1}) beta_t / (1 - a'_t) x_a + sqrt(alpha_t) (1 - a'_{t-1}) / (1 - a'_t) x_t,
    var  = beta_t (1 - a'_{t-1}) / (1 - a'_t), with a' = abar / abar_anchor (or abar when not relative).
    At t - 1 = anchor the variance is 0 and the mean is x_anchor."""
    ab_t, ab_prev = relative_alpha_bar(sched, t, anchor, relative), relative_alpha_bar(sched, t - 1, anchor, relative)
    beta = 1 - ab_t / ab_prev
    c_anchor = ab_prev.sqrt() * beta / (1 - ab_t)
    c_t = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    var = beta * (1 - ab_prev) / (1 - ab_t)
    f = dict(device=x_t.device, dtype=x_t.dtype)
    return c_anchor.to(**f) * x_anchor_hat + c_t.to(**f) * x_t, var.to(**f)


def reverse_variance(sched: Schedule, t: int, anchor: int, relative: bool, gamma: float) -> Tensor:
    """Analytic-DPM's variance for x_t -> x_{t-1} (Bao et al. 2022, Thm 1), clamped.

    Var(x_{t-1} | x_t) = var_post + k_a^2 (1 - a'_t) / a'_t (1 - gamma), gamma = E||eps_hat||^2 / d,
    k_a = sqrt(a'_{t-1}) beta_t / (1 - a'_t) (law of total variance, averaged over x_t). The kernel does not depend on
    the parametrisation, so it is clamped to what the full chain allows for data of per-pixel variance <= 1 (in
    [-1, 1]): [v_full, v_full + k_0^2], which keeps an imperfect model from producing variances no data could have."""
    ab_t, ab_prev = relative_alpha_bar(sched, t, anchor, relative), relative_alpha_bar(sched, t - 1, anchor, relative)
    beta = sched.betas[t]
    var_post = beta * (1 - ab_prev) / (1 - ab_t)
    k_a = ab_prev.sqrt() * beta / (1 - ab_t)
    var_anchor = (1 - ab_t) / ab_t * max(0.0, 1.0 - float(gamma))
    full_t, full_prev = sched.alpha_bars[t], sched.alpha_bars[t - 1]
    lo = beta * (1 - full_prev) / (1 - full_t)
    hi = lo + full_prev * (beta / (1 - full_t)) ** 2
    return (var_post + k_a**2 * var_anchor).clamp(min=float(lo), max=float(hi))


def _strided_steps(t_from: int, t_to: int, num_steps: int | None) -> list[int]:
    if num_steps is None or num_steps <= 0 or num_steps >= t_from - t_to:
        return list(range(t_from, t_to - 1, -1))
    pts = torch.linspace(t_from, t_to, num_steps + 1).round().long().tolist()
    return sorted(set(pts), reverse=True)


@torch.no_grad()
def reverse_chain(eps_model: EpsModel, sched: Schedule, x: Tensor, t_from: int, t_to: int, anchor: int | None = None,
                  relative: bool = True, num_steps: int | None = None, generator: torch.Generator | None = None,
                  clip: float | None = None, variance: Variance = "posterior") -> Tensor:
    """Run the reverse process from x at step t_from down to step t_to.

    anchor: the step the chain treats as clean (default t_to). num_steps None/0: DDPM ancestral sampling over every
    step; n >= 1: deterministic DDIM (eta = 0) on min(n, t_from - t_to) steps. variance (DDPM): "posterior" returns
    the mean at the anchor; "analytic" draws every step, the anchor's included. clip: bound on |anchor estimate|."""
    anchor = t_to if anchor is None else anchor
    if not (anchor <= t_to <= t_from <= sched.T):
        raise ValueError(f"need anchor <= t_to <= t_from <= T, got {anchor}, {t_to}, {t_from}, {sched.T}")
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be None/0 (DDPM) or >= 1 (DDIM steps), got {num_steps}")
    if variance not in ("posterior", "analytic"):
        raise ValueError(f"variance must be 'posterior' or 'analytic', got {variance!r}")
    ddpm = not num_steps
    steps = _strided_steps(t_from, t_to, None if ddpm else num_steps)
    for t, s in zip(steps[:-1], steps[1:]):
        eps = eps_model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))
        x_a = predict_anchor(sched, x, t, eps, anchor, relative)
        if clip is not None:
            x_a = x_a.clamp(-clip, clip)
        if ddpm:
            mean, var = posterior(sched, x, x_a, t, anchor, relative)
            if variance == "analytic":
                gamma = eps.detach().pow(2).mean().item()  # torch's cascade sum: ~1e-7 relative
                var = reverse_variance(sched, t, anchor, relative, gamma).to(var)
            elif s == anchor:
                var = torch.zeros_like(var)
            x = mean + var.sqrt() * torch.randn(x.shape, generator=generator).to(x) if var.item() > 0 else mean
            continue
        ab_s = relative_alpha_bar(sched, s, anchor, relative).to(x)
        ab_t = relative_alpha_bar(sched, t, anchor, relative).to(x)
        eps_dir = (x - ab_t.sqrt() * x_a) / (1 - ab_t).sqrt()
        if relative and anchor > 0:
            # Full chain's coordinates, eps_full = sqrt((1 - abar_t) / (1 - a'_t)) eps': the sub-chain's angle
            # jumps to pi/2 at the anchor and loses ~4x more variance (T = 1000, c = 0.2, 20 steps: 21 % vs 5.3 %).
            fs, ft = sched.alpha_bars[s].to(x), sched.alpha_bars[t].to(x)
            eps_full = ((1 - ft) / (1 - ab_t)).sqrt() * eps_dir
            x0_hat = (x - (1 - ft).sqrt() * eps_full) / ft.sqrt()
            x = fs.sqrt() * x0_hat + (1 - fs).sqrt() * eps_full
        else:
            x = ab_s.sqrt() * x_a + (1 - ab_s).sqrt() * eps_dir
    return x


def anchor_bound(sched: Schedule, anchor: int, z: float = 4.0) -> float:
    """sqrt(abar_a) + z sqrt(1 - abar_a): the range of x_anchor for data in [-1, 1] (|eps| <= z). Clamping to
    it is x_0-clipping for the sub-chain; without it, betas near 1 (cosine, 0.999) amplify the server
    model's early errors up to 1/sqrt(1 - beta_T) ~ 30x per step."""
    ab = float(sched.alpha_bars[anchor])
    return math.sqrt(ab) + z * math.sqrt(1.0 - ab)


def server_sample(eps_model: EpsModel, sched: Schedule, shape: tuple[int, ...], t_c: int,
                  target: ServerTarget = "exact", num_steps: int | None = None,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                  variance: Variance = "analytic") -> Tensor:
    """Server half of inference: x_T ~ N(0, I) -> a draw of x_{t_c} (x_T itself when t_c = T). exact: the
    sub-chain anchored at t_c; renoise: the absolute chain anchored at 0, stopped at t_c (the authors')."""
    x = torch.randn(shape, generator=generator).to(device)
    if t_c >= sched.T:
        return x
    exact = is_exact(target)
    return reverse_chain(eps_model, sched, x, sched.T, t_c, anchor=t_c if exact else 0, relative=exact,
                         num_steps=num_steps, generator=generator, clip=anchor_bound(sched, t_c), variance=variance)


def client_finish(eps_model: EpsModel, sched: Schedule, x_start: Tensor, t_start: int, num_steps: int | None = None,
                  generator: torch.Generator | None = None, variance: Variance = "posterior") -> Tensor:
    """Client half of inference (and the baselines' whole chain, t_start = T): x_{t_start} -> x_0
    with the private model, clipped to [-1, 1]."""
    x = reverse_chain(eps_model, sched, x_start, t_start, 0, anchor=0, num_steps=num_steps,
                      generator=generator, clip=1.0, variance=variance)
    return x.clamp(-1, 1)


def split_sample(server_model: EpsModel | None, client_model: EpsModel | None, sched: Schedule,
                 shape: tuple[int, ...], c: float, target: ServerTarget = "exact", num_steps: int | None = None,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Full CollaFuse inference in one process; num_steps is shared by `split_step_budget`."""
    t_c = cut_step(c, sched.T)
    s_srv, s_cli = split_step_budget(num_steps, sched.T, t_c)
    if t_c < sched.T and server_model is None:
        raise ValueError("cut-ratio < 1 needs a server model")
    if t_c > 0 and client_model is None:
        raise ValueError("cut-ratio > 0 needs a client model")
    x = server_sample(server_model, sched, shape, t_c, target, s_srv, generator, device)  # type: ignore[arg-type]
    t_start = client_start_step(c, sched.T, target)
    return client_finish(client_model, sched, x, t_start, s_cli, generator)  # type: ignore[arg-type]
