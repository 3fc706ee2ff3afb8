"""The `pacs-embed` command line, `run` and the composition root.

Both entries (the ``pacs-embed`` script and ``python -m pacs_embed``) import this package
before anything else, so it is where a worker process gets its one BLAS thread before numpy is
imported (``workers.blas``).
"""

import os
import sys

from workers.blas import is_worker_command, single_threaded

if is_worker_command(sys.argv):
    single_threaded(os.environ)
