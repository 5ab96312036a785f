"""One thread policy for every process that runs torch: the cores divided among the workers.

    from components.threads import apply_thread_policy
    apply_thread_policy()             # the CLI, `dvc repro` stages, Prefect flows: one process
    apply_thread_policy(workers=2)    # each of 2 Dask workers / server workers sharing the cores

Why: torch's default is one OpenMP thread per core in every process. Two processes with 2
threads each on 2 cores (or a scoring server next to a training run) spin against each other
and run many times slower than one (measured: a served text 5 s instead of 0.6 s). So each
process takes `cores // workers` threads (at least 1), where cores are the CPUs this process
may run on (`sched_getaffinity`, so containers and `taskset` count right). `GENCLS_THREADS`
overrides the figure (`--threads` on a command sets it for that command). The choice is
exported as OMP_NUM_THREADS / MKL_NUM_THREADS, which torch reads when it starts, so it holds
before torch is imported and in child processes (dvc stages, the scoring server's worker);
when torch is already loaded, `torch.set_num_threads` applies it at once.
"""
from __future__ import annotations

import os

ENV = "GENCLS_THREADS"


def available_cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_budget(workers: int = 1) -> int:
    """Torch threads for one of `workers` processes sharing the cores (GENCLS_THREADS wins).

    Example:
        >>> import os; os.environ.pop("GENCLS_THREADS", None)
        >>> thread_budget(workers=available_cores() * 4)
        1
    """
    explicit = os.environ.get(ENV, "").strip()
    if explicit:
        try:
            value = int(explicit)
        except ValueError:
            raise ValueError(f"{ENV}={explicit!r}: expected a whole number of threads, e.g. {ENV}=1") from None
        if value < 1:
            raise ValueError(f"{ENV}={explicit!r}: expected at least 1 thread")
        return value
    return max(1, available_cores() // max(1, int(workers)))


def apply_thread_policy(workers: int = 1, threads: int | None = None) -> int:
    """Set torch's intra-op threads (now if torch is loaded, else through OMP/MKL_NUM_THREADS); returns them."""
    import sys

    n = int(threads) if threads else thread_budget(workers)
    if n < 1:
        raise ValueError(f"threads={n}: expected at least 1")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n
