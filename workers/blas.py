"""One BLAS thread in a worker process, set before numpy is first imported.

A worker's numpy work (verdict scoring, reference k-NN tables) is small matrix products, run
beside other workers, the listener and sometimes the endpoint on the same few cores. OpenBLAS
starts a thread per core for each of them, and its threads spin-wait for one another: on a
shared core one that was preempted stalls the product for a scheduler tick or more, which
costs more than the product itself. The thread count is read from the environment once, when
numpy loads the library, so this has to run before anything imports numpy: ``pacs_embed``'s
package ``__init__`` calls it for the ``worker`` command. An operator's own setting wins.

Imports nothing but the standard library, for the same reason.
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence

#: The variables OpenBLAS, OpenMP and MKL read for their thread counts.
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def single_threaded(environ: MutableMapping[str, str]) -> None:
    """One thread for each BLAS, unless ``environ`` already says otherwise."""
    for name in BLAS_THREAD_VARIABLES:
        environ.setdefault(name, "1")


def is_worker_command(argv: Sequence[str]) -> bool:
    """Whether ``argv`` (``pacs-embed [--config FILE] COMMAND ...``) runs the embed worker."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "--config":
            next(args, None)
        elif not arg.startswith("-"):
            return arg == "worker"
    return False
