"""Measurements of the machine shared by both sides of the benchmark (standard library only:
the PyTorch side imports it from its own interpreter, without JAX or the repo's lib)."""
from __future__ import annotations

import os
import resource
import time


def rss_peak_mib() -> float:
    """VmHWM (Linux): ``ru_maxrss`` survives fork+exec and would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def compile_timed(jitted, *args):
    """``jitted.lower(*args).compile()`` and its seconds (tracing, lowering and XLA compilation):
    what every JAX row reports as ``compile_s``, apart from the calls."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def time_calls(call, warmup: int, steps: int, wait=lambda out: out):
    """Time ``call()``: seconds of the first call, then of each of ``steps`` calls after ``warmup``
    untimed ones, the last output, and CPU snapshots around the timed calls. ``wait(out)`` returns
    once the output exists (``jax.block_until_ready``; CPU PyTorch ops are synchronous)."""
    t0 = time.perf_counter()
    wait(call())
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        wait(call())
    times = []
    cpu0 = cpu_snapshot()
    for _ in range(steps):
        t0 = time.perf_counter()
        out = wait(call())
        times.append(time.perf_counter() - t0)
    cpu1 = cpu_snapshot()
    return first_s, times, out, cpu0, cpu1


def call_stats(times, cpu0, cpu1) -> dict:
    """What every benchmark row reports of its timed calls (``time_calls``' times and CPU snapshots):
    median / min / max ms, peak RSS, load average, other processes' CPU and the cores this one used."""
    import statistics
    return {"median_step_ms": round(1000 * statistics.median(times), 2),
            "min_step_ms": round(1000 * min(times), 2), "max_step_ms": round(1000 * max(times), 2),
            "rss_peak_mib": rss_peak_mib(), "loadavg": [round(v, 2) for v in os.getloadavg()],
            "other_cpu_pct": other_cpu_pct(cpu0, cpu1, os.cpu_count() or 1), "own_cpu_cores": own_cores(cpu0, cpu1)}


def cpu_snapshot():
    """(wall, all-CPU busy seconds from /proc/stat, this process's CPU seconds); busy is None off Linux."""
    busy = None
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.perf_counter(), busy, t.user + t.system


def own_cores(start, end):
    """Cores this process kept busy during [start, end] (its CPU seconds / wall seconds)."""
    return round((end[2] - start[2]) / (end[0] - start[0]), 2)


def other_cpu_pct(start, end, cores: int):
    """CPU used by *other* processes during [start, end], in % of all the machine's cores:
    the disturbance of a measurement (0 on a quiet machine; 100 = one process took the cores)."""
    if start[1] is None or end[1] is None:
        return None
    other = (end[1] - start[1]) - (end[2] - start[2])
    return round(max(0.0, 100 * other / ((end[0] - start[0]) * cores)), 1)
