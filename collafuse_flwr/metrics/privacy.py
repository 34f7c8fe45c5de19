r"""A formal (epsilon, delta) bound for CollaFuse uploads, each a Gaussian mechanism: divided by sqrt(abar_c),
x_{t_c} = sqrt(abar_c) x_0 + sqrt(1 - abar_c) eps is x_0 plus noise of std sqrt(1 - abar_c) / sqrt(abar_c). With d
pixels in [-1, 1] the L2 sensitivity (replace-one on the image) is at worst S = 2 sqrt(d) (black vs white, so
epsilon is usually huge; a tighter ``l2_sensitivity`` may be passed), so z = sqrt(1 - abar_c) / (sqrt(abar_c) S).
An image uploaded k times (fresh noise each round) composes k mechanisms; different images do not, for a
per-image guarantee. The bound covers the uploads only.

Accountants (dp-accounting): ``"rdp"`` (default) self-composes ``GaussianDpEvent(z)`` k times in an
``RdpAccountant``; ``"pld"`` inverts the exact Gaussian curve (k-fold = std z / sqrt(k)) with
``get_epsilon_gaussian``, tight and never above RDP. ``PLDAccountant`` is not used: its discretised
PMF ran out of memory (7 TiB requested, measured) for the small z of early cuts.
"""

from __future__ import annotations

import math
from typing import Literal

from collafuse_flwr.imports import load

Accountant = Literal["rdp", "pld"]
ACCOUNTANTS = ("rdp", "pld")


def _validate(alpha_bar_c: float, num_uploads: int, dim: int, delta: float,
              l2_sensitivity: float | None, accountant: str) -> tuple[float, float]:
    abar = float(alpha_bar_c)
    if not 0.0 <= abar <= 1.0:  # NaN fails the comparison too
        raise ValueError(f"alpha_bar_c must be in [0, 1] (abar at the cut step), got {alpha_bar_c!r}")
    if isinstance(num_uploads, bool) or int(num_uploads) != num_uploads or num_uploads < 0:
        raise ValueError(f"num_uploads must be an integer >= 0 (uploads of one image), got {num_uploads!r}")
    if isinstance(dim, bool) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be the number of pixel values per image (C*H*W >= 1), got {dim!r}")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5, got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    sens = 2.0 * math.sqrt(int(dim)) if l2_sensitivity is None else float(l2_sensitivity)  # black vs white
    if not sens > 0.0 or math.isinf(sens):
        raise ValueError(f"l2_sensitivity must be a finite number > 0, got {l2_sensitivity!r}")
    return abar, sens


def upload_noise_multiplier(alpha_bar_c: float, dim: int, l2_sensitivity: float | None = None) -> float:
    """z = sqrt(1 - abar_c) / (sqrt(abar_c) * S); inf at abar_c = 0, 0 at abar_c = 1."""
    abar, sens = _validate(alpha_bar_c, 0, dim, 0.5, l2_sensitivity, "rdp")
    if abar == 0.0:
        return math.inf
    return math.sqrt(1.0 - abar) / (math.sqrt(abar) * sens)


def gaussian_upload_epsilon(alpha_bar_c: float, num_uploads: int, dim: int, delta: float = 1e-5,
                            l2_sensitivity: float | None = None, accountant: Accountant = "rdp") -> float:
    """Epsilon at ``delta`` for one image uploaded ``num_uploads`` times at cut abar_c: 0 for no uploads
    or pure noise (abar_c = 0), inf for raw images (abar_c = 1)."""
    abar, _ = _validate(alpha_bar_c, num_uploads, dim, delta, l2_sensitivity, accountant)
    k = int(num_uploads)
    if k == 0 or abar == 0.0:
        return 0.0
    if abar == 1.0:
        return math.inf
    z = upload_noise_multiplier(abar, dim, l2_sensitivity)
    if accountant == "pld":  # dp-accounting's exact inverse for the Gaussian mechanism (Balle & Wang 2018)
        return float(load("dp_accounting.gaussian_mechanism").get_epsilon_gaussian(z / math.sqrt(k), delta))
    dp_accounting = load("dp_accounting")
    acc = load("dp_accounting.rdp").RdpAccountant()
    acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(z), k))
    return float(acc.get_epsilon(delta))


def sensitivity_note(alpha_bar_c: float, num_uploads: int, dim: int, delta: float = 1e-5,
                     l2_sensitivity: float | None = None, accountant: Accountant = "rdp") -> str:
    """The assumptions behind an epsilon, in words, to be stored next to it in results."""
    abar, sens = _validate(alpha_bar_c, num_uploads, dim, delta, l2_sensitivity, accountant)
    eps = gaussian_upload_epsilon(abar, num_uploads, dim, delta, l2_sensitivity, accountant)
    z = upload_noise_multiplier(abar, dim, l2_sensitivity)
    how = (f"default 2*sqrt(d) for d={int(dim)} pixel values in [-1, 1]" if l2_sensitivity is None
           else f"user-supplied bound on ||x0 - x0'||_2 (d={int(dim)})")
    method = ("RDP accountant (GaussianDpEvent self-composed)" if accountant == "rdp"
              else "exact Gaussian privacy-loss curve (PLD)")
    return (f"(epsilon={eps:.6g}, delta={delta:g}) per training image, for a server that sees "
            f"{int(num_uploads)} upload(s) of that image; each upload x_tc = sqrt(abar_c) x0 + "
            f"sqrt(1-abar_c) eps is a Gaussian mechanism on x0 with abar_c={abar:.6g}, L2 "
            f"sensitivity S={sens:.6g} ({how}; replace-one adjacency on the image), noise "
            f"multiplier z=sqrt(1-abar_c)/(sqrt(abar_c)*S)={z:.6g}; composed with the {method} "
            f"of dp-accounting. Covers the uploads only, not model updates or generated samples.")
