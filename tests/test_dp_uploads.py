"""upload-epsilon wired through the ClientApp and the strategy: a node with a DP target uploads
at its plan's step t_u, declares it, never uploads an image more than K times, and the server
trains and hands off at t_u for that node. Its run through `flwr run` (upload-epsilon=4 on
MNIST-5k) is in tests/test_e2e_datasets.py."""


import pytest
import torch
from inprocess import InProcessGrid

from collafuse_flwr import client_app as ca
from collafuse_flwr.config import parse_config
from collafuse_flwr.server.build import build_strategy

# T = 200 (the default): at T = 20 the cosine chain has too little noise left for epsilon = 4
DP = {"diffusion-steps": 200, "upload-epsilon": 4.0, "cut-ratio": 0.2, "count-flops": False}


def _run(rc, num_nodes=2, rounds=1):
    cfg = parse_config(rc)
    s, arrays = build_strategy(cfg, num_nodes, torch.device("cpu"), harness=False)
    grid = InProcessGrid(ca.app, rc, num_nodes)
    s.start(grid=grid, initial_arrays=arrays, num_rounds=rounds)
    return s, grid


def test_a_dp_node_uploads_at_its_plans_step_and_the_server_follows(tiny_config):
    rc = tiny_config(**{k.replace("-", "_"): v for k, v in DP.items()}, max_samples=200)
    s, grid = _run(rc)
    t_c = 40
    assert s.node_cuts
    for nid, info in s.registry.info.items():
        client = s.registry.index[nid]
        assert info["dp-t-cut"] == t_c and info["dp-epsilon"] <= 4.0
        assert s.client_cut[client] == info["dp-t-upload"] > t_c  # the server trains t > t_u for it
    # what left the nodes: only x_{t_u} (the train messages asked for each node's t_u, not 40)
    train = [m for m in grid.sent if m.metadata.message_type == "train.collafuse"]
    assert {int(m.content["config"]["cut-step"]) for m in train} == set(s.client_cut.values())
    ev = [m for m in grid.sent if m.metadata.message_type == "evaluate.collafuse"]
    assert {int(m.content["config"]["client-start-step"]) for m in ev} == set(s.client_cut.values())


def test_no_image_is_uploaded_more_than_k_times_however_much_the_server_asks(tiny_config):
    """The server asks for 64 a round for 3 rounds from ~80 images; with K = 1 each image leaves
    once at most, so the later rounds upload fewer (or none), never a repeat."""
    rc = tiny_config(**{k.replace("-", "_"): v for k, v in DP.items()}, max_samples=200,
                     max_uploads_per_image=1, uploads_per_round=64, num_server_rounds=3)
    s, grid = _run(rc, rounds=3)
    for nid, ctx in grid.contexts.items():
        client = s.registry.index[nid]
        n = sum(t.shape[0] for t in s.buffer.get(client, []))
        counts = ctx.state.array_records["upload-history"]["counts"].numpy()
        assert counts.max() <= 1 and counts.sum() == n
    ups = [r for r in grid.replies if "upload" in r.content.array_records]
    sizes = [r.content["upload"]["x_tc"].numpy().shape[0] for r in ups]
    assert sizes and max(sizes) <= 64 and sum(sizes) < 3 * 64 * 2  # the cap cut the later rounds


def test_an_impossible_target_stops_the_node_with_the_fix(tiny_config):
    """The node will not upload with less noise than its target needs: its first-contact handler
    is an Error reply naming epsilon, K and what would work; the run stops at once, saying why."""
    from strategies import RoundFailed

    rc = tiny_config(upload_epsilon=0.01, count_flops=False)  # T = 20: nowhere near enough noise
    s, arrays = build_strategy(parse_config(rc), 2, torch.device("cpu"), harness=False)
    with pytest.raises(RoundFailed, match=r"upload-epsilon=0.01.*cannot be met.*K=1.*larger epsilon"):
        s.start(grid=InProcessGrid(ca.app, rc, 2), initial_arrays=arrays, num_rounds=1)
    assert not s.registry.index  # nobody was admitted
