"""Keep freed heap memory for reuse, so the engine's T×T temporaries do not page-fault on every layer.

Each map of a layer allocates a few T×T float64 temporaries (512 KiB at T = 256, 8 MiB at T = 1024). glibc's
malloc serves blocks of that size by ``mmap`` and returns them to the system on ``free`` (or trims the heap
top), so every new temporary faults its pages in again: on this project's benchmark machine that made the
elementwise passes of a Pre-LN block at T = 256 about 1.5× slower than the same passes on warm memory
(3.4 → 2.2 ms per block; benchmarks/bench_propagate.py). :func:`retain` sets, once per process and only on
glibc, ``M_MMAP_THRESHOLD`` = 32 MiB (glibc's largest) and ``M_TRIM_THRESHOLD`` = 64 MiB: blocks below 32 MiB
come from the heap, and up to 64 MiB of freed heap top stays mapped for the next layer. Results do not
depend on it; the process may keep up to 64 MiB more than it uses.

Left alone when the environment already tunes malloc (a ``MALLOC_*`` variable, or ``GLIBC_TUNABLES`` naming
``glibc.malloc``) or when ``KERNELPROP_HEAP=system`` (``retain``, the default, or unset: as above; anything else
is a :class:`~kernelprop.errors.SpecError` naming the variable).
"""

from __future__ import annotations

import os
import sys

ENV = "KERNELPROP_HEAP"
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameter numbers (malloc.h)

_state: str | None = None


def retain() -> str:
    """Set malloc to keep freed memory (see the module docstring) on the first call; returns what was done:
    ``"retained"``, ``"system"`` (asked to leave malloc alone, or the environment tunes it) or
    ``"unavailable"`` (not glibc)."""
    global _state
    if _state is None:
        _state = _configure()
    return _state


def _configure() -> str:
    choice = os.environ.get(ENV, "").strip().lower()
    if choice not in ("", "retain", "system"):
        from ..errors import SpecError
        raise SpecError(ENV, os.environ[ENV], "must be \"retain\" (the default) or \"system\" (leave malloc alone)")
    if choice == "system" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", "") \
            or any(k.startswith("MALLOC_") for k in os.environ):
        return "system"
    if not sys.platform.startswith("linux"):
        return "unavailable"
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):       # musl and others: no glibc mallopt
        return "unavailable"
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return "retained" if ok else "unavailable"
