"""Nothing is lost on failure: a killed run resumes from its last round's checkpoint and ends as
the uninterrupted run does; a restarted node keeps its private model."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from inprocess import InProcessGrid

from collafuse_flwr import server_app
from collafuse_flwr.client_app import app as client_app
from collafuse_flwr.config import parse_config
from collafuse_flwr.node.state import MODEL_KEY


class KilledAfter(Exception):
    pass


def _run(rc, out, grid, run_id, kill_after=None, monkeypatch=None):
    """The real ServerApp main on an in-process grid; optionally 'killed' after a round's checkpoint."""
    if kill_after is not None:
        from collafuse_flwr.server import checkpoint as ck

        real = ck.save_checkpoint

        def save_then_die(run_dir, strategy, server_round, *a, **k):
            real(run_dir, strategy, server_round, *a, **k)
            if server_round == kill_after:
                raise KilledAfter(server_round)

        monkeypatch.setattr(ck, "save_checkpoint", save_then_die)
    ctx = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=dict(rc))
    server_app.main(grid, ctx)


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_a_killed_run_resumes_and_ends_as_the_uninterrupted_one(tiny_config, tmp_path, monkeypatch):
    rc = tiny_config(cut_ratio=0.5, num_server_rounds=2, eval_every=1, harness="on")
    # uninterrupted
    (tmp_path / "a").mkdir()
    rc_a = {**rc, "output-dir": str(tmp_path / "a")}
    _run(rc_a, tmp_path / "a", InProcessGrid(client_app, rc_a, 2), run_id=11)
    (run_a,) = (tmp_path / "a").iterdir()
    # killed after round 1 (nodes lose their in-memory state too), then resumed on fresh nodes
    (tmp_path / "b").mkdir()
    rc_b = {**rc, "output-dir": str(tmp_path / "b")}
    with monkeypatch.context() as mp, pytest.raises(KilledAfter):
        _run(rc_b, tmp_path / "b", InProcessGrid(client_app, rc_b, 2), run_id=12, kill_after=1, monkeypatch=mp)
    (run_b,) = (tmp_path / "b").iterdir()
    assert _results(run_b)["status"] == "failed"  # said so, not left at "running"
    rc_resume = {**rc_b, "resume-from": str(run_b)}
    _run(rc_resume, run_b, InProcessGrid(client_app, rc_resume, 2), run_id=99)
    a, b = _results(run_a), _results(run_b)
    assert b["status"] == "ok"
    for key in ("fid", "fid_pooled", "kid", "client_train_flops", "server_train_flops"):
        assert a["final"][key] == pytest.approx(b["final"][key], rel=1e-9), key
    # bytes count whole messages, metadata included: the in-process grid numbers message ids with a
    # process-wide counter ("m99" vs "m100"), so the resumed run's ids are a few characters longer
    for key in ("bytes_up", "bytes_down"):
        assert abs(a["final"][key] - b["final"][key]) <= 2 * 2 * 2 * 2, key  # <= 2 chars x 2 rounds x 2 nodes x 2
    assert a["final"]["disclosure"]["epsilon"] == b["final"]["disclosure"]["epsilon"]
    np.testing.assert_array_equal(np.load(run_a / "samples.npz")["images"], np.load(run_b / "samples.npz")["images"])
    assert [r.split(",")[0] for r in (run_b / "metrics.csv").read_text().splitlines()[1:]] == ["1", "2"]


def test_resume_refuses_other_settings(tiny_config, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    rc = {**tiny_config(cut_ratio=0.5, num_server_rounds=2), "output-dir": str(tmp_path / "out")}
    with monkeypatch.context() as mp, pytest.raises(KilledAfter):
        _run(rc, tmp_path, InProcessGrid(client_app, rc, 2), run_id=5, kill_after=1, monkeypatch=mp)
    (run,) = (tmp_path / "out").iterdir()
    other = {**rc, "cut-ratio": 0.3, "resume-from": str(run)}
    with pytest.raises(RuntimeError, match=r"differs from the checkpoint's in \['cut-ratio'\]"):
        _run(other, run, InProcessGrid(client_app, other, 2), run_id=6)


def _train(ctx, cfg, rnd):
    conf = ConfigRecord({"server-round": rnd, "cut-step": cfg.cut_step, "uploads": cfg.uploads_per_round,
                         "client-index": 0})
    m = Message(content=RecordDict({"config": conf}), message_type="train.collafuse", dst_node_id=1)
    m.metadata.__dict__["_message_id"] = f"m{rnd}"
    return client_app(m, ctx)


def _weights(ctx):
    return {k: v.numpy().copy() for k, v in ctx.state.array_records[MODEL_KEY].items()}


def test_a_restarted_node_keeps_its_private_model(tiny_config, tmp_path):
    """Naively a restarted SuperNode starts from a fresh denoiser: context.state died with it."""
    rc = tiny_config(cut_ratio=0.5)
    cfg = parse_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"),
                   "trust-run-config": "true"}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    before = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    _train(before, cfg, 1)
    weights = _weights(before)
    after = Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    from collafuse_flwr.client_app import _node, _private_model

    model, _ = _private_model(_node(after), "collafuse", 0, 2, 0)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), weights[k])
    counts = after.state.array_records["upload-history"]["counts"].numpy()
    assert counts.sum() == cfg.uploads_per_round  # its upload history survived too


def test_a_replayed_round_continues_from_the_round_before(tiny_config, tmp_path):
    """A server resumed from its round-1 checkpoint re-sends round 2, which the node already
    trained: it continues from its round-1 state, so the resumed run computes what the
    uninterrupted one did (same model, same upload)."""
    rc = tiny_config(cut_ratio=0.5)
    cfg = parse_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"),
                   "trust-run-config": "true"}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    first = Context(run_id=8, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    _train(first, cfg, 1)
    up2 = _train(first, cfg, 2).content["upload"]["x_tc"].numpy()
    w2 = _weights(first)
    resumed = Context(run_id=8, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    again = _train(resumed, cfg, 2).content["upload"]["x_tc"].numpy()
    np.testing.assert_array_equal(again, up2)
    for k, v in _weights(resumed).items():
        np.testing.assert_array_equal(v, w2[k])


def test_a_corrupt_state_file_resets_that_node_instead_of_failing_every_round(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5)
    cfg = parse_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"),
                   "trust-run-config": "true"}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    ctx = Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    _train(ctx, cfg, 1)
    (state_file,) = (tmp_path / "node").rglob("client-0.pt")
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated
    restarted = Context(run_id=9, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    reply = _train(restarted, cfg, 2)
    assert not reply.has_error() and "upload" in reply.content.array_records
    assert list((tmp_path / "node").rglob("client-0.pt.corrupt"))  # set aside, not deleted


def test_a_crafted_state_file_runs_no_code(tiny_config, tmp_path):
    """Naively torch.load(weights_only=False) unpickles the node's state file: a swapped file runs
    code in the node. The node loads with weights_only=True and sets the file aside."""
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    rc = tiny_config(cut_ratio=0.5)
    cfg = parse_config(rc)
    node_config = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "node"),
                   "trust-run-config": "true"}
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    ctx = Context(run_id=10, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    _train(ctx, cfg, 1)
    (state_file,) = (tmp_path / "node").rglob("client-0.pt")
    state_file.write_bytes(pickle.dumps(Evil()))
    pickle.loads(state_file.read_bytes()).close()  # the attack is real: unpickling runs it
    assert marker.exists()
    marker.unlink()
    restarted = Context(run_id=10, node_id=1, node_config=node_config, state=RecordDict(), run_config=dict(rc))
    assert not _train(restarted, cfg, 2).has_error()
    assert not marker.exists()


def test_a_stopped_run_says_stopped(tiny_config, tmp_path):
    """`flwr stop` (SIGTERM to the ServerApp process) used to leave results.json at "running"."""
    import os
    import signal

    (tmp_path / "out").mkdir()
    rc = {**tiny_config(cut_ratio=0.5, num_server_rounds=2), "output-dir": str(tmp_path / "out")}

    class StoppedGrid(InProcessGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(m.metadata.message_type.startswith("train") for m in messages):
                os.kill(os.getpid(), signal.SIGTERM)  # what `flwr stop` does to the ServerApp
            return super().send_and_receive(messages, timeout=timeout)

    before = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            _run(rc, None, StoppedGrid(client_app, rc, 2), run_id=3)
    finally:
        signal.signal(signal.SIGTERM, before)
    (run,) = (tmp_path / "out").iterdir()
    assert _results(run)["status"] == "stopped"


def _simulation_pids(flwr_home):
    """pids of the flwr-simulation processes whose FLWR_HOME is `flwr_home` (read from /proc)."""
    import os

    found = []
    for proc in os.listdir("/proc"):
        if not proc.isdigit():
            continue
        try:
            cmd = open(f"/proc/{proc}/cmdline", "rb").read().replace(b"\0", b" ")
            env = open(f"/proc/{proc}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"flwr-simulation" in cmd and f"FLWR_HOME={flwr_home}".encode() in env:
            found.append(int(proc))
    return found


@pytest.mark.e2e
def test_resume_under_flwr_run_after_the_serverapp_is_killed(tmp_path):
    """Through `flwr run`: the simulation (ServerApp and nodes) is SIGKILLed after round 1's
    checkpoint, then resumed on fresh nodes (new node ids); it ends with the figures of the
    uninterrupted run (run in process: the two engines give the same figures to the last bit).
    Naively every fresh node was refused ("partition-id 0 is already held by node <old id>") and
    the run waited 10 minutes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from flwr_runs import tiny_run_config

    from benchmarks.sweep import run_inprocess
    from collafuse_flwr.config import preset
    from collafuse_flwr.tools.launch import run_flower
    from collafuse_flwr.tools.precheck import parse_overrides

    extra = "num-server-rounds=2 cut-ratio=0.5 torch-threads=1"
    rc = tiny_run_config(extra)
    (tmp_path / "b").mkdir()
    threads = torch.get_num_threads()
    try:  # in this process: the run sets torch-threads=1 here too
        a_dir, _ = run_inprocess({**preset("tiny"), **parse_overrides(extra)}, 2, tmp_path / "a")
    finally:
        torch.set_num_threads(threads)
    home = tmp_path / "home-b"
    killed = subprocess.Popen([sys.executable, "-m", "collafuse_flwr.tools.launch", "--num-clients", "2", "--quiet",
                               "--flwr-home", str(home), "--run-config", f"{rc} output-dir='{tmp_path / 'b'}'"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((tmp_path / "b").glob("*/checkpoint.pt")) and time.time() < deadline:
        time.sleep(0.5)
    (run_b,) = (tmp_path / "b").iterdir()
    assert (run_b / "checkpoint.pt").is_file(), "no checkpoint after round 1"
    for pid in _simulation_pids(home):
        os.kill(pid, signal.SIGKILL)
    killed.wait(timeout=300)
    resumed = run_flower(f"{rc} output-dir='{tmp_path / 'b'}' resume-from='{run_b}'", num_clients=2,
                         flwr_home=tmp_path / "home-c", timeout=600, stream=False)
    assert resumed.ok, resumed.log[-3000:]
    ra, rb = _results(a_dir), _results(run_b)
    assert rb["status"] == "ok"
    for key in ("fid", "kid", "client_train_flops", "server_train_flops"):
        assert ra["final"][key] == pytest.approx(rb["final"][key], rel=1e-9), key
    assert ra["final"]["fid_per_client"] == pytest.approx(rb["final"]["fid_per_client"], rel=1e-9)
