"""The integer arithmetic of a split chain: where it is cut, where the client starts, how a DDIM
step budget is shared. No torch: the run-config is validated with these before anything heavy
is imported (`collafuse_flwr.config`, `collafuse-run`'s check of a run-config).
"""

from __future__ import annotations

import math
from typing import Literal

ServerTarget = Literal["exact", "renoise"]


def cut_step(c: float, T: int) -> int:  # noqa: N803
    """t_c = round(c T): the client runs t_c of the T denoising steps.

    Only c = 0 may give t_c = 0 (clients upload raw images) and only c = 1 may give t_c = T
    (nothing is uploaded): a c strictly between that rounds to either end would silently switch
    to one of those very different regimes, so it is an error naming the nearest valid c.
    """
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
    """Where the client starts its reverse chain on the image the server hands it.

    exact: at t_c, because the server's output really is distributed as x_{t_c}.
    renoise: at round((c + c(1 - c)) T), the authors' patch for the mismatched server marginal.
    """
    t_c = cut_step(c, T)
    if target == "exact" or t_c == 0:
        return t_c
    if target == "renoise":
        return min(T, int(round((c + c * (1 - c)) * T)))
    raise ValueError(f"server-target must be 'exact' or 'renoise', got {target!r}")


def split_step_budget(num_steps: int | None, T: int, t_c: int) -> tuple[int | None, int | None]:  # noqa: N803
    """Share a DDIM step budget between server (T - t_c steps) and client (t_c steps).

    In proportion to each side's span, at least one step for each side that has a span, never
    more than that side's span, and never more than num_steps in all. A split chain
    (0 < t_c < T) needs a step on each side, so a budget of 1 there is an error.
    Returns (None, None) for num_steps None/0 (full DDPM on both sides); a side with no span
    gets None.
    """
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
    cli = min(num_steps - srv, t_c)
    return srv, cli
