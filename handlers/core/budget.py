"""The time budget: how much work one batch (or, for a streaming request, one step) may hold so
that it finishes within the server's response timeout at the speed this worker measures.

A request that alone exceeds it is refused (400, naming the field to lower); requests that would
push a batch past it get 503 (clients retry), so the server never kills a worker for a slow
batch, on a slow board or a busy machine alike. Work is counted in each request's `cost()` units
(`step_cost()` for a streaming request, whose messages restart the server's timer every step).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

from handlers.core.errors import RequestError
from handlers.core.request import RequestModel


def streaming(params: RequestModel) -> bool:
    return bool(getattr(params, "stream", False))


def charge(params: RequestModel) -> float:
    """What a request takes of a batch's budget: all its work, or for a streaming request the
    work between two of its messages."""
    return params.step_cost() if streaming(params) else params.cost()


class StepClock:
    """Seconds per work unit (an image-step for ddpm, a 512x512 guided step for sd15) as this
    worker measured them: a warm-up at load, then every group it runs (exponential average).
    The estimate never goes below the warm-up's batch-1 figure, the slowest per unit on an idle
    worker: batched groups are faster per unit and must not talk the budget up; a busier machine
    raises it within a few groups."""

    def __init__(self, warmup_seconds_per_unit: float):
        self.floor = self.recent = float(warmup_seconds_per_unit)

    def observe(self, seconds: float, units: float) -> None:
        if units > 0:
            self.recent = 0.7 * self.recent + 0.3 * seconds / units

    @property
    def seconds_per_unit(self) -> float:
        return max(self.floor, self.recent)


class TimeBudget:
    """Work units a batch may hold: response timeout x margin / measured seconds per unit.
    Without a clock (models whose requests cost about the same) there is no limit."""

    def __init__(self, timeout_s: float, margin: float, clock: StepClock | None = None):
        self.timeout_s = timeout_s
        self.margin = margin
        self.clock = clock

    @property
    def units(self) -> float:
        if self.clock is None:
            return math.inf
        return self.timeout_s * self.margin / self.clock.seconds_per_unit

    def observe(self, seconds: float, units: float) -> None:
        if self.clock is not None:
            self.clock.observe(seconds, units)

    def check(self, params: RequestModel) -> None:
        """RequestError when this request alone cannot finish in time."""
        need = charge(params)
        if need <= self.units:
            return
        name = params.cost_field()
        what = "one step of " + params.cost_summary() if streaming(params) else params.cost_summary()
        hint = "" if streaming(params) else ", or stream it (\"stream\": true: the limit is then per step)"
        raise RequestError(name, f"{what} cannot finish within this server's response timeout "
                                 f"(at most {self.units:.0f} work units per batch at this worker's measured "
                                 f"speed; this request needs {need:.0f}); lower '{name}'{hint}")


def seconds_per_call(call: Callable[[], object], repeats: int = 3) -> float:
    """Mean wall time of call() after one untimed call (allocations, lazy initialisation)."""
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats
