"""Hostile checkpoint files (issue 27, items 2 and 3): each is refused with one CheckpointError
naming the file and the problem, before anything large is allocated or decompressed, and the
``selattn`` command prints it as one line with exit status 2. The files are built here."""

from __future__ import annotations

import io
import json
import tracemalloc
import zipfile

import numpy as np
import pytest

from selattn_lm import model as M
from selattn_lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from selattn_lm.cli import main

CFG = M.ModelConfig(vocab_size=11, context=16, n_layers=2, n_heads=2, d_model=8)


def npy_bytes(array: np.ndarray) -> bytes:
    """The .npy file of ``array`` (object arrays pickled, as np.save would)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def npy_header(shape, dtype=np.float32) -> bytes:
    """A .npy header (format 1.0) declaring ``shape`` and ``dtype``, without data."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(shape)})
    return buf.getvalue()


def entries(cfg=CFG, config=None, extra="{}"):
    """{member name: .npy bytes} of a good checkpoint of ``cfg``, to be spoiled."""
    out = {f"{name}.npy": npy_bytes(p) for name, p in M.init_params(cfg).items()}
    out["config.npy"] = npy_bytes(np.array(config or json.dumps(cfg.to_dict())))
    out["extra.npy"] = npy_bytes(np.array(extra))
    return out


def write_zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def refused(path, words) -> str:
    """load_checkpoint(path) raises CheckpointError matching ``words``, and the peak of memory
    allocated meanwhile stays under 16 MiB; return the message."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=words) as info:
            load_checkpoint(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak} bytes allocated before the refusal"
    assert str(path) in str(info.value)
    return str(info.value)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """The issue's case, scaled down: a 64 MiB wte of zeros deflated to about 64 KB, with a
    config that asks for exactly that shape (so every header agrees)."""
    big = M.ModelConfig(vocab_size=1 << 21, context=16, n_layers=1, n_heads=2, d_model=8)
    path = tmp_path / "bomb.npz"
    members = entries(M.ModelConfig(vocab_size=11, context=16, n_layers=1, n_heads=2,
                                    d_model=8), config=json.dumps(big.to_dict()))
    del members["wte.npy"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
        with z.open("wte.npy", "w", force_zip64=True) as f:
            f.write(npy_header((1 << 21, 8)))
            zeros = bytes(1 << 20)
            for _ in range(64):
                f.write(zeros)
    assert path.stat().st_size < 1 << 20
    refused(path, r"'wte' inflates .* more than 100:1 \(a zip bomb\?\)")


@pytest.mark.parametrize("shape, dtype", [((1 << 40,), np.float64), ((11, 8), np.float64),
                                          ((1 << 62, 1 << 62), np.float32)])
def test_a_header_that_declares_more_data_than_the_member_holds(tmp_path, shape, dtype):
    """A header declaring 2^40 float64 (or just other than its data) is refused from the sizes
    alone, before any allocation: no MemoryError."""
    members = entries()
    members["wte.npy"] = npy_header(shape, dtype) + bytes(11 * 8 * 4)
    write_zip(tmp_path / "m.npz", members)
    refused(tmp_path / "m.npz", r"'wte': its header declares .* \(inconsistent: refused\)")


def test_a_header_that_agrees_with_its_data_but_not_with_the_config(tmp_path):
    members = entries()
    members["wte.npy"] = npy_bytes(np.zeros((1000, 8), np.float32))
    write_zip(tmp_path / "m.npz", members)
    refused(tmp_path / "m.npz", r"tensor 'wte' has shape \(1000, 8\), the config needs \(11, 8\)")


@pytest.mark.parametrize("field, value, words", [
    ("n_layers", 10**8, "n_layers must be <= 1024"),
    ("d_model", 2**40, "d_model must be <= 65536"),
    ("vocab_size", 2**40, "vocab_size must be <= 16777216"),
    ("context", 2**40, "context must be <= 16777216"),
    ("n_layers", 1000, "the config's 1000 layers need 12004 tensors, the file has 30 entries"),
])
def test_huge_settings_are_refused_before_param_shapes(tmp_path, field, value, words):
    """The issue's ``"n_layers": 10**8`` made param_shapes build 1.2e9 entries (5.8 GB); the
    settings are bounded, and the layers must fit the archive's member count."""
    members = entries(config=json.dumps(dict(CFG.to_dict(), **{field: value})))
    write_zip(tmp_path / "m.npz", members)
    refused(tmp_path / "m.npz", words)


@pytest.mark.parametrize("config, words", [
    ("[" * 100_000 + "]" * 100_000, "'config' is not valid JSON: nested 100000 levels deep"),
    (json.dumps(CFG.to_dict())[:-1] + ', "x": ' + "9" * 5000 + "}",
     "'config' is not valid JSON: an integer of 5000 digits"),
    (json.dumps(dict(CFG.to_dict(), eps=float("nan"))), "'config' is not valid JSON: NaN"),
])
def test_hostile_config_json(tmp_path, config, words):
    write_zip(tmp_path / "m.npz", entries(config=config))
    refused(tmp_path / "m.npz", words)


def test_pickled_and_object_members_are_refused_unread(tmp_path):
    members = entries()
    members["extra.npy"] = npy_bytes(np.array([{"a": 1}], dtype=object))
    write_zip(tmp_path / "m.npz", members)
    refused(tmp_path / "m.npz", r"member 'extra' holds Python objects .* refused")


@pytest.mark.parametrize("content, words", [
    (b"a text file renamed to .npz\n" * 20, "not a .npz archive"),
    (b"", "not a .npz archive"),
])
def test_other_files_say_they_are_not_archives(tmp_path, content, words):
    (tmp_path / "m.npz").write_bytes(content)
    message = refused(tmp_path / "m.npz", words)
    assert "allow_pickle" not in message


def test_too_many_members_and_foreign_members(tmp_path):
    members = entries()
    members.update({f"junk{i}.npy": npy_bytes(np.zeros(1, np.float32)) for i in range(4100)})
    write_zip(tmp_path / "many.npz", members)
    refused(tmp_path / "many.npz", "4130 members, more than the 4096 accepted")
    members = entries()
    members["script.py"] = b"print('hello')"
    write_zip(tmp_path / "foreign.npz", members)
    refused(tmp_path / "foreign.npz", "member 'script.py' is not a .npy array")


def test_legitimate_variants_still_load(tmp_path):
    """Compressed archives (np.savez_compressed), Fortran-order tensors: loaded as before."""
    params = M.init_params(CFG, seed=2)
    save_checkpoint(tmp_path / "m.npz", params, CFG, {"k": 1})
    members = {}
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        for name in z.namelist():
            members[name] = z.read(name)
    members["h0.mlp.w1.npy"] = npy_bytes(np.asfortranarray(params["h0.mlp.w1"]))
    write_zip(tmp_path / "c.npz", members, zipfile.ZIP_DEFLATED)
    loaded, cfg, extra = load_checkpoint(tmp_path / "c.npz")
    assert cfg == CFG and extra == {"k": 1}
    for name, p in params.items():
        np.testing.assert_array_equal(loaded[name], p)
        assert loaded[name].flags.c_contiguous


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, capsys):
    members = entries()
    members["wte.npy"] = npy_header((1 << 40,), np.float64) + bytes(64)
    write_zip(tmp_path / "m.npz", members)
    (tmp_path / "text.npz").write_text("not an archive\n")
    for name, words in (("m.npz", "inconsistent"), ("text.npz", "not a .npz archive")):
        assert main(["eval", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("selattn eval: error:") and words in err
