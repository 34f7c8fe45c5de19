"""`flower-supernode`, polling the SuperLink every POLL seconds instead of Flower's fixed 3 s.

Why: Flower 1.42's SuperNode sleeps a hard-coded 3 s whenever a pull finds no message
(`flwr/supernode/start_client_internal.py`), so each round's message waits 0–3 s at every node
and a round waits for the slowest: about 2.25 s on average with 3 nodes, most of a tiny round's
overhead. There is no flag or environment variable for it, so this wrapper replaces the `time`
module that function sees with one whose `sleep` is capped at POLL seconds (the 0.5 s waits for a
reply are capped too), then runs Flower's own `flower-supernode` entry point with the same
arguments. Everything else is Flower's code.

    python -m collafuse_flwr.tools.fast_supernode --poll 0.5 -- <flower-supernode arguments>
"""

from __future__ import annotations

import sys
import time as _time


class _CappedSleep:
    """The `time` module, except that `sleep(s)` sleeps min(s, cap)."""

    def __init__(self, cap: float) -> None:
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def patch_poll_interval(cap: float) -> None:
    """Cap the SuperNode loop's idle sleeps at `cap` seconds (Flower: 3 s idle, 0.5 s per reply check)."""
    if not 0 < cap <= 3:
        raise ValueError(f"poll interval must be in (0, 3] seconds, got {cap}")
    import flwr.supernode.start_client_internal as loop
    loop.time = _CappedSleep(cap)  # type: ignore[assignment]


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cap = 0.5
    if args[:1] == ["--poll"]:
        cap, args = float(args[1]), args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    patch_poll_interval(cap)
    from flwr.supernode.cli.flower_supernode import flower_supernode
    sys.argv = ["flower-supernode", *args]
    flower_supernode()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
