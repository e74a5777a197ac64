"""Run independent jobs over a few worker processes, falling back to this process when needed.

Workers are *spawned* (not forked): the parent may hold threads (torch, tqdm, logging) that make
``fork`` unsafe. Spawning re-imports the parent's main module in each worker, which is impossible
when it was read from stdin and breaks scripts without an ``if __name__ == "__main__":`` guard;
in those cases (a missing main file, or a pool whose workers die) the remaining jobs run here,
with a warning, so the result is the same, only slower.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterator, Sequence

log = logging.getLogger(__name__)


def can_spawn() -> bool:
    """False when spawned workers could not re-import the main module (``python - < script``)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return path is None or os.path.exists(path)


def run_jobs(fn: Callable[..., Any], jobs: Sequence[tuple], workers: int = 2) -> Iterator[tuple[int, Any]]:
    """Yield ``(index, fn(*jobs[index]))`` for every job, in completion order.

    ``fn`` must be a module-level function. Exceptions raised by ``fn`` propagate unchanged.
    """
    done: set[int] = set()
    workers = max(1, int(workers))
    if workers > 1 and len(jobs) > 1:
        if not can_spawn():
            log.warning("cannot start worker processes (the main module %r is not a file); running %d jobs in "
                        "this process", getattr(sys.modules.get("__main__"), "__file__", None), len(jobs))
        else:
            pool = ProcessPoolExecutor(max_workers=min(workers, len(jobs)),
                                       mp_context=multiprocessing.get_context("spawn"))
            try:
                futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    result = fut.result()
                    done.add(futures[fut])
                    yield futures[fut], result
            except BrokenProcessPool as exc:
                log.warning("worker processes failed (%s; a script without an `if __name__ == \"__main__\":` "
                            "guard does this); running the remaining %d jobs in this process",
                            exc, len(jobs) - len(done))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    for i, job in enumerate(jobs):
        if i not in done:
            yield i, fn(*job)
