"""Wall-clock timing shared by the benchmarks."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_calls(function: Callable[[], object], runs: int) -> list[float]:
    """Seconds of each of ``runs`` calls of ``function``, after one untimed warm-up call."""
    function()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times
