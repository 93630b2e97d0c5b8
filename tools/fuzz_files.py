"""Fuzz the readers of untrusted files: checkpoints (``load_checkpoint``) and budgets files
(``read_budgets``). Not part of the test suite (minutes, not seconds); docs/reliability.md gives
the command and the last result.

    python tools/fuzz_files.py [--examples 3000] [--seed 0]

Hypothesis draws files from a valid tiny checkpoint: byte flips, insertions and truncations of
the whole archive; members replaced by .npy headers of drawn shapes (up to 2^62 per axis) and
dtypes (objects, strings, structured, big-endian, ...) with drawn data lengths; the config
replaced by drawn JSON (nested, huge numbers, wrong types) or drawn text; members added or
dropped; stored or deflated. Budgets files are drawn JSON and text likewise. The property: the
reader returns, or raises its one documented error (``CheckpointError``, ``ValueError``) with a
message naming the file; never another exception, and never more than 64 MiB allocated
(tracemalloc peak).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import tracemalloc
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selattn_lm import model as M
from selattn_lm.calibrate import read_budgets
from selattn_lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

PEAK_LIMIT = 64 << 20
CFG = M.ModelConfig(vocab_size=11, context=8, n_layers=1, n_heads=2, d_model=4)
OUTCOMES: Counter = Counter()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**40), 10**40) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=5),
    max_leaves=30)
config_dicts = st.fixed_dictionaries(
    {}, optional={k: st.integers(-5, 10**12) | json_values
                  for k in ("vocab_size", "context", "n_layers", "n_heads", "d_model",
                            "mlp_ratio", "selector_head")}
    | {"selective": st.booleans() | json_values, "eps": st.floats() | json_values})


def json_texts():
    """Drawn JSON documents and near-JSON text: deep nesting, long digit strings, junk."""
    return st.one_of(
        json_values.map(json.dumps),
        config_dicts.map(lambda d: json.dumps(dict(CFG.to_dict(), **d))),
        st.integers(1, 100_000).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 6000).map(lambda n: '{"budgets": [' + "9" * n + "]}"),
        st.text(max_size=200),
        st.sampled_from(["NaN", '{"budgets": [Infinity]}', '{"budgets": [1e999]}', "",
                         '{"budgets": [4, 4]}']))


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def header(shape, descr, fortran=False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran,
                                               "shape": tuple(shape)})
    return buf.getvalue()


DESCRS = ["<f4", "<f8", ">f4", "|O", "<U10", "|V8", "<i4", "|b1", [("a", "<f4"), ("b", "|O")],
          [("a", "<f4")], "<c8"]


BASE = {**{f"{n}.npy": npy(p) for n, p in M.init_params(CFG).items()},
        "config.npy": npy(np.array(json.dumps(CFG.to_dict()))), "extra.npy": npy(np.array("{}"))}


@st.composite
def members(draw):
    """{member name: bytes} of a spoiled checkpoint, and the compression."""
    out = dict(BASE)
    names = sorted(out)
    for _ in range(draw(st.integers(1, 4))):
        what = draw(st.sampled_from(["header", "config", "extra", "drop", "add", "object"]))
        name = draw(st.sampled_from(names))
        if what == "header":
            shape = draw(st.lists(st.integers(0, 2**62) | st.integers(0, 64), max_size=3))
            descr = draw(st.sampled_from(DESCRS))
            out[name] = header(shape, descr, draw(st.booleans())) + bytes(
                draw(st.integers(0, 4096)))
        elif what in ("config", "extra"):
            out[f"{what}.npy"] = npy(np.array(draw(json_texts())))
        elif what == "drop":
            out.pop(name, None)
        elif what == "add":
            out[draw(st.text(min_size=1, max_size=10)) + draw(st.sampled_from([".npy", ""]))] = (
                draw(st.binary(max_size=300)))
        else:
            out[name] = npy(np.array([{"x": 1}], dtype=object))
    return out, draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))


def zipped(files, compression) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@st.composite
def checkpoint_bytes(draw):
    files, compression = draw(members())
    data = bytearray(zipped(files, compression))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        else:
            del data[at:]
    return bytes(data)


def bounded(call, path: Path, errors) -> None:
    """Run call(); it must return or raise one of ``errors`` naming ``path``, within the memory
    limit."""
    tracemalloc.start()
    try:
        try:
            call()
            OUTCOMES["returned"] += 1
        except errors as exc:
            assert str(path) in str(exc), f"message without the file's name: {exc}"
            OUTCOMES[type(exc).__name__] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak <= PEAK_LIMIT, f"{peak} bytes allocated"


def run(examples: int, seed: int) -> int:
    tmp = Path(tempfile.mkdtemp())
    valid = tmp / "valid.npz"
    save_checkpoint(valid, M.init_params(CFG), CFG)
    profile = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                       suppress_health_check=list(HealthCheck))

    @profile
    @given(data=checkpoint_bytes())
    def fuzz_checkpoint(data):
        path = tmp / "c.npz"
        path.write_bytes(data)
        bounded(lambda: load_checkpoint(path), path, CheckpointError)

    @profile
    @given(text=json_texts())
    def fuzz_budgets(text):
        path = tmp / "b.json"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        bounded(lambda: read_budgets(path, 2), path, ValueError)

    np.random.seed(seed)
    for name, target in (("checkpoints", fuzz_checkpoint), ("budgets files", fuzz_budgets)):
        OUTCOMES.clear()
        start = time.perf_counter()
        target()
        print(f"{name}: {sum(OUTCOMES.values())} cases in {time.perf_counter() - start:.0f} s, "
              f"{dict(OUTCOMES)}; no other exception, no allocation peak above "
              f"{PEAK_LIMIT >> 20} MiB")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=3000, help="cases per target")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return run(args.examples, args.seed)


if __name__ == "__main__":
    sys.exit(main())
