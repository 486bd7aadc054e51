"""Where a sweep's runs are computed: serially, on a local ``dask.distributed`` cluster or on an
existing one, with an optional cache on disk (docs/sweeps.md).

The jobs (one per distinct network, :func:`kernelprop.sweep.compute.sweep` plans them) are cut into
chunks of consecutive jobs; each chunk is one Dask task, retried when it raises and resubmitted by
the scheduler when its worker dies. Outcomes come back as plain data and are put back in the
planning order, so the grid is filled exactly as in the serial loop. Dask is imported only here,
and only when asked for (extra ``kernelprop[dask]``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..errors import KernelpropError, SpecError
from .extras import MissingExtraError, require

RETRIES = 2
__all__ = ["Cache", "MissingExtraError", "RETRIES", "cache_key", "require", "run_jobs"]


# ----------------------------------------------------------------------------------------------
# the cache


def cache_key(fingerprint, job, inputs, measures, spectral) -> str:
    """sha256 of what a job's outcome depends on: the network's fingerprint, the reads (depth,
    last record?), whether it shares a depth run, the input kernel, the measures and the package
    version."""
    from .. import __version__
    h = hashlib.sha256()
    reads = sorted({(int(d), bool(last)) for _, d, last in job.reads})
    with np.printoptions(threshold=10**9, precision=17):
        h.update(json.dumps({"version": __version__, "network": repr(fingerprint), "reads": reads,
                             "shared": bool(job.shared), "measures": list(measures), "spectral": bool(spectral),
                             "segments": list(inputs.segments), "tokens": repr(inputs.token_ids)}).encode())
    for a in (inputs.sigma, inputs.mean):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()


class Cache:
    """One JSON file per job outcome in ``directory`` (floats written by ``repr``, read back exactly)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise SpecError("cache", str(directory), "must be a directory (it is created when missing)")

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.json"

    def get(self, key: str):
        from .compute import _Outcome
        path = self._path(key)
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None                           # missing or unreadable: compute it again
        if data.get("key") != key:
            return None
        return _Outcome([(int(d), bool(last), [float(v) for v in vs]) for d, last, vs in data["values"]],
                        list(data["failures"]), int(data["runs"]),
                        None if data["error"] is None else tuple(data["error"]))

    def put(self, key: str, outcome) -> None:
        from ..io.results import atomic_write
        data = {"key": key, "values": outcome.values, "failures": outcome.failures, "runs": outcome.runs,
                "error": outcome.error}
        atomic_write(self._path(key), json.dumps(data).encode())


# ----------------------------------------------------------------------------------------------
# running the jobs


def _run_chunk(jobs, inputs, measures, spectral, batch=True):
    """Outcomes of ``jobs`` (runs on a worker): as batches (:mod:`kernelprop.sweep.batch`), or one run per
    job when ``batch`` is False. Errors of the package come back as data (their constructors do not survive
    pickling); anything else raises, and Dask retries the chunk."""
    from .batch import execute
    from .compute import _execute
    try:
        if batch:
            return execute(list(jobs), inputs, measures, spectral)
        return [_execute(job, inputs, measures, spectral) for job in jobs]
    except KernelpropError as exc:
        return _Raised(type(exc), str(exc), dict(vars(exc)))


class _Raised:
    def __init__(self, kind, message, state):
        self.kind, self.message, self.state = kind, message, state

    def exception(self):
        exc = self.kind.__new__(self.kind)
        Exception.__init__(exc, self.message)
        exc.__dict__.update(self.state)
        return exc


def run_jobs(jobs: dict, inputs, measures, spectral, *, workers: int | None = None, scheduler=None,
             cache=None, chunk: int | None = None,
             progress: Callable[[int, int], None] | None = None, batch: bool = True) -> tuple[list, int]:
    """``(outcomes in the order of jobs, number read from the cache)``. ``batch``: run jobs of one structure
    as batched propagations (serially: all of them, in batches bounded in memory; on Dask: each chunk);
    False: one propagation per job."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, (int, np.integer))
                                or workers < 0):
        raise SpecError("workers", workers, "must be a whole number >= 0 (0: one per core; 1: serial)")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1):
        raise SpecError("chunk", chunk, "must be a whole number >= 1 (networks per task)")
    if scheduler is not None and workers not in (None, 1):
        raise SpecError("workers", workers, "give either workers (a local cluster) or scheduler (an existing one)")
    store = Cache(cache) if cache is not None else None
    items = list(jobs.items())
    keys = [cache_key(fp, job, inputs, measures, spectral) for fp, job in items] if store else []
    outcomes: list = [None] * len(items)
    if store is not None:
        for i, key in enumerate(keys):
            outcomes[i] = store.get(key)
    todo = [i for i, o in enumerate(outcomes) if o is None]
    cached = len(items) - len(todo)
    total, done = len(items), cached
    if progress is not None and cached:
        progress(done, total)

    def finished(indices, results):
        nonlocal done
        if isinstance(results, _Raised):
            raise results.exception()
        for i, outcome in zip(indices, results):
            outcomes[i] = outcome
            if store is not None:
                store.put(keys[i], outcome)
        done += len(indices)
        if progress is not None:
            progress(done, total)

    if todo and (scheduler is not None or (workers is not None and workers != 1)):
        _run_dask(items, todo, inputs, measures, spectral, workers, scheduler, chunk, finished, batch)
    elif batch and todo:
        from .batch import execute
        execute([items[i][1] for i in todo], inputs, measures, spectral,
                done=lambda k, outcome: finished([todo[k]], [outcome]))
    else:
        for i in todo:
            finished([i], _run_chunk([items[i][1]], inputs, measures, spectral, batch=False))
    return outcomes, cached


def _run_dask(items, todo, inputs, measures, spectral, workers, scheduler, chunk, finished, batch=True):
    distributed = require("distributed", "dask", "a distributed sweep")
    own = []
    try:
        if isinstance(scheduler, distributed.Client):
            client = scheduler
        elif scheduler is not None:
            try:
                client = distributed.Client(str(scheduler), timeout="30s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SpecError("scheduler", str(scheduler), f"no Dask scheduler answered there ({exc}); give "
                                "its address tcp://HOST:PORT") from None
            own.append(client)
        else:
            n = workers or os.cpu_count() or 1
            cluster = distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                                               dashboard_address=":0")
            own.append(cluster)
            client = distributed.Client(cluster)
            own.insert(0, client)
        threads = max(1, sum(client.nthreads().values()))
        size = chunk or max(1, math.ceil(len(todo) / (4 * threads)))
        chunks = [todo[k:k + size] for k in range(0, len(todo), size)]
        futures = {client.submit(_run_chunk, [items[i][1] for i in c], inputs, list(measures), spectral, batch,
                                 retries=RETRIES, pure=False): c for c in chunks}
        try:
            for future in distributed.as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            client.cancel(list(futures))
            raise
    finally:
        for thing in own:
            thing.close()
