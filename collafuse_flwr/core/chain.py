"""The integer arithmetic of a split chain: where it is cut, where the client starts, how a DDIM step
budget is shared. No torch, so the run-config is validated before anything heavy is imported."""

from __future__ import annotations

import math
from typing import Literal

ServerTarget = Literal["exact", "renoise"]


def cut_step(c: float, T: int) -> int:  # noqa: N803
    """t_c = round(c T). Only c = 0 may give t_c = 0 (raw images uploaded) and only c = 1 t_c = T (nothing
    uploaded): a c in between that rounds to either end would silently switch regime, so it is an error."""
    if not (0.0 <= float(c) <= 1.0) or math.isnan(float(c)):
        raise ValueError(f"cut-ratio must be in [0, 1], got {c!r} (0 = server-only, 1 = local-only)")
    t_c = int(round(float(c) * T))
    if t_c == 0 and c > 0:
        raise ValueError(f"cut-ratio={c!r} with diffusion-steps={T} rounds to t_c = 0, i.e. clients "
                         f"would upload raw images; use cut-ratio >= {1 / T:.6g} (t_c = 1) or 0 "
                         f"(server-only), or raise diffusion-steps")
    if t_c == T and c < 1:
        raise ValueError(f"cut-ratio={c!r} with diffusion-steps={T} rounds to t_c = T, i.e. no "
                         f"server steps; use cut-ratio <= {1 - 1 / T:.6g} (t_c = T - 1) or 1 "
                         f"(local-only), or raise diffusion-steps")
    return t_c


def client_start_step(c: float, T: int, target: ServerTarget = "exact") -> int:  # noqa: N803
    """exact: t_c (the server's output is distributed as x_{t_c}); renoise: round((c + c(1 - c)) T),
    the authors' patch for the mismatched server marginal."""
    t_c = cut_step(c, T)
    return t_c if is_exact(target) or t_c == 0 else min(T, int(round((c + c * (1 - c)) * T)))


def is_exact(target: ServerTarget) -> bool:
    """Whether the target is "exact"; any other value than "renoise" is an error, never a silent renoise."""
    if target not in ("exact", "renoise"):
        raise ValueError(f"server-target must be 'exact' or 'renoise', got {target!r}")
    return target == "exact"


def split_step_budget(num_steps: int | None, T: int, t_c: int) -> tuple[int | None, int | None]:  # noqa: N803
    """Share a DDIM step budget between server (T - t_c) and client (t_c) in proportion to their spans:
    >= 1 and <= its span per side with a span (else None), <= num_steps in all; None/0: (None, None)."""
    if not num_steps:
        return None, None
    if num_steps < 0:
        raise ValueError(f"sampling-steps must be 0 (DDPM) or >= 1, got {num_steps}")
    if not 0 <= t_c <= T:
        raise ValueError(f"t_c must be in [0, T={T}], got {t_c}")
    if t_c == 0:
        return min(num_steps, T), None
    if t_c == T:
        return None, min(num_steps, T)
    if num_steps < 2:
        raise ValueError(f"sampling-steps={num_steps} cannot be split between server and client "
                         f"(t_c = {t_c} of T = {T}: each side needs >= 1 step); use sampling-steps "
                         f">= 2, or 0 for full DDPM")
    srv = min(max(1, round(num_steps * (T - t_c) / T)), num_steps - 1, T - t_c)
    return srv, min(num_steps - srv, t_c)
