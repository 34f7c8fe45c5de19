"""Flower Message-API strategies: CollaFuse and the baselines it is compared against."""

from .centralized import Centralized
from .collafuse import CollaFuse
from .fedavg import FedAvgDiffusion
from .local_only import LocalOnly

__all__ = ["Centralized", "CollaFuse", "FedAvgDiffusion", "LocalOnly"]
