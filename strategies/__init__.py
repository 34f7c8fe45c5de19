"""Flower Message-API strategies: CollaFuse and the baselines it is compared against, with plain
constructor arguments in the style of `flwr.serverapp.strategy.FedAvg` (this project's ServerApp
maps its run-config onto them in `collafuse_flwr/server/build.py`)."""

from .base import (DiffusionStrategy, ImplausibleUpload, MalformedReply, NotAdmitted, OverBudget, ReplyRejected,
                   RoundFailed)
from .centralized import Centralized
from .collafuse import CollaFuse
from .fedavg import FedAvgDiffusion
from .local_only import LocalOnly
from .recorder import Recorder
from .registry import NodeRegistry
from .trainer import ServerTrainer

__all__ = ["Centralized", "CollaFuse", "DiffusionStrategy", "FedAvgDiffusion", "ImplausibleUpload", "LocalOnly",
           "MalformedReply", "NodeRegistry", "NotAdmitted", "OverBudget", "Recorder", "ReplyRejected", "RoundFailed",
           "ServerTrainer"]
