r"""DDPM math for CollaFuse: the noise schedule, the timestep split, and split sampling.

Pure torch, no Flower. Timesteps are 1-indexed, t in {1, ..., T}, with the convention
abar_0 = 1 (t = 0 is clean data). The forward process is

    q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I),   abar_t = prod_{s<=t} (1 - beta_s).

CollaFuse cuts the chain at t_c = round(c T). The client owns t <= t_c, the server t > t_c.

Why the server can train on the *exact* sub-diffusion: with x_{t_c} = sqrt(abar_c) x_0 +
sqrt(1 - abar_c) eps and, for t > t_c,

    x_t = sqrt(abar_t / abar_c) x_{t_c} + sqrt(1 - abar_t / abar_c) eps',

x_t = sqrt(abar_t) x_0 + [sqrt(abar_t/abar_c - abar_t) eps + sqrt(1 - abar_t/abar_c) eps'],
whose noise variance is (abar_t/abar_c - abar_t) + (1 - abar_t/abar_c) = 1 - abar_t. So x_t has
exactly the marginal q(x_t | x_0), yet the server never needs x_0: it is an ordinary DDPM whose
"clean data" is x_{t_c} and whose cumulative schedule is abar_t / abar_c (the per-step betas are
unchanged). Its reverse posterior q(x_{t-1} | x_t, x_{t_c}) is the usual DDPM posterior with
abar replaced by abar / abar_c. Both sides are therefore the same code, `reverse_chain`, run with
a different *anchor* (0 for the client, t_c for the server).

The hand-off. The client's chain expects a *draw* of x_{t_c}, which carries N(0, (1 - abar_c) I)
noise, not an estimate of it. The sub-chain posterior q(x_{t-1} | x_t, x_{t_c}) conditions on the
very x_{t_c} the server is meant to sample, so its variance is too small at every step and exactly
0 at the last one (t - 1 = t_c): run with it, the server hands over E[x_{t_c} | x_{t_c+1}] and the
handed-over variance falls short of Var(x_{t_c}) (measured for Gaussian data with the optimal
denoiser: -6.7 % at T = 200, c = 0.2; -18 % at T = 50). The variance a step needs is that of the
true reverse kernel, Var(x_{t-1} | x_t), which is the same for every parametrisation of the chain
and lies between the full chain's posterior variance beta_t (1 - abar_{t-1}) / (1 - abar_t)
(conditioning on x_0) and that plus its x_0 coefficient squared times the data variance
(<= 1 for pixels in [-1, 1]). Even the full chain's posterior variance at every step leaves the
hand-off 5 % short at T = 50 (the DDPM discretisation itself), so the server's DDPM steps use the
Analytic-DPM variance (Bao et al., ICLR 2022): Var(x_{t-1} | x_t) averaged over x_t, estimated from
the batch's mean squared predicted noise (`reverse_variance`), clamped to those bounds. It is exact
for Gaussian data with the optimal denoiser (tested to 1 % for T in {50, 200, 1000},
c in {0.1, ..., 0.9}) and adds no model evaluation. Its last step draws x_{t_c} around the
server's estimate with variance Var(x_{t_c} | x_{t_c+1}), never 0.

DDIM (eta = 0) hands over a deterministic function of x_T: its discretisation of the probability
flow ODE at t_c, stepped in the full chain's coordinates (the server's eps' converted to the
full chain's eps), i.e. what a full-chain DDIM with an equivalent model holds at t_c. It never
matches the variance exactly: for Gaussian data x_0 ~ N(0, s2) with the optimal denoiser each
step multiplies Var(x)/Var(x_true) by cos^2 of the step's angle change, tan(theta_t) =
sqrt(abar_t s2 / (1 - abar_t)), so the hand-off is short by 1 - prod cos^2(dtheta) <= sum dtheta^2,
shrinking with more steps (tested against that closed form: T = 1000, c = 0.2: 20 % short with
5 server steps, 5.3 % with 20, 1.1 % with 100, 0.14 % with 800).

"renoise" is the authors' public-code variant kept for the ablation: the server adds noise to
x_{t_c} with the *absolute* schedule (x_t = sqrt(abar_t) x_{t_c} + sqrt(1 - abar_t) eps'), i.e.
treats x_{t_c} as if it were clean data. That is not q(x_t | x_0); the authors patch the sampler by
letting the client restart its chain at t_max = round((c + c(1 - c)) T), which `client_start_step`
reproduces. The renoise server's own chain is an ordinary DDPM whose data is x_{t_c} and whose
anchor is 0, so stopping it at t_c already hands over a draw (its last step's variance is > 0):
x' = sqrt(abar_c) x_{t_c} + sqrt(1 - abar_c) eps = abar_c x_0 + N(0, (1 - abar_c^2) I), i.e. exactly
q(x_{t*} | x_0) at the step t* where abar_{t*} = abar_c^2 (`renoise_matched_step`). That is the
correct place for the client to start; the authors' t_max approximates it (kept for fidelity).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar
from torch import Tensor

from collafuse_flwr.core.chain import ServerTarget, client_start_step, cut_step, split_step_budget  # noqa: F401

BetaSchedule = Literal["linear", "cosine"]
#: "posterior": q(x_{t-1} | x_t, x_anchor)'s variance (the classic DDPM choice; 0 at the anchor).
#: "analytic": Analytic-DPM's estimate of Var(x_{t-1} | x_t) (`reverse_variance`).
Variance = Literal["posterior", "analytic"]
#: eps_model(x_t, t) -> predicted noise; t is a LongTensor of shape (N,) with values in 1..T.
EpsModel = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Schedule:
    """A DDPM noise schedule. Index arrays by timestep t in 0..T (entry 0 is t = 0, clean)."""

    betas: Tensor  # (T + 1,), betas[0] = 0
    alpha_bars: Tensor  # (T + 1,), alpha_bars[0] = 1

    @property
    def T(self) -> int:  # noqa: N802 - the paper's name
        return self.betas.shape[0] - 1

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.betas.to(device), self.alpha_bars.to(device))


def make_schedule(T: int, kind: BetaSchedule = "linear") -> Schedule:  # noqa: N803
    """Build the schedule in float64 (products of ~1000 factors lose precision in float32).

    linear: betas from 1e-4 to 0.02 scaled by 1000/T (Ho et al. 2020, as diffusers' "linear").
    cosine: abar_t = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008, betas clipped
    to 0.999 (Nichol & Dhariwal 2021, diffusers' "squaredcos_cap_v2").
    """
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"diffusion-steps must be an integer >= 1, got {T!r}")
    if kind == "linear":
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), T, dtype=torch.float64)
    elif kind == "cosine":
        # diffusers computes the betas in Python floats and returns float32 (relative error
        # <= 6e-8 per beta, so <= 1e-7 on abar_t, except ~1.3e-5 on abar_T, where beta is the
        # 0.999 cap); the cumulative product below is taken in float64.
        betas = betas_for_alpha_bar(T, max_beta=0.999, alpha_transform_type="cosine").to(torch.float64)
    else:
        raise ValueError(f"beta-schedule must be 'linear' or 'cosine', got {kind!r}")
    betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])
    alpha_bars = torch.cumprod(1 - betas, dim=0)
    return Schedule(betas=betas, alpha_bars=alpha_bars)


def renoise_matched_step(sched: Schedule, t_c: int) -> int:
    """The step t* with abar_{t*} closest to abar_c^2: where the renoise server's hand-off lies.

    The renoise chain's state at t_c is sqrt(abar_c) x_{t_c} + sqrt(1 - abar_c) eps
    = abar_c x_0 + N(0, (1 - abar_c^2) I), which is q(x_{t*} | x_0) when abar_{t*} = abar_c^2.
    The authors' client_start_step approximates this step with round((c + c(1 - c)) T).
    """
    if not 0 <= t_c <= sched.T:
        raise ValueError(f"t_c must be in [0, T={sched.T}], got {t_c}")
    target = sched.alpha_bars[t_c] ** 2
    return int(torch.argmin((sched.alpha_bars - target).abs()))


def _bcast(v: Tensor, x: Tensor) -> Tensor:
    """Gather per-sample scalars to x's dtype/device and shape (N, 1, 1, ...)."""
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def relative_alpha_bar(sched: Schedule, t: Tensor | int, anchor: int) -> Tensor:
    """abar_t / abar_anchor: the cumulative schedule of the chain that starts at x_anchor."""
    t = torch.as_tensor(t, device=sched.alpha_bars.device)
    return sched.alpha_bars[t] / sched.alpha_bars[anchor]


def _chain_alpha_bar(sched: Schedule, t: int, anchor: int, relative: bool) -> Tensor:
    """abar_t of the chain anchored at `anchor` (relative), or of the full chain."""
    return relative_alpha_bar(sched, t, anchor) if relative else sched.alpha_bars[t]


def q_sample(sched: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward noising: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (t = 0 returns x_0)."""
    ab = _bcast(sched.alpha_bars[t.cpu()], x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def upload(sched: Schedule, x0: Tensor, t_c: int, noise: Tensor | None = None) -> Tensor:
    """The cut image x_{t_c}: the only data-derived tensor a CollaFuse client ever sends.

    t_c = 0 returns x_0 itself (server-only CollaFuse shares raw images).
    """
    if noise is None:
        noise = torch.randn_like(x0)
    t = torch.full((x0.shape[0],), t_c, dtype=torch.long)
    return q_sample(sched, x0, t, noise)


def sub_diffuse(
    sched: Schedule,
    x_anchor: Tensor,
    anchor: int,
    t: Tensor,
    noise: Tensor,
    target: ServerTarget = "exact",
) -> Tensor:
    """Noise x_anchor up to step t > anchor.

    exact: x_t = sqrt(abar_t/abar_a) x_a + sqrt(1 - abar_t/abar_a) eps' (marginal = q(x_t|x_0)).
    renoise: x_t = sqrt(abar_t) x_a + sqrt(1 - abar_t) eps' (x_a treated as clean data).
    """
    if target == "exact":
        ab = _bcast(relative_alpha_bar(sched, t.cpu(), anchor), x_anchor)
    elif target == "renoise":
        ab = _bcast(sched.alpha_bars[t.cpu()], x_anchor)
    else:
        raise ValueError(f"server-target must be 'exact' or 'renoise', got {target!r}")
    return ab.sqrt() * x_anchor + (1 - ab).sqrt() * noise


def sample_timesteps(n: int, low: int, high: int, generator: torch.Generator | None = None) -> Tensor:
    """t ~ U{low, ..., high}, inclusive."""
    if not 1 <= low <= high:
        raise ValueError(f"empty timestep range [{low}, {high}]")
    return torch.randint(low, high + 1, (n,), generator=generator)


def client_loss(
    eps_model: EpsModel,
    sched: Schedule,
    x0: Tensor,
    t_c: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The usual DDPM epsilon loss restricted to the client's steps t ~ U{1..t_c}."""
    t = sample_timesteps(x0.shape[0], 1, t_c, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    x_t = q_sample(sched, x0, t, noise)
    return torch.nn.functional.mse_loss(eps_model(x_t, t), noise)


def server_loss(
    eps_model: EpsModel,
    sched: Schedule,
    x_tc: Tensor,
    t_c: int | Tensor,
    target: ServerTarget = "exact",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Epsilon loss on the server's steps t ~ U{t_c+1..T}, from uploads x_{t_c} alone.

    The target is the fresh noise eps' of `sub_diffuse`, never the client's noise. t_c may be a
    per-row tensor (nodes that chose their own cuts): row i then draws t ~ U{t_c[i]+1..T} and is
    noised from its own anchor.
    """
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


def predict_anchor(
    sched: Schedule, x_t: Tensor, t: int, eps: Tensor, anchor: int, relative: bool = True
) -> Tensor:
    """Tweedie's estimate of the chain's clean end x_anchor from (x_t, predicted noise)."""
    ab = _chain_alpha_bar(sched, t, anchor, relative).to(device=x_t.device, dtype=x_t.dtype)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def posterior(
    sched: Schedule, x_t: Tensor, x_anchor_hat: Tensor, t: int, anchor: int, relative: bool = True
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(x_{t-1} | x_t, x_anchor) for the chain anchored at `anchor`.

    mean = sqrt(a'_{t-1}) beta_t / (1 - a'_t) x_a + sqrt(alpha_t) (1 - a'_{t-1}) / (1 - a'_t) x_t,
    var  = beta_t (1 - a'_{t-1}) / (1 - a'_t), with a' = abar / abar_anchor (or abar when not
    relative). At t - 1 = anchor the variance is 0 and the mean is x_anchor.
    """
    ab_t, ab_prev = _chain_alpha_bar(sched, t, anchor, relative), _chain_alpha_bar(sched, t - 1, anchor, relative)
    beta = 1 - ab_t / ab_prev
    c_anchor = ab_prev.sqrt() * beta / (1 - ab_t)
    c_t = (1 - beta).sqrt() * (1 - ab_prev) / (1 - ab_t)
    var = beta * (1 - ab_prev) / (1 - ab_t)
    f = dict(device=x_t.device, dtype=x_t.dtype)
    return c_anchor.to(**f) * x_anchor_hat + c_t.to(**f) * x_t, var.to(**f)


def reverse_variance(
    sched: Schedule, t: int, anchor: int, relative: bool, gamma: float, data_var_max: float = 1.0
) -> Tensor:
    """Analytic-DPM's variance for the step x_t -> x_{t-1} (Bao et al. 2022, Thm 1), clamped.

    Why: the sampled x_{t-1} must carry the true reverse kernel's variance Var(x_{t-1} | x_t), not
    the posterior's given the chain's clean end (which is 0 at the anchor). By the law of total
    variance, averaged over x_t,

        Var(x_{t-1} | x_t) = var_post + k_a^2 Var(x_a | x_t),
        Var(x_a | x_t)     = (1 - a'_t) / a'_t * (1 - gamma),  gamma = E||eps_hat(x_t)||^2 / d,

    with var_post and k_a = sqrt(a'_{t-1}) beta_t / (1 - a'_t) the posterior variance and anchor
    coefficient of the chain (a' = abar / abar_anchor if relative, else abar). The kernel does not
    depend on the parametrisation, so the result is clamped to what the full chain allows for data
    of per-pixel variance <= data_var_max: [v_full, v_full + k_0^2 data_var_max], with
    v_full = beta_t (1 - abar_{t-1}) / (1 - abar_t) and k_0 = sqrt(abar_{t-1}) beta_t / (1 - abar_t).
    The clamp keeps an imperfect model (gamma far from its true value) from producing variances
    no data in range could have.
    """
    ab_t, ab_prev = _chain_alpha_bar(sched, t, anchor, relative), _chain_alpha_bar(sched, t - 1, anchor, relative)
    beta = sched.betas[t]
    var_post = beta * (1 - ab_prev) / (1 - ab_t)
    k_a = ab_prev.sqrt() * beta / (1 - ab_t)
    var_anchor = (1 - ab_t) / ab_t * max(0.0, 1.0 - float(gamma))
    full_t, full_prev = sched.alpha_bars[t], sched.alpha_bars[t - 1]
    lo = beta * (1 - full_prev) / (1 - full_t)
    hi = lo + full_prev * (beta / (1 - full_t)) ** 2 * data_var_max
    return (var_post + k_a**2 * var_anchor).clamp(min=float(lo), max=float(hi))


def _strided_steps(t_from: int, t_to: int, num_steps: int | None) -> list[int]:
    """Descending timesteps t_from = s_0 > s_1 > ... > s_k = t_to for the reverse chain."""
    span = t_from - t_to
    if num_steps is None or num_steps <= 0 or num_steps >= span:
        return list(range(t_from, t_to - 1, -1))
    pts = torch.linspace(t_from, t_to, num_steps + 1).round().long().tolist()
    out: list[int] = []
    for p in pts:
        if not out or p < out[-1]:
            out.append(int(p))
    return out


@torch.no_grad()
def reverse_chain(
    eps_model: EpsModel,
    sched: Schedule,
    x: Tensor,
    t_from: int,
    t_to: int,
    anchor: int | None = None,
    relative: bool = True,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    clip: float | None = None,
    variance: Variance = "posterior",
) -> Tensor:
    """Run the reverse process from x at step t_from down to step t_to.

    anchor: the step whose state the chain treats as clean (default t_to); the client uses 0,
    the exact-target server t_c. num_steps: None (or 0) runs every step with the DDPM ancestral
    sampler; n >= 1 runs deterministic DDIM (eta = 0) on a grid of min(n, t_from - t_to) steps,
    so a DDIM budget that covers the whole span is DDIM with stride 1, never a silent DDPM.
    variance (DDPM only): "posterior" uses q(x_{t-1} | x_t, x_anchor)'s variance and returns the
    mean at the anchor (the classic sampler); "analytic" uses `reverse_variance` at every step,
    the anchor's included, so the result is a draw of x_{t_to}, not its conditional mean.
    clip: clamp the anchor estimate to [-clip, clip] (1 for x_0; `anchor_bound` for x_{t_c}).
    """
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
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = eps_model(x, tt)
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
            if var.item() > 0:
                noise = torch.randn(x.shape, generator=generator).to(x)
                x = mean + var.sqrt() * noise
            else:
                x = mean
        else:
            ab_s = _chain_alpha_bar(sched, s, anchor, relative).to(x)
            ab_t = _chain_alpha_bar(sched, t, anchor, relative).to(x)
            eps_dir = (x - ab_t.sqrt() * x_a) / (1 - ab_t).sqrt()
            if relative and anchor > 0:
                # Step in the full chain's coordinates: same ODE, but the sub-chain's angle
                # jumps to pi/2 at the anchor, so its last step returns E[x_a | x_t] and loses
                # ~4x more variance (Gaussian data, 20 steps, T = 1000, c = 0.2: 21 % vs 5.3 %).
                # eps_full = E[total noise | x_t] / sqrt(1 - abar_t) = sqrt((1 - abar_t) / (1 - a'_t)) eps'.
                fs, ft = sched.alpha_bars[s].to(x), sched.alpha_bars[t].to(x)
                eps_full = ((1 - ft) / (1 - ab_t)).sqrt() * eps_dir
                x0_hat = (x - (1 - ft).sqrt() * eps_full) / ft.sqrt()
                x = fs.sqrt() * x0_hat + (1 - fs).sqrt() * eps_full
            else:
                x = ab_s.sqrt() * x_a + (1 - ab_s).sqrt() * eps_dir
    return x


def anchor_bound(sched: Schedule, anchor: int, z: float = 4.0) -> float:
    """Range of x_anchor for data in [-1, 1]: sqrt(abar_a) + z sqrt(1 - abar_a) (|eps| <= z).

    Clamping the anchor estimate to it is what x_0-clipping is for an ordinary DDPM (anchor 0
    gives exactly [-1, 1]). Without it, schedules whose last betas approach 1 (cosine, capped at
    0.999) amplify the server model's early errors by up to 1/sqrt(1 - beta_T) ~ 30x per step.
    """
    ab = float(sched.alpha_bars[anchor])
    return math.sqrt(ab) + z * math.sqrt(1.0 - ab)


def server_sample(
    eps_model: EpsModel,
    sched: Schedule,
    shape: tuple[int, ...],
    t_c: int,
    target: ServerTarget = "exact",
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    variance: Variance = "analytic",
) -> Tensor:
    """Server half of inference: x_T ~ N(0, I) -> a draw of x_{t_c} (x_T itself when t_c = T).

    DDPM (num_steps None) uses the Analytic-DPM variance by default, so the hand-off is a sample
    of x_{t_c} (exact target) or of the renoise chain's state at t_c (renoise target), not a
    conditional mean; variance="posterior" reproduces the old hand-off for ablations.
    """
    x = torch.randn(shape, generator=generator).to(device)
    if t_c >= sched.T:
        return x
    if target not in ("exact", "renoise"):
        raise ValueError(f"server-target must be 'exact' or 'renoise', got {target!r}")
    # exact: the sub-chain anchored at t_c. renoise: the server's chain treats x_{t_c} as clean data
    # under the absolute schedule; stop at t_c and hand over that (still noisy) state, as the authors' code does.
    exact = target == "exact"
    return reverse_chain(eps_model, sched, x, sched.T, t_c, anchor=t_c if exact else 0, relative=exact,
                         num_steps=num_steps, generator=generator, clip=anchor_bound(sched, t_c), variance=variance)


def client_finish(
    eps_model: EpsModel,
    sched: Schedule,
    x_start: Tensor,
    t_start: int,
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    variance: Variance = "posterior",
) -> Tensor:
    """Client half of inference: x_{t_start} -> x_0 with the private model, clipped to [-1, 1].

    Also the whole chain of the baselines (t_start = T). variance defaults to the classic DDPM
    posterior variance; "analytic" gives them the server's sampler.
    """
    if t_start == 0:
        return x_start.clamp(-1, 1)
    x = reverse_chain(eps_model, sched, x_start, t_start, 0, anchor=0, num_steps=num_steps,
                      generator=generator, clip=1.0, variance=variance)
    return x.clamp(-1, 1)


def split_sample(
    server_model: EpsModel | None,
    client_model: EpsModel | None,
    sched: Schedule,
    shape: tuple[int, ...],
    c: float,
    target: ServerTarget = "exact",
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Full CollaFuse inference in one process (the Flower apps run the two halves apart).

    num_steps is split between the sides in proportion to their share of the chain.
    """
    t_c = cut_step(c, sched.T)
    s_srv, s_cli = split_step_budget(num_steps, sched.T, t_c)
    if t_c < sched.T and server_model is None:
        raise ValueError("cut-ratio < 1 needs a server model")
    if t_c > 0 and client_model is None:
        raise ValueError("cut-ratio > 0 needs a client model")
    x = server_sample(server_model, sched, shape, t_c, target, s_srv, generator, device)  # type: ignore[arg-type]
    return client_finish(client_model, sched, x, client_start_step(c, sched.T, target), s_cli, generator)  # type: ignore[arg-type]
