"""The node side of the protocol, as functions a Flower user's own ClientApp can call.

`steps` does the work (train the private share, make an upload, finish a hand-off) and checks
the server's requests; `randomness` keeps the node's draws secret and never repeated; `policy`
is what the node's operator allows; `ledger` caps each image's uploads over the node's life;
`state` keeps the private model between rounds; `scoring` measures, where the policy allows.
`collafuse_flwr.client_app` wires them into this project's ClientApp.
"""

from collafuse_flwr.node.randomness import fresh_generator, keyed_generator, node_secret
from collafuse_flwr.node.steps import (FAILED, REFUSED, Refused, check_handoff, check_train_request, diffuse_upload,
                                       finish, finite_metrics, make_upload, refusal, reply, scrub_paths, train_share)

__all__ = ["FAILED", "REFUSED", "Refused", "check_handoff", "check_train_request", "diffuse_upload", "finish",
           "finite_metrics", "fresh_generator", "keyed_generator", "make_upload", "node_secret", "refusal",
           "reply", "scrub_paths", "train_share"]
