r"""Differentially private uploads: per-image (epsilon, delta) over a node's uploads, node side.

Pure numpy/torch/dp-accounting; no Flower. The node calls `plan_uploads` once (from its own
settings), counts uploads with an `UploadLedger` and uploads with `dp_upload`.

What is protected. Each training image's *upload history* in the ledger's scope (a deployed
node: its whole life, every run; `collafuse_flwr.node.ledger`): with replace-one
adjacency (two datasets of the same size that differ in one image, replaced by any other image
of the same shape), the multiset of all x_{t_u} tensors a node uploads is (epsilon, delta)-DP
per image. Which images are uploaded (`UploadLedger.choose`) depends only on indices and past
counts, never on pixel values, so replacing image i changes only the uploads *of i*: at most K
of them (the ledger's cap).

One upload is a Gaussian mechanism. x_0 is L2-clipped, x_0 <- x_0 min(1, C / ||x_0||_2), so two
images differ by at most 2C (C = sqrt(d) by default, the largest norm of an image in [-1, 1]^d:
no distortion for valid images, and a bound that still holds for invalid ones). The upload

    x_{t_u} = sqrt(abar_u) x_0 + sqrt(1 - abar_u) eps,   eps ~ N(0, I) secret,

adds N(0, (1 - abar_u) I) to a function of sensitivity 2 C sqrt(abar_u): noise multiplier
z(t) = sqrt(1 - abar_t) / (2 C sqrt(abar_t)). K uploads of one image with fresh noise compose
K-fold, accounted with dp-accounting's RDP accountant (GaussianDpEvent self-composed K times).

Extra noise as a later step. When z(t_c) is too small for the target, the node diffuses *forward*
to t_u > t_c: x_{t_u} = sqrt(abar_u / abar_c) x_{t_c} + sqrt(1 - abar_u / abar_c) xi, i.e. it adds
Gaussian noise of std sqrt(1 - abar_u / abar_c) (`DPPlan.extra_noise_std`; in units of x_{t_c}
before the rescale: `DPPlan.extra_noise_std_at_cut` = sqrt(abar_c / abar_u - 1)). The result is a
genuine x_{t_u}, so the server's exact sub-diffusion math holds with the client's effective cut
t_u, and the node's private model must cover t <= t_u (train on 1..t_u, start sampling at t_u).
`plan_uploads` picks the smallest t_u in [t_c, T - 1] that meets the target.

Deliberately conservative; what is *not* claimed:
- No amplification by subsampling. Each round uploads a random subset, and Poisson/uniform
  subsampling could in principle shrink epsilon, but the ledger's selection is not an i.i.d.
  Poisson sample (it excludes capped images, so it depends on the history), the server sees how
  many rows each round carries, and over a long run every image is uploaded exactly K times
  anyway. The bound assumes the server knows which uploads are of the same image.
- Uploads only. The private denoiser never leaves the node; what the research harness returns
  under `share-harness` (generated images, FID against private data, disclosure scores) and the
  counts/losses in the metrics are outside the guarantee (losses are data-dependent; a deployment
  that wants everything covered must stop reporting them).
- The ledger's scope. A deployed node keeps one lifetime ledger in its state folder: K counts
  every upload of an image in any run, and since every upload of every run has noise at least
  z* (the plan's multiplier depends only on epsilon, delta, K and C, never on the run's
  schedule), the K-fold bound holds across runs. A node that trusts the run-config (the
  simulation) keeps a ledger per run: there, runs compose (epsilons add up, roughly).
- Fresh, secret noise. The noise must be unpredictable to the server and never reused for two
  releases (equal noise cancels in a difference): a deployed node draws OS entropy for every
  upload; a trusting node keys its draws by its secret, the run's fingerprint and its upload
  count, which only grows (`collafuse_flwr.node.randomness`).
- Real arithmetic. Floating-point Gaussian sampling is not exactly the Gaussian mechanism
  (Mironov 2012); the usual caveat, not addressed here.

Numbers (digits: d = 64, C = 8, T = 200 cosine, c = 0.2 -> t_c = 40, delta = 1e-5, RDP): with
no extra noise epsilon is 1,361 / 5,109 / 10,105 for K = 1 / 4 / 8. The smallest t_u (realised
epsilon) is

    target   K=1          K=4          K=8
    10       185 (9.94)   193 (9.10)   195 (9.21)
    4        194 (3.40)   197 (3.40)   198 (3.18)
    1        199 (0.48)   impossible   impossible

i.e. a useful per-image guarantee leaves the server only the last 1-8 % of the chain; the
exact Gaussian curve (PLD) moves t_u by at most one step, so RDP costs little here.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.imports import load

#: Default delta per image (the issue's choice; well below 1 / number of training images).
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class DPPlan:
    """Where and how a node uploads so each image's upload history is (epsilon, delta)-DP.

    t_cut: the node's configured cut t_c. t_upload: the step its uploads are at (t_u >= t_c);
    the node's effective cut everywhere (the server trains t > t_u on them, hands over x_{t_u} at
    inference, the private model covers t <= t_u). clip: the L2 bound C on each image.
    noise_multiplier: z(t_u) = sqrt(1 - abar_u) / (2 C sqrt(abar_u)). extra_noise_std:
    sqrt(1 - abar_u / abar_c), the std of the forward step's fresh noise from x_{t_c} to x_{t_u}
    (0 when t_u = t_c). epsilon: the realised epsilon(delta) of max_uploads_per_image uploads of
    one image (RDP, no amplification). target_epsilon: what was asked (inf = DP off).
    """

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
        """sqrt(abar_c / abar_u - 1): the extra noise in x_{t_c}'s own units. x_{t_u} rescaled by
        sqrt(abar_c / abar_u) is x_{t_c} plus N(0, this^2) noise; inf if abar_u = 0."""
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


# -- accounting --------------------------------------------------------------------------------------
def epsilon_for(noise_multiplier: float, compositions: int, delta: float = DEFAULT_DELTA) -> float:
    """epsilon(delta) of `compositions` Gaussian mechanisms with this noise multiplier (RDP).

    z = inf or no compositions: 0. z = 0 (no noise, e.g. raw images): inf.
    """
    z = float(noise_multiplier)
    if math.isnan(z) or z < 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if isinstance(compositions, bool) or int(compositions) != compositions or compositions < 0:
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


def _check_plan_args(sched: D.Schedule, t_cut: int, epsilon: float, delta: float, k: int,
                     image_dim: int, clip: float | None) -> float:
    if isinstance(t_cut, bool) or int(t_cut) != t_cut or not 0 <= t_cut <= sched.T:
        raise ValueError(f"t_cut must be an integer step in [0, T={sched.T}], got {t_cut!r}")
    if math.isnan(float(epsilon)) or float(epsilon) < 0:
        raise ValueError(f"upload epsilon must be > 0 (or inf/0 for DP off), got {epsilon!r}")
    if not 0.0 < float(delta) < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
    if isinstance(k, bool) or int(k) != k or k < 0:
        raise ValueError(f"max_uploads_per_image must be an integer >= 0, got {k!r}")
    if isinstance(image_dim, bool) or int(image_dim) != image_dim or image_dim < 1:
        raise ValueError(f"image_dim must be the number of values per image (C*H*W >= 1), got {image_dim!r}")
    c = math.sqrt(int(image_dim)) if clip is None else float(clip)
    if not (c > 0.0 and math.isfinite(c)):
        raise ValueError(f"clip must be a finite L2 norm > 0 (default sqrt(d)), got {clip!r}")
    return c


def plan_uploads(sched: D.Schedule, t_cut: int, epsilon: float, delta: float = DEFAULT_DELTA, *,
                 max_uploads_per_image: int, image_dim: int, clip: float | None = None) -> DPPlan:
    """The smallest upload step t_u in [t_cut, T - 1] whose K-fold RDP epsilon(delta) <= epsilon.

    epsilon = inf or 0 means DP off: t_u = t_cut, and the plan's epsilon is still computed
    honestly (often thousands). t_cut = T (local-only: nothing is uploaded) and K = 0 give
    epsilon 0. Raises ValueError naming epsilon, K and the fixes when even t_u = T - 1 (the last
    step that leaves the server a step to learn) is not enough.
    """
    C = _check_plan_args(sched, t_cut, epsilon, delta, max_uploads_per_image, image_dim, clip)
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
    last_t = sched.T - 1
    last = plan(last_t)
    if last.epsilon > target:
        raise ValueError(_impossible(sched, last, target, C))
    lo, hi = t_cut, last_t  # eps(lo) > target >= eps(hi); eps falls as t grows (abar falls)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan(mid).epsilon <= target:
            hi = mid
        else:
            lo = mid
    return plan(hi)


def _impossible(sched: D.Schedule, last: DPPlan, target: float, clip: float) -> str:
    """The error when no t_u works, with the K, epsilon and clip that would."""
    k, delta, t = last.max_uploads_per_image, last.delta, last.t_upload
    k_ok = 0
    while k_ok < k and epsilon_for(last.noise_multiplier, k_ok + 1, delta) <= target:
        k_ok += 1
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


# -- the upload itself ---------------------------------------------------------------------------------
def clip_images(x: Tensor, clip: float) -> Tensor:
    """x * min(1, C / ||x||_2) per image (norm over all but the batch dimension)."""
    if not (float(clip) > 0.0 and math.isfinite(float(clip))):
        raise ValueError(f"clip must be a finite L2 norm > 0, got {clip!r}")
    norms = x.reshape(x.shape[0], -1).double().norm(dim=1)
    scale = torch.clamp(float(clip) / norms.clamp_min(1e-300), max=1.0)
    return x * scale.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def dp_upload(x0: Tensor, sched: D.Schedule, plan: DPPlan, generator: torch.Generator) -> Tensor:
    """Clip x0 to the plan's L2 bound and diffuse it to x_{t_upload} with fresh secret noise.

    One draw x_{t_u} = sqrt(abar_u) x0 + sqrt(1 - abar_u) eps is the same distribution as x_{t_c}
    followed by the forward step to t_u (the noise variances add up to 1 - abar_u), with half the
    noise to draw. `generator` must be secret to the server and never replay a stream used for
    another release (see the module docstring). Returns float32 on x0's device.
    """
    if plan.t_upload >= sched.T:
        raise ValueError(f"the plan uploads nothing (t_upload={plan.t_upload} = T): local-only")
    if x0.dim() < 2 or x0[0].numel() != plan.image_dim:
        raise ValueError(f"images of {tuple(x0.shape[1:])} values do not match the plan's d={plan.image_dim}")
    x = clip_images(x0.float(), plan.clip)
    noise = torch.randn(x.shape, generator=generator).to(x)
    return D.upload(sched, x, plan.t_upload, noise).float()


# -- how often each image has been uploaded --------------------------------------------------------------
class UploadLedger:
    """Per-image upload counts, kept in the node's private state; enforces the cap K.

    `choose(n, generator)` draws up to n distinct images among those uploaded fewer than K
    times, uniformly among them (the choice depends on indices and counts, never on pixels) and
    counts them. When fewer than n are left it returns all that are left; it never goes over K.
    """

    def __init__(self, num_images: int, max_uploads_per_image: int, counts: np.ndarray | None = None):
        if isinstance(num_images, bool) or int(num_images) != num_images or num_images < 0:
            raise ValueError(f"num_images must be an integer >= 0, got {num_images!r}")
        k = max_uploads_per_image
        if isinstance(k, bool) or int(k) != k or k < 0:
            raise ValueError(f"max_uploads_per_image must be an integer >= 0, got {k!r}")
        self.num_images, self.max_uploads_per_image = int(num_images), int(k)
        self.counts = np.zeros(self.num_images, dtype=np.int64)
        if counts is not None:
            self._set_counts(counts)

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
        """Uploads still allowed over the run."""
        return int(np.clip(self.max_uploads_per_image - self.counts, 0, None).sum())

    def choose(self, n: int, generator: torch.Generator) -> np.ndarray:
        """Up to n distinct image indices with count < K, uniform among them; counts them."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        eligible = np.flatnonzero(self.counts < self.max_uploads_per_image)
        if eligible.size == 0:
            return np.zeros(0, dtype=np.int64)
        pick = torch.randperm(eligible.size, generator=generator)[: int(n)].numpy()
        idx = eligible[pick].astype(np.int64)
        self.counts[idx] += 1
        return idx

    def state_dict(self) -> dict:
        return {"counts": self.counts.copy(), "max_uploads_per_image": self.max_uploads_per_image}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counts. The cap stays this ledger's (the node's current setting); images
        already at or over it are simply never chosen again."""
        self._set_counts(state["counts"])
