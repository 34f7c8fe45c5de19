"""What a node's operator allows: its methods, its noise floor, its upload caps, its DP, its data.

All from `node_config`, which only the operator sets (docs/reference.md); the run-config fills the
privacy keys left unset only where the node trusts it (the simulation), else `DEFAULTS`. A node's c
is a noise level, read on its own `REFERENCE_SCHEDULE`: a server that sets a tiny T or another
schedule gets a larger cut step (or no uploads), never a weaker floor.
"""

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collafuse_flwr import protocol as P
from collafuse_flwr.data.dataset import _EMBEDDED as EMBEDDED
from collafuse_flwr.data.dataset import HF_PREFIX, canonical_name
from collafuse_flwr.config import RunConfig
from collafuse_flwr.core.diffusion import Schedule, cut_step, make_schedule
from collafuse_flwr.data.splits import cache_dir

#: The schedule a node's cut-ratio is read on: the project's default (cosine, T = 200), on which
#: c = 0.2 is abar = 0.90 and c = 0.8 is abar = 0.095. The run's own T and schedule cannot move it.
REFERENCE_SCHEDULE = ("cosine", 200)
#: Lifetime uploads of one image by a node that did not set max-uploads-per-image: averaging K
#: uploads gains 10 log10(K) dB of PSNR (6 dB at 4), however many runs the server starts.
DEFAULT_MAX_UPLOADS = 4
DEFAULTS: dict[str, Any] = {  # a node that trusts nothing and set nothing
    P.NODE_CUT_RATIO: 0.2, P.NODE_UPLOADS_PER_ROUND: 64, P.NODE_MAX_UPLOADS: DEFAULT_MAX_UPLOADS,
    P.NODE_EPSILON: 0.0, P.NODE_DELTA: 1e-5, P.NODE_CLIP: 0.0, P.NODE_MAX_SAMPLES: 0, P.NODE_TEST_FRACTION: 0.2,
}
#: NodePolicy's numbers: field -> (node_config key, type); a trusting node falls back on the run-config field
_NUMBERS = {"uploads_per_round": (P.NODE_UPLOADS_PER_ROUND, int), "max_uploads_per_image": (P.NODE_MAX_UPLOADS, int),
            "upload_epsilon": (P.NODE_EPSILON, float), "upload_delta": (P.NODE_DELTA, float),
            "upload_clip": (P.NODE_CLIP, float), "max_samples": (P.NODE_MAX_SAMPLES, int),
            "test_fraction": (P.NODE_TEST_FRACTION, float)}


class NodeConfigError(ValueError):
    """A node_config value is unusable; the message names the key, the value and the fix."""


def in_simulation() -> bool:
    """Inside Flower's simulation engine (Ray workers): a server does not start a deployed node's process."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and getattr(ray, "is_initialized", lambda: False)())


@dataclass(frozen=True)
class NodePolicy:
    methods: frozenset[str]
    trusts_run_config: bool
    abar_floor: float  # every upload has abar <= this (1.0: no floor, raw images allowed)
    uploads_per_round: int
    max_uploads_per_image: int  # per image, over the ledger's scope (0: derived from the run, trusted only)
    upload_epsilon: float  # 0 = DP off
    upload_delta: float
    upload_clip: float  # 0 = sqrt(pixels)
    max_samples: int
    test_fraction: float
    share_harness: bool  # generated images, FID, disclosure scores and losses go back
    state_dir: Path

    @property
    def reproducible(self) -> bool:  # keyed randomness (same run, same draws) only for a trusting node
        return self.trusts_run_config

    @property
    def lifetime_ledger(self) -> bool:  # caps over the node's life, or per run for a trusting node
        return not self.trusts_run_config

    def serves(self, method: str) -> bool:
        return method in self.methods

    def cut_step(self, sched: Schedule, proposed: int) -> int:
        """The first step of the run's schedule noisy enough for the floor (sched.T, nothing uploaded,
        if none is), or the server's `proposed` step where noisier still."""
        ab = sched.alpha_bars.double()
        # relative tolerance: the schedules are float32, so abar at the same t/T differs by ~1e-9
        # between T = 200 and another T, and an honest c equal to the floor must still fit
        ok = (ab[: sched.T + 1] <= self.abar_floor * (1 + 1e-6)).nonzero()
        floor = int(ok[0]) if len(ok) else sched.T
        return max(floor, int(proposed))

    def data_config(self, cfg: RunConfig, node_config: dict[str, Any]) -> RunConfig:
        """The run-config with the node's own data size, split and (untrusting) dataset. An untrusting
        node reads only what its operator names: node_config `dataset`, else the run's dataset name as
        the format of the operator's `data-dir`, else an embedded dataset. Never a run-config `hf:`
        name: a path or a Hub id names files (or the node's Hub cache) of its own, wherever data-dir is."""
        out = dataclasses.replace(cfg, max_samples=self.max_samples, test_fraction=self.test_fraction)
        if self.trusts_run_config:
            return out
        own = str(node_config.get(P.NODE_DATASET, "") or "")
        run = canonical_name(cfg.dataset)
        if not own and run not in EMBEDDED and (run.startswith(HF_PREFIX) or not node_config.get(P.NODE_DATA_DIR)):
            raise NodeConfigError(f"run-config dataset={cfg.dataset!r} would have this node read files the server "
                                  f"names; it reads only what its operator names: set node_config "
                                  f"{P.NODE_DATASET} (and {P.NODE_DATA_DIR}), or run on an embedded dataset "
                                  f"({', '.join(EMBEDDED)})")
        return dataclasses.replace(out, dataset=own or cfg.dataset, data_dir="", download=False, seed=0)


def node_policy(node_config: dict[str, Any], cfg: RunConfig, client: int = -1) -> NodePolicy:
    """The operator's policy from node_config; `cfg` (at slot `client`) only fills a trusting node's unset keys."""
    nc = dict(node_config)
    unknown = sorted(set(nc) - set(P.NODE_KEYS))
    if unknown:
        raise NodeConfigError(f"unknown node_config key(s) {unknown}; a node understands {sorted(P.NODE_KEYS)}")
    trust = _bool(nc, P.NODE_TRUST, in_simulation())
    # only a trusting node reads the run's c (a short client-cut-ratios must not fail another node)
    run_c = cfg.cut_ratio_for(client) if trust else DEFAULTS[P.NODE_CUT_RATIO]
    if P.NODE_UPLOAD_NOISE in nc:
        sigma = _number(nc, P.NODE_UPLOAD_NOISE, float)
        if not 0.0 <= sigma <= 1.0:
            raise NodeConfigError(f"node_config {P.NODE_UPLOAD_NOISE}={sigma} must be in [0, 1]: the least std "
                                  f"sqrt(1 - abar) of the noise in an upload (0 = raw images, 1 = pure noise)")
        floor = 1.0 - sigma**2
    else:
        c = _number(nc, P.NODE_CUT_RATIO, float) if P.NODE_CUT_RATIO in nc else run_c
        if not 0.0 <= c <= 1.0:
            raise NodeConfigError(f"node_config {P.NODE_CUT_RATIO}={c} must be in [0, 1] (0 = raw images, "
                                  f"1 = nothing uploaded)")
        floor = reference_abar(c) if (P.NODE_CUT_RATIO in nc or not trust) else 1.0
    methods = _methods(nc, trust)
    numbers = {f: _number(nc, key, kind) if key in nc else getattr(cfg, f) if trust else DEFAULTS[key]
               for f, (key, kind) in _NUMBERS.items()}
    pol = NodePolicy(methods=methods, trusts_run_config=trust, abar_floor=floor, **numbers,
                     share_harness=_bool(nc, P.NODE_SHARE_HARNESS, trust), state_dir=_state_dir(nc))
    _check(pol, trust)
    return pol


def reference_abar(c: float) -> float:
    """abar at cut ratio c on the node's reference schedule (1.0 at c = 0: no noise)."""
    kind, T = REFERENCE_SCHEDULE  # noqa: N806
    return float(make_schedule(T, kind).alpha_bars[cut_step(c, T)])  # type: ignore[arg-type]


def _check(p: NodePolicy, trust: bool) -> None:
    if p.uploads_per_round < 0:
        raise NodeConfigError(f"node_config {P.NODE_UPLOADS_PER_ROUND} must be >= 0, got {p.uploads_per_round}")
    if p.max_uploads_per_image < (0 if trust else 1):
        raise NodeConfigError(f"node_config {P.NODE_MAX_UPLOADS} must be >= 1 (each image's uploads over the "
                              f"node's life), got {p.max_uploads_per_image}")
    if p.upload_epsilon < 0 or not 0.0 < p.upload_delta < 1.0 or p.upload_clip < 0:
        raise NodeConfigError(f"node_config needs {P.NODE_EPSILON} >= 0 (0 = off), {P.NODE_DELTA} in (0, 1) and "
                              f"{P.NODE_CLIP} >= 0, got {p.upload_epsilon}, {p.upload_delta}, {p.upload_clip}")
    if p.max_samples < 0 or not 0.0 < p.test_fraction < 1.0:
        raise NodeConfigError(f"node_config needs {P.NODE_MAX_SAMPLES} >= 0 and {P.NODE_TEST_FRACTION} in (0, 1), "
                              f"got {p.max_samples}, {p.test_fraction}")


def _methods(nc: dict[str, Any], trust: bool) -> frozenset[str]:
    if P.NODE_METHODS not in nc:
        return frozenset(P.METHODS if trust else P.PRIVATE_METHODS)
    names = [m.strip() for m in str(nc[P.NODE_METHODS]).split(",") if m.strip()]
    bad = sorted(set(names) - set(P.METHODS))
    if bad or not names:
        raise NodeConfigError(f"node_config {P.NODE_METHODS}={nc[P.NODE_METHODS]!r}: give a comma-separated subset "
                              f"of {list(P.METHODS)}" + (f" ({bad} unknown)" if bad else ""))
    return frozenset(names)


def _number(nc: dict[str, Any], key: str, kind: type) -> Any:
    v = nc[key]
    try:
        x = float(v) if not isinstance(v, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or (kind is int and x != int(x)):
        raise NodeConfigError(f"node_config {key}={v!r} must be {'an integer' if kind is int else 'a number'}")
    return kind(x)


def _bool(nc: dict[str, Any], key: str, default: bool) -> bool:
    if key not in nc:
        return default
    v = str(nc[key]).strip().lower()
    if v not in ("true", "false", "1", "0", "yes", "no"):
        raise NodeConfigError(f"node_config {key}={nc[key]!r} must be true or false")
    return v in ("true", "1", "yes")


def _state_dir(nc: dict[str, Any]) -> Path:
    given = str(nc.get(P.NODE_STATE_DIR, "") or "")
    if given and not Path(given).expanduser().is_absolute():
        raise NodeConfigError(f"node_config {P.NODE_STATE_DIR} must be an absolute path, got {given!r}")
    default = (cache_dir() or Path.home() / ".cache" / "collafuse-flwr") / "node-state"
    return Path(given).expanduser() if given else default
