"""One BLAS thread per process: the package's linear algebra is small and its processes many.

Every matrix here is small (Fisher matrices of tens to a few hundred
parameters, Jacobians of a few thousand rows), and the demo, ``validate`` and
the tests already run several processes at once (workers, IOCs, the catalog
server).  OpenBLAS's own threads then only spin: one tip-free evolution fit
took 1.45 s of CPU with OpenBLAS's two threads on a busy 2-core machine and
0.11 s with one, for the same result.
"""

from __future__ import annotations

import os

__all__ = ["one_blas_thread"]

_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def one_blas_thread() -> None:
    """Limit BLAS to one thread here and in every process started from here.

    The environment variables (kept where the user set them) reach the
    subprocesses (IOCs, demo workers) before they load numpy; threadpoolctl
    limits the libraries this process has loaded already.
    """
    for name in _VARIABLES:
        os.environ.setdefault(name, "1")
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"]), user_api="blas")
