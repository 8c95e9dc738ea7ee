"""Keep freed host memory in the process, so XLA:CPU's large buffers do not page-fault every step.

XLA:CPU allocates every buffer of an execution (outputs and temporaries) with ``malloc`` and frees
it afterwards. glibc serves allocations above 32 MB (and those of worker threads, from their own
arenas) with a fresh ``mmap`` and returns them to the kernel on ``free``, so every step touches new
pages again: one page fault and a zeroed 4 KB page per 4 KB of activations. Measured on the 2-core
CPU machine: a jitted ``x * 2`` over a 51 MB array takes 20-26 ms with 12,545 page faults per call,
about 4 ms without them; the starnet_s1 train step (batch 32) 2.10-2.20 s with about 380,000 page
faults per step, 1.63 s with this module's setting (``benchmarks/RESULTS.md``).

Google's own builds run XLA on tcmalloc, which keeps freed memory for reuse; this gives glibc the
same behaviour without a preloaded library: one malloc arena for all threads, no ``mmap`` for
large blocks, and no returning of freed memory to the kernel. The process then keeps its peak
host memory, plus the single heap's fragmentation, for its lifetime (as tcmalloc or a framework's
caching allocator would): the starnet_s1 train step's peak RSS is 4.0 GiB with it, 2.7 GiB without.

``retain_freed_memory()`` must run before the JAX backend starts (before the first computation or
``jax.devices()``): threads that have already made their own arena keep it. The training CLI and
the benchmarks call it; in a notebook call it in the first cell.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def retain_freed_memory() -> bool:
    """Tell glibc's malloc to keep and reuse freed memory; returns False where it cannot (not glibc).

    * ``M_ARENA_MAX=1``: XLA's worker threads allocate from the main heap instead of per-thread
      arenas, whose heaps (64 MB at most) hand larger blocks to ``mmap`` whatever the settings.
    * ``M_MMAP_MAX=0``: large blocks come from the heap too.
    * ``M_TRIM_THRESHOLD=-1``: the heap is never shrunk, so its pages stay mapped for the next step.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
