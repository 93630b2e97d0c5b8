"""Checkpoints of the tiny LM: one ``.npz`` with every weight, the JSON config and JSON extras.

Layout: one array per parameter under its name (``"wte"``, ``"h0.attn.wqkv"``, ...), a 0-d string
``"config"`` (``ModelConfig.to_dict()`` as JSON) and a 0-d string ``"extra"`` (a JSON object, e.g.
tokenizer or task settings). Nothing is pickled: loading never runs code from the file.
Loading checks the file against its own config (every tensor present, none extra, right shape,
one floating dtype) and raises ``CheckpointError`` naming what is wrong.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .model import ModelConfig, check_params, param_shapes
from .output_files import write_files_atomically

CONFIG_KEY = "config"
EXTRA_KEY = "extra"
ALLOWED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not match its config."""


def checkpoint_arrays(params: Dict[str, np.ndarray], cfg: ModelConfig,
                      extra: Optional[dict] = None) -> Dict[str, np.ndarray]:
    """The arrays of the .npz that ``save_checkpoint`` writes (checked): every parameter under
    its name, the config and ``extra`` as 0-d JSON strings.

    Parameters
    ----------
    params : dict name -> array, matching ``cfg`` (checked)
    cfg : ModelConfig
    extra : JSON-serialisable dict or None
    """
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
    check_params(params, cfg)
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    try:
        extra_json = json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"extra must be JSON-serialisable: {exc}") from exc
    arrays = {name: np.ascontiguousarray(p) for name, p in params.items()}
    arrays[CONFIG_KEY] = np.array(json.dumps(cfg.to_dict()))
    arrays[EXTRA_KEY] = np.array(extra_json)
    return arrays


def save_checkpoint(path, params: Dict[str, np.ndarray], cfg: ModelConfig,
                    extra: Optional[dict] = None) -> None:
    """Write ``params``, ``cfg`` and ``extra`` to one ``.npz`` at ``path`` (exactly that name).

    The file is written next to ``path`` first and renamed over it, so an interrupted or failed
    save never leaves a truncated checkpoint under the final name, nor a temporary file.

    Parameters
    ----------
    path : str or Path
    params : dict name -> array, matching ``cfg`` (checked)
    cfg : ModelConfig
    extra : JSON-serialisable dict or None
    """
    arrays = checkpoint_arrays(params, cfg, extra)
    write_files_atomically([(Path(path), lambda f: np.savez(f, **arrays))])


def _read_all(path: Path) -> Dict[str, np.ndarray]:
    """Every array of the .npz (decompressed and CRC-checked now, not lazily)."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path} is a single array, not a checkpoint (.npz archive)")
        with loaded as z:
            return {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, KeyError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt "
                              f"file?): {exc}") from exc


def _read_json(arrays: Dict[str, np.ndarray], key: str, path: Path) -> object:
    entry = arrays.pop(key)
    if entry.shape != () or entry.dtype.kind != "U":
        raise CheckpointError(f"{path}: entry {key!r} must be a JSON string, got an array of "
                              f"dtype {entry.dtype} and shape {entry.shape}")
    try:
        return json.loads(str(entry))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: entry {key!r} is not valid JSON: {exc}") from exc


def load_checkpoint(path) -> Tuple[Dict[str, np.ndarray], ModelConfig, dict]:
    """Read a checkpoint written by ``save_checkpoint``.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    params : dict name -> array (float32 or float64, as saved)
    cfg : ModelConfig
    extra : dict ({} when the file has none)

    Raises
    ------
    CheckpointError
        missing, truncated or corrupt file; missing or invalid config; missing or extra tensors;
        a tensor of the wrong shape, or of a dtype other than float32/float64, or mixed dtypes.
    """
    path = Path(path)
    arrays = _read_all(path)
    if CONFIG_KEY not in arrays:
        raise CheckpointError(f"{path}: no {CONFIG_KEY!r} entry (not a selattn checkpoint?)")
    config = _read_json(arrays, CONFIG_KEY, path)
    try:
        cfg = ModelConfig.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid config: {exc}") from exc
    extra = _read_json(arrays, EXTRA_KEY, path) if EXTRA_KEY in arrays else {}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: entry {EXTRA_KEY!r} must be a JSON object, got "
                              f"{type(extra).__name__}")

    expected = param_shapes(cfg)
    missing = sorted(set(expected) - set(arrays))
    unexpected = sorted(set(arrays) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing}")
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors {unexpected} (not in the config)")
    dtypes = {}
    for name, shape in expected.items():
        a = arrays[name]
        if a.shape != shape:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {a.shape}, the config "
                                  f"needs {shape}")
        if a.dtype not in ALLOWED_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {a.dtype}, expected "
                                  "float32 or float64")
        dtypes.setdefault(a.dtype, name)
    if len(dtypes) > 1:
        raise CheckpointError(f"{path}: mixed dtypes {sorted(str(d) for d in dtypes)} (e.g. "
                              f"{list(dtypes.values())})")
    if not all(np.isfinite(a).all() for a in arrays.values()):
        bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
        raise CheckpointError(f"{path}: tensors {bad} contain NaN or infinity")
    return {name: arrays[name] for name in expected}, cfg, extra
