"""A real Flower deployment on 127.0.0.1: SuperLink + 3 SuperNodes, TLS, SuperNode authentication.

Every certificate and key is generated in the test (`collafuse_flwr.tools.deploy_keys`), every
process is started by `collafuse_flwr.tools.deploy.LocalDeployment` and stopped by pid in its
`__exit__`, which runs when an assertion fails too; each test then checks that none of the
pids it saw is still alive. Run status comes from `flwr list --format json`, never from the
exit code of `flwr run`.
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from collafuse_flwr.config import preset, run_config_text
from collafuse_flwr.tools.deploy import LocalDeployment
from collafuse_flwr.tools.launch import APP_DIR
from collafuse_flwr.tools.processes import tree

pytestmark = pytest.mark.e2e

TINY = run_config_text({**preset("tiny"), "torch-threads": 1})  # 3 nodes train at once on 2 cores
NODES = 3
#: the app the jobs run (default: this checkout); point it at another checkout to test that one
APP = Path(os.environ.get("COLLAFUSE_DEPLOY_TEST_APP", str(APP_DIR)))


def _alive(pids: list[int]) -> list[int]:
    out = []
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(p)
    return out


def _all_pids(dep: LocalDeployment) -> list[int]:
    return [p for proc in dep.procs.values() for p in tree(proc.pid)]


def _flwr_list(dep: LocalDeployment) -> dict[int, str]:
    runs = dep.list_runs()
    assert runs is not None, "flwr list --format json did not answer"
    return runs


def _check_outputs(out, output_root: Path, method: str, num_clients: int) -> dict:
    """Outputs are where the docs say: <output-dir>/<time>-<method>-...-<run-id>/."""
    assert out.output_dir is not None and out.output_dir.parent == output_root
    assert out.output_dir.name.endswith(str(out.run_id)) and f"-{method}" in out.output_dir.name
    res = json.loads((out.output_dir / "results.json").read_text())
    assert res["method"] == method and res["num_clients"] == num_clients
    assert [r["round"] for r in csv.DictReader(open(out.output_dir / "metrics.csv"))] == ["1", "2"]
    # a deployment's nodes share no generated images by default (node_config share-harness)
    return res


def test_a_tls_deployment_refuses_centralized_and_survives_a_killed_node(tmp_path):
    """TLS + SuperNode auth, nodes as deployed (node_config names only each one's own image folder:
    the default policy), two jobs on one SuperLink, warm ClientApp workers (the stock
    `--isolation subprocess` SuperNodes run in the recipe test):
    1. a server asking for method='centralized' (raw images) is refused by every node, the run
       fails naming why, and not one byte of data came up;
    2. CollaFuse runs; node 2 is SIGKILLed after round 1; the run finishes and says a client went
       missing."""
    from collafuse_flwr.tools.node_folders import write_node_folders

    folders = write_node_folders(tmp_path / "data", NODES, max_per_class=40)
    for k, f in enumerate(folders):  # disjoint: no node holds another node's classes
        assert not set(p.name for p in f.iterdir()) & set(p.name for g in folders[k + 1:] for p in g.iterdir())
    configs = [f"data-dir='{f}' dataset='imagefolder'" for f in folders]
    dep = LocalDeployment(tmp_path / "dep", num_nodes=NODES, node_configs=configs, tls=True, auth=True,
                          isolation="warm", quiet=True)
    seen: list[int] = []
    try:
        with dep:
            # TLS really is on and the nodes really are registered by key
            cfg = (dep.flwr_home / "config.toml").read_text()
            assert f'address = "127.0.0.1:{dep.superlink_port}"' in cfg and "root-certificates" in cfg
            assert len(list((tmp_path / "dep" / "keys").glob("*.pub"))) == NODES
            assert dep.online_nodes() == NODES
            root = tmp_path / "out-centralized"
            evil = dep.run(APP, run_config=f"{TINY} method='centralized' output-dir='{root}'", stream=False,
                           timeout=900)
            seen += _all_pids(dep)
            res = json.loads((evil.output_dir / "results.json").read_text())
            assert res["status"] == "failed" and "serves only" in res["error"], res.get("error")
            assert "collafuse" in res["error"] and "centralized" in res["error"]
            assert not list(evil.output_dir.glob("samples.*"))  # no images, generated or raw

            root = tmp_path / "out-collafuse"
            out = dep.run(APP, run_config=f"{TINY} method='collafuse' round-timeout=20.0 "
                                          f"min-available-fraction=0.5 output-dir='{root}'",
                          kill_node_after_round=1, stream=False, timeout=900)
            seen += _all_pids(dep)
            assert out.killed_node == NODES - 1
            assert out.ok, f"collafuse: {out.status}\n{out.log[-3000:]}"
            res = _check_outputs(out, root, "collafuse", NODES)
            statuses = _flwr_list(dep)
            assert statuses[evil.run_id] == "finished:failed"
            assert statuses[out.run_id] == "finished:completed"
            # the run says honestly that a client went missing, and the two others finished
            assert res["status"] == "degraded"
            assert any("missing" in r for r in res["status_reasons"]), res["status_reasons"]
            assert len(res["per_client"]) == NODES - 1
            seen += _all_pids(dep)
    finally:
        seen += _all_pids(dep)
    assert not _alive(seen), f"processes left running: {_alive(seen)}"


def test_the_cli_recipe_runs_and_says_where_outputs_are(tmp_path):
    """The local deployment recipe (examples/local_deployment/run.sh -> collafuse-deploy) with
    Flower's stock SuperNodes: a fresh ClientApp process per message."""
    script = APP_DIR / "examples" / "local_deployment" / "run.sh"
    env = {**os.environ, "WORKDIR": str(tmp_path / "w"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "EXTRA_RUN_CONFIG": "num-server-rounds=1 attack-reference-steps=5 torch-threads=1", "APP": str(APP),
           "ISOLATION": "subprocess", "NUM_NODES": "2"}  # a process per message: 2 nodes keep the cost down
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=900)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert ": finished:completed" in text
    outputs = Path(next(line for line in text.splitlines() if line.startswith("outputs: ")).split(": ", 1)[1])
    assert outputs.is_absolute() and (outputs / "results.json").is_file()
    assert outputs.parent == (tmp_path / "w" / "outputs").resolve()
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "w")], capture_output=True, text=True).stdout.split()
    assert not _alive([int(p) for p in pids]), f"processes left running: {pids}"


def test_a_failed_start_says_why_and_stops_what_it_started(tmp_path):
    """The SuperLink cannot bind its port: the start fails naming it, and nothing is left running."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        dep = LocalDeployment(tmp_path, num_nodes=1, quiet=True, superlink_port=busy.getsockname()[1])
        with pytest.raises(RuntimeError, match="superlink exited while waiting for the SuperLink"):
            with dep:
                pass
    assert "superlink" in dep.procs and not _alive([p.pid for p in dep.procs.values()])
