"""The memory benchmark's child process (selattn_bench.memory_probe) reports sane figures."""

import json
import subprocess
import sys

import numpy as np
import pytest

from selattn_bench import memory_probe as bench_memory_probe


@pytest.mark.parametrize("case, tensors", [("fwd", 4), ("fwdbwd", 8)])
def test_probe_reports_its_tensors_and_a_peak_above_them(case, tensors, tmp_path):
    N, H, D, B = 300, 2, 8, 1
    # cwd elsewhere: `python -m` puts the cwd first on sys.path, and the checkout's selattn_c
    # (no compiled extension) must not shadow the installed one
    proc = subprocess.run([sys.executable, "-m", "selattn_bench.memory_probe", case, str(N),
                           str(H), str(D), str(B), "1"], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["tensors"] == tensors
    assert info["tensor_bytes"] == tensors * B * H * N * D * 4
    assert 0 < info["rss_after_imports"] <= info["rss_before_call"] <= info["peak"]
    assert info["fwd_seconds"] >= 0.0


def test_probe_refuses_bad_arguments(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "selattn_bench.memory_probe", "fwd", "300"],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0 and "fwd|fwdbwd" in proc.stderr


def test_filled_is_the_pattern_written_chunk_by_chunk():
    x = bench_memory_probe.filled((2, 3, 50, 4), 0.3, chunk=7)      # chunks that do not divide
    i = np.arange(x.size, dtype=np.float32)
    np.testing.assert_array_equal(x.reshape(-1), np.sin(i * np.float32(0.7) + 0.3).astype(np.float32))
    assert x.dtype == np.float32 and x.flags.c_contiguous
