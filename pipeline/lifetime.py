"""Child processes must not outlive the process that started them.

A ``kill -9`` of the daemon gives it no chance to stop its children; Linux's PR_SET_PDEATHSIG
asks the kernel to do it instead. Used for `run`'s children and the conversion pool.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int | None = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies.

    Given ``parent_pid``, also exit at once if the parent already died before this call.
    A no-op where prctl does not exist (children may then outlive a killed parent).
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def pool_process_init(parent_pid: int) -> None:
    """Initializer for pool processes: die with the parent, and leave Ctrl-C to it (pool
    processes share the terminal's process group)."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
