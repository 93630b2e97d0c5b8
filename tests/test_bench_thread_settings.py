"""selattn_bench.thread_settings: each setting's child process runs with the threads the setting
names (the table's "in force" column is what the child reported), with the caller's threading
variables removed, and the table prints. Timing itself is the benchmark's job, not a test's."""

from __future__ import annotations

import pytest

import selattn_c
from selattn_bench import thread_settings as ts

pytestmark = pytest.mark.skipif(not selattn_c.extension_built(),
                                reason="the settings run the C kernels")


def test_a_child_runs_with_the_threads_its_setting_names(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "7")               # the caller's: must not leak in
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "5")
    table = ts.settings(2)
    names = [s.name for s in table]
    assert len(set(names)) == len(names)
    by_name = dict(zip(names, range(len(table))))
    for name, kernels, blas in (("C, kernels 1, BLAS 1", 1, 1), ("C, kernels 2, BLAS 1", 2, 1),
                                ("C, kernels 1, BLAS 2", 1, 2)):
        i = by_name[name]
        out = ts.run_child(i, "tiny", 1, table[i])
        assert len(out["times"]) == 1 and out["times"][0] > 0
        assert out["threads"]["kernels"] == kernels
        assert all(b["threads"] == blas for b in out["threads"]["blas"])
    i = by_name["numpy reference, nothing set"]
    out = ts.run_child(i, "tiny", 1, table[i])
    assert out["threads"]["kernels"] is None
    assert all(b["threads"] not in (5, 7) for b in out["threads"]["blas"])


def test_the_environment_of_a_child():
    env = ts.child_env(ts.Setting("x", "c", env={"OMP_WAIT_POLICY": "passive"}))
    assert env["OMP_WAIT_POLICY"] == "passive"
    assert not set(ts.THREAD_VARIABLES) - {"OMP_WAIT_POLICY"} & set(env)


def test_the_table_prints(capsys):
    ts.main(["--shape", "tiny", "--rounds", "1", "--steps", "1"])
    out = capsys.readouterr().out
    assert "shape tiny" in out and "C, nothing set" in out and "speed-up vs numpy" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        ts.parse_args(["--rounds", "0"])
