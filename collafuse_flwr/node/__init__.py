"""The node side of the protocol, as functions a Flower user's own ClientApp can call (`steps`,
`randomness`), and the pieces `collafuse_flwr.client_app` adds: `policy`, `ledger`, `state`, `scoring`."""

from collafuse_flwr.node.randomness import fresh_generator, keyed_generator, node_secret
from collafuse_flwr.node.steps import (FAILED, REFUSED, Refused, check_handoff, check_train_request, diffuse_upload,
                                       finish, finite_metrics, make_upload, refusal, reply, scrub_paths, train_share)

__all__ = ["FAILED", "REFUSED", "Refused", "check_handoff", "check_train_request", "diffuse_upload", "finish",
           "finite_metrics", "fresh_generator", "keyed_generator", "make_upload", "node_secret", "refusal",
           "reply", "scrub_paths", "train_share"]
