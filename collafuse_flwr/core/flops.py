"""FLOPs measured on the real passes with ``torch.utils.flop_counter`` (a split's cost depends on
which code ran): matmul/conv/attention, 2 per multiply-add, backward included; keys are inclusive.
Counting runs a Python hook per aten op, slowing small nets: set ``count-flops = false`` for wall-clock runs."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager, nullcontext

from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode


class _GlobalOnlyTracker(nullcontext):
    """FlopCounterMode's ModuleTracker crashes under inference_mode for inputs that require grad: all is 'Global'."""

    parents = frozenset({"Global"})


class FlopMeter:
    """Accumulates measured FLOPs per key (e.g. 'client_train'); ``enabled=False`` makes it a no-op."""

    def __init__(self, enabled: bool = True, every_pass: bool = False) -> None:
        self.enabled, self.every_pass = enabled, every_pass
        self.totals: dict[str, int] = {}
        self._per_shape: dict[tuple[str, Hashable], int] = {}

    @contextmanager
    def count(self, key: str, shape: Hashable | None = None) -> Iterator[None]:
        """Add the enclosed block's FLOPs to ``totals[key]``. With a `shape` key, only the first such block
        is measured (unless ``every_pass``): a denoiser pass has no data-dependent control flow (tested)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"FLOP key must be a non-empty string, got {key!r}")
        if not self.enabled:
            yield
            return
        cached = None if shape is None or self.every_pass else self._per_shape.get((key, shape))
        if cached is not None:
            yield
            self.add(key, cached)
            return
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _GlobalOnlyTracker()  # type: ignore[assignment]
        try:
            with counter:
                yield
        finally:  # work done before an exception was still spent
            flops = int(counter.get_total_flops())
            self.add(key, flops)
            if shape is not None:
                self._per_shape[(key, shape)] = flops

    def wrap(self, eps_model: Callable[[Tensor, Tensor], Tensor], key: str) -> Callable[[Tensor, Tensor], Tensor]:
        """eps_model whose every call is billed to ``key`` (per shape, as in :meth:`count`)."""
        def counted(x: Tensor, t: Tensor) -> Tensor:
            with self.count(key, shape=(tuple(x.shape), x.dtype, str(x.device))):
                return eps_model(x, t)
        return counted

    def add(self, key: str, flops: int) -> None:
        """Add a count measured elsewhere (e.g. received from a client in a MetricRecord)."""
        if flops < 0:
            raise ValueError(f"FLOPs must be >= 0, got {flops} for key {key!r}")
        self.totals[key] = self.totals.get(key, 0) + int(flops)

    def merge(self, other: FlopMeter | Mapping[str, int]) -> FlopMeter:
        for key, flops in (other.totals if isinstance(other, FlopMeter) else other).items():
            self.add(key, int(flops))
        return self

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    def as_dict(self) -> dict[str, int]:
        return dict(self.totals)
