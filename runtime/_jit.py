"""What the numba kernels share (runtime._prepare_kernel, runtime._post_kernel): compiling one
explicit signature, cached on disk, and the threading layer. Imported only by those modules, on
first use: numba's import stays off every path that never runs a kernel.
"""

from __future__ import annotations

import os

import numba
from numba import njit

# The workqueue layer has no spinning threads to steal cores from the backend and needs no
# libgomp/TBB on the host; it must not be entered by two threads at once (fast_prepare's lock).
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def compile_for(sig, **kw):
    """njit for one explicit signature (compiled once, at first use), no GIL held while it runs,
    cached on disk where numba finds a writable place (seconds of LLVM otherwise, in every new
    process)."""
    def wrap(fn):
        try:
            return njit(sig, nogil=True, cache=True, **kw)(fn)
        except RuntimeError:  # no writable cache location (a read-only install): compile each start
            return njit(sig, nogil=True, **kw)(fn)
    return wrap
