"""What every benchmark shares: the repository on ``sys.path`` and one way to time a call.

Benchmarks run as scripts (``python bench/bench_x.py``), so Python puts ``bench/`` on ``sys.path``
and ``import benchlib`` finds this module; importing it puts the repository root there too, after
which ``import training`` / ``import deploy_app`` put the bundle's code on the path themselves (see
their ``__init__``).

Timings on a shared machine are noisy: report medians over repeats, after one warm-up call, and
compare against a baseline measured in the same process.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

T = TypeVar("T")


def median_seconds(
    function: Callable[[], T], repeats: int, *, warmup: int = 1, synchronize: Callable[[], None] | None = None
) -> tuple[float, T]:
    """The median wall time of ``function()`` over ``repeats`` calls, and the last call's value.

    Args:
        function: the work to time.
        repeats: timed calls (at least 1).
        warmup: untimed calls first (imports, caches, allocator, TorchScript profiling).
        synchronize: called before reading the clock (e.g. ``torch.cuda.synchronize``), so that
            asynchronous device work is inside the measurement.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    value = None
    for _ in range(warmup):
        value = function()
    if synchronize is not None:
        synchronize()  # the warm-up's queued device work stays out of the first measurement
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = function()
        if synchronize is not None:
            synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value  # type: ignore[return-value]


class StageTimes:
    """Wall time per named stage, collected over repeats: ``with stages("load"): ...``."""

    def __init__(self) -> None:
        self.samples: dict[str, list[float]] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.samples.setdefault(name, []).append(time.perf_counter() - start)

    def medians(self) -> dict[str, float]:
        """Median seconds of each stage, in the order the stages first ran."""
        return {name: statistics.median(values) for name, values in self.samples.items()}
