"""The state of a training run, saved every few steps so that the run can be resumed exactly.

One ``.npz`` (``RUN.npz``, written atomically by ``selattn_lm.output_files``) holds everything
the loop of ``selattn_lm.training`` needs to continue as if it had never stopped:

- ``param/<name>``: the weights, float32, as after ``step`` steps;
- ``adam.m/<name>``, ``adam.v/<name>``: AdamW's moments (its step count is in the JSON);
- ``state``: a 0-d JSON string: the run's settings (``TrainConfig.to_dict()``), the base model
  config, ``step`` (steps done), ``adam_t``, the bit-generator states of the training stream and
  of the pruning-aware draws, the losses since the last evaluation, the curve so far, the seconds
  spent, and the sessions the run has had (when each started, at which step, on how many
  threads).

Nothing is pickled. Reading checks every member's declared size against what the JSON's model
config implies before reading it, so a hostile file cannot make the reader allocate more than a
real run state of that config would.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .checkpoint import CheckpointError
from .model import ModelConfig, param_shapes
from .output_files import write_files_atomically

FORMAT = "selattn-run"
VERSION = 1
STATE_KEY = "state"
MAX_STATE_BYTES = 64 << 20           # the JSON: settings, curve and log of a run
NPY_HEADER_BYTES = 4096              # an .npy header is at most this long for these arrays


def state_arrays(params: Dict[str, np.ndarray], m: Dict[str, np.ndarray],
                 v: Dict[str, np.ndarray], state: Dict[str, object]) -> Dict[str, np.ndarray]:
    """The arrays of a run-state file."""
    arrays = {}
    for prefix, group in (("param/", params), ("adam.m/", m), ("adam.v/", v)):
        for name, a in group.items():
            arrays[prefix + name] = np.ascontiguousarray(a)
    arrays[STATE_KEY] = np.array(json.dumps(dict(state, format=FORMAT, version=VERSION),
                                            allow_nan=False))
    return arrays


def save_run_state(path, params: Dict[str, np.ndarray], m: Dict[str, np.ndarray],
                   v: Dict[str, np.ndarray], state: Dict[str, object]) -> None:
    """Write a run state atomically (an existing file is replaced only by a whole new one)."""
    arrays = state_arrays(params, m, v, state)
    write_files_atomically([(Path(path), lambda f: np.savez(f, **arrays))])


def _member_sizes(path: Path) -> Dict[str, int]:
    try:
        with zipfile.ZipFile(path) as z:
            return {info.filename[:-4] if info.filename.endswith(".npy") else info.filename:
                    info.file_size for info in z.infolist()}
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise CheckpointError(f"{path} is not a run state (.npz archive): {exc}") from None


def load_run_state(path) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray],
                                  Dict[str, np.ndarray], Dict[str, object]]:
    """Read a run state written by ``save_run_state``: (params, m, v, state).

    Raises
    ------
    CheckpointError (a ValueError) naming the file: not a run state, members missing, extra,
    of the wrong size, shape or dtype, or not finite.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no run state at {path}")
    sizes = _member_sizes(path)
    if STATE_KEY not in sizes:
        raise CheckpointError(f"{path} is not a run state of selattn train (no {STATE_KEY!r}; "
                              "a model checkpoint? --resume takes the RUN.npz that training "
                              "writes every --checkpoint-every steps)")
    if sizes[STATE_KEY] > MAX_STATE_BYTES:
        raise CheckpointError(f"{path}: its {STATE_KEY!r} entry declares {sizes[STATE_KEY]} "
                              f"bytes, more than {MAX_STATE_BYTES}")
    try:
        with np.load(path, allow_pickle=False) as z:
            entry = z[STATE_KEY]
            if entry.shape != () or entry.dtype.kind != "U":
                raise CheckpointError(f"{path}: {STATE_KEY!r} is not a JSON string")
            state = json.loads(str(entry))
            if not isinstance(state, dict) or state.get("format") != FORMAT:
                raise CheckpointError(f"{path} is not a run state of selattn train")
            if state.get("version") != VERSION:
                raise CheckpointError(f"{path}: run-state version {state.get('version')!r}, "
                                      f"this selattn reads version {VERSION}")
            try:
                shapes = param_shapes(ModelConfig.from_dict(state["model_config"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: bad model config: {exc}") from None
            expected = {prefix + name: shape for prefix in ("param/", "adam.m/", "adam.v/")
                        for name, shape in shapes.items()}
            names = set(sizes) - {STATE_KEY}
            if names != set(expected):
                missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
                raise CheckpointError(f"{path}: members do not match the model config "
                                      f"(missing {missing[:3]}, unexpected {extra[:3]})")
            arrays = {}
            for name, shape in expected.items():
                limit = 4 * int(np.prod(shape)) + NPY_HEADER_BYTES
                if sizes[name] > limit:
                    raise CheckpointError(f"{path}: member {name!r} declares {sizes[name]} "
                                          f"bytes, more than a float32 {shape} needs")
                a = z[name]
                if a.shape != shape or a.dtype != np.float32:
                    raise CheckpointError(f"{path}: member {name!r} is {a.dtype} {a.shape}, "
                                          f"expected float32 {shape}")
                if not np.isfinite(a).all():
                    raise CheckpointError(f"{path}: member {name!r} is not finite")
                arrays[name] = a
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, json.JSONDecodeError,
            RecursionError) as exc:
        raise CheckpointError(f"{path} is not a readable run state: "
                              f"{type(exc).__name__}: {exc}") from None
    except ValueError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable run state: {exc}") from None
    groups = [{name[len(prefix):]: a for name, a in arrays.items() if name.startswith(prefix)}
              for prefix in ("param/", "adam.m/", "adam.v/")]
    return groups[0], groups[1], groups[2], state
