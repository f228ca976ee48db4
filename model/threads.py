"""How many CPU threads torch and FAISS use: the cores other processes leave free, unless told.

Torch and FAISS's OpenMP pool start one thread per core. Next to a busy process those threads wait
for each other at every parallel region: on two cores beside one busy job, two torch threads made a
fine-tuning epoch take 70–181 s instead of 5 s. The default therefore counts the cores this process
may run on and subtracts the busy ones, read from the one-minute load average.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def usable_cores(processes: int = 1) -> int:
    """The cores this process may run on (its CPU affinity where the platform has one), at most torch's
    own default (the physical cores, or OMP_NUM_THREADS when set) as long as nothing has changed it.
    One of several ``processes`` started by torchrun counts the affinity alone: torchrun sets
    OMP_NUM_THREADS=1 in every worker it starts, which says nothing about the machine."""
    import torch  # here, not at import: the tests of the arithmetic below need no torch

    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if processes > 1:
        return max(1, logical)
    return max(1, min(logical, torch.get_num_threads()))


def load_average() -> float:
    """The one-minute load average, 0.0 where the platform has none."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def free_cores(cores: int, load: float) -> int:
    """Cores left by ``load`` busy processes (rounded to the nearest whole one), at least 1."""
    return max(1, cores - round(max(0.0, load)))


def choose_threads(
    requested: int | None, cores: int | None = None, load: float | None = None, processes: int = 1
) -> int:
    """``requested`` when positive (``--threads N``), else (None or 0) the free cores, shared evenly by
    the ``processes`` of this machine (torchrun's workers; at least one thread each); logs the choice."""
    if requested is not None and requested > 0:
        log.info("using %d CPU threads (--threads)", requested)
        return requested
    n_cores = usable_cores(processes) if cores is None else cores
    busy = load_average() if load is None else load
    n = max(1, free_cores(n_cores, busy) // max(1, processes))
    shared = f", shared by {processes} processes" if processes > 1 else ""
    log.info(
        "using %d CPU threads: %d cores, load average %.2f%s (--threads N to override)",
        n,
        n_cores,
        busy,
        shared,
    )
    return n


def apply_threads(n: int) -> None:
    """Size torch's intra-op pool and FAISS's OpenMP pool to ``n`` threads."""
    import faiss  # here, not at import: choosing a number needs neither library
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)  # FAISS's OpenMP pool would otherwise take every core
