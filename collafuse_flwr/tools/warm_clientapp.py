"""A long-lived ClientApp worker for a SuperNode started with `--isolation process`.

Why: with Flower's default `--isolation subprocess`, the SuperNode's SuperExec starts a fresh
`flwr-clientapp` process for every message, which imports torch and Flower, installs the FAB,
imports the app and reloads and re-partitions the node's data before it does any work: several
seconds per message on a small machine, for a round whose training takes half a second. Flower
1.42's own `flwr-clientapp` (and its "prestarted" workers) serve exactly one task and exit.

This worker plays SuperExec and `flwr-clientapp` in one process and loops: it asks the
SuperNode's Runtime API for a ClientApp task (`AcquireTask`), runs it in-process with the same
calls `flwr-clientapp` makes (pull input, call the ClientApp, push the reply and the task
output), and keeps the imported app, hence torch and the app's own caches (the node's data and
partition), for the next task of the same FAB. A new FAB (another app version) drops the
previous app's modules first, so a run never executes another run's code.

    flower-supernode ... --isolation process --port 9094
    python -m collafuse_flwr.tools.warm_clientapp --runtime-api-address 127.0.0.1:9094 --insecure

It uses Flower's internal Runtime API client (`flwr.supercore.runtime`), the same one Flower's
SuperExec uses; pin flwr (this project requires >=1.42,<2) when relying on it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import get_project_dir
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.tls import validate_and_resolve_root_certificates
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output


class AppCache:
    """The loaded ClientApp of the last FAB seen; a different FAB unloads the old app's modules."""

    def __init__(self) -> None:
        self.fab_hash: str | None = None
        self.project_dir: Path | None = None
        self.app: ClientApp | None = None

    def get(self, fab_id: str, fab_version: str, fab_hash: str, fab_content: bytes) -> ClientApp:
        if self.app is not None and fab_hash == self.fab_hash:
            return self.app
        if self.project_dir is not None:
            _unload_modules_under(self.project_dir)
        install_from_fab(fab_content, skip_prompt=True)
        self.project_dir = get_project_dir(fab_id, fab_version, fab_hash).resolve()
        _unload_shadowing(self.project_dir)
        self.app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
            fab_id, fab_version, fab_hash)
        self.fab_hash = fab_hash
        return self.app


def _unload_modules_under(folder: Path) -> list[str]:
    """Drop every imported module whose file lies under `folder` (the previous app's code)."""
    gone = [name for name, mod in list(sys.modules.items())
            if getattr(mod, "__file__", None) and Path(mod.__file__).resolve().is_relative_to(folder)]
    for name in gone:
        del sys.modules[name]
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    return gone


def _unload_shadowing(project_dir: Path) -> list[str]:
    """Drop imported modules that share a top-level name with the app's but live elsewhere.

    The app must run its own FAB's code: if this worker's process already imported a package of
    the same name from elsewhere (e.g. an installed `collafuse_flwr`, which `python -m
    collafuse_flwr.tools.warm_clientapp` imports), `import` would return that copy instead.
    """
    tops = {p.stem for p in project_dir.iterdir()
            if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    gone = [name for name, mod in list(sys.modules.items())
            if name.split(".")[0] in tops and name != "__main__"
            and not (getattr(mod, "__file__", None) and Path(mod.__file__).resolve().is_relative_to(project_dir))]
    for name in gone:
        del sys.modules[name]
    return gone


def _client(address: str, insecure: bool, certificates: bytes | None, token: str | None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
    if token is not None:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                 root_certificates=certificates, interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def run_task(address: str, token: str, insecure: bool, certificates: bytes | None, cache: AppCache) -> str:
    """One ClientApp task, as `flwr-clientapp` runs it, minus the process start; returns its status."""
    t0 = time.perf_counter()
    marks: dict[str, float] = {}
    client = _client(address, insecure, certificates, token)
    heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
    message = reply = context = None
    sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
    try:
        heartbeat.start()
        message, context, run, fab = pull_task_input(client)
        marks["pull"] = time.perf_counter()
        app = cache.get(run.fab_id, run.fab_version, fab.hash_str, fab.content)
        marks["load"] = time.perf_counter()
        reply = app(message=message, context=context)
        marks["app"] = time.perf_counter()
        sub_status, details = SubStatus.COMPLETED, ""
    except Exception as ex:  # the same error reply flwr-clientapp sends  # noqa: BLE001
        code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError) \
            else ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        details = f"{type(ex)}:<'{ex}'>"
        log(ERROR, "ClientApp raised an exception", exc_info=ex)
        if message is not None:
            reply = Message(Error(code=code, reason=details), reply_to=message)
    finally:
        try:
            if reply is not None and context is not None:
                push_message(client, reply, context)
        except Exception as ex:  # noqa: BLE001
            log(ERROR, "Failed to push reply message", exc_info=ex)
            sub_status = SubStatus.FAILED
        push_task_output(client, context, sub_status, details)
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
        marks["push"] = time.perf_counter()
        log(INFO, "warm ClientApp: %s", " ".join(f"{k} {v - t0:.2f}s" for k, v in marks.items()))
    return sub_status


def serve(address: str, insecure: bool = True, root_certificates: str | None = None,
          poll_interval: float = 0.1, max_tasks: int = 0) -> int:
    """Acquire and run ClientApp tasks until stopped (or `max_tasks` > 0 have run)."""
    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
    acquirer = _client(address, insecure, certificates, None)
    cache, done = AppCache(), 0
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "warm ClientApp worker polling %s every %.2fs", address, poll_interval)
    try:
        while not max_tasks or done < max_tasks:
            res = acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                t0 = time.perf_counter()
                status = run_task(address, res.token, insecure, certificates, cache)
                done += 1
                log(INFO, "warm ClientApp: task %d %s in %.2fs", res.task.task_id, status,
                    time.perf_counter() - t0)
                continue
            time.sleep(poll_interval)
    finally:
        acquirer.close()
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m collafuse_flwr.tools.warm_clientapp",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--runtime-api-address", required=True,
                   help="the SuperNode's Runtime API, host:port (its --host/--port)")
    p.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP (the default SuperNode)")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's --ssl-certfile")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between AcquireTask polls")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    a = p.parse_args(argv)
    if not a.insecure and not a.root_certificates:
        p.error("give --insecure (plain-HTTP Runtime API) or --root-certificates")
    if a.parent_pid:
        start_parent_process_monitor(a.parent_pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        serve(a.runtime_api_address, a.insecure, a.root_certificates, a.poll_interval)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
