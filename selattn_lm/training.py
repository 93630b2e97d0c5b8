"""Train the tiny language model (``selattn_lm.model``) on the variable-assignment task.

The recipe, in one place (``TrainConfig``): AdamW, linear warmup then cosine decay of the learning
rate, gradient-norm clipping, cross-entropy on the answer characters only (every value is random,
so predicting anything else teaches nothing), and the memory loss weighted by ``eps``, which can be
switched on after a warm-up (``eps_start``) and ramped in (``eps_ramp``). Every ``eval_every`` steps
the model is scored on a held-out set with exact match: the argmax at every answer position
(teacher-forced) must equal the answer, i.e. what greedy decoding would produce.

``train(config)`` returns the parameters, the model config and a JSON-able log; ``save_run``
writes the checkpoint (task settings in its ``extra`` so that ``evaluate_checkpoint`` and the
inference tools can rebuild the tokenizer and the held-out set) and the log.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from selattn_reference.attention import DEFAULT_SOFT_STRENGTH
from selattn_reference.validation import check_budgets

from . import model as lm
from .backends import make_attention
from .checkpoint import load_checkpoint, save_checkpoint
from .optim import AdamW, clip_grad_norm
from .tasks import (
    CharTokenizer,
    Example,
    TaskConfig,
    encode_batch,
    generate_examples,
    make_split,
    prompts,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (with the seed, it reproduces the run).

    Task: ``n_vars``, ``n_assignments``, ``max_value``, ``min_assignments``, ``fixed_width``
    (see TaskConfig);
    ``train_min_assignments``, if set, gives each *training batch* a uniform number of
    assignments in ``[train_min_assignments, n_assignments]`` (one number per batch, so a batch of
    short sequences is also cheap; short sequences show the structure sooner); the held-out set
    always follows the task itself.
    Model: ``n_layers``, ``n_heads``, ``d_model``, ``mlp_ratio``, ``standard`` (True: the
    baseline with plain causal attention), ``eps`` (memory-loss weight), ``tau``, ``context``
    (None: the task's longest input).
    Optimisation: ``steps``, ``batch_size``, ``lr`` (peak), ``min_lr`` (end of the cosine),
    ``warmup_steps``, ``weight_decay``, ``grad_clip``, ``eps_start`` (step at which the memory
    loss switches on) and ``eps_ramp`` (steps over which its weight grows linearly to ``eps``).
    Evaluation: ``eval_every`` (steps), ``heldout_size``, ``heldout_seed``.
    Start: ``init_from`` (a checkpoint of ``selattn train`` on the same task whose weights start
    the run instead of a fresh initialisation; the model settings must describe it) and
    ``insert_layer`` (with ``init_from``: first insert an identity block, a new layer whose
    output projections are zero, at this index, so the grown model computes exactly what the
    checkpoint did and the new layer learns from there).
    Pruning-aware training: ``soft_budgets`` (one KV budget per layer, or None) makes a share
    ``soft_share`` of the steps (drawn at random) run with the rank penalty of those budgets
    (``selattn_reference.attention.rank_penalty``, slope ``soft_strength``): keys a pruned
    cache would rank out are masked harder, so the loss sees, softly, what eviction would do.
    Those steps run on the chosen backend (the C kernels have the penalty too).
    """

    # task
    n_vars: int = 3
    n_assignments: int = 20
    max_value: int = 99
    min_assignments: Optional[int] = None
    fixed_width: bool = False
    train_min_assignments: Optional[int] = None
    # model
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 64
    mlp_ratio: int = 4
    standard: bool = False
    eps: float = 0.1
    tau: float = 1.0
    context: Optional[int] = None
    # optimisation
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps_start: int = 0
    eps_ramp: int = 0
    # evaluation
    eval_every: int = 100
    heldout_size: int = 1000
    heldout_seed: int = 12345
    seed: int = 0
    # start
    init_from: Optional[str] = None
    insert_layer: Optional[int] = None
    # pruning-aware training
    soft_budgets: Optional[List[int]] = None
    soft_strength: float = DEFAULT_SOFT_STRENGTH
    soft_share: float = 1.0

    def __post_init__(self) -> None:
        positive = ("n_layers", "n_heads", "d_model", "mlp_ratio", "steps", "batch_size",
                    "eval_every", "heldout_size")
        non_negative = ("warmup_steps", "eps_start", "eps_ramp", "seed", "heldout_seed")
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
        task = self.task()   # validates the task fields
        self.train_task()
        if self.context is not None and self.context < task.max_tokens:
            raise ValueError(f"context ({self.context}) is shorter than the task's longest input "
                             f"({task.max_tokens} tokens)")

    def task(self) -> TaskConfig:
        """The task these settings describe."""
        return TaskConfig(n_vars=self.n_vars, n_assignments=self.n_assignments,
                          max_value=self.max_value, min_assignments=self.min_assignments,
                          fixed_width=self.fixed_width)

    def train_task(self, rng: Optional[np.random.Generator] = None) -> TaskConfig:
        """The task of one training batch: the task itself, or with ``train_min_assignments``
        set, the task with a number of assignments drawn from ``rng`` (the largest without one)."""
        task = self.task()
        if self.train_min_assignments is None:
            return task
        if not 1 <= self.train_min_assignments <= self.n_assignments:
            raise ValueError(f"train_min_assignments must be in [1, n_assignments="
                             f"{self.n_assignments}], got {self.train_min_assignments}")
        if rng is None:
            return task
        n = int(rng.integers(self.train_min_assignments, self.n_assignments + 1))
        return replace(task, n_assignments=n, min_assignments=None)

    def model_config(self, vocab_size: int) -> "lm.ModelConfig":
        """The model these settings describe (context defaults to the task's longest input)."""
        context = self.context if self.context is not None else self.task().max_tokens
        return lm.ModelConfig(vocab_size=vocab_size, context=context, n_layers=self.n_layers,
                              n_heads=self.n_heads, d_model=self.d_model,
                              mlp_ratio=self.mlp_ratio, selective=not self.standard,
                              eps=self.eps if not self.standard else 0.0, tau=self.tau)

    def to_dict(self) -> Dict[str, object]:
        """Plain dict (JSON-able)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TrainConfig":
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Schedules


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


# ----------------------------------------------------------------------------------------------
# Backends and evaluation


def answer_accuracy(params: Dict[str, np.ndarray], cfg: "lm.ModelConfig",
                    tokenizer: CharTokenizer, examples: Sequence[Example], *, attention=None,
                    batch_size: int = 256, budgets=None) -> float:
    """Exact-match answer accuracy: the fraction of examples whose every answer character is the
    argmax of the model at its position (teacher-forced, i.e. what greedy decoding produces).

    Parameters
    ----------
    params, cfg : the model
    tokenizer : CharTokenizer of the task
    examples : sequence of (prompt, answer)
    attention : attention backend (default NumPy)
    batch_size : examples per forward pass
    budgets : optional per-layer KV budgets (pruned attention)

    Returns
    -------
    accuracy : float in [0, 1]
    """
    if not examples:
        raise ValueError("examples must not be empty")
    correct = 0
    for i in range(0, len(examples), batch_size):
        tokens, targets, mask = encode_batch(tokenizer, examples[i:i + batch_size], cfg.context)
        logits, _, _ = lm.forward(params, cfg, tokens, attention=attention, budgets=budgets)
        hit = (logits.argmax(axis=-1) == targets) | ~mask                  # (B, T)
        correct += int(hit.all(axis=1).sum())
    return correct / len(examples)


# ----------------------------------------------------------------------------------------------
# Progress bar


class ProgressBar:
    """One status line on a stream (stderr): redrawn in place on a terminal, otherwise printed
    once per evaluation so that logs stay short."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, width: int = 24) -> None:
        self.total, self.width = total, width
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, step: int, seconds: float, loss: float, accuracy: Optional[float],
               final_line: bool = False, heldout: Optional[str] = None) -> None:
        """Show ``step`` of ``total`` with the loss and the latest held-out accuracy (or, when
        given, the held-out score already written out, e.g. ``"2.134 bpb"``)."""
        done = int(self.width * step / self.total)
        bar = "=" * done + ">" * (done < self.width) + " " * (self.width - done - 1)
        acc = "  --  " if accuracy is None else f"{100 * accuracy:5.1f}%"
        if heldout is not None:
            acc, accuracy = heldout, heldout     # a score to show: this line is an evaluation
        rate = seconds / max(step, 1)
        eta = rate * (self.total - step)
        line = (f"step {step:>{len(str(self.total))}}/{self.total} [{bar}] loss {loss:.4f} "
                f"heldout {acc} {rate:.3f}s/step {seconds:.0f}s eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final_line else ""))
        elif final_line or accuracy is not None:
            self.stream.write(line + "\n")
        self.stream.flush()


# ----------------------------------------------------------------------------------------------
# The training loop


def train(cfg: TrainConfig, *, backend: str = "auto", progress: Optional[ProgressBar] = None,
          quiet: bool = False) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", Dict]:
    """Train a model (from scratch, or from ``cfg.init_from``).

    Parameters
    ----------
    cfg : TrainConfig
    backend : 'auto', 'c' or 'numpy' (see ``make_attention``)
    progress : ProgressBar or None (default: one on stderr unless ``quiet``)
    quiet : bool, no progress output

    Returns
    -------
    params : dict of float32 arrays, the trained weights
    model_cfg : ModelConfig (with ``eps`` the final memory-loss weight)
    log : dict (JSON-able): config, seed, backend, the curve of (step, seconds, loss, ce, mem,
        lr, eps, heldout accuracy) at every evaluation, final accuracy, wall and training time
    """
    task = cfg.task()
    tokenizer = CharTokenizer.for_task(task)
    model_cfg = cfg.model_config(tokenizer.vocab_size)
    attention, backend_name = make_attention(backend)
    heldout = make_split(task, cfg.heldout_size, cfg.heldout_seed)
    heldout_prompts = prompts(heldout)
    rng = np.random.default_rng([cfg.seed, 1])        # the training stream (never the held-out)
    soft_rng = np.random.default_rng([cfg.seed, 2])   # which steps get the rank penalty
    if cfg.init_from is not None:
        params = start_from_checkpoint(cfg, model_cfg)
    else:
        params = lm.init_params(model_cfg, seed=cfg.seed, dtype=np.float32)
    optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if progress is None and not quiet:
        progress = ProgressBar(cfg.steps)

    curve: List[Dict[str, float]] = []
    train_seconds, eval_seconds = 0.0, 0.0
    wall_start = time.perf_counter()
    window: List[Tuple[float, float, float]] = []   # (total, ce, mem) since the last evaluation
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg)
        eps = memory_loss_weight(step, cfg)
        step_cfg = replace(model_cfg, eps=eps)
        batch = generate_examples(rng, cfg.train_task(rng), cfg.batch_size, exclude=heldout_prompts)
        tokens, targets, mask = encode_batch(tokenizer, batch, model_cfg.context)
        soft = cfg.soft_budgets is not None and soft_rng.random() < cfg.soft_share
        _, losses, cache = lm.forward(params, step_cfg, tokens, targets, mask,
                                      attention=attention,
                                      soft_budgets=cfg.soft_budgets if soft else None,
                                      soft_strength=cfg.soft_strength)
        apply_gradients(params, cache, losses, optimizer, lr, cfg.grad_clip, step)
        train_seconds += time.perf_counter() - t0
        window.append((losses["total"], losses["ce"], losses["mem"]))

        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            t1 = time.perf_counter()
            accuracy = answer_accuracy(params, model_cfg, tokenizer, heldout,
                                       attention=attention)
            eval_seconds += time.perf_counter() - t1
            total, ce, mem = (float(np.mean(col)) for col in zip(*window))
            window = []
            curve.append({"step": step + 1, "seconds": round(train_seconds, 3),
                          "loss": total, "ce": ce, "mem": mem, "lr": lr, "eps": eps,
                          "heldout_accuracy": accuracy})
            if progress is not None:
                progress.update(step + 1, train_seconds, total, accuracy, final_line=last)
        elif progress is not None and progress.tty:
            progress.update(step + 1, train_seconds, losses["total"], None)

    final_cfg = replace(model_cfg, eps=memory_loss_weight(cfg.steps - 1, cfg))
    log = {
        "train_config": cfg.to_dict(),
        "task": task.to_dict(),
        "model_config": final_cfg.to_dict(),
        "seed": cfg.seed,
        "backend": backend_name,
        "threads": _threads(backend_name),
        "num_params": lm.num_params(params),
        "heldout_size": cfg.heldout_size,
        "heldout_seed": cfg.heldout_seed,
        "final_heldout_accuracy": curve[-1]["heldout_accuracy"],
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "curve": curve,
    }
    first = next((c for c in curve if c["heldout_accuracy"] >= 0.99), None)
    log["first_99"] = None if first is None else {"step": first["step"],
                                                  "seconds": first["seconds"]}
    return params, final_cfg, log


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
    when they do not describe the checkpoint."""
    params, ck_cfg, ck_task, _ = load_task_model(Path(cfg.init_from))
    if ck_task != cfg.task():
        raise ValueError(f"init_from {cfg.init_from}: the checkpoint was trained on "
                         f"{ck_task}, this run's task is {cfg.task()}")
    if cfg.insert_layer is not None:
        params, ck_cfg = insert_identity_block(params, ck_cfg, cfg.insert_layer, seed=cfg.seed)
    mine = replace(model_cfg, eps=0.0)
    theirs = replace(ck_cfg, eps=0.0)
    if mine != theirs:
        diff = ", ".join(f"{f.name}: checkpoint {getattr(theirs, f.name)}, settings "
                         f"{getattr(mine, f.name)}" for f in fields(mine)
                         if getattr(mine, f.name) != getattr(theirs, f.name))
        raise ValueError(f"init_from {cfg.init_from}"
                         f"{' with insert_layer' if cfg.insert_layer is not None else ''}: the "
                         f"model settings do not describe the checkpoint ({diff})")
    return {name: np.asarray(value, dtype=np.float32) for name, value in params.items()}


def _threads(backend_name: str) -> Optional[int]:
    if backend_name != "c":
        return None
    import selattn_c
    return selattn_c.get_num_threads()


# ----------------------------------------------------------------------------------------------
# Files


def checkpoint_extra(log: Dict) -> Dict[str, object]:
    """What a checkpoint must carry besides the weights: the task (tokenizer and held-out set are
    rebuilt from it), the held-out seed and size, the training settings and the final accuracy."""
    return {"task": log["task"], "heldout_seed": log["heldout_seed"],
            "heldout_size": log["heldout_size"], "train_config": log["train_config"],
            "heldout_accuracy": log["final_heldout_accuracy"]}


def save_run(params: Dict[str, np.ndarray], model_cfg: "lm.ModelConfig", log: Dict,
             checkpoint: Path, log_path: Optional[Path] = None) -> Path:
    """Write the checkpoint and the JSON log (default: the checkpoint's path with ``.json``).
    Returns the log's path."""
    checkpoint = Path(checkpoint)
    log_path = checkpoint.with_suffix(".json") if log_path is None else Path(log_path)
    save_checkpoint(checkpoint, params, model_cfg, extra=checkpoint_extra(log))
    log = dict(log, checkpoint=checkpoint.name)
    log_path.write_text(json.dumps(log, indent=1) + "\n", encoding="utf-8")
    return log_path


def load_task_model(path: Path) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", TaskConfig,
                                         Dict[str, object]]:
    """Load a checkpoint written by ``save_run``: (params, model config, task, extra).
    Raises CheckpointError (a ValueError) when the file or its task settings are unusable."""
    from .checkpoint import CheckpointError
    params, model_cfg, extra = load_checkpoint(path)
    if not isinstance(extra, dict) or "task" not in extra:
        raise CheckpointError(f"{path}: the checkpoint has no task settings in its 'extra' "
                              "(was it written by selattn train?)")
    try:
        task = TaskConfig.from_dict(extra["task"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad task settings: {e}") from None
    return params, model_cfg, task, extra


def heldout_set(task: TaskConfig, extra: Dict[str, object]) -> List[Example]:
    """The held-out set a checkpoint was evaluated on during training."""
    return make_split(task, int(extra["heldout_size"]), int(extra["heldout_seed"]))


def evaluate_checkpoint(path: Path, *, backend: str = "auto", n: Optional[int] = None,
                        budgets=None) -> Dict[str, object]:
    """Held-out exact-match accuracy of a saved model.

    Parameters
    ----------
    path : checkpoint written by ``selattn train``
    backend : 'auto', 'c' or 'numpy'
    n : int or None, evaluate on the first ``n`` held-out examples (default: all of them)
    budgets : optional per-layer KV budgets (pruned attention)

    Returns
    -------
    dict with ``accuracy``, ``n`` (examples scored), ``backend`` and ``selective``
    """
    params, model_cfg, task, extra = load_task_model(path)
    attention, backend_name = make_attention(backend)
    examples = heldout_set(task, extra)
    if n is not None:
        if n < 1:
            raise ValueError(f"n (examples to score) must be >= 1, got {n}")
        examples = examples[:n]
    acc = answer_accuracy(params, model_cfg, CharTokenizer.for_task(task), examples,
                          attention=attention, budgets=budgets)
    return {"accuracy": acc, "n": len(examples), "backend": backend_name,
            "selective": model_cfg.selective}
