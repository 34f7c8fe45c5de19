"""The deployment helpers' parts, without starting Flower: keys, node folders, README commands."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
import sys
import time
import types
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from collafuse_flwr.tools.deploy import LocalDeployment, _rounds_done
from collafuse_flwr.tools.deploy_keys import make_node_key, make_tls
from collafuse_flwr.tools.node_folders import class_blocks, write_node_folders

REPO = Path(__file__).resolve().parent.parent


def test_server_certificate_is_signed_by_the_ca_for_localhost(tmp_path):
    files = make_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert files.server_key.stat().st_mode & 0o077 == 0  # private key not readable by others


def test_node_key_is_what_flower_accepts(tmp_path):
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    priv, pub = make_node_key(tmp_path, 0)
    key = load_ssh_private_key(priv.read_bytes(), None)  # what flower-supernode does
    public = load_ssh_public_key(pub.read_bytes())       # what `flwr supernode register` does
    assert isinstance(key, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(public)
    assert key.public_key().public_numbers() == public.public_numbers()
    assert make_node_key(tmp_path, 1)[1].read_bytes() != pub.read_bytes()


def test_node_folders_hold_disjoint_classes_in_imagefolder_layout(tmp_path):
    assert class_blocks(3) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="num_nodes must be in 1..10"):
        class_blocks(11)
    folders = write_node_folders(tmp_path, 3, max_per_class=5)
    classes = [sorted(int(p.name) for p in f.iterdir()) for f in folders]
    assert classes == class_blocks(3)
    assert all(len(list((f / str(c)).glob("*.png"))) == 5 for f, cs in zip(folders, classes) for c in cs)
    from PIL import Image
    img = Image.open(next((folders[0] / "0").glob("*.png")))
    import numpy as np
    assert img.size == (8, 8) and img.mode == "L" and np.asarray(img).max() > 100


def test_rounds_done_counts_metrics_rows(tmp_path):
    assert _rounds_done(tmp_path) == 0
    run = tmp_path / "20260101-000000-collafuse-1"
    run.mkdir()
    (run / "metrics.csv").write_text("round,elapsed-s\n1,3.0\n2,5.0\n")
    assert _rounds_done(tmp_path) == 2
    assert _rounds_done(tmp_path, since=time.time() + 60) == 0  # an older run's file does not count


@pytest.mark.parametrize("kwargs, match", [({"num_nodes": 0}, "num_nodes must be >= 1"),
                                           ({"isolation": "thread"}, "isolation must be one of"),
                                           ({"tls": False}, "needs TLS"),
                                           ({"node_configs": ["a=1"]}, "1 node configs for 3 nodes")])
def test_bad_deployment_settings_are_refused_with_the_fix(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalDeployment(tmp_path, **{"num_nodes": 3, **kwargs})


def test_federation_entry_names_address_and_trust(tmp_path):
    dep = LocalDeployment(tmp_path, num_nodes=1, tls=False, auth=False)
    dep.flwr_home.mkdir(parents=True)
    dep.superlink_port = 12345
    text = dep.write_federation_entry().read_text()
    import tomllib
    entry = tomllib.loads(text)["superlink"]
    assert entry["default"] == "collafuse-local"
    assert entry["collafuse-local"] == {"address": "127.0.0.1:12345", "insecure": True}


def _warm_script():
    """scripts/flwr142_warm.py, loaded by path (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("flwr142_warm", REPO / "scripts" / "flwr142_warm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_warm_patches_are_pinned_to_the_flower_they_were_written_for():
    """The warm isolation patches private Flower internals: on another Flower this test fails (re-check
    the patches, then update FLOWER), and the script itself refuses to start, naming the fix."""
    import flwr

    warm = _warm_script()
    assert flwr.__version__.startswith(warm.FLOWER), (
        f"scripts/flwr142_warm.py was written against flwr {warm.FLOWER}*, installed is {flwr.__version__}")
    warm.check_flower(flwr.__version__)
    with pytest.raises(SystemExit, match=r"found flwr 1\.43\.0: use isolation 'subprocess'"):
        warm.check_flower("1.43.0")


def test_the_warm_supernode_caps_only_the_loop_sleeps(monkeypatch):
    import flwr.supernode.start_client_internal as loop

    monkeypatch.setattr(loop, "time", time)
    warm = _warm_script()
    warm.patch_poll_interval(0.01)
    t0 = time.perf_counter()
    loop.time.sleep(3)  # Flower's idle poll
    assert time.perf_counter() - t0 < 1.0
    assert loop.time.time() > 0 and time.sleep is not loop.time.sleep  # the real module is untouched
    with pytest.raises(ValueError, match="poll interval must be in"):
        warm.patch_poll_interval(0)


def test_the_warm_worker_drops_the_previous_apps_modules_only(tmp_path, monkeypatch):
    app, other = tmp_path / "app", tmp_path / "elsewhere"
    mods = {"mypkg": app / "mypkg" / "__init__.py", "mypkg.sub": app / "mypkg" / "sub.py",
            "otherpkg": other / "otherpkg" / "__init__.py"}
    for name, path in mods.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(__file__=str(path)))
    monkeypatch.setattr(sys, "path", [*sys.path, str(app)])
    assert sorted(_warm_script().unload_modules_under(app)) == ["mypkg", "mypkg.sub"]
    assert "otherpkg" in sys.modules and "mypkg" not in sys.modules and str(app) not in sys.path


@pytest.mark.parametrize("isolation, node_exe, worker", [
    ("subprocess", ["flower-supernode"], None),
    ("process", ["flower-supernode"], ["flower-superexec"]),  # stock: Flower's long-lived executor
    ("warm", [sys.executable, str(REPO / "scripts" / "flwr142_warm.py"), "supernode", "--poll", "0.5", "--"],
     [sys.executable, str(REPO / "scripts" / "flwr142_warm.py"), "worker"])])
def test_each_isolation_starts_its_supernode_and_clientapp_runner(tmp_path, monkeypatch, isolation, node_exe,
                                                                   worker):
    dep = LocalDeployment(tmp_path, num_nodes=1, tls=False, auth=False, isolation=isolation)
    started = {}
    monkeypatch.setattr(dep, "_spawn", lambda name, cmd: started.setdefault(name, cmd) and types.SimpleNamespace(pid=42))
    dep._start_supernode(0)
    node = started.pop("supernode-0")
    assert node[:len(node_exe)] == node_exe and ("--isolation" in node) == (worker is not None)
    port = node[node.index("--port") + 1]
    if worker is None:
        assert not started
    else:
        assert started.pop("clientapp-0") == [*worker, "--runtime-api-address", f"127.0.0.1:{port}", "--insecure",
                                              "--parent-pid", "42"]


def test_warm_needs_the_checkouts_script(tmp_path, monkeypatch):
    from collafuse_flwr.tools import deploy

    monkeypatch.setattr(deploy, "WARM_SCRIPT", deploy.APP_DIR / "scripts" / "gone.py")
    with pytest.raises(ValueError, match=r"isolation 'warm' runs scripts/gone.py from a collafuse-flwr checkout"):
        LocalDeployment(tmp_path, isolation="warm")


def test_readme_by_hand_commands_are_the_scripts():
    """examples/README.md's "By hand" block is copied verbatim into by_hand.sh (which was run)."""
    readme = (REPO / "examples" / "README.md").read_text()
    block = re.search(r"### By hand.*?```bash\n(.*?)```", readme, re.S).group(1)
    script = (REPO / "examples" / "local_deployment" / "by_hand.sh").read_text()
    lines = [ln for ln in block.splitlines() if ln.strip()]
    assert len(lines) > 20
    missing = [ln for ln in lines if ln not in script.splitlines()]
    assert not missing, f"README lines not in by_hand.sh: {missing}"


def test_a_relative_app_path_is_submitted_absolute(tmp_path, monkeypatch):
    """`flwr run` runs with cwd=app: a relative `--app` passed as given resolved twice (app/app)."""
    from collafuse_flwr.tools import deploy

    (tmp_path / "my-app").mkdir()
    monkeypatch.chdir(tmp_path)
    dep = LocalDeployment(tmp_path / "w", num_nodes=1, tls=False, auth=False, isolation="subprocess")
    monkeypatch.setattr(dep, "list_runs", lambda: {})
    seen = {}

    class Done(Exception):
        pass

    def popen(cmd, **kw):
        seen.update(cmd=cmd, cwd=kw["cwd"])
        raise Done

    monkeypatch.setattr(deploy.subprocess, "Popen", popen)
    with pytest.raises(Done):
        dep.run(Path("my-app"))
    app = str((tmp_path / "my-app").resolve())
    assert seen["cwd"] == app and seen["cmd"][2] == app, seen


def test_one_node_config_reaches_every_node_and_a_wrong_count_is_one_line(tmp_path, monkeypatch, capsys):
    """The examples' FedAvg deployment needs every node to list fedavg: one --node-config was refused with
    a traceback (after making a workdir). It now reaches all nodes, each keeping its partition."""
    from collafuse_flwr.tools import deploy

    seen = {}

    class Started(Exception):
        pass

    def deployment(workdir, num_nodes, node_configs, **kwargs):
        seen["configs"] = node_configs
        raise Started

    def submitted(self, app, run_config, *args, **kwargs):
        seen["run_config"] = run_config
        raise Started

    monkeypatch.setattr(deploy, "LocalDeployment", deployment)
    with pytest.raises(Started):
        deploy.main(["--num-nodes", "3", "--workdir", str(tmp_path / "w"), "--node-config", "methods='local,fedavg'"])
    assert seen["configs"] == [f"partition-id={k} num-partitions=3 methods='local,fedavg'" for k in range(3)]
    with pytest.raises(Started):
        deploy.main(["--num-nodes", "2", "--workdir", str(tmp_path / "w"), "--per-node-data",
                     "--node-config", "cut-ratio=0.5"])
    assert [c.endswith("dataset='imagefolder' cut-ratio=0.5") for c in seen["configs"]] == [True, True]
    real = LocalDeployment
    monkeypatch.setattr(deploy, "LocalDeployment", real)
    monkeypatch.setattr(real, "__enter__", lambda self: self)
    monkeypatch.setattr(real, "__exit__", lambda self, *exc: None)
    monkeypatch.setattr(real, "run", submitted)
    for argv, run_config in ((["--node-config", "methods='local,fedavg'"], ""),
                             (["--per-node-data"], "dataset='digits'")):  # its folders hold digits
        with pytest.raises(Started):
            deploy.main(["--num-nodes", "2", "--workdir", str(tmp_path / "w2"), *argv])
        assert seen["run_config"] == run_config
    with pytest.raises(SystemExit) as exc:  # one state folder for all: a shared secret and ledger
        deploy.main(["--num-nodes", "2", "--node-config", "state-dir='/srv/state'"])
    assert exc.value.code == 2 and "would share their secret" in capsys.readouterr().err
    monkeypatch.setattr(deploy.tempfile, "mkdtemp", lambda **kw: pytest.fail("a workdir was made"))
    with pytest.raises(SystemExit) as exc:
        deploy.main(["--num-nodes", "3", "--node-config", "a=1", "--node-config", "b=2"])
    assert exc.value.code == 2 and "give one per node, or one for every node" in capsys.readouterr().err
