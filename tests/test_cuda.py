"""The training and split-sampling path on a GPU (skipped where CUDA is absent, as in CI)."""

import pytest
import torch

from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.flops import FlopMeter
from collafuse_flwr.core.images import to_model_range
from collafuse_flwr.core.models import build_denoiser, default_device, shared_denoiser
from collafuse_flwr.core.training import client_share_loss, generate, make_optimizer, server_share_loss, train_steps
from collafuse_flwr.data.load import load_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_collafuse_round_trip_on_cuda():
    dev = default_device()
    assert dev.type == "cuda"
    x0 = to_model_range(load_dataset("digits").images[:256])
    sched = D.make_schedule(100, "cosine")
    t_c = D.cut_step(0.2, sched.T)
    gen = torch.Generator().manual_seed(0)
    client = build_denoiser(8, 1, "small").to(dev)
    server = shared_denoiser(8, 1, "small", "client", num_clients=2).to(dev)
    meter = FlopMeter()
    loss_c = train_steps(client, make_optimizer(client, 2e-3), client_share_loss(client, sched, t_c, gen),
                         x0, 20, 64, gen, dev, meter, "client")
    uploads = D.upload(sched, x0, t_c)
    labels = torch.randint(0, 2, (uploads.shape[0],))
    loss_s = train_steps(server, make_optimizer(server, 2e-3),
                         server_share_loss(server, sched, t_c, "exact", gen),
                         uploads, 20, 64, gen, dev, meter, "server", labels=labels)
    assert loss_c == loss_c and loss_s == loss_s  # finite
    assert next(client.parameters()).is_cuda and next(server.parameters()).is_cuda
    server.eval().condition(1)
    client.eval()
    with torch.no_grad():
        x_tc = D.server_sample(meter.wrap(server, "s-infer"), sched, (16, 1, 8, 8), t_c, device=dev)
        assert x_tc.is_cuda
        x = D.client_finish(meter.wrap(client, "c-infer"), sched, x_tc, t_c)
    assert x.is_cuda and torch.isfinite(x).all() and x.abs().max() <= 1
    # measured FLOPs on the GPU follow the cut: client passes are t_c of T
    assert meter.totals["c-infer"] * (sched.T - t_c) == pytest.approx(meter.totals["s-infer"] * t_c, rel=0.01)
    out = generate(client, sched, 8, (1, 8, 8), 10, gen, dev)
    assert out.shape == (8, 1, 8, 8)
