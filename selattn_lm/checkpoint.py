"""Checkpoints of the tiny LM: one ``.npz`` with every weight, the JSON config and JSON extras.

Layout: one array per parameter under its name (``"wte"``, ``"h0.attn.wqkv"``, ...), a 0-d string
``"config"`` (``ModelConfig.to_dict()`` as JSON) and a 0-d string ``"extra"`` (a JSON object, e.g.
tokenizer or task settings). Nothing is pickled: loading never runs code from the file.
Loading checks the file against its own config (every tensor present, none extra, right shape,
one floating dtype) and raises ``CheckpointError`` naming what is wrong. Files may be hostile:
the config is read first, with limits, and every tensor's .npy header is checked against it
before any data is read (``npz_reader``: size limits, no zip bombs, no pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from .bounded_json import MAX_BYTES as MAX_JSON_BYTES
from .bounded_json import parse_json
from .model import ModelConfig, check_params, param_shapes
from .npz_reader import NpzArchive, NpzError
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


def _open(path: Path) -> NpzArchive:
    """The archive with every member's header read (no data yet): limits, no pickle."""
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    try:
        return NpzArchive(path)
    except NpzError as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint: {exc.reason}") from None


def _read(archive: NpzArchive, name: str) -> np.ndarray:
    try:
        return archive.read(name)
    except NpzError as exc:
        raise CheckpointError(f"{archive.path} is not a readable checkpoint: {exc.reason}") \
            from None


def _read_json(archive: NpzArchive, key: str, path: Path) -> object:
    """The JSON string member ``key``: its header checked (a 0-d string of at most
    ``bounded_json.MAX_BYTES`` characters) before it is read, then parsed with limits."""
    m = archive.members[key]
    if m.shape != () or m.dtype.kind != "U":
        raise CheckpointError(f"{path}: entry {key!r} must be a JSON string, got an array of "
                              f"dtype {m.dtype} and shape {m.shape}")
    if m.dtype.itemsize > 4 * MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: entry {key!r} is longer than {MAX_JSON_BYTES} "
                              "characters")
    try:
        return parse_json(str(_read(archive, key)), f"{path}: entry {key!r} is not valid JSON")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None


def _expected(archive: NpzArchive, cfg: ModelConfig, path: Path) -> Dict[str, Tuple[int, ...]]:
    """param_shapes(cfg), once the config is known to fit the archive: a config asking for more
    layers than the archive has members is refused before param_shapes builds their entries."""
    needed = 12 * cfg.n_layers + 4                    # param_shapes' count, without building it
    if needed > len(archive.members):
        raise CheckpointError(f"{path}: the config's {cfg.n_layers} layers need {needed} "
                              f"tensors, the file has {len(archive.members)} entries in all")
    return param_shapes(cfg)


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
    with _open(path) as archive:
        # The config first, read with limits; every tensor's header is checked against it
        # before any tensor's data is read.
        if CONFIG_KEY not in archive.members:
            raise CheckpointError(f"{path}: no {CONFIG_KEY!r} entry (not a selattn checkpoint?)")
        config = _read_json(archive, CONFIG_KEY, path)
        try:
            cfg = ModelConfig.from_dict(config)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: invalid config: {exc}") from exc
        extra = _read_json(archive, EXTRA_KEY, path) if EXTRA_KEY in archive.members else {}
        if not isinstance(extra, dict):
            raise CheckpointError(f"{path}: entry {EXTRA_KEY!r} must be a JSON object, got "
                                  f"{type(extra).__name__}")
        expected = _expected(archive, cfg, path)
        json_entries = {key: ((), "U") for key in (CONFIG_KEY, EXTRA_KEY)
                        if key in archive.members}
        try:
            archive.check({**{name: (shape, ALLOWED_DTYPES) for name, shape in
                              expected.items()}, **json_entries})
        except NpzError as exc:
            raise CheckpointError(str(exc)) from None
        dtypes = {}
        for name in expected:
            dtypes.setdefault(archive.members[name].dtype, name)
        if len(dtypes) > 1:
            raise CheckpointError(f"{path}: mixed dtypes {sorted(str(d) for d in dtypes)} (e.g. "
                                  f"{list(dtypes.values())})")
        arrays = {name: _read(archive, name) for name in expected}
    bad = [name for name, a in arrays.items() if not np.isfinite(a).all()]
    if bad:
        raise CheckpointError(f"{path}: tensors {bad} contain NaN or infinity")
    return arrays, cfg, extra
