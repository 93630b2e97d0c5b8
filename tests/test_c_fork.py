"""Fork safety (issue 27, item 1): a child forked after the kernels ran in the parent, or while
another thread is inside a kernel, runs the kernels (with several threads) and finishes.

Each case runs in a fresh interpreter in its own session, and every wait has a deadline: a hang
(what the code before ``selattn_c._fork`` did) fails the test within seconds and is killed, it
never hangs the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap

import pytest

import selattn_c

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

DEADLINE = 60  # seconds for one whole script; a child gets 20 (both far above a normal run)

# Shared by the scripts: run every entry point, and fork a child that runs them too and exits
# 0 when its results equal the parent's bitwise (1 when they differ, killed after 20 s).
PRELUDE = textwrap.dedent("""
    import os, sys, threading, time
    import numpy as np
    import selattn_c

    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 2, 200, 16)).astype(np.float32) for _ in range(4))

    def work():
        out, ctx = selattn_c.forward(q, k, v)
        grads = selattn_c.backward(dout, ctx)
        F = selattn_c.accumulated_mask(q, k)
        with selattn_c.KVCache(1, 2, 16, budget=20) as cache:
            steps = [cache.step(q[:, :, i], k[:, :, i], v[:, :, i]) for i in range(40)]
        return [out, *grads, F, *steps]

    def same(a, b):
        return all(np.array_equal(x, y) for x, y in zip(a, b))

    def fork_and_check(want, threads=2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                selattn_c.set_num_threads(threads)
                code = 0 if same(work(), want) else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return "hung"
""")


def run_script(body: str) -> str:
    """Run PRELUDE + body in a new interpreter (own session); return its stdout. Fails the test
    when the script fails or does not finish within DEADLINE (its whole process group is then
    killed)."""
    proc = subprocess.Popen([sys.executable, "-c", PRELUDE + textwrap.dedent(body)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # outside the checkout: `python -c` puts the working directory first
                            # on sys.path, and a checkout without an in-place build would shadow
                            # the installed package
                            cwd=tempfile.gettempdir())
    try:
        out, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the script did not finish within {DEADLINE} s")
    assert proc.returncode == 0, err
    return out


@pytest.mark.skipif(not selattn_c.extension_built(), reason="needs the C extension")
def test_a_child_forked_after_the_kernels_ran_runs_them_with_threads():
    """The issue's case: every entry point ran with 2 threads in the parent, then the child runs
    them all with 2 threads, three times in a row, with bitwise the parent's results; and the
    parent goes on with its threads afterwards."""
    out = run_script("""
        selattn_c.set_num_threads(2)
        want = work()
        print([fork_and_check(want) for _ in range(3)], same(work(), want))
    """)
    assert out.split("\n")[0] == "[0, 0, 0] True"


@pytest.mark.skipif(not selattn_c.extension_built(), reason="needs the C extension")
def test_multiprocessing_fork_pool_workers_run_the_kernels():
    """A multiprocessing pool with the fork start method (Linux' default before Python 3.14),
    forked after the parent ran the kernels with 2 threads: the workers' results equal the
    parent's."""
    out = run_script("""
        import multiprocessing as mp
        selattn_c.set_num_threads(2)
        want = selattn_c.forward(q, k, v)[0]

        def one(i):
            return selattn_c.forward(q, k, v)[0]

        with mp.get_context("fork").Pool(2) as pool:
            got = pool.map_async(one, range(4)).get(timeout=30)
        print(all(np.array_equal(x, want) for x in got))
    """)
    assert out.strip() == "True"


@pytest.mark.skipif(not selattn_c.extension_built(), reason="needs the C extension")
def test_a_fork_while_another_thread_is_inside_a_kernel():
    """A thread runs kernels (2 OpenMP threads each) without pause while the main thread, which
    ran them too, forks 8 times: every child runs all entry points with 2 threads, bitwise as
    the parent, and finishes."""
    out = run_script("""
        selattn_c.set_num_threads(2)
        want = work()
        stop, calls = threading.Event(), [0]
        big = rng.standard_normal((2, 4, 512, 32)).astype(np.float32)

        def busy():
            while not stop.is_set():
                selattn_c.backward(big, selattn_c.forward(big, big, big)[1])
                calls[0] += 1

        t = threading.Thread(target=busy)
        t.start()
        codes = []
        for _ in range(8):
            time.sleep(0.02)
            codes.append(fork_and_check(want))
        stop.set()
        t.join()
        print(codes, calls[0] > 0)
    """)
    assert out.split("\n")[0] == "[0, 0, 0, 0, 0, 0, 0, 0] True"


@pytest.mark.skipif(not selattn_c.extension_built(), reason="needs the C extension")
def test_a_runtime_that_cannot_release_its_threads_pins_the_child_to_one_thread():
    """The fallback: when the OpenMP runtime cannot end its workers before the fork (made to fail
    here), the child runs every kernel with 1 thread, whatever set_num_threads asks, and still
    gives the parent's results; the parent keeps its setting."""
    out = run_script("""
        import selattn_c._fork as fork_hooks

        class Refusing:
            @staticmethod
            def selattn_release_threads():
                return -1

        fork_hooks.lib = Refusing()
        selattn_c.set_num_threads(2)
        want = work()
        pid = os.fork()
        if pid == 0:
            ok = selattn_c.get_num_threads() == 1
            selattn_c.set_num_threads(2)
            ok = ok and selattn_c.get_num_threads() == 1 and same(work(), want)
            os._exit(0 if ok else 1)
        deadline, done = time.monotonic() + 20, 0
        while not done:
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                raise SystemExit("the child hung")
            time.sleep(0.01)
            done, status = os.waitpid(pid, os.WNOHANG)
        print(os.waitstatus_to_exitcode(status), selattn_c.get_num_threads())
    """)
    assert out.strip() == "0 2"
