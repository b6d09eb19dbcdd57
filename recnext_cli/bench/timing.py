"""How a prepared model is timed: per-call durations, their statistics, warm-up counts, threads, operator profiles."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from typing import Any, Callable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class LatencyStats:
    """Per-call wall-clock latency over the timed iterations, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    iters: int


@dataclasses.dataclass(frozen=True)
class OperatorTime:
    """One operator's share of a profiled call (torch.profiler self time: excluding the operators it calls)."""

    name: str
    ms_per_call: float
    share: float  # of all operators' self time
    calls: int  # per model call


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_stats(durations_s: Sequence[float]) -> LatencyStats:
    """Median, 10th and 90th percentile and mean of per-call durations given in seconds, in milliseconds."""
    if not durations_s:
        raise ValueError("no timed calls; --iters must be at least 1")
    ms = [duration * 1000 for duration in durations_s]
    return LatencyStats(percentile(ms, 50), percentile(ms, 10), percentile(ms, 90), sum(ms) / len(ms), len(ms))


def time_calls(
    fn: Callable[[], Any],
    *,
    warmup: int,
    iters: int,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] = lambda: None,
) -> list[float]:
    """Call `fn` `warmup` times untimed, then `iters` times, returning each timed call's duration in seconds.

    `synchronize` runs before each clock reading: CUDA kernels are asynchronous, and without waiting for them the
    clock would measure only the kernel launches.
    """
    for _ in range(warmup):
        fn()
    durations = []
    for _ in range(iters):
        synchronize()
        start = clock()
        fn()
        synchronize()
        durations.append(clock() - start)
    return durations


def time_in_turns(
    runs: Mapping[str, Callable[[], Any]],
    *,
    warmup: int,
    rounds: int,
    clock: Callable[[], float] = time.perf_counter,
    synchronize: Callable[[], None] = lambda: None,
    keep_going: Callable[[], bool] = lambda: True,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, list[float]]:
    """Call every run once per round, in turns: `warmup` rounds untimed, then `rounds` timed; {label: durations in s}.

    In turns, a slow spell of the machine slows every variant alike, so per-round ratios (`speedup_in_turns`) hold
    where separate runs would not. `keep_going` is asked before each round (a deadline). With `on_error`, a run that
    raises is reported there and dropped while the others go on; without it, the error propagates.
    """
    active = dict(runs)
    durations: dict[str, list[float]] = {label: [] for label in runs}
    for round_ in range(warmup + rounds):
        if not keep_going():
            break
        timed = round_ >= warmup
        for label, run in list(active.items()):
            try:
                synchronize()
                start = clock() if timed else 0.0
                run()
                synchronize()
            except Exception as error:
                if on_error is None:
                    raise
                on_error(label, error)
                del active[label]
                continue
            if timed:
                durations[label].append(clock() - start)
    return durations


def speedup_in_turns(baseline_s: Sequence[float], durations_s: Sequence[float]) -> float:
    """The median over rounds of baseline time / variant time, both taken in the same round (`time_in_turns`)."""
    return statistics.median(base / duration for base, duration in zip(baseline_s, durations_s))


def untimed_calls(fast_path, device, warmup: int) -> int:
    """How many calls to make before timing: `warmup`, raised to what the prepared model needs to reach steady state.

    A CUDA-graph compiled model (torch.compile mode "reduce-overhead") compiles on its first call, records its graph
    on the second and replays it from the third; a CPU compiled model compiles on its first call; oneDNN-fused
    convolutions reorder their weights on their first call. None of that may land among the timed calls, whatever
    --warmup says.
    """
    if fast_path.compile and device.type == "cuda":
        needed = 3
    elif fast_path.compile or fast_path.onednn_fusion:
        needed = 1
    else:
        needed = 0
    return max(warmup, needed)


@contextlib.contextmanager
def torch_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: unchanged) inside the block, restored after."""
    import torch

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def profile_operators(run: Callable[[], Any], device, calls: int = 3, top: int = 15) -> tuple[OperatorTime, ...]:
    """The `top` operators by self time over `calls` calls of `run` (already warmed up), under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    # On a GPU the kernels' time is what a call waits for; on a CPU the operators' own time.
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [event for event in profiler.key_averages() if getattr(event, attribute) > 0]
    total = sum(getattr(event, attribute) for event in events) or 1.0
    events.sort(key=lambda event: getattr(event, attribute), reverse=True)
    return tuple(
        OperatorTime(
            name=event.key,
            ms_per_call=getattr(event, attribute) / 1000 / calls,
            share=getattr(event, attribute) / total,
            calls=round(event.count / calls),
        )
        for event in events[:top]
    )
