"""Child processes must not outlive the process that started them.

A ``kill -9`` of the daemon gives it no chance to stop its children; Linux's PR_SET_PDEATHSIG
asks the kernel to do it instead (for `run`'s children, started from its main thread). The
conversion pool's processes watch their parent instead (:func:`exit_with_parent`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

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


#: How often a pool process checks that its parent is still there.
PARENT_POLL_SECONDS = 0.5


def exit_with_parent(parent_pid: int) -> None:
    """Exit (from a watchdog thread) as soon as the process ``parent_pid`` is gone.

    Not PR_SET_PDEATHSIG: that fires when the parent *thread* that started the child ends, and a
    process pool starts its processes from whichever thread submits first. A pool process killed
    that way can die holding the pool's queue lock and leave its siblings deadlocked.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pool_process_init(parent_pid: int, log_level: str = "info", log_format: str = "json") -> None:
    """Initializer for pool processes: exit with the parent, leave Ctrl-C to it (pool processes
    share the terminal's process group), and log (and capture warnings) like it, without PHI."""
    from pipeline import logs

    exit_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logs.configure(log_level, log_format)
