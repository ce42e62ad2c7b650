"""Timing shared by the benchmarks: variants interleaved in one process, results with their spread.

On a shared machine the load changes from one second to the next, so variants timed one after another compare
different machines. Here every round times each variant once, in turn, and a ratio is taken within a round (both
variants saw nearly the same load); the spread over rounds says how far to trust it.
"""

import statistics
import time
from collections.abc import Callable


def seconds(fn: Callable, device: str) -> float:
    """Wall time of one `fn()`, with the GPU's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def interleaved(calls: dict[str, Callable], device: str, rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call per round: `warmup` untimed rounds (compilation happens there), then `rounds` rounds
    that time every call once, in turn."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name].append(seconds(call, device))
    return times


def per_round(combine: Callable, *series: list[float]) -> list[float]:
    """`combine` applied round by round (e.g. a difference of two calls, or a ratio of two variants)."""
    return [combine(*values) for values in zip(*series, strict=True)]


def spread(values: list[float], scale: float = 1.0, digits: int = 2, unit: str = "") -> str:
    """`median [min-max]` of the rounds, times `scale`."""
    low, mid, high = (scale * v for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f}{unit} [{low:.{digits}f}-{high:.{digits}f}]"
