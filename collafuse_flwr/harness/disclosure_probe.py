"""Research harness: what an honest-but-curious server can reconstruct from a node's uploads. At evaluation
the server reconstructs each node's last upload three ways (its own model, `attack.py`'s reference attacker,
model-free scaling) and sends them back for the node to score against the true x0, which only it holds (where
its operator allows research measurements). The reference attacker reloads data: simulation harness only."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from collafuse_flwr import protocol as P
from collafuse_flwr.config import RunConfig
from collafuse_flwr.harness.attack import train_reference_denoiser
from collafuse_flwr.metrics.disclosure import reconstruct


class DisclosureProbe:
    """A `CollaFuse(harness_payload=...)` hook."""

    def __init__(self, cfg: RunConfig, num_clients: int, device: torch.device) -> None:
        self.cfg, self.num_clients, self.device = cfg, num_clients, device
        self.reference: torch.nn.Module | None = None
        self._trained = False  # trained at the first evaluation, while the clients are idle (attack.py says why)

    def __call__(self, strategy, client: int, uploads: np.ndarray) -> ArrayRecord:
        t_c, T = strategy.cut_for(client), strategy.sched.T  # the cut this client's uploads were made at
        if not self._trained and 0 < t_c < T:
            self.reference = train_reference_denoiser(self.cfg, self.num_clients, self.device)
            self._trained = True
        x = torch.from_numpy(uploads).to(self.device)  # where the server model is (a GPU: found on an H100)
        model = strategy.model.eval()
        with torch.no_grad():
            if hasattr(model, "condition"):
                model.condition(client)
            own = reconstruct(x, strategy.sched, t_c, model if t_c > 0 else None)
            recon = {P.RECON_SERVER: own, P.RECON_SCALED: reconstruct(x, strategy.sched, t_c, None)}
            if self.reference is not None:
                recon[P.RECON_REFERENCE] = reconstruct(x, strategy.sched, t_c, self.reference)
            elif t_c == 0:
                recon[P.RECON_REFERENCE] = own  # raw images: every attacker recovers them exactly
        return ArrayRecord({P.UPLOADS: Array(uploads.astype(np.float32)),
                            **{k: Array(v.float().cpu().numpy()) for k, v in recon.items()}})
