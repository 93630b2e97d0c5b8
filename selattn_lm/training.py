"""The training loop of the tiny LM (``selattn_lm.model``), one for every task.

The recipe, in one place (``TrainConfig``): AdamW, linear warmup then cosine decay of the learning
rate, gradient-norm clipping, the task's loss and the memory loss weighted by ``eps``, which can be
switched on after a warm-up (``eps_start``) and ramped in (``eps_ramp``); optionally the rank
penalty of pruning-aware training (``soft_budgets``). The *task* (``selattn_lm.task_assign``,
``selattn_lm.task_text``; by name in ``selattn_lm.task_registry``) supplies the batches, the
evaluation run every ``eval_every`` steps and its metric.

A run can be left alone: with ``run_path`` and ``checkpoint_every`` it writes its whole state
(``selattn_lm.run_state``: weights, AdamW's moments, the step, the random streams, the log so far)
atomically every ``checkpoint_every`` steps; ``resume`` continues it, bit for bit as if it had
never stopped; with ``handle_signals`` a SIGINT or SIGTERM ends the current step, writes the state
and raises ``TrainingStopped``.

``train(config)`` returns the parameters, the model config and a JSON-able log; ``save_run``
writes the checkpoint (the task's settings in its ``extra``) and the log, both or neither.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.validation import check_budgets

from . import model as lm
from .backends import make_attention
from .checkpoint import checkpoint_arrays
from .optim import AdamW, clip_grad_norm
from .output_files import write_files_atomically
from .progress import TrainingProgress
from .run_state import load_run_state, save_run_state
from .stop_signals import StopSignals, TrainingStopped
from .task_assign import AssignTask
from .task_registry import Task, load_task_checkpoint, task_from_settings
from .threads import thread_report


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the seed, it reproduces the run).

    Task: ``task``, an ``AssignTask`` or a ``TextTask`` (its own settings: data, held-out set).
    Model: ``n_layers``, ``n_heads``, ``d_model``, ``mlp_ratio``, ``context``, ``standard``
    (True: the baseline with plain causal attention), ``eps`` (memory-loss weight), ``tau``.
    ``n_layers``, ``d_model``, ``context``, ``steps`` and ``batch_size`` left None take the
    task's defaults (``task.DEFAULTS``; the assign task's context is its longest input).
    Optimisation: ``steps``, ``batch_size``, ``lr`` (peak), ``min_lr`` (end of the cosine),
    ``warmup_steps``, ``weight_decay``, ``grad_clip``, ``eps_start`` (step at which the memory
    loss switches on) and ``eps_ramp`` (steps over which its weight grows linearly to ``eps``).
    Evaluation: every ``eval_every`` steps, by the task. ``seed``: initialisation and data.
    Start: ``init_from`` (a checkpoint of ``selattn train`` on the same data whose weights start
    the run; the model settings must describe it, except ``standard``: a standard model can be
    fine-tuned into a selective one, the change being parameter-free) and ``insert_layer`` (with
    ``init_from``: first insert an identity block, a new layer whose output projections are zero,
    at this index, so the grown model computes exactly what the checkpoint did).
    Pruning-aware training: ``soft_budgets`` (one KV budget per layer, or None) makes a share
    ``soft_share`` of the steps (drawn at random) run with the rank penalty of those budgets
    (``selattn_reference.attention.rank_penalty``, slope ``soft_strength``): keys a pruned
    cache would rank out are masked harder, so the loss sees, softly, what eviction would do.
    """

    task: Task = field(default_factory=AssignTask)
    # model
    n_layers: Optional[int] = None
    n_heads: int = 4
    d_model: Optional[int] = None
    mlp_ratio: int = 4
    standard: bool = False
    eps: float = 0.1
    tau: float = 1.0
    context: Optional[int] = None
    # optimisation
    steps: Optional[int] = None
    batch_size: Optional[int] = None
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps_start: int = 0
    eps_ramp: int = 0
    # evaluation
    eval_every: int = 100
    seed: int = 0
    # start
    init_from: Optional[str] = None
    insert_layer: Optional[int] = None
    # pruning-aware training
    soft_budgets: Optional[List[int]] = None
    soft_strength: float = DEFAULT_SOFT_STRENGTH
    soft_share: float = 1.0

    def __post_init__(self) -> None:
        if not hasattr(self.task, "NAME") or not hasattr(self.task, "batch"):
            raise TypeError(f"task must be a training task (AssignTask, TextTask), got "
                            f"{type(self.task).__name__}")
        defaults = dict(self.task.DEFAULTS, context=self.task.default_context())
        for name, value in defaults.items():          # frozen: fill in the task's defaults
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        positive = ("n_layers", "n_heads", "d_model", "mlp_ratio", "steps", "batch_size",
                    "eval_every", "context")
        non_negative = ("warmup_steps", "eps_start", "eps_ramp", "seed")
        if self.insert_layer is not None:
            non_negative += ("insert_layer",)
        for name in positive + non_negative:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < (1 if name in positive else 0):
                raise ValueError(f"{name} must be >= {1 if name in positive else 0}, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "tau", "soft_strength",
                     "soft_share"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0 or self.tau <= 0 or self.grad_clip <= 0:
            raise ValueError("lr, tau and grad_clip must be > 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.soft_share > 1:
            raise ValueError(f"soft_share must be in [0, 1], got {self.soft_share}")
        if self.soft_budgets is not None:
            if self.standard:
                raise ValueError("soft_budgets need a selective model: a standard model's F is "
                                 "zero, so the rank penalty has nothing to act on")
            object.__setattr__(self, "soft_budgets",            # frozen: a validated list
                               check_budgets(self.soft_budgets, self.n_layers, "soft_budgets"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")
        if self.insert_layer is not None:
            if self.init_from is None:
                raise ValueError("insert_layer needs init_from: a layer is inserted into a "
                                 "trained checkpoint")
            if not 0 <= self.insert_layer < self.n_layers:
                raise ValueError(f"insert_layer must be in [0, n_layers - 1 = "
                                 f"{self.n_layers - 1}] (n_layers counts the inserted layer), "
                                 f"got {self.insert_layer}")
        self.task.check_context(self.context)

    def model_config(self) -> "lm.ModelConfig":
        """The model these settings describe."""
        return lm.ModelConfig(vocab_size=self.task.vocab_size, context=self.context,
                              n_layers=self.n_layers, n_heads=self.n_heads,
                              d_model=self.d_model, mlp_ratio=self.mlp_ratio,
                              selective=not self.standard,
                              eps=self.eps if not self.standard else 0.0, tau=self.tau)

    def warnings(self) -> List[str]:
        """What in these settings is probably not what was meant (one line each)."""
        out = []
        if self.steps <= self.warmup_steps:
            out.append(f"the schedule cannot complete its warm-up: steps ({self.steps}) <= "
                       f"warmup_steps ({self.warmup_steps}), so the learning rate never reaches "
                       f"lr ({self.lr:g}) and the cosine decay never starts")
        if not self.standard and self.eps_start >= self.steps and self.eps > 0:
            out.append(f"the memory loss never switches on: eps_start ({self.eps_start}) >= "
                       f"steps ({self.steps})")
        return out

    def to_dict(self) -> Dict[str, object]:
        """Plain dict (JSON-able); the task as its settings."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["task"] = self.task.settings()
        if d["soft_budgets"] is not None:
            d["soft_budgets"] = list(d["soft_budgets"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys are an error."""
        if not isinstance(d, dict):
            raise ValueError(f"training settings must be a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        d = dict(d)
        if "task" in d:
            d["task"] = task_from_settings(d["task"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Schedules and the update


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then cosine down to ``min_lr``
    at the last step. ``step`` counts from 0."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def memory_loss_weight(step: int, cfg: TrainConfig) -> float:
    """Weight of the memory loss at ``step``: 0 before ``eps_start``, then a linear ramp over
    ``eps_ramp`` steps up to ``eps``. Letting the model first learn the task and only then asking
    it to forget keeps the memory loss from masking tokens before it knows which are needed."""
    if cfg.standard or step < cfg.eps_start:
        return 0.0
    if cfg.eps_ramp == 0:
        return cfg.eps
    return cfg.eps * min(1.0, (step - cfg.eps_start + 1) / cfg.eps_ramp)


def apply_gradients(params, cache, losses: Dict[str, float], optimizer: AdamW, lr: float,
                    grad_clip: float, step: int) -> None:
    """The update of one training step, after ``model.forward``: backward, clip the gradient's
    global norm to ``grad_clip``, one AdamW step at ``lr`` (``params`` in place); raises
    FloatingPointError when a loss of the step is not finite (a diverged run stops there)."""
    grads = lm.backward(cache)
    clip_grad_norm(grads, grad_clip)
    optimizer.step(params, grads, lr=lr)
    if not all(math.isfinite(losses[k]) for k in ("ce", "mem", "total")):
        raise FloatingPointError(f"loss is not finite at step {step}: {losses}")


# ----------------------------------------------------------------------------------------------
# The state of a run


@dataclass
class RunProgress:
    """What the loop carries from step to step besides weights and optimizer: the step, the
    random streams, the losses since the last evaluation, the curve, the seconds, the sessions."""

    step: int
    rng: np.random.Generator            # the training stream (batches)
    soft_rng: np.random.Generator       # which steps get the rank penalty
    window: List[List[float]]           # (total, ce, mem) of each step since the evaluation
    curve: List[Dict[str, float]]
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    sessions: List[Dict[str, object]] = field(default_factory=list)

    @classmethod
    def fresh(cls, seed: int) -> "RunProgress":
        return cls(step=0, rng=np.random.default_rng([seed, 1]),
                   soft_rng=np.random.default_rng([seed, 2]), window=[], curve=[])

    def to_state(self) -> Dict[str, object]:
        return {"step": self.step, "rng": self.rng.bit_generator.state,
                "soft_rng": self.soft_rng.bit_generator.state, "window": self.window,
                "curve": self.curve, "train_seconds": self.train_seconds,
                "eval_seconds": self.eval_seconds, "sessions": self.sessions}

    @classmethod
    def from_state(cls, state: Dict[str, object]) -> "RunProgress":
        rng, soft_rng = np.random.default_rng(), np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        soft_rng.bit_generator.state = state["soft_rng"]
        return cls(step=int(state["step"]), rng=rng, soft_rng=soft_rng,
                   window=[list(map(float, w)) for w in state["window"]],
                   curve=list(state["curve"]), train_seconds=float(state["train_seconds"]),
                   eval_seconds=float(state["eval_seconds"]),
                   sessions=list(state["sessions"]))


def _save_state(path: Path, cfg: TrainConfig, model_cfg: "lm.ModelConfig", params,
                optimizer: AdamW, run: RunProgress, outputs: Optional[Dict[str, object]]
                ) -> None:
    state = dict(run.to_state(), train_config=cfg.to_dict(), model_config=model_cfg.to_dict(),
                 adam_t=optimizer.t, outputs=outputs)
    save_run_state(path, params, optimizer.m, optimizer.v, state)


def load_resume(path) -> Tuple[TrainConfig, Dict[str, object]]:
    """The settings of a saved run and its state (``train(cfg, resume=state)`` continues it).
    Raises CheckpointError (a ValueError) naming the file."""
    from .checkpoint import CheckpointError
    params, m, v, state = load_run_state(path)
    try:
        cfg = TrainConfig.from_dict(state["train_config"])
        RunProgress.from_state(state)                        # the streams and log are usable
        if int(state["adam_t"]) != int(state["step"]) or not 0 < int(state["step"]):
            raise ValueError(f"adam_t {state['adam_t']} and step {state['step']} disagree")
        if cfg.model_config() != lm.ModelConfig.from_dict(state["model_config"]):
            raise ValueError("the model config is not the one the settings describe")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad run state: {e}") from None
    return cfg, {"params": params, "m": m, "v": v, "state": state}


# ----------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, *, backend: str = "auto", quiet: bool = False,
          run_path: Optional[Path] = None, checkpoint_every: int = 0,
          resume: Optional[Dict[str, object]] = None, handle_signals: bool = False,
          command: Optional[str] = None, outputs: Optional[Dict[str, object]] = None,
          stream=None) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", Dict]:
    """Train a model (from scratch, from ``cfg.init_from``, or continuing ``resume``).

    Parameters
    ----------
    cfg : TrainConfig
    backend : 'auto', 'c' or 'numpy' (``selattn_lm.backends.make_attention``)
    quiet : no progress output
    run_path : where the run state goes (every ``checkpoint_every`` steps, on a signal, and at
        the end, so that a failed write of the outputs loses nothing)
    checkpoint_every : write the run state every this many steps (0: never on a schedule)
    resume : the second value of ``load_resume`` (continue that run; ``cfg`` must be its)
    handle_signals : SIGINT/SIGTERM end the step, write the state, raise ``TrainingStopped``
    command : the command line, for the log
    outputs : JSON-able, kept in the run state (the command's output paths, for ``--resume``)
    stream : where progress goes (default stderr)

    Returns
    -------
    params : dict of float32 arrays, the trained weights
    model_cfg : ModelConfig (with ``eps`` the final memory-loss weight)
    log : dict (JSON-able): settings, seed, backend, threads, the curve of (step, seconds, loss,
        ce, mem, lr, eps, the task's metric) at every evaluation, the final metric, the sessions
        (command, start, steps, threads, wall seconds), times, warnings
    """
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) \
            or checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be an int >= 0, got {checkpoint_every!r}")
    task = cfg.task
    model_cfg = cfg.model_config()
    attention, backend_name = make_attention(backend)
    if resume is not None:
        params = {n: np.array(a, dtype=np.float32) for n, a in resume["params"].items()}
        optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        optimizer.load_state_dict({"t": resume["state"]["adam_t"], "m": resume["m"],
                                   "v": resume["v"]})
        run = RunProgress.from_state(resume["state"])
    else:
        if cfg.init_from is not None:
            params = start_from_checkpoint(cfg, model_cfg)
        else:
            params = lm.init_params(model_cfg, seed=cfg.seed, dtype=np.float32)
        optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        run = RunProgress.fresh(cfg.seed)
    threads = thread_report(backend_name)
    session = {"command": command, "started": datetime.now(timezone.utc).isoformat(
        timespec="seconds"), "start_step": run.step, "backend": backend_name,
        "threads": threads}
    run.sessions.append(session)
    progress = TrainingProgress(cfg.steps, run.step, task.METRIC, task.format_metric,
                                quiet=quiet, stream=stream)
    for line in cfg.warnings():
        progress.write(f"warning: {line}")

    wall_start = time.perf_counter()
    signals = StopSignals() if handle_signals else None

    def checkpoint() -> None:
        session["end_step"] = run.step
        session["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
        _save_state(run_path, cfg, model_cfg, params, optimizer, run, outputs)

    try:
        if signals is not None:
            signals.__enter__()
        while run.step < cfg.steps:
            step = run.step
            t0 = time.perf_counter()
            lr = learning_rate(step, cfg)
            eps = memory_loss_weight(step, cfg)
            tokens, targets, mask = task.batch(run.rng, cfg.batch_size, model_cfg.context)
            soft = cfg.soft_budgets is not None and run.soft_rng.random() < cfg.soft_share
            _, losses, cache = lm.forward(params, replace(model_cfg, eps=eps), tokens, targets,
                                          mask, attention=attention,
                                          soft_budgets=cfg.soft_budgets if soft else None,
                                          soft_strength=cfg.soft_strength)
            apply_gradients(params, cache, losses, optimizer, lr, cfg.grad_clip, step)
            run.train_seconds += time.perf_counter() - t0
            run.window.append([float(losses[k]) for k in ("total", "ce", "mem")])
            run.step = step + 1
            mean_loss = float(np.mean([w[0] for w in run.window]))

            if run.step % cfg.eval_every == 0 or run.step == cfg.steps:
                t1 = time.perf_counter()
                value = task.evaluate(params, model_cfg, attention=attention)
                run.eval_seconds += time.perf_counter() - t1
                total, ce, mem = (float(np.mean(col)) for col in zip(*run.window))
                run.window = []
                run.curve.append({"step": run.step, "seconds": round(run.train_seconds, 3),
                                  "loss": total, "ce": ce, "mem": mem, "lr": lr, "eps": eps,
                                  task.METRIC: value})
                progress.step(mean_loss)
                progress.evaluation(run.step, total, value, run.train_seconds)
            else:
                progress.step(mean_loss)
            if run_path is not None and checkpoint_every and run.step % checkpoint_every == 0:
                checkpoint()
            if signals is not None and signals.signum is not None and run.step < cfg.steps:
                if run_path is not None:
                    checkpoint()
                raise TrainingStopped(signals.signum, run.step, run_path)
    finally:
        if signals is not None:
            signals.__exit__(None, None, None)
        progress.close()

    if run_path is not None:             # the finished state: outputs can be written again
        checkpoint()
    session["end_step"] = run.step
    session["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    final_cfg = replace(model_cfg, eps=memory_loss_weight(cfg.steps - 1, cfg))
    final = run.curve[-1][task.METRIC]
    log = {
        "task": task.settings(),
        "train_config": cfg.to_dict(),
        "model_config": final_cfg.to_dict(),
        "seed": cfg.seed,
        "backend": backend_name,
        "threads": threads,
        "num_params": lm.num_params(params),
        "metric": task.METRIC,
        f"final_{task.METRIC}": final,
        "train_seconds": round(run.train_seconds, 3),
        "eval_seconds": round(run.eval_seconds, 3),
        "wall_seconds": round(sum(s.get("wall_seconds", 0.0) for s in run.sessions), 3),
        "sessions": run.sessions,
        "warnings": cfg.warnings(),
        "curve": run.curve,
    }
    return params, final_cfg, log


# ----------------------------------------------------------------------------------------------
# Starting from a checkpoint


def insert_identity_block(params: Dict[str, np.ndarray], model_cfg: "lm.ModelConfig",
                          at: int, seed: int = 0
                          ) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig"]:
    """A model one layer deeper that computes exactly what ``params`` computes: a new block is
    inserted before layer ``at`` (0 <= at <= n_layers; the layers from ``at`` on move up by one).
    Its LayerNorms and QKV and MLP input weights are initialised as ``init_params`` would (from
    ``seed``), its output projections (attn.wo, attn.bo, mlp.w2, mlp.b2) are zero, so it adds
    exactly 0 to the residual stream until training moves them.

    Returns
    -------
    params : dict, the grown model's weights (new arrays)
    model_cfg : ModelConfig with n_layers + 1
    """
    if isinstance(at, bool) or not isinstance(at, (int, np.integer)):
        raise TypeError(f"at must be an int, got {type(at).__name__}")
    if not 0 <= at <= model_cfg.n_layers:
        raise ValueError(f"at must be in [0, n_layers = {model_cfg.n_layers}], got {at}")
    grown_cfg = replace(model_cfg, n_layers=model_cfg.n_layers + 1)
    dtype = lm.check_params(params, model_cfg)
    fresh = lm.init_params(grown_cfg, seed=seed, dtype=dtype)
    grown = {}
    for name in lm.param_shapes(grown_cfg):
        if not name.startswith("h"):
            grown[name] = params[name].copy()
            continue
        layer, rest = name[1:].split(".", 1)
        layer = int(layer)
        if layer == at:
            zero = rest in ("attn.wo", "attn.bo", "mlp.w2", "mlp.b2")
            grown[name] = np.zeros_like(fresh[name]) if zero else fresh[name]
        else:
            grown[name] = params[f"h{layer if layer < at else layer - 1}.{rest}"].copy()
    return grown, grown_cfg


def start_from_checkpoint(cfg: TrainConfig, model_cfg: "lm.ModelConfig"
                          ) -> Dict[str, np.ndarray]:
    """The weights ``cfg.init_from`` holds (grown by ``cfg.insert_layer`` when set), checked
    against the run's task and model settings (``model_cfg``, from ``cfg``). Raises ValueError
    when they do not describe the checkpoint. Selective or standard may differ (the change is
    parameter-free: a standard model can be fine-tuned into a selective one)."""
    params, ck_cfg, ck_task, _ = load_task_checkpoint(Path(cfg.init_from),
                                                       expect=cfg.task.NAME)
    if not cfg.task.same_data(ck_task):
        raise ValueError(f"init_from {cfg.init_from}: the checkpoint was trained on "
                         f"{ck_task.describe()}, this run's task is {cfg.task.describe()}")
    if cfg.insert_layer is not None:
        params, ck_cfg = insert_identity_block(params, ck_cfg, cfg.insert_layer, seed=cfg.seed)
    mine = replace(model_cfg, eps=0.0, selective=True)
    theirs = replace(ck_cfg, eps=0.0, selective=True)
    if mine != theirs:
        diff = ", ".join(f"{f.name}: checkpoint {getattr(theirs, f.name)}, settings "
                         f"{getattr(mine, f.name)}" for f in fields(mine)
                         if getattr(mine, f.name) != getattr(theirs, f.name))
        raise ValueError(f"init_from {cfg.init_from}"
                         f"{' with insert_layer' if cfg.insert_layer is not None else ''}: the "
                         f"model settings do not describe the checkpoint ({diff})")
    return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}


# ----------------------------------------------------------------------------------------------
# Files


def checkpoint_extra(log: Dict) -> Dict[str, object]:
    """What a checkpoint carries besides the weights: the task's settings (data, tokenizer and
    evaluation are rebuilt from them), the training settings and the final metric."""
    return {"task": log["task"], "train_config": log["train_config"], "metric": log["metric"],
            log["metric"]: log[f"final_{log['metric']}"]}


def save_run(params: Dict[str, np.ndarray], model_cfg: "lm.ModelConfig", log: Dict,
             checkpoint: Path, log_path: Optional[Path] = None) -> Path:
    """Write the checkpoint and the JSON log (default: the checkpoint's path with ``.json``),
    both or neither: neither file is replaced before both are written in full. Returns the log's
    path."""
    checkpoint = Path(checkpoint)
    log_path = checkpoint.with_suffix(".json") if log_path is None else Path(log_path)
    arrays = checkpoint_arrays(params, model_cfg, extra=checkpoint_extra(log))
    text = json.dumps(dict(log, checkpoint=checkpoint.name), indent=1) + "\n"
    write_files_atomically([(checkpoint, lambda f: np.savez(f, **arrays)),
                            (log_path, lambda f: f.write(text.encode("utf-8")))])
    return log_path


def evaluate_checkpoint(path: Path, *, backend: str = "auto", n: Optional[int] = None,
                        budgets=None, expect: Optional[str] = None) -> Dict[str, object]:
    """A saved model's score on its task's evaluation (held-out accuracy, validation bits per
    byte).

    Parameters
    ----------
    path : checkpoint written by ``selattn train``
    backend : 'auto', 'c' or 'numpy'
    n : int or None, score only the first ``n`` held-out examples / validation windows
    budgets : optional per-layer KV budgets (pruned attention)
    expect : a task name the checkpoint must be of, or None

    Returns
    -------
    dict with ``task``, ``metric``, the metric's value under its name, ``formatted`` (its
    text), ``n`` (examples or windows scored), ``backend`` and ``selective``
    """
    params, model_cfg, task, _ = load_task_checkpoint(path, expect=expect)
    attention, backend_name = make_attention(backend)
    if budgets is not None:
        budgets = check_budgets(budgets, model_cfg.n_layers)
    value = task.evaluate(params, model_cfg, attention=attention, budgets=budgets, n=n)
    return {"task": task.NAME, "metric": task.METRIC, task.METRIC: value,
            "formatted": task.format_metric(value),
            "n": task.evaluation_size(model_cfg.context, n), "backend": backend_name,
            "selective": model_cfg.selective}
