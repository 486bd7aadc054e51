"""How many BLAS threads the numeric engine uses (threadpoolctl).

The maps of a layer are a few T×T products and elementwise passes. Below a few hundred tokens a
product takes microseconds and a second BLAS thread costs more than it saves (its wake-up and
spin-wait dominate, and on a busy machine it can be 100× slower than one thread); above, the
products are large enough to split. :func:`choose` picks, in this order:

1. ``threads=`` given to :func:`kernelprop.propagate` (an int ≥ 1);
2. the environment variable ``KERNELPROP_THREADS`` (an int ≥ 1);
3. one thread below :data:`PARALLEL_TOKENS` tokens, or when the machine is busy (1-minute load average
   at least ``cores − 0.5``); otherwise every core this process may run on.

The limit applies to BLAS only and only inside the call (:func:`limit` is a context manager); the
results do not depend on it beyond rounding.
"""

from __future__ import annotations

import contextlib
import os

PARALLEL_TOKENS = 512      # from this many tokens on, BLAS may use every core (benchmarks/bench_propagate.py)
ENV = "KERNELPROP_THREADS"

_controller = None


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):     # not on Linux
        return max(1, os.cpu_count() or 1)


def _count(value, field: str) -> int:
    from ..errors import SpecError
    try:
        n = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else None
    except (TypeError, ValueError):
        n = None
    if n is None or n < 1:
        raise SpecError(field, value, "must be a whole number of threads >= 1")
    return n


def choose(tokens: int, threads: int | None = None, field: str = "threads") -> int:
    """The BLAS thread count for kernels of ``tokens`` tokens (see the module docstring); ``field`` names
    ``threads`` in the error if it is not a whole number >= 1."""
    if threads is not None:
        return _count(threads, field)
    env = os.environ.get(ENV, "").strip()
    if env:
        return _count(env, ENV)
    n = cores()
    if tokens < PARALLEL_TOKENS or n == 1:
        return 1
    try:
        busy = os.getloadavg()[0] >= n - 0.5
    except OSError:
        busy = False
    return 1 if busy else n


def limit(tokens: int, threads: int | None = None):
    """Context manager: BLAS limited to :func:`choose` threads inside it (a no-op when threadpoolctl finds no
    BLAS, or when the count already is the library's)."""
    global _controller
    n = choose(tokens, threads)
    try:
        if _controller is None:
            from threadpoolctl import ThreadpoolController
            _controller = ThreadpoolController()
        return _controller.limit(limits=n, user_api="blas")
    except ImportError:      # pragma: no cover - threadpoolctl is a dependency
        return contextlib.nullcontext()
