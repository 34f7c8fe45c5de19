"""The server's memory stays flat as rounds grow: CollaFuse keeps every node's x_tc uploads to train
on, and `server-buffer-size` bounds them however many rounds run (what the former benchmark
measured as peak RSS: 994 MB at 10 rounds, 1,007 MB at 50, against 1,216 -> 2,421 MB uncapped).
Here the tensors the strategy holds are summed after 10 and after 40 rounds of honest uploads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from collafuse_flwr.config import parse_config
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.core.models import shared_denoiser
from strategies import CollaFuse
from collafuse_flwr.server.build import from_config

NODES, UPLOADS = 3, 8
ROW_BYTES = 8 * 8 * 4  # one 1x8x8 float32 upload


def _reply(to: Message, content: RecordDict) -> Message:
    to.metadata.__dict__["_message_id"] = f"m{id(to)}"
    r = Message(content=content, reply_to=to)
    r.metadata.__dict__["_src_node_id"] = to.metadata.dst_node_id
    return r


class Grid:
    """Nodes 1..NODES, each claiming partition node - 1 at first contact."""

    def get_node_ids(self):
        return list(range(1, NODES + 1))

    def send_and_receive(self, messages, *, timeout=None):
        return [_reply(m, RecordDict({"metrics": MetricRecord({"partition-id": m.metadata.dst_node_id - 1})}))
                for m in messages]


def held_bytes(obj, seen: set[int] | None = None, storages: set[int] | None = None) -> int:
    """Bytes of every tensor and array reachable from obj's attributes and containers, each storage
    once (a trimmed slice keeps its whole storage alive, so the storage is what is counted)."""
    seen, storages = (set(), set()) if seen is None else (seen, storages)
    if id(obj) in seen or isinstance(obj, (type, type(torch), str, bytes, int, float)) or callable(obj) \
            and not hasattr(obj, "__dict__"):
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        s = obj.untyped_storage()
        return 0 if s.data_ptr() in storages or storages.add(s.data_ptr()) else s.nbytes()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(held_bytes(k, seen, storages) + held_bytes(v, seen, storages) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return sum(held_bytes(v, seen, storages) for v in obj)
    return held_bytes(vars(obj), seen, storages) if hasattr(obj, "__dict__") else 0


def _held_after(tiny_config, cap: int, rounds: tuple[int, ...]) -> tuple[list[int], CollaFuse]:
    """Drive the real strategy (validation, buffer, one server step a round) with well-formed uploads."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    cfg = parse_config(tiny_config(cut_ratio=0.2, server_steps=1, uploads_per_round=UPLOADS, server_buffer_size=cap,
                                   count_flops=False, num_server_rounds=max(rounds)))
    s = from_config(cfg, shared_denoiser(8, 1, "tiny", "client", NODES), (1, 8, 8), overlap=False)
    s.num_rounds = cfg.num_server_rounds
    rng, held = np.random.default_rng(0), []
    for rnd in range(1, max(rounds) + 1):
        msgs = list(s.configure_train(rnd, ArrayRecord(), ConfigRecord(), Grid()))
        x0 = torch.from_numpy(rng.uniform(-1, 1, (len(msgs), UPLOADS, 1, 8, 8)).astype(np.float32))
        s.aggregate_train(rnd, [_reply(m, RecordDict({
            "upload": ArrayRecord({"x_tc": Array(D.upload(s.sched, x0[i], s.t_c).numpy())}),
            "metrics": MetricRecord({"num-examples": 100, "train-loss": 1.0})})) for i, m in enumerate(msgs)])
        if rnd in rounds:
            held.append(held_bytes(s))
    return held, s


@pytest.fixture(autouse=True)
def _one_thread():
    """80 tiny server steps: one thread is fastest, and a 2-thread team beside another job spins (30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("cap", [4 * NODES * UPLOADS])
def test_the_upload_buffer_keeps_the_servers_memory_flat_over_rounds(tiny_config, cap):
    (h10, h40), s = _held_after(tiny_config, cap, (10, 40))
    assert sum(t.shape[0] for ts in s.buffer.values() for t in ts) == cap and not s.recorder.rejected
    assert h40 - h10 <= NODES * UPLOADS * ROW_BYTES, f"grew {h40 - h10} bytes from round 10 to 40 with a cap"
    (u10, u40), s = _held_after(tiny_config, 0, (10, 40))  # no cap: the same check fails
    assert sum(t.shape[0] for ts in s.buffer.values() for t in ts) == 40 * NODES * UPLOADS
    assert u40 - u10 >= 30 * NODES * UPLOADS * ROW_BYTES
