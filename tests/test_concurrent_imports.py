"""Flower's simulation loads the ServerApp and the ClientApp in two threads at once; so do many
runs' apps in one process. Concurrent imports must never deadlock or see a half-made module
(issue 24: `_DeadlockError ... _ModuleLock('collafuse_flwr.metrics.features')`)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: loads each app in its own thread, started together, in a fresh interpreter (imports happen once)
PROBE = textwrap.dedent("""
    import importlib, sys, threading
    errors, go = [], threading.Barrier({n})
    def load(name):
        go.wait()
        try:
            importlib.import_module(name)
        except BaseException as exc:
            errors.append(f"{{name}}: {{type(exc).__name__}}: {{exc}}")
    names = {names!r}
    threads = [threading.Thread(target=load, args=(n,)) for n in names]
    for t in threads: t.start()
    for t in threads: t.join()
    print("\\n".join(errors) or "ok")
""")


@pytest.mark.parametrize("names", [
    ["collafuse_flwr.server_app", "collafuse_flwr.client_app"],
    ["collafuse_flwr.client_app", "collafuse_flwr.server_app", "collafuse_flwr.client_app", "collafuse_flwr.server_app"],
])
def test_the_apps_load_in_concurrent_threads(names):
    """Without the shared import lock this fails every time on this machine (diffusers' lazy
    module is seen half-initialised: "cannot import name 'UNet2DModel'")."""
    code = PROBE.format(n=len(names), names=names)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "ok", out.stdout
