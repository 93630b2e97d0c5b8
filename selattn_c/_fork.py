"""Fork safety: a child forked after the kernels ran must not wait for OpenMP threads that exist
only in its parent.

GNU OpenMP keeps, for every thread that ran a parallel region, a pool of worker threads that sleep
between regions. ``fork()`` copies only the forking thread, so in the child that pool names threads
that are gone, and the child's first parallel region waits for them forever (multiprocessing's
default start method on Linux and PyTorch's DataLoader workers fork). Before ``os.fork`` the hook
below ends the forking thread's workers (``selattn_release_threads``, OpenMP 5.0's
``omp_pause_resource_all``); the parent's next call starts them again (thread creation, once per
fork), and the child starts its own. When the runtime cannot do that, the child runs every kernel
with 1 thread instead, which needs no pool. A fork while another thread is inside a kernel is safe
too: that thread's team is its own pool, which the child (having only the forking thread) never
uses.

Covered: every fork made through ``os.fork`` (multiprocessing, ``concurrent.futures``, PyTorch).
Not covered: a ``fork()`` made in C by another library, which runs no Python hooks.
"""

from __future__ import annotations

import os

from ._extension import lib


_state: dict = {"threads": None, "released": True}


def _before() -> None:
    """In the forking thread, just before ``os.fork``: end its OpenMP workers."""
    _state["released"] = lib.selattn_release_threads() == 0


def _after_in_child() -> None:
    """In the child: when the workers could not be ended, pin every kernel to 1 thread."""
    if not _state["released"] and _state["threads"] is not None:
        _state["threads"]["n"] = 1
        _state["threads"]["pinned"] = True


def install(threads: dict) -> None:
    """Register the fork hooks (once per process). ``threads`` is the package's thread setting
    (``threads["n"]``, 0 for the OpenMP default), which a child that could not release the pool
    pins to 1 (``threads["pinned"]``, honoured by ``set_num_threads``)."""
    if lib is None or _state["threads"] is not None:
        return
    _state["threads"] = threads
    os.register_at_fork(before=_before, after_in_child=_after_in_child)
