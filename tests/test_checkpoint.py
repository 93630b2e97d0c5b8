"""Checkpoints (selattn_lm/checkpoint.py): exact round trip, and a clear CheckpointError for every
kind of bad file."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from selattn_lm import model as M
from selattn_lm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

CFG = M.ModelConfig(vocab_size=11, context=16, n_layers=2, n_heads=2, d_model=8, eps=0.25,
                    selective=True, selector_head=1, tau=2.0)


def write_npz(path, arrays):
    """Write raw arrays as an .npz (for hand-made bad checkpoints)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def valid_arrays(params=None, cfg=CFG, extra=None):
    """The entries a good checkpoint holds, as a dict, to be spoiled one at a time."""
    params = M.init_params(cfg, seed=3) if params is None else params
    return {**params, "config": np.array(json.dumps(cfg.to_dict())),
            "extra": np.array(json.dumps(extra or {}))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact(tmp_path, dtype):
    params = M.init_params(CFG, seed=7, dtype=dtype)
    extra = {"tokenizer": {"chars": "=;abc0123"}, "step": 120}
    path = tmp_path / "model.ckpt"                       # any name, kept as given
    save_checkpoint(path, params, CFG, extra)
    assert path.is_file() and not (tmp_path / "model.ckpt.npz").exists()
    loaded, cfg, loaded_extra = load_checkpoint(path)
    assert cfg == CFG and loaded_extra == extra
    assert list(loaded) == list(params)
    for name in params:
        assert loaded[name].dtype == params[name].dtype
        np.testing.assert_array_equal(loaded[name], params[name])


def test_the_loaded_model_computes_the_same_logits(tmp_path):
    params = M.init_params(CFG, seed=1)
    save_checkpoint(tmp_path / "m.npz", params, CFG)
    loaded, cfg, extra = load_checkpoint(tmp_path / "m.npz")
    tokens = np.arange(1, 9).reshape(1, 8)
    np.testing.assert_array_equal(M.forward(loaded, cfg, tokens)[0],
                                  M.forward(params, CFG, tokens)[0])
    assert extra == {}


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(tmp_path / "nothing.npz")


@pytest.mark.parametrize("keep", [0.0, 0.3, 0.9, 0.999])
def test_truncated_file(tmp_path, keep):
    path = tmp_path / "m.npz"
    save_checkpoint(path, M.init_params(CFG), CFG)
    data = path.read_bytes()
    path.write_bytes(data[:int(keep * len(data))])
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_corrupt_bytes_inside_a_tensor(tmp_path):
    """A flipped byte inside an array is caught by the zip's CRC, not silently loaded."""
    path = tmp_path / "m.npz"
    save_checkpoint(path, M.init_params(CFG), CFG)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("h0.mlp.w1.npy")
    # past the local header (30 bytes + name + extra field) and the .npy header (128 bytes)
    data[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)


def test_not_an_archive(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(CheckpointError, match="single array"):
        load_checkpoint(tmp_path / "one.npy")


def test_missing_tensor(tmp_path):
    arrays = valid_arrays()
    del arrays["h1.attn.wo"]
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=r"missing tensors \['h1.attn.wo'\]"):
        load_checkpoint(tmp_path / "m.npz")


def test_extra_tensor(tmp_path):
    """e.g. a checkpoint of a 3-layer model with a config that says 2 layers."""
    arrays = valid_arrays()
    arrays["h2.ln1.g"] = np.ones(CFG.d_model, dtype=np.float32)
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['h2.ln1.g'\]"):
        load_checkpoint(tmp_path / "m.npz")


def test_wrong_shape(tmp_path):
    arrays = valid_arrays()
    arrays["wpe"] = arrays["wpe"][:-1]                   # a shorter context than the config's
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=r"'wpe' has shape \(15, 8\).*\(16, 8\)"):
        load_checkpoint(tmp_path / "m.npz")


def test_wrong_and_mixed_dtypes(tmp_path):
    arrays = valid_arrays()
    arrays["lnf.g"] = arrays["lnf.g"].astype(np.int32)
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match="'lnf.g' has dtype int32"):
        load_checkpoint(tmp_path / "m.npz")
    arrays = valid_arrays()
    arrays["lnf.g"] = arrays["lnf.g"].astype(np.float64)
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match="mixed dtypes"):
        load_checkpoint(tmp_path / "m.npz")


def test_non_finite_weights(tmp_path):
    arrays = valid_arrays()
    arrays["wte"][2, 3] = np.nan
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=r"\['wte'\] contain NaN"):
        load_checkpoint(tmp_path / "m.npz")


@pytest.mark.parametrize("config, message", [
    (None, "no 'config' entry"),
    ("{not json", "'config' is not valid JSON"),
    (json.dumps([1, 2]), "invalid config: config must be a dict"),
    (json.dumps(dict(CFG.to_dict(), n_heads=3)), "invalid config: d_model"),
    (json.dumps(dict(CFG.to_dict(), dropout=0.1)), "invalid config: unknown.*dropout"),
    (json.dumps({"vocab_size": 11}), "invalid config: missing.*context"),
    (json.dumps(dict(CFG.to_dict(), vocab_size="11")), "invalid config: vocab_size"),
])
def test_bad_config(tmp_path, config, message):
    arrays = valid_arrays()
    if config is None:
        del arrays["config"]
    else:
        arrays["config"] = np.array(config)
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "m.npz")


def test_config_that_does_not_fit_the_weights(tmp_path):
    """A config with another vocabulary: every tensor is there but wte has the wrong shape."""
    arrays = valid_arrays()
    arrays["config"] = np.array(json.dumps(dict(CFG.to_dict(), vocab_size=12)))
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match=r"'wte' has shape \(11, 8\).*\(12, 8\)"):
        load_checkpoint(tmp_path / "m.npz")


def test_bad_extra(tmp_path):
    arrays = valid_arrays()
    arrays["extra"] = np.array(json.dumps([1, 2]))
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match="'extra' must be a JSON object"):
        load_checkpoint(tmp_path / "m.npz")
    arrays["extra"] = np.zeros(3)
    write_npz(tmp_path / "m.npz", arrays)
    with pytest.raises(CheckpointError, match="'extra' must be a JSON string"):
        load_checkpoint(tmp_path / "m.npz")


def test_save_refuses_params_that_do_not_fit_the_config(tmp_path):
    params = M.init_params(CFG)
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint(tmp_path / "m.npz", {n: p for n, p in params.items() if n != "wte"},
                        CFG)
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "m.npz", params, CFG, extra={"f": object()})
    assert not list(tmp_path.iterdir())                  # nothing written
