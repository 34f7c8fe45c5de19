"""Attacks a malicious server can mount with what it controls: the run-config and the messages.

Each test first shows the attack working where the defence is missing (a naive node, or the
node's own trusting mode that a simulation uses), then that it recovers nothing from a node as
its operator configured it. A node here is driven with real Flower messages through the
project's ClientApp; its node_config is what `flower-supernode --node-config` would give it.
"""

import itertools
import json
import math
import stat
import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
from inprocess import message_to_node

from collafuse_flwr.client_app import app, node_data
from collafuse_flwr.config import parse_config
from collafuse_flwr.core import diffusion as D
from collafuse_flwr.node import REFUSED
from collafuse_flwr.node.policy import node_policy, reference_abar

NUM_NODES = 3
_RUNS = itertools.count(int(time.time()) % 10**6)


def _context(rc, pid=0, **node_config):
    return Context(run_id=next(_RUNS), node_id=100 + pid,
                   node_config={"partition-id": pid, "num-partitions": NUM_NODES, **node_config},
                   state=RecordDict(), run_config=rc)


def _send(rc, ctx, category, content, method=None):
    return app(message_to_node(content, f"{category}.{method or parse_config(rc).method}"), ctx)


def _hello(rc, ctx, method=None):
    method = method or parse_config(rc).method
    return _send(rc, ctx, "query", RecordDict({"config": ConfigRecord({"method": method})}), "hello")


def _declared_cut(rc, ctx) -> int:
    reply = _hello(rc, ctx)
    assert not reply.has_error(), reply.error.reason
    return int(reply.content["metrics"]["cut-step"])


def _train(rc, ctx, rnd=1, method=None, **conf):
    cfg = parse_config(rc)
    c = {"server-round": rnd, "uploads": cfg.uploads_per_round, "client-index": 0, **conf}
    if "cut-step" not in c and (method or cfg.method) == "collafuse":
        c["cut-step"] = _declared_cut(rc, ctx)
    return _send(rc, ctx, "train", RecordDict({"config": ConfigRecord(c)}), method)


def _uploaded(reply) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason
    return reply.content["upload"]["x_tc"].numpy() if "upload" in reply.content.array_records else np.zeros(0)


def _evaluate(rc, ctx, rnd=2, extra=None, **records):
    conf = ConfigRecord({"server-round": rnd, "num-samples": 4, "client-start-step": _declared_cut(rc, ctx),
                         "client-sampling-steps": 0, "client-index": 0, **(extra or {})})
    records.setdefault("handoff", ArrayRecord({"x_tc": Array(np.zeros((4, 1, 8, 8), np.float32))}))
    return _send(rc, ctx, "evaluate", RecordDict({"config": conf, **records}))


def _train_images(rc, ctx) -> torch.Tensor:
    from collafuse_flwr.node.policy import node_policy

    cfg = parse_config(rc)
    return node_data(node_policy(ctx.node_config, cfg, 0).data_config(cfg, ctx.node_config), ctx.node_config).train


# -- the method is the operator's choice ------------------------------------------------------------
@pytest.mark.parametrize("method", ["centralized", "fedavg"])
def test_a_default_node_refuses_the_methods_that_send_its_data(tiny_config, method):
    """Naively the node runs whatever `method` the run-config names: centralized uploads every raw
    training image (shown with a node that trusts the run-config, as a simulated one does)."""
    rc = tiny_config(method=method)
    trusting = _context(rc, **{"trust-run-config": "true"})
    assert not _hello(rc, trusting).has_error()
    if method == "centralized":
        raw = _train(rc, trusting).content["upload"]["x0"].numpy()
        np.testing.assert_array_equal(raw, _train_images(rc, trusting).numpy())  # every image, exactly
    ctx = _context(rc)  # a node as deployed: nothing set
    hello = _hello(rc, ctx)
    assert hello.has_error() and hello.error.code == REFUSED and "serves only" in hello.error.reason
    reply = _train(rc, ctx)
    assert reply.has_error() and not reply.has_content()
    # its operator can opt in to a baseline, and only then does it run it
    assert not _hello(rc, _context(rc, methods=f"collafuse,{method}")).has_error()


def test_a_node_runs_no_method_its_message_type_does_not_name(tiny_config):
    """A plain "train" message (no action) reaches no handler: Flower turns the error into an
    Error reply; nothing falls back to the run-config's method."""
    rc = tiny_config()
    with pytest.raises(ValueError, match="No train function registered with name 'default'"):
        app(message_to_node(RecordDict({"config": ConfigRecord({"server-round": 1})}), "train"), _context(rc))


# -- noise never repeats across runs -------------------------------------------------------------------
def _best_exact_solution(x_a, ab_a, x_b, ab_b, x0) -> float:
    """The attack on two releases that share their noise: x = sqrt(ab) x0 + sqrt(1 - ab) eps for both,
    so x0 = (s_b x_a - s_a x_b) / (s_b sqrt(ab_a) - s_a sqrt(ab_b)). Tried on every pair; returns the
    smallest max-abs error to any true image (1e-6: exact; > 0.1: nothing recovered)."""
    s_a, s_b = math.sqrt(1 - ab_a), math.sqrt(1 - ab_b)
    a = torch.from_numpy(x_a).double().flatten(1)
    b = torch.from_numpy(x_b).double().flatten(1)
    hat = (s_b * a[:, None] - s_a * b[None, :]) / (s_b * math.sqrt(ab_a) - s_a * math.sqrt(ab_b))
    err = (hat.flatten(0, 1)[:, None] - x0.double().flatten(1)[None]).abs().amax(-1)
    return float(err.min())


def _two_runs(rc_a, rc_b, state_dir, **node_config):
    out = []
    for rc in (rc_a, rc_b):
        ctx = _context(rc, **{"state-dir": str(state_dir), **node_config})
        x = _uploaded(_train(rc, ctx))
        cfg = parse_config(rc)
        sched = D.make_schedule(cfg.diffusion_steps, cfg.beta_schedule)
        out.append((x, float(sched.alpha_bars[_declared_cut(rc, ctx)])))
    return out


@pytest.mark.parametrize("other", [{"cut_ratio": 0.6}, {"beta_schedule": "linear"}, {"diffusion_steps": 30},
                                   {"max_uploads_per_image": 3}])
@pytest.mark.parametrize("trust", ["false", "true"])
def test_two_runs_give_no_exact_solution(tiny_config, tmp_path, other, trust):
    """Naively the noise is keyed by (secret, seed, client, round) only: two runs that differ in c,
    the schedule, T or K release the same images with the same noise at two noise levels, and x0
    is solved exactly; where both land on the same noise level they release identical tensors.
    Every image is uploaded in both runs here (10 training images, up to 16 uploads)."""
    small = {"max_samples": 30, "uploads_per_round": 16}
    rc_a, rc_b = tiny_config(cut_ratio=0.5, **small), tiny_config(**{"cut_ratio": 0.5, **small, **other})
    x0 = _train_images(rc_a, _context(rc_a, **{"max-samples": 30}))
    # the attack is right: against the naive node's shared stream it recovers x0 exactly
    sched_a = D.make_schedule(20, "cosine")
    cfg_b = parse_config(rc_b)
    sched_b = D.make_schedule(cfg_b.diffusion_steps, cfg_b.beta_schedule)
    t_b = D.cut_step(cfg_b.cut_ratio, cfg_b.diffusion_steps)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    naive = [D.upload(sched_a, x0, 10, eps).numpy(), D.upload(sched_b, x0, t_b, eps).numpy()]
    ab_a, ab_b = float(sched_a.alpha_bars[10]), float(sched_b.alpha_bars[t_b])
    same_level = abs(ab_a - ab_b) < 1e-6
    if same_level:
        np.testing.assert_allclose(naive[0], naive[1], atol=1e-5)
    else:
        assert _best_exact_solution(naive[0], ab_a, naive[1], ab_b, x0) < 1e-4
    # against the node (deployed default: fresh entropy; trusting: keyed by the whole run-config)
    (x_a, ab_a), (x_b, ab_b) = _two_runs(rc_a, rc_b, tmp_path / "node", **{"max-samples": 30,
                                                                          "trust-run-config": trust})
    assert len(x_a) == len(x_b) == len(x0)
    if same_level:  # no two released rows share their noise
        diff = (torch.from_numpy(x_a).flatten(1)[:, None] - torch.from_numpy(x_b).flatten(1)[None]).abs().amax(-1)
        assert float(diff.min()) > 0.1
    else:
        assert _best_exact_solution(x_a, ab_a, x_b, ab_b, x0) > 0.1


def test_a_trusting_node_reproduces_a_run_and_a_deployed_node_never_repeats(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5)
    same = [_uploaded(_train(rc, _context(rc, **{"state-dir": str(tmp_path / "a"), "trust-run-config": "true"})))
            for _ in range(2)]
    np.testing.assert_array_equal(*same)  # same node secret, same run-config: the seed reproduces
    fresh = [_uploaded(_train(rc, _context(rc, **{"state-dir": str(tmp_path / "b")}))) for _ in range(2)]
    assert not np.allclose(*fresh)


def test_replaying_a_public_seed_recovers_nothing(tiny_config):
    """The oldest attack: noise drawn from (seed, client, round) is redrawn by the server and
    subtracted, giving x0 exactly. The node's draws are keyed by its secret or by OS entropy."""
    rc = tiny_config(cut_ratio=0.5, uploads_per_round=8)
    ctx = _context(rc, **{"trust-run-config": "true"})
    x = torch.from_numpy(_uploaded(_train(rc, ctx)))
    x0 = _train_images(rc, ctx)
    sched = D.make_schedule(20, "cosine")
    ab = float(sched.alpha_bars[10])
    for seed in range(20):  # every public formula a server might guess
        eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        hat = (x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)
        assert (hat.flatten(1)[:, None] - x0.flatten(1)[None]).abs().amax(-1).min() > 0.1


# -- the noise floor is the node's, on the node's own arithmetic ----------------------------------------------
def test_the_servers_schedule_cannot_weaken_a_pinned_noise_floor(tiny_config):
    """Naively a node's c = 0.8 becomes t_c = round(0.8 T) on the server's T and schedule:
    diffusion-steps=3 beta-schedule='linear' moves abar_c from 0.094 to 0.47."""
    floor = reference_abar(0.8)
    rc = tiny_config(diffusion_steps=3, beta_schedule="linear", cut_ratio=0.2)
    naive_step = D.cut_step(0.8, 3)
    sched = D.make_schedule(3, "linear")
    assert float(sched.alpha_bars[naive_step]) > 4 * floor  # the attack is real
    ctx = _context(rc, **{"cut-ratio": 0.8})
    t = _declared_cut(rc, ctx)
    assert t == 3 or float(sched.alpha_bars[t]) <= floor  # noisy enough, or nothing uploaded at all
    assert _train(rc, ctx, **{"cut-step": naive_step}).has_error()
    # on the reference schedule itself the floor is the familiar step
    rc = tiny_config(diffusion_steps=200, cut_ratio=0.2)
    assert _declared_cut(rc, _context(rc, **{"cut-ratio": 0.8})) == 160


def test_the_node_refuses_privacy_parameters_it_did_not_choose(tiny_config):
    """Naively cut-step=0 makes a c=0.5 node upload raw images, uploads=1e9 everything, and a round
    number of 1e6 is taken as it comes."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)
    for conf, what in (({"cut-step": 0}, "cut step 0"), ({"uploads": 10**9}, "1000000000 uploads"),
                       ({"server-round": 10**6}, "server-round"), ({"server-round": 1.5}, "server-round")):
        reply = _train(rc, ctx, **conf)
        assert reply.has_error() and not reply.has_content(), conf
        assert reply.error.code == REFUSED and what in reply.error.reason


# -- a lifetime cap per image --------------------------------------------------------------------------------
def test_no_image_leaves_more_than_k_times_however_many_runs_the_server_starts(tiny_config, tmp_path):
    """Naively the count restarts with every run: 20 runs upload an image 20 K times, and the
    average of many uploads cleans it. The deployed default caps each image at 4 uploads for life."""
    rc = tiny_config(cut_ratio=0.5, max_samples=30, uploads_per_round=8)
    node = {"state-dir": str(tmp_path / "node"), "max-samples": 30}
    n = len(_train_images(rc, _context(rc, **node)))
    sent = [len(_uploaded(_train(rc, _context(rc, **node), rnd=1 + r % 2))) for r in range(4 * n // 8 + 6)]
    assert sum(sent) == 4 * n and sent[-3:] == [0, 0, 0]  # 4 per image, then nothing, in any run
    counts = json.loads((tmp_path / "node" / "upload-ledger.json").read_text())["counts"]
    assert sorted(counts.values()) == [4] * n
    # neither a new run key nor the final evaluation resets it
    ctx = _context(rc, **node)
    assert len(_uploaded(_train(rc, ctx, **{"run-key": 999}))) == 0


def test_a_servers_data_size_split_and_delta_are_not_the_nodes(tiny_config):
    """max-samples=2 would leave the node one training image; upload-delta=0.5 would make an
    epsilon of 4 worth 13. A deployed node keeps its own (node_config, else safe defaults)."""
    rc = tiny_config(cut_ratio=0.5)
    ref = _hello(rc, _context(rc)).content["metrics"]
    evil = tiny_config(cut_ratio=0.5, max_samples=2, test_fraction=0.9, upload_delta=0.5, upload_epsilon=4.0,
                       diffusion_steps=200)
    got = _hello(evil, _context(evil)).content["metrics"]
    assert got["num-examples"] == ref["num-examples"] > 100
    assert "dp-delta" not in got  # the server's epsilon is not the node's either: DP stays as its operator set it
    own = _hello(evil, _context(evil, **{"upload-epsilon": 4.0})).content["metrics"]
    assert own["dp-delta"] == 1e-5 and own["dp-epsilon"] <= 4.0


def test_the_final_evaluation_ends_the_run_on_the_node(tiny_config, tmp_path):
    """A late train message after the final evaluation would rewrite the private state the node
    had just dropped; the node refuses it and writes nothing."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc, **{"trust-run-config": "true", "state-dir": str(tmp_path / "node")})
    _train(rc, ctx)
    state_files = lambda: sorted(p.name for p in (tmp_path / "node").rglob("client-*.pt"))  # noqa: E731
    assert state_files() == ["client-0.pt"]
    conf = {"server-round": 2, "num-samples": 4, "client-start-step": 10, "client-sampling-steps": 0,
            "client-index": 0, "final-round": 1}
    x = ArrayRecord({"x_tc": Array(np.zeros((4, 1, 8, 8), np.float32))})
    assert not _send(rc, ctx, "evaluate", RecordDict({"config": ConfigRecord(conf), "handoff": x})).has_error()
    assert state_files() == []
    late = _train(rc, ctx, rnd=2)
    assert late.has_error() and "final evaluation" in late.error.reason
    assert state_files() == []


# -- the node's files and its error replies ---------------------------------------------------------------
def test_an_empty_or_corrupt_secret_stops_the_node(tiny_config, tmp_path):
    """Naively an empty node-secret file is used as the key: every draw becomes public."""
    rc = tiny_config(cut_ratio=0.5)
    folder = tmp_path / "node"
    folder.mkdir()
    (folder / "node-secret").write_bytes(b"")
    reply = _train(rc, _context(rc, **{"state-dir": str(folder), "trust-run-config": "true"}), **{"cut-step": 10})
    assert reply.has_error() and "node secret" in reply.error.reason and str(tmp_path) not in reply.error.reason


def test_state_is_private_to_the_nodes_owner(tiny_config, tmp_path):
    rc = tiny_config(cut_ratio=0.5)
    folder = tmp_path / "node"
    _train(rc, _context(rc, **{"state-dir": str(folder)}))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files), files
    dirs = [p for p in folder.rglob("*") if p.is_dir()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in dirs), dirs


@pytest.mark.parametrize("parts", [("srv", "hospital-a", "scans"), ("my data", "hospital a", "ct scans")])
def test_an_error_reply_names_no_local_path(tiny_config, tmp_path, parts):
    """Naively the node's exception travels whole: 'node_config data-dir='/srv/hospital-a/...' holds 1
    image(s)' tells the server where the data lives; a pattern for paths alone stops at a space
    ('.../my' scrubbed, 'data/hospital a/ct scans' sent)."""
    folder = tmp_path.joinpath(*parts)
    folder.mkdir(parents=True)
    rc = tiny_config(dataset="imagefolder", data_dir=str(folder))
    reply = _hello(rc, _context(rc, **{"data-dir": str(folder), "dataset": "imagefolder"}))
    assert reply.has_error() and "<local path>" in reply.error.reason
    assert not any(part in reply.error.reason for part in parts[1:]), reply.error.reason
    assert str(tmp_path) not in reply.error.reason


def test_a_root_path_in_node_config_does_not_unhide_the_others():
    from collafuse_flwr.node.steps import scrub_paths

    assert scrub_paths("no images in /data/my scans", ["/", "/data/my scans"]) == "no images in <local path>"


def test_relative_node_config_paths_and_file_names_with_spaces_are_scrubbed():
    """Naively only absolute node_config values are known paths, and a known folder hides only
    itself: 'data/St Mary/scans' and '/d/John Doe MRN 448812.png' under data-dir=/d travel whole."""
    from collafuse_flwr.node.steps import scrub_paths

    known = ["data/St Mary/scans", "/d", "0.5"]
    assert scrub_paths("got 'data/St Mary/scans'", known) == "got '<local path>'"
    assert (scrub_paths("cannot read /d/John Doe MRN 448812.png: cannot identify '/d/John Doe MRN 448812.png'",
                        known) == "cannot read <local path>: cannot identify '<local path>'")
    assert scrub_paths("cut-ratio 0.5 is fine", known) == "cut-ratio 0.5 is fine"
    url = "Tried http://yann.lecun.com/exdb/mnist/train-images-idx3-ubyte.gz, got: timed out"
    assert scrub_paths(url, known) == url  # a download URL is no local path (it read 'http<local path>')
    assert scrub_paths("dataset='hf:/srv/op/scans'", []) == "dataset='hf:<local path>'"
    assert scrub_paths("open file:///home/al/jd.png failed", []) == "open file:<local path> failed"
    assert scrub_paths("see http://h/a,/home/al/secret/x", []) == "see http://h/a,<local path>"


def test_a_deployed_node_reports_no_loss(tiny_config):
    """A training loss is data-dependent: from it a server's membership test on a canary image
    reached AUC 0.78. A deployed node sends counts and costs; a trusting one its loss too."""
    rc = tiny_config(cut_ratio=0.5)
    assert "train-loss" not in _train(rc, _context(rc)).content["metrics"]
    assert "train-loss" in _train(rc, _context(rc, **{"trust-run-config": "true"})).content["metrics"]


# -- what a node returns at evaluation ------------------------------------------------------------------------
def test_scores_are_no_reconstruction_oracle(tiny_config):
    """Naively the node scores any number of server-chosen arrays against its x0 by PSNR: ~1,000
    crafted arrays and the server solves for every uploaded image."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc, **{"share-harness": "true"})
    n_up = len(_uploaded(_train(rc, ctx)))
    crafted = {f"recon-probe-{i}": Array(np.full((n_up, 1, 8, 8), i / 1000, np.float32)) for i in range(1000)}
    reply = _evaluate(rc, ctx, harness=ArrayRecord(crafted))
    assert reply.has_error() and "refusing to score" in reply.error.reason
    wrong_shape = {"recon-server": Array(np.zeros((1, 1, 8, 8), np.float32))}  # one pixel-probe image
    assert _evaluate(rc, ctx, harness=ArrayRecord(wrong_shape)).has_error()
    ok = {"recon-server": Array(np.zeros((n_up, 1, 8, 8), np.float32))}
    metrics = _evaluate(rc, ctx, harness=ArrayRecord(ok)).content["metrics"]
    assert "disclosure-psnr-server" in metrics  # the fixed set is still scored (research harness)


def test_an_upload_is_scored_once_so_repeated_scores_reveal_nothing(tiny_config, tmp_path):
    """Naively each evaluate message scores the last upload again: three allowed arrays a message
    (x, x + d e_k, x - d e_k) give pixel k of an uploaded image from the mean PSNRs, 64 messages the
    whole image, exactly. A node scores each upload once: also when a message names another run key,
    or after a restart. A resumed run that redoes a round makes a new upload, scored once again."""
    rc = tiny_config(cut_ratio=0.5)
    node = {"share-harness": "true", "state-dir": str(tmp_path / "node")}
    ctx = _context(rc, **node)
    n_up = len(_uploaded(_train(rc, ctx)))
    probe = ArrayRecord({k: Array(np.zeros((n_up, 1, 8, 8), np.float32)) for k in
                         ("recon-server", "recon-scaled", "recon-reference")})
    assert "disclosure-psnr-scaled" in _evaluate(rc, ctx, rnd=1, harness=probe).content["metrics"]
    for extra in ({}, {"run-key": 7}, {"run-key": 8}):
        again = _evaluate(rc, ctx, rnd=1, extra=extra, harness=probe)
        assert again.has_error() and "scored already" in again.error.reason, extra
    assert not list((tmp_path / "node").glob("run-7-*"))  # and no folder for a made-up run key

    def restarted():
        return Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config, state=RecordDict(),
                       run_config=rc)

    assert "scored already" in _evaluate(rc, restarted(), rnd=1, harness=probe).error.reason
    assert not _evaluate(rc, ctx, rnd=1).has_error()  # without the harness, evaluation goes on
    assert len(_uploaded(_train(rc, ctx, rnd=2))) == n_up  # a new upload is scored, once
    assert not _evaluate(rc, ctx, rnd=2, harness=probe).has_error()
    resumed = restarted()  # a resumed run redoes round 2 (the server died before its checkpoint)
    assert len(_uploaded(_train(rc, resumed, rnd=2))) == n_up
    assert not _evaluate(rc, resumed, rnd=2, harness=probe).has_error()


def test_the_server_names_no_fid_weights_file_that_a_node_unpickles(tiny_config, tmp_path):
    """Naively the run-config's fid-weights=<path> is torch.load-ed (weights_only=False, inside
    torchmetrics) by a node sharing measurements: any pickle it can read runs code in the node."""
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    torch.save(Payload(), tmp_path / "weights.pth")
    rc = tiny_config(cut_ratio=0.5, fid_backbone="inception", fid_weights=str(tmp_path / "weights.pth"))
    ctx = _context(rc, **{"share-harness": "true"})
    _uploaded(_train(rc, ctx))
    reply = _evaluate(rc, ctx, rnd=1)
    assert reply.has_error() and "Inception" in reply.error.reason  # its own weights: none here, offline
    assert not marker.exists() and str(tmp_path) not in reply.error.reason


def test_invented_run_keys_and_client_indices_cannot_fill_the_nodes_disk(tiny_config, tmp_path):
    """Naively every train message with a new run-key (2^64 of them) or client-index (2^20) makes a
    new private-model file that stays until that run's final evaluation, which never comes."""
    from collafuse_flwr.node.state import RUNS_KEPT

    rc = tiny_config(cut_ratio=0.5)
    state_dir = tmp_path / "node"
    ctx = _context(rc, **{"state-dir": str(state_dir)})
    for k in range(1, RUNS_KEPT + 3):
        assert not _train(rc, ctx, **{"run-key": k, "client-index": k, "uploads": 0}).has_error()
    runs = sorted(state_dir.glob("run-*"))
    assert len(runs) == RUNS_KEPT and all(len(list(r.glob("*.pt"))) == 1 for r in runs)
    assert any(r.name.startswith(f"run-{RUNS_KEPT + 2}-") for r in runs)  # the newest stays


def test_a_deployment_node_returns_no_images_and_no_private_scores(tiny_config):
    """Default outside the simulation engine: counts, timings and FLOPs only. A server that sends
    a node's own uploads back as x_tc gets nothing cleaned back."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)  # no share-harness: the node operator did not opt in
    x_tc = _uploaded(_train(rc, ctx))[:4]
    reply = _evaluate(rc, ctx, handoff=ArrayRecord({"x_tc": Array(x_tc)}),
                      harness=ArrayRecord({"recon-server": Array(np.zeros((8, 1, 8, 8), np.float32))}))
    assert not reply.content.array_records
    keys = set(reply.content["metrics"].keys())
    # the node's model size and its own cut are public (it declared both at first contact)
    assert keys <= {"num-examples", "infer-seconds", "client-infer-flops-per-image", "client-params", "cut-step"}, keys
    # opted in, the same node returns the research measurements
    ctx = _context(rc, **{"share-harness": "true"})
    _train(rc, ctx)
    shared = _evaluate(rc, ctx, handoff=ArrayRecord({"x_tc": Array(x_tc)}))
    assert "samples" in shared.content.array_records and "fid" in shared.content["metrics"]


def test_a_record_nobody_asked_for_is_refused(tiny_config):
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc)
    conf = {"server-round": 1, "uploads": 8, "client-index": 0, "cut-step": _declared_cut(rc, ctx)}
    extra = ArrayRecord({"x": Array(np.zeros((1000,), np.float32))})
    reply = _send(rc, ctx, "train", RecordDict({"config": ConfigRecord(conf), "payload": extra}))
    assert reply.has_error() and "payload" in reply.error.reason


def test_the_serverapp_loads_no_client_data_outside_the_simulation(tiny_config, tmp_path, monkeypatch):
    """Naively the pooled FID and the reference attacker reload every client's dataset on the
    server. With the harness off (the deployment default) nothing on the server touches it."""
    from inprocess import InProcessGrid

    from collafuse_flwr.harness.report import finalize
    from collafuse_flwr.server.build import build_strategy
    from collafuse_flwr.server_app import harness_enabled

    rc = tiny_config(cut_ratio=0.5, num_server_rounds=1)
    cfg = parse_config(rc)
    assert harness_enabled(cfg, simulation=True) and not harness_enabled(cfg, simulation=False)
    grid = InProcessGrid(app, rc, 2)

    def forbidden(*a, **k):
        raise AssertionError("the ServerApp read client data")

    # the two server-side readers of client data: pooled FID and the reference attacker
    monkeypatch.setattr("collafuse_flwr.harness.report.pooled_quality", forbidden)
    monkeypatch.setattr("collafuse_flwr.harness.disclosure_probe.train_reference_denoiser", forbidden)
    strategy, arrays = build_strategy(cfg, 2, torch.device("cpu"), harness=False)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=1)
    res = finalize(cfg, strategy, result, tmp_path, 1, 2, time.time(), 0, harness=False)
    assert "fid_pooled" not in res["final"] and res["status"] == "ok"


def test_a_harness_that_cannot_read_the_data_is_skipped_at_start(tiny_config, monkeypatch):
    """harness=on where the ServerApp cannot see the clients' files: one line at start, not a
    FileNotFoundError after all the training."""
    from collafuse_flwr import server_app
    from collafuse_flwr.server_app import harness_data_readable

    cfg = parse_config(tiny_config(harness="on"))
    assert harness_data_readable(cfg)

    def unreadable(_cfg):
        raise FileNotFoundError("/data/mnist: no such folder")

    monkeypatch.setattr(server_app, "dataset_for", unreadable)
    assert not harness_data_readable(cfg)


@pytest.mark.parametrize("T", [20, 200, 1000])
@pytest.mark.parametrize("c", [0.2, 0.3, 0.4, 0.5, 0.6, 0.8])
def test_an_honest_cut_equal_to_the_floor_is_the_servers_step(c, T):
    """The floor is abar on the node's reference schedule (T = 200); float32 schedules give abar at
    the same t/T to ~1e-9 only, so an exact comparison pushed a node whose node_config c equals the
    run's to t_c + 1 on T = 1000 or 20 for c = 0.3 ... 0.8, and the server refused it."""
    cfg = parse_config({"diffusion-steps": T, "cut-ratio": c})
    pol = node_policy({"cut-ratio": c}, cfg)
    sched = D.make_schedule(T, "cosine")
    assert pol.cut_step(sched, D.cut_step(c, T)) == D.cut_step(c, T)


def test_the_server_cannot_point_a_node_at_files(tiny_config, tmp_path):
    """Naively run-config dataset='imagefolder' data-dir=<any folder> makes a deployed node train on
    the files there and upload x_tc of them (here a folder of 'private' images, uploaded whole)."""
    from collafuse_flwr.tools.node_folders import write_node_folders

    folder = write_node_folders(tmp_path / "private", 1, max_per_class=3)[0]
    rc = tiny_config(cut_ratio=0.5, dataset="imagefolder", data_dir=str(folder), max_samples=0)
    trusting = _context(rc, **{"trust-run-config": "true"})
    assert len(_uploaded(_train(rc, trusting))) > 0  # the attack works on a node that takes the run-config
    reply = _hello(rc, _context(rc))  # a deployed node
    assert reply.has_error() and "reads only what its operator names" in reply.error.reason
    assert str(folder) not in reply.error.reason
    own = _context(rc, **{"data-dir": str(folder), "dataset": "imagefolder"})  # its operator names it
    assert not _hello(rc, own).has_error()


def _gray_folder(folder, n, value):
    """n distinct images of about `value` gray, in one class folder (an `hf:` local image folder)."""
    from PIL import Image

    (folder / "x").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.where(np.arange(64).reshape(8, 8) == i, 128, value).astype(np.uint8)).save(
            folder / "x" / f"{i:03d}.png")
    return folder


def test_a_run_config_hf_path_never_replaces_the_operators_data(tiny_config, tmp_path):
    """Naively an operator who names only data-dir (the run's dataset then says the format) or only
    dataset='hf:<its folder>' gets the run-config's dataset='hf:/any/path' read, trained on and
    uploaded: the server picks the folder (here 50 white images instead of the operator's 30 dark)."""
    other = _gray_folder(tmp_path / "other", 50, 255)
    mine = _gray_folder(tmp_path / "mine", 30, 0)
    rc = tiny_config(cut_ratio=0.5, dataset=f"hf:{other}", max_samples=0)
    assert _hello(rc, _context(rc, **{"trust-run-config": "true", "num-partitions": 1}))  # the attack's data loads
    reply = _hello(rc, _context(rc, **{"data-dir": str(mine)}))
    assert reply.has_error() and "reads only what its operator names" in reply.error.reason
    ctx = _context(rc, **{"dataset": f"hf:{mine}", "num-partitions": 1})
    assert _declared_cut(rc, ctx) and _train_images(rc, ctx).shape[0] == 24  # its own 30, less the test fifth
    assert float(_uploaded(_train(rc, ctx)).mean()) < 0  # x_tc of dark images, not of the white ones


def test_another_image_size_meets_the_same_lifetime_cap(tiny_config, tmp_path):
    """Naively the ledger keys hash the images as loaded, so every image-size (8, 16, 10, ...) gives
    every image fresh counts: K more uploads per size, and the upsampled uploads average anyway."""
    node = {"state-dir": str(tmp_path / "node"), "max-samples": 30}
    rc = tiny_config(cut_ratio=0.5, max_samples=30, uploads_per_round=8)
    assert len(_uploaded(_train(rc, _context(rc, **node)))) == 8
    other = tiny_config(cut_ratio=0.5, max_samples=30, uploads_per_round=8, image_size=16)
    ctx = _context(other, **node)
    hello = _hello(other, ctx)  # refused at first contact ...
    assert hello.has_error() and "run at image-size 8" in hello.error.reason
    reply = _train(other, ctx, **{"cut-step": 10})  # ... and a train message anyway uploads nothing
    assert reply.has_error() and not reply.has_content() and "run at image-size 8" in reply.error.reason


def test_a_node_never_sampled_to_train_finishes_the_final_evaluation(tiny_config, tmp_path):
    """With fraction-train < 1 a node may first hear of a run at its final evaluation: its 'finished'
    marker went into a run folder that did not exist, and the honest node's reply was an error."""
    rc = tiny_config(cut_ratio=0.5)
    ctx = _context(rc, **{"state-dir": str(tmp_path / "node")})
    reply = _evaluate(rc, ctx, rnd=1, extra={"final-round": 1})
    assert not reply.has_error(), reply.error.reason
    assert "final evaluation is done" in _train(rc, ctx, rnd=1).error.reason  # the run is over on this node
