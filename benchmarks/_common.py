"""Shared helpers for the benchmarks: an interleaved median timer and a description of the machine.

Timing protocol (used by every benchmark in this folder):

* every callable is warmed up first (``warmup`` calls, not timed);
* each callable gets a fixed ``number`` of calls per measurement, calibrated once so that one measurement
  lasts about ``target_s`` seconds (short calls are repeated to rise above timer and scheduler noise);
* measurements are **interleaved**: each round times every callable once, in turn (round-robin), so a
  change of machine load during the run hits all callables alike;
* a callable whose first call is slow (``slow_s``) is measured with one call in a few rounds spread over
  the run, so that one expensive method does not dominate the run time;
* the summary is the median over rounds (with the 25 % and 75 % quantiles), and ratios are medians of the
  per-round ratios to a baseline measured in the same round.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

__all__ = ["machine_info", "calibrate", "interleaved_timings", "median_time", "quantiles", "summarise"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """One line: CPU model, usable cores, OS, Python, torch version and its intra-op thread count."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count()
    try:
        load = "load avg {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = "load avg n/a"
    return (
        f"CPU {_cpu_model()} ({platform.machine()}), {cores} usable cores, {load} at start; "
        f"{platform.system()} {platform.release()}; Python {platform.python_version()}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} intra-op threads"
    )


def calibrate(fn: Callable[[], object], target_s: float = 0.02, max_number: int = 1000) -> int:
    """Calls per measurement so that one measurement lasts about ``target_s`` seconds (at least 1)."""
    t0 = time.perf_counter()
    fn()
    once = max(time.perf_counter() - t0, 1e-7)
    return int(max(1, min(max_number, round(target_s / once))))


def _measure(fn: Callable[[], object], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """``(q25, median, q75)`` of ``values`` (the median alone when there are fewer than 2 values)."""
    med = statistics.median(values)
    if len(values) < 2:
        return med, med, med
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], med, q[2]


def interleaved_timings(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 2,
    target_s: float = 0.02,
    progress: Callable[[str], None] | None = None,
    slow_s: float | None = None,
    slow_rounds: int = 3,
) -> dict[str, list[float]]:
    """Seconds per call of each callable, one entry per measured round, measured round-robin.

    Args:
        fns: ``{name: callable}``; every callable runs once per round (times its calibrated ``number``).
        rounds: number of rounds (measurements per callable).
        warmup: untimed calls of each callable before calibration (at least one call is always made).
        target_s: approximate duration of one measurement (sets the number of calls averaged in it).
        progress: optional sink for one progress line per round.
        slow_s: a callable whose first call lasts longer than this is *slow*: no further warm-up, one call
            per measurement, and measured only in ``slow_rounds`` rounds spread evenly over the run
            (``None``: no callable is slow).
        slow_rounds: number of rounds that measure a slow callable.

    Returns:
        ``{name: [seconds per call in round r for r in range(rounds)]}``; ``nan`` marks a round that did not
        measure a slow callable.
    """
    if rounds < 1:
        raise ValueError(f"Invalid rounds: {rounds}")
    if slow_rounds < 1:
        raise ValueError(f"Invalid slow_rounds: {slow_rounds}")
    numbers: dict[str, int] = {}
    slow: set[str] = set()
    for name, fn in fns.items():
        first = _measure(fn, 1)
        if slow_s is not None and first > slow_s:
            slow.add(name)
            numbers[name] = 1
            continue
        for _ in range(warmup - 1):
            fn()
        numbers[name] = calibrate(fn, target_s)
    k = min(rounds, slow_rounds)
    slow_at = {round(i * (rounds - 1) / (k - 1)) for i in range(k)} if k > 1 else {0}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            skip = name in slow and r not in slow_at
            times[name].append(math.nan if skip else _measure(fn, numbers[name]))
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done")
    return times


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, target_s: float = 0.02) -> float:
    """Median seconds per call of a single callable (warm-up, calibrated repeats)."""
    return statistics.median(interleaved_timings({"fn": fn}, repeats, warmup, target_s)["fn"])


def summarise(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per callable: median/q25/q75 milliseconds and the median of per-round ratios to ``baseline``.

    Rounds marked ``nan`` (a slow callable not measured in that round) are left out.
    """
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        ok = [(t, b) for t, b in zip(ts, base) if not math.isnan(t)]
        q25, med, q75 = quantiles([t for t, _ in ok])
        rq25, rmed, rq75 = quantiles([t / b for t, b in ok])
        out[name] = {
            "ms": med * 1e3,
            "ms_q25": q25 * 1e3,
            "ms_q75": q75 * 1e3,
            "ratio": rmed,
            "ratio_q25": rq25,
            "ratio_q75": rq75,
            "rounds": len(ok),
        }
    return out


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
