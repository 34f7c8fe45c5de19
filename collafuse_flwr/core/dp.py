r"""Differentially private uploads, node side. With replace-one adjacency, all x_{t_u} a node uploads in the
ledger's scope (a deployed node: its whole life) are (epsilon, delta)-DP per image. Which images are uploaded
depends only on indices and past counts, never on pixels, so replacing image i changes only the (at most K)
uploads *of i*. With x_0 L2-clipped to C (default sqrt(d), the largest norm in [-1, 1]^d), an upload x_{t_u}
(secret noise) is a Gaussian mechanism of sensitivity 2 C sqrt(abar_u), composed K-fold (dp-accounting's RDP).
If that is not enough at t_c, the node diffuses forward to a genuine x_{t_u}, its effective cut.

Not claimed: subsampling amplification (selection depends on history; the server sees row counts); anything
but uploads; across runs for a trusting (simulated) node, whose ledger is per run; exact floating-point
Gaussian sampling (Mironov 2012). Noise must be fresh and secret (`node.randomness`)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.imports import load

#: Default delta per image (well below 1 / number of training images).
DEFAULT_DELTA = 1e-5


def _is_int(v: object, lo: int) -> bool:
    return not isinstance(v, bool) and int(v) == v and v >= lo  # type: ignore[call-overload,operator]


@dataclass(frozen=True)
class DPPlan:
    """Where and how a node uploads. t_upload (>= t_cut) is its effective cut everywhere; extra_noise_std
    = sqrt(1 - abar_u / abar_c) (x_{t_c} -> x_{t_u}); epsilon: realised for K uploads; target inf: DP off."""

    t_cut: int
    t_upload: int
    clip: float
    delta: float
    max_uploads_per_image: int
    noise_multiplier: float
    extra_noise_std: float
    epsilon: float
    target_epsilon: float = math.inf
    image_dim: int = 0

    @property
    def enabled(self) -> bool:
        """True when a finite target was asked for (the plan may still have t_upload == t_cut)."""
        return math.isfinite(self.target_epsilon)

    @property
    def extra_noise_std_at_cut(self) -> float:
        """sqrt(abar_c / abar_u - 1): the extra noise in x_{t_c}'s own units (inf if abar_u = 0)."""
        s2 = self.extra_noise_std**2
        return math.inf if s2 >= 1.0 else math.sqrt(s2 / (1.0 - s2))

    def metrics(self, prefix: str) -> dict[str, float | int]:
        """Finite numbers for a MetricRecord / results.json (inf values are left out)."""
        out = {f"{prefix}{k.replace('_', '-')}": v for k, v in asdict(self).items()}
        out[f"{prefix}extra-noise-std-at-cut"] = self.extra_noise_std_at_cut
        return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v))
                for k, v in out.items() if math.isfinite(float(v))}

    def describe(self) -> str:
        """The guarantee and its assumptions, in words, to store next to the numbers."""
        how = "no extra noise" if self.t_upload == self.t_cut else (
            f"extra Gaussian noise by diffusing forward from t_c={self.t_cut} to t_u={self.t_upload} "
            f"(std {self.extra_noise_std:.4g} in upload units, {self.extra_noise_std_at_cut:.4g} in x_tc units)")
        return (f"(epsilon={self.epsilon:.6g}, delta={self.delta:g}) per training image over one run "
                f"(target {self.target_epsilon:g}): each image is uploaded at most "
                f"{self.max_uploads_per_image} time(s) (node-enforced), L2-clipped to C={self.clip:.6g} "
                f"(d={self.image_dim}), replace-one adjacency (sensitivity 2C sqrt(abar_u)); uploads are "
                f"x_tu at t_u={self.t_upload} with secret noise, noise multiplier z={self.noise_multiplier:.6g}, "
                f"{how}; K-fold composition with dp-accounting's RDP accountant, no subsampling "
                f"amplification claimed. Covers the uploads only.")


def epsilon_for(noise_multiplier: float, compositions: int, delta: float = DEFAULT_DELTA) -> float:
    """epsilon(delta) of `compositions` Gaussian mechanisms (RDP); z = inf or k = 0: 0; z = 0: inf."""
    z = float(noise_multiplier)
    if math.isnan(z) or z < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not _is_int(compositions, 0):
        raise ValueError(f"compositions must be an integer >= 0, got {compositions!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
    k = int(compositions)
    if k == 0 or math.isinf(z):
        return 0.0
    if z == 0.0:
        return math.inf
    dp_accounting = load("dp_accounting")
    acc = load("dp_accounting.rdp").RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    return float(acc.get_epsilon(float(delta)))


def noise_multiplier_at(sched: D.Schedule, t: int, clip: float) -> float:
    """z(t) = sqrt(1 - abar_t) / (2 C sqrt(abar_t)); 0 at t = 0 (raw images), inf if abar_t = 0."""
    ab = float(sched.alpha_bars[t])
    if ab <= 0.0:
        return math.inf
    return math.sqrt(max(0.0, 1.0 - ab)) / (2.0 * float(clip) * math.sqrt(ab))


def plan_uploads(sched: D.Schedule, t_cut: int, epsilon: float, delta: float = DEFAULT_DELTA, *,
                 max_uploads_per_image: int, image_dim: int, clip: float | None = None) -> DPPlan:
    """The smallest upload step t_u in [t_cut, T - 1] whose K-fold RDP epsilon(delta) <= epsilon (inf or
    0: DP off, t_u = t_cut, epsilon still computed); a ValueError names the fixes when none is enough."""
    if not _is_int(t_cut, 0) or t_cut > sched.T:
        raise ValueError(f"t_cut must be an integer step in [0, T={sched.T}], got {t_cut!r}")
    if math.isnan(float(epsilon)) or float(epsilon) < 0:
        raise ValueError(f"upload epsilon must be > 0 (or inf/0 for DP off), got {epsilon!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
    if not _is_int(max_uploads_per_image, 0):
        raise ValueError(f"max_uploads_per_image must be an integer >= 0, got {max_uploads_per_image!r}")
    if not _is_int(image_dim, 1):
        raise ValueError(f"image_dim must be the number of values per image (C*H*W >= 1), got {image_dim!r}")
    C = math.sqrt(int(image_dim)) if clip is None else float(clip)  # noqa: N806
    if not (C > 0.0 and math.isfinite(C)):
        raise ValueError(f"clip must be a finite L2 norm > 0 (default sqrt(d)), got {clip!r}")
    k, target = int(max_uploads_per_image), float(epsilon)
    off = math.isinf(target) or target == 0.0
    target = math.inf if off else target

    def plan(t_u: int) -> DPPlan:
        z = noise_multiplier_at(sched, t_u, C) if t_u < sched.T else math.inf
        rel = float(sched.alpha_bars[t_u] / sched.alpha_bars[t_cut]) if t_u > t_cut else 1.0
        eps = epsilon_for(z, k, delta) if t_u < sched.T else 0.0
        return DPPlan(int(t_cut), int(t_u), C, float(delta), k, z, math.sqrt(max(0.0, 1.0 - rel)),
                      eps, target, int(image_dim))

    first = plan(t_cut)
    if off or t_cut >= sched.T or first.epsilon <= target:
        return first
    last = plan(sched.T - 1)
    if last.epsilon > target:
        raise ValueError(_impossible(sched, last, target, C))
    lo, hi = t_cut, sched.T - 1  # eps(lo) > target >= eps(hi); eps falls as t grows (abar falls)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if plan(mid).epsilon <= target else (mid, hi)
    return plan(hi)


def _impossible(sched: D.Schedule, last: DPPlan, target: float, clip: float) -> str:
    """The error when no t_u works, with the K, epsilon and clip that would."""
    k, delta, t = last.max_uploads_per_image, last.delta, last.t_upload
    k_ok = next((j for j in range(k) if epsilon_for(last.noise_multiplier, j + 1, delta) > target), k)
    # the noise multiplier that meets the target (epsilon falls as z grows), hence the clip
    lo, hi = last.noise_multiplier, max(1.0, 2 * last.noise_multiplier)
    while epsilon_for(hi, k, delta) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon_for(mid, k, delta) <= target else (mid, hi)
    clip_ok = clip * last.noise_multiplier / hi
    return (f"upload epsilon={target:g} (delta={delta:g}) cannot be met for images uploaded up to "
            f"K={k} times: even at the last usable step t_u={t} of T={sched.T} (noise multiplier "
            f"{last.noise_multiplier:.4g} at clip {clip:.4g}) K uploads give epsilon={last.epsilon:.4g}. "
            f"Fix one of: fewer uploads per image (K <= {k_ok} meets it"
            f"{'; K = 1 does not' if k_ok == 0 else ''}), a larger epsilon (>= {last.epsilon:.4g}), "
            f"or clip images to a smaller L2 norm (clip <= {clip_ok:.4g}, distorts images of larger norm)")


def clip_images(x: Tensor, clip: float) -> Tensor:
    """x * min(1, C / ||x||_2) per image (norm over all but the batch dimension)."""
    if not (float(clip) > 0.0 and math.isfinite(float(clip))):
        raise ValueError(f"clip must be a finite L2 norm > 0, got {clip!r}")
    norms = x.reshape(x.shape[0], -1).double().norm(dim=1)
    scale = torch.clamp(float(clip) / norms.clamp_min(1e-300), max=1.0)
    return x * scale.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def dp_upload(x0: Tensor, sched: D.Schedule, plan: DPPlan, generator: torch.Generator) -> Tensor:
    """Clip x0 to the plan's L2 bound and diffuse it to x_{t_upload} in one draw (the same law as x_{t_c}
    then the forward step). `generator` must be secret and never replay another release's stream."""
    if plan.t_upload >= sched.T:
        raise ValueError(f"the plan uploads nothing (t_upload={plan.t_upload} = T): local-only")
    if x0.dim() < 2 or x0[0].numel() != plan.image_dim:
        raise ValueError(f"images of {tuple(x0.shape[1:])} values do not match the plan's d={plan.image_dim}")
    x = clip_images(x0.float(), plan.clip)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return D.upload(sched, x, plan.t_upload, noise).float()


class UploadLedger:
    """Per-image upload counts in the node's private state; `choose` enforces the cap K and picks by
    indices and counts only, never pixels."""

    def __init__(self, num_images: int, max_uploads_per_image: int, counts: np.ndarray | None = None):
        if not _is_int(num_images, 0):
            raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
        if not _is_int(max_uploads_per_image, 0):
            raise ValueError(f"max_uploads_per_image must be an integer >= 0, got {max_uploads_per_image!r}")
        self.num_images, self.max_uploads_per_image = int(num_images), int(max_uploads_per_image)
        self._set_counts(np.zeros(self.num_images, dtype=np.int64) if counts is None else counts)

    def _set_counts(self, counts: np.ndarray) -> None:
        c = np.asarray(counts)
        if c.shape != (self.num_images,) or (c.size and (c.min() < 0 or not np.issubdtype(c.dtype, np.integer))):
            raise ValueError(f"upload counts must be {self.num_images} integers >= 0, got shape {c.shape}, "
                             f"dtype {c.dtype}")
        self.counts = c.astype(np.int64).copy()

    @property
    def total_uploads(self) -> int:
        """Uploads made so far (monotone while the state persists: a nonce for upload noise)."""
        return int(self.counts.sum())

    @property
    def remaining(self) -> int:
        return int(np.clip(self.max_uploads_per_image - self.counts, 0, None).sum())

    def choose(self, n: int, generator: torch.Generator) -> np.ndarray:
        """Up to n distinct image indices with count < K, uniform among them; counts them."""
        eligible = np.flatnonzero(self.counts < self.max_uploads_per_image)
        if n <= 0 or eligible.size == 0:
            return np.zeros(0, dtype=np.int64)
        idx = eligible[torch.randperm(eligible.size, generator=generator)[: int(n)].numpy()].astype(np.int64)
        self.counts[idx] += 1
        return idx

    def state_dict(self) -> dict:
        return {"counts": self.counts.copy(), "max_uploads_per_image": self.max_uploads_per_image}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts; the cap stays the node's current setting (images over it are never chosen)."""
        self._set_counts(state["counts"])
