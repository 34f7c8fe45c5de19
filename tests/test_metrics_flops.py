"""FlopMeter counts what actually ran: known layer costs, backward, nesting, no_grad/inference_mode."""

import pytest
import torch
from torch import nn

from collafuse_flwr.core.flops import FlopMeter

N, IN, OUT = 8, 16, 32
LINEAR_FWD = 2 * N * IN * OUT


def test_linear_forward_and_backward():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(N, IN, requires_grad=True)
    meter = FlopMeter()
    with meter.count("fwd"):
        lin(x)
    with meter.count("fwd+bwd"):
        lin(x).sum().backward()  # grad wrt input and weight: two more matmuls of the same size
    assert meter.totals == {"fwd": LINEAR_FWD, "fwd+bwd": 3 * LINEAR_FWD}


def test_conv2d_forward():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    meter = FlopMeter()
    with meter.count("conv"):
        conv(torch.randn(2, 3, 10, 10))
    assert meter.totals["conv"] == 2 * 2 * 8 * 10 * 10 * 3 * 3 * 3


def test_counts_accumulate_and_merge():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(N, IN)
    a, b = FlopMeter(), FlopMeter()
    for _ in range(3):
        with a.count("client"):
            lin(x)
    with b.count("server"):
        lin(x)
    a.merge(b).merge({"client": 5})
    assert a.as_dict() == {"client": 3 * LINEAR_FWD + 5, "server": LINEAR_FWD}
    assert a.total == 4 * LINEAR_FWD + 5
    assert b.as_dict() == {"server": LINEAR_FWD}  # merge does not touch the source


def test_nested_blocks_are_inclusive():
    lin = nn.Linear(IN, OUT)
    x = torch.randn(N, IN)
    outer, inner = FlopMeter(), FlopMeter()
    with outer.count("round"):
        with inner.count("step"):
            lin(x)
        with outer.count("step"):
            lin(x)
    assert inner.totals == {"step": LINEAR_FWD}
    assert outer.totals == {"round": 2 * LINEAR_FWD, "step": LINEAR_FWD}


def test_no_grad_and_inference_mode_with_grad_requiring_input():
    # Stock FlopCounterMode crashes here (its ModuleTracker hooks an input that requires
    # grad, which has no grad_fn under inference_mode).
    lin = nn.Linear(IN, OUT)
    x = torch.randn(N, IN, requires_grad=True)
    meter = FlopMeter()
    with torch.no_grad(), meter.count("no_grad"):
        lin(x)
    with torch.inference_mode(), meter.count("inference"):
        lin(x)
    assert meter.totals == {"no_grad": LINEAR_FWD, "inference": LINEAR_FWD}


def test_disabled_meter_counts_nothing_but_runs_the_block():
    meter = FlopMeter(enabled=False)
    ran = []
    with meter.count("x"):
        nn.Linear(IN, OUT)(torch.randn(N, IN))
        ran.append(True)
    assert ran == [True] and meter.as_dict() == {}


def test_work_before_an_exception_is_still_counted():
    meter = FlopMeter()
    with pytest.raises(RuntimeError, match="boom"):
        with meter.count("x"):
            nn.Linear(IN, OUT)(torch.randn(N, IN))
            raise RuntimeError("boom")
    assert meter.totals == {"x": LINEAR_FWD}


def test_bad_keys_and_counts():
    meter = FlopMeter()
    with pytest.raises(ValueError, match="non-empty string"):
        with meter.count(""):
            pass
    with pytest.raises(ValueError, match=">= 0"):
        meter.add("x", -1)
