"""Defences against one hostile or broken client (issue 25). A reply valid in every field can
still take the federation over (constant images just under the magnitude bound, a claim of 1e12
examples, weights x100), but it cannot look like an honest reply: the thresholds come from the
distribution an honest reply follows, so honest replies pass with overwhelming probability (tail
bounds; bit-identical honest runs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: One-sided tail probability allowed per statistic per image. Five statistics per image and 64
#: images an upload: an honest upload is refused with probability < 1e-9 (per round per node).
TAIL_P = 1e-12
#: Standard deviations of the per-image mean's noise allowed (two-sided Gaussian tail 1e-15).
MEAN_Z = 8.0


def chi2_tail_factor(m: int, p: float = TAIL_P, upper: bool = False) -> float:
    """u with P(chi2_m <= m u) <= p (lower tail, u < 1) or P(chi2_m >= m u) <= p (upper, u > 1).
    From the Chernoff bound P <= (u e^(1-u))^(m/2), valid for every m: rigorous, no scipy, and a
    little looser than the exact quantile (only fewer false positives)."""
    if m <= 0:
        return 0.0 if not upper else math.inf
    target = math.log(p) * 2.0 / m  # log(u) + 1 - u must reach this (<= 0)
    f = lambda u: math.log(u) + 1.0 - u - target  # noqa: E731 - decreasing in u > 1, increasing in u < 1
    lo, hi = (1e-300, 1.0) if not upper else (1.0, 2.0)
    while upper and f(hi) > 0:
        hi *= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi) if not upper else 0.5 * (lo + hi)
        if (f(mid) > 0) == upper:
            lo = mid
        else:
            hi = mid
    return lo if not upper else hi


@dataclass(frozen=True)
class UploadCheck:
    """What every image of an honest upload x = sqrt(abar) x0 + s eps (x0 in [-1, 1], s^2 = 1 - abar,
    d pixels) satisfies with probability 1 - TAIL_P per statistic: |mean| <= sqrt(abar) + MEAN_Z s /
    sqrt(d); spread ||x - mean||^2 >= s^2 (d - 1) u_lo and texture (squared differences of disjoint
    neighbour pairs, across and down) >= 2 s^2 m u_lo (constant or smooth images fail); ||x|| <=
    sqrt(abar d) + s sqrt(d u_hi). Lower bounds hold for any x0 by Anderson's theorem (a fixed shift
    only makes a symmetric convex set less likely), upper ones by the triangle inequality."""

    abar: float
    image_shape: tuple[int, int, int]

    @property
    def noise_var(self) -> float:
        return max(0.0, 1.0 - self.abar)

    def _pairs(self, axis: int) -> int:
        c, h, w = self.image_shape
        return c * (h // 2) * w if axis == 2 else c * h * (w // 2)

    def statistics(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per image: mean, spread, texture across rows / down columns, norm (float64)."""
        x = np.asarray(x, dtype=np.float64).reshape(-1, *self.image_shape)
        n = x.shape[0]
        flat = x.reshape(n, -1)
        mean = flat.mean(axis=1)
        h2, w2 = (self.image_shape[1] // 2) * 2, (self.image_shape[2] // 2) * 2
        across = x[..., 0:w2:2] - x[..., 1:w2:2]
        down = x[:, :, 0:h2:2, :] - x[:, :, 1:h2:2, :]
        return {"mean": mean, "spread": ((flat - mean[:, None]) ** 2).sum(axis=1),
                "texture-across": (across.reshape(n, -1) ** 2).sum(axis=1),
                "texture-down": (down.reshape(n, -1) ** 2).sum(axis=1),
                "norm": np.sqrt((flat ** 2).sum(axis=1))}

    def bounds(self) -> dict[str, tuple[float, float]]:
        """(lowest, highest) allowed value of each statistic."""
        d = int(np.prod(self.image_shape))
        s2, ab = self.noise_var, self.abar
        s = math.sqrt(s2)
        slack = 1e-4  # float32 rounding of [-1, 1] data (matters only without noise)
        m_across, m_down = self._pairs(3), self._pairs(2)
        return {
            "mean": (-math.inf, math.sqrt(ab) + MEAN_Z * s / math.sqrt(d) + slack),
            "spread": (s2 * (d - 1) * chi2_tail_factor(d - 1), math.inf),
            "texture-across": (2 * s2 * m_across * chi2_tail_factor(m_across), math.inf),
            "texture-down": (2 * s2 * m_down * chi2_tail_factor(m_down), math.inf),
            "norm": (-math.inf, math.sqrt(ab * d) + s * math.sqrt(d * chi2_tail_factor(d, upper=True)) + slack),
        }

    def __call__(self, x: np.ndarray) -> str:
        """'' when every image could be an honest x_tc, else why not (the first failing image)."""
        if x.size == 0:
            return ""
        stats = self.statistics(x)
        stats["mean"] = np.abs(stats["mean"])
        for name, (lo, hi) in self.bounds().items():
            v = stats[name]
            bad = np.flatnonzero((v < lo) | (v > hi))
            if bad.size:
                i = int(bad[0])
                what = f"below {lo:.3g}" if v[i] < lo else f"above {hi:.3g}"
                return (f"upload statistics: {bad.size} of {len(v)} image(s) cannot be an x_tc at this node's "
                        f"noise level (1 - abar = {self.noise_var:.3g}); image {i}'s {name} is {v[i]:.3g}, "
                        f"{what}")
        return ""

    def summary(self, x: np.ndarray) -> dict[str, float]:
        """Per-upload figures for the report: each statistic over its honest expectation."""
        stats = self.statistics(x)
        d = int(np.prod(self.image_shape))
        s2 = self.noise_var
        out = {"mean": float(np.mean(stats["mean"]))}
        if s2 > 0:
            out["spread-ratio"] = float(np.mean(stats["spread"]) / (s2 * (d - 1)))
            out["texture-ratio"] = float(np.mean(stats["texture-across"]) / (2 * s2 * max(self._pairs(3), 1)))
        return out


def balanced_batches(labels: Tensor, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor] | None:
    """Minibatch row indices in which every client (label) gets the same share of rows: the "auto"
    budget is earned per client, so one that uploaded more gets no larger share. None when all
    hold as many rows (the plain sampler already gives 1/K: honest runs stay bit-identical)."""
    clients, counts = torch.unique(labels, return_counts=True)
    if steps <= 0 or len(clients) <= 1 or bool((counts == counts[0]).all()):
        return None
    rows = [torch.nonzero(labels == c).flatten() for c in clients]
    streams = [torch.empty(0, dtype=torch.long) for _ in rows]
    bs = min(batch_size, int(labels.numel()))
    k = len(rows)
    out: list[Tensor] = []
    take = [bs // k + (1 if j < bs % k else 0) for j in range(k)]
    for _ in range(steps):
        batch = []
        for need, ci in zip(take, torch.randperm(k, generator=generator).tolist()):
            while streams[ci].numel() < need:
                streams[ci] = torch.cat([streams[ci], rows[ci][torch.randperm(rows[ci].numel(), generator=generator)]])
            batch.append(streams[ci][:need])
            streams[ci] = streams[ci][need:]
        out.append(torch.cat(batch))
    return out


#: A client's claimed example count weighs at most this many times the median of the others'.
CLAIM_FACTOR = 2.0
#: A FedAvg update (returned weights minus the global model) may be at most this many times the
#: median of the other clients' update norms; larger ones are scaled down to it.
CLIP_FACTOR = 3.0
#: The fewest other clients whose median may blame one. With one, "the others" is that one client,
#: perhaps the hostile one: claims and updates are still bounded by it (neither client takes the
#: average over), but nobody is flagged, or a claim of 1e-9 examples would name the honest client.
MIN_OTHERS = 2


def _others_median(values: dict[int, float]) -> dict[int, float]:
    """Each client's median of the other clients' values (0 when there are none)."""
    return {c: float(np.median([w for o, w in values.items() if o != c])) if len(values) > 1 else 0.0
            for c in values}


def cap_claims(claims: dict[int, float], declared: dict[int, float]) -> dict[int, float]:
    """Each client's example count for weighting: its claim, at most what it declared at first
    contact and CLAIM_FACTOR x the median of the others' (so a 1e12 claim weighs like two clients)."""
    first = {c: min(v, declared[c]) if declared.get(c, 0) > 0 else v for c, v in claims.items()}
    if len(first) < 2:
        return first
    return {c: min(first[c], CLAIM_FACTOR * med) for c, med in _others_median(first).items()}


def update_norms(updates: dict[int, dict[str, np.ndarray]], base: dict[str, np.ndarray]) -> dict[int, float]:
    """L2 norm of each client's update (its floating-point arrays minus the global model's)."""
    return {c: math.sqrt(sum(float(np.sum((a.astype(np.float64) - base[k].astype(np.float64)) ** 2))
                             for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)))
            for c, arrays in updates.items()}


def clip_bounds(norms: dict[int, float]) -> dict[int, float]:
    """CLIP_FACTOR x the median of the others' norms (inf when there is nothing to compare with)."""
    return {c: CLIP_FACTOR * med if med > 0 else math.inf for c, med in _others_median(norms).items()}


def clipped(arrays: dict[str, np.ndarray], base: dict[str, np.ndarray], scale: float) -> dict[str, np.ndarray]:
    """base + scale x (arrays - base) for floating-point arrays, in their dtype (others as they are)."""
    return {k: ((base[k].astype(np.float64) + scale * (a.astype(np.float64) - base[k].astype(np.float64)))
                .astype(a.dtype) if np.issubdtype(a.dtype, np.floating) else a) for k, a in arrays.items()}
