"""The benchmarks' sgemm reference runs with OpenBLAS's own kernel choice: the override variables
are removed from the measuring process only, and the header line names what was done."""

import os

import pytest

from selattn_bench.sgemm_reference import OVERRIDES, SgemmReference, measure_sgemm


def test_overrides_are_unset_for_the_measurement_only(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setenv("OPENBLAS_L2_SIZE", "262144")
    ref = measure_sgemm(64, 1, 1)
    assert ref.seen == []                                   # the child did not see them
    assert ref.unset == list(OVERRIDES)
    assert os.environ["OPENBLAS_CORETYPE"] == "Haswell"     # this process keeps them
    assert ref.gflops > 0
    line = ref.describe()
    assert "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset for this measurement only" in line


def test_without_overrides_nothing_is_unset(monkeypatch):
    for key in OVERRIDES:
        monkeypatch.delenv(key, raising=False)
    ref = measure_sgemm(32, 1, 1)
    assert ref.unset == [] and ref.seen == []
    assert "no kernel override in the environment" in ref.describe()


def test_describe_names_the_kernel():
    ref = SgemmReference(gflops=1.0, blas=[{"internal_api": "openblas", "version": "0.3",
                                            "architecture": "SkylakeX", "num_threads": 2}],
                         unset=["OPENBLAS_CORETYPE"], seen=[])
    assert ref.describe() == ("openblas 0.3 kernel SkylakeX on 2 thread(s) "
                              "(OPENBLAS_CORETYPE unset for this measurement only)")


@pytest.mark.parametrize("bad", [dict(n=0), dict(repeats=0), dict(threads=0)])
def test_bad_arguments_raise_value_error(bad):
    kwargs = {**dict(n=8, repeats=1, threads=1), **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        measure_sgemm(**kwargs)
