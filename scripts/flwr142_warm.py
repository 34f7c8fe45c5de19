"""Fast deployment rounds on Flower 1.42, from its private internals: a long-lived ClientApp worker
per SuperNode, and a SuperNode that polls the SuperLink every 0.5 s instead of 3 s.

Stock Flower starts a fresh `flwr-clientapp` (torch, the app, the node's data) per message and an idle
SuperNode sleeps 3 s between pulls: 22-23 s overhead a round against a 3 s target (this: 1.2-2.4 s,
benchmarks.deploy_overhead). The patched names carry no stability promise, so it refuses any Flower
but FLOWER and stays out of the wheel; `collafuse-deploy --isolation warm` starts it:

    python scripts/flwr142_warm.py supernode --poll 0.5 -- <flower-supernode arguments, --isolation process>
    python scripts/flwr142_warm.py worker --runtime-api-address 127.0.0.1:9094 --insecure [--parent-pid PID]

The worker keeps the imported app for the next task of the same FAB; a new FAB drops the old one's modules.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import types
from pathlib import Path

FLOWER = "1.42."  # the Flower release these patches were written against and are tested with


def check_flower(version: str) -> None:
    """Refuse a Flower these patches were not written for, saying what to do instead."""
    if not version.startswith(FLOWER):
        sys.exit(f"scripts/flwr142_warm.py patches private internals of flwr {FLOWER}*, found flwr {version}: "
                 f"use isolation 'subprocess' (stock Flower), or re-check the patches against this version and "
                 f"update FLOWER")


def patch_poll_interval(cap: float) -> None:
    """Cap the SuperNode loop's sleeps at `cap` seconds (Flower: 3 s when idle, 0.5 s per reply check)."""
    if not 0 < cap <= 3:
        raise ValueError(f"poll interval must be in (0, 3] seconds, got {cap}")
    import flwr.supernode.start_client_internal as loop

    capped = types.ModuleType("time")  # a copy of `time` whose sleep is capped; the real module is untouched
    capped.__dict__.update(vars(time))
    capped.sleep = lambda seconds: time.sleep(min(seconds, cap))
    loop.time = capped  # type: ignore[assignment]


def unload_modules_under(folder: Path) -> list[str]:
    """Drop every imported module whose file lies under `folder` (the previous app's code)."""
    gone = [name for name, mod in list(sys.modules.items())
            if getattr(mod, "__file__", None) and Path(mod.__file__).resolve().is_relative_to(folder)]
    for name in gone:
        del sys.modules[name]
    if str(folder) in sys.path:
        sys.path.remove(str(folder))
    return gone


def serve(address: str, insecure: bool, root_certificates: str | None, poll_interval: float = 0.1) -> None:
    """Acquire and run ClientApp tasks until stopped."""
    from logging import ERROR, INFO

    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.common.config import get_project_dir
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore import log
    from flwr.supercore.constant import TaskType
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    if poll_interval <= 0:
        raise ValueError(f"poll_interval must be > 0 seconds, got {poll_interval}")
    certificates = validate_and_resolve_root_certificates(root_certificates, insecure)

    def client(token: str | None):
        interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp")]
        interceptors += [RuntimeTokenHttpInterceptor(token)] if token is not None else []
        return RuntimeHttpClient.from_server_address(server_address=address, insecure=insecure,
                                                     root_certificates=certificates, interceptors=interceptors,
                                                     retry_invoker=make_simple_http_retry_invoker())

    app = fab_hash = project_dir = None

    def run_task(token: str) -> None:
        """One task as `flwr-clientapp` runs it, minus the process start."""
        nonlocal app, fab_hash, project_dir
        t0, task = time.perf_counter(), client(token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(task))
        message = reply = context = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(task)
            if app is None or fab.hash_str != fab_hash:  # another app version: drop the old one's modules
                if project_dir is not None:
                    unload_modules_under(project_dir)
                install_from_fab(fab.content, skip_prompt=True)
                project_dir = get_project_dir(run.fab_id, run.fab_version, fab.hash_str).resolve()
                app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)(
                    run.fab_id, run.fab_version, fab.hash_str)
                fab_hash = fab.hash_str
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # the same error reply flwr-clientapp sends  # noqa: BLE001
            code = (ErrorCode.LOAD_CLIENT_APP_EXCEPTION if isinstance(ex, LoadClientAppError)
                    else ErrorCode.CLIENT_APP_RAISED_EXCEPTION)
            details = f"{type(ex)}:<'{ex}'>"
            log(ERROR, "ClientApp raised an exception", exc_info=ex)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(task, reply, context)
            except Exception as ex:  # noqa: BLE001
                log(ERROR, "Failed to push reply message", exc_info=ex)
                status = SubStatus.FAILED
            push_task_output(task, context, status, details)
            if heartbeat.is_running:
                heartbeat.stop()
            task.close()
            log(INFO, "warm ClientApp: task %s in %.2fs", status, time.perf_counter() - t0)

    acquirer = client(None)
    request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
    log(INFO, "warm ClientApp worker polling %s every %.2fs", address, poll_interval)
    try:
        while True:
            res = acquirer.AcquireTask(request)
            if res.HasField("task") and res.token:
                run_task(res.token)
            else:
                time.sleep(poll_interval)
    finally:
        acquirer.close()


def main(argv: list[str] | None = None) -> int:
    import flwr

    check_flower(flwr.__version__)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["supernode"]:  # supernode [--poll S] [--] <flower-supernode arguments>
        args, cap = args[1:], 0.5
        if args[:1] == ["--poll"]:
            cap, args = float(args[1]), args[2:]
        patch_poll_interval(cap)
        from flwr.supernode.cli.flower_supernode import flower_supernode

        sys.argv = ["flower-supernode", *(args[1:] if args[:1] == ["--"] else args)]
        flower_supernode()
        return 0
    p = argparse.ArgumentParser(prog="python scripts/flwr142_warm.py worker", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["worker"])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, host:port")
    p.add_argument("--insecure", action="store_true", help="the Runtime API is plain HTTP (the default SuperNode)")
    p.add_argument("--root-certificates", default=None, help="CA of the Runtime API's --ssl-certfile")
    p.add_argument("--poll-interval", type=float, default=0.1, help="seconds between AcquireTask polls")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process (the SuperNode) exits")
    a = p.parse_args(args)
    if not a.insecure and not a.root_certificates:
        p.error("give --insecure (plain-HTTP Runtime API) or --root-certificates")
    if a.parent_pid:
        from flwr.supercore.app_utils import start_parent_process_monitor

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
