"""Train the tiny LM (``selattn_lm.model``) on real text, byte by byte, and score it in bits
per byte.

The corpus is the Wikipedia sample of ``selattn_lm.text`` (train / valid / test split by
article). Each step trains on ``batch_size`` windows of ``context`` bytes at random offsets of the
train split; every ``eval_every`` steps the model is scored on the first ``eval_windows``
non-overlapping windows of the validation split. The recipe (AdamW, warmup then cosine decay,
gradient clipping, the memory loss weighted by ``eps``) is the one of ``selattn_lm.training``; so
are its schedules and its progress bar.

``selattn train --task text`` runs ``train_text``; ``selattn_lm.text_results`` scores checkpoints
under pruned KV caches.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from . import model as lm
from .backends import make_attention
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .optim import AdamW
from .text import ByteTokenizer, TextCorpus, eval_windows, load_corpus, \
    random_windows
from .training import ProgressBar, apply_gradients, learning_rate, memory_loss_weight

LN2 = math.log(2.0)
TASK_NAME = "text"


@dataclass(frozen=True)
class TextTrainConfig:
    """Everything that determines a text training run (with the seed, it reproduces the run).

    Model: ``n_layers``, ``n_heads``, ``d_model``, ``mlp_ratio``, ``context`` (bytes per
    window), ``standard`` (plain causal attention, the baseline), ``eps`` (memory-loss weight;
    0 for the standard model), ``tau``.
    Optimisation: ``steps``, ``batch_size`` (windows per step), ``lr``, ``min_lr``,
    ``warmup_steps``, ``weight_decay``, ``grad_clip``, ``eps_start``, ``eps_ramp``.
    Evaluation: ``eval_every`` steps, on the first ``eval_windows`` validation windows.
    Data: ``corpus`` (a MediaWiki XML dump, default: the Wikipedia sample in gensim).
    """

    n_layers: int = 4
    n_heads: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    context: int = 256
    standard: bool = False
    eps: float = 0.1
    tau: float = 1.0
    steps: int = 2000
    batch_size: int = 16
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eps_start: int = 0
    eps_ramp: int = 0
    eval_every: int = 100
    eval_windows: int = 64
    seed: int = 0
    corpus: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("n_layers", "n_heads", "d_model", "mlp_ratio", "steps", "batch_size",
                     "eval_every", "eval_windows", "warmup_steps", "eps_start", "eps_ramp",
                     "seed", "context"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            smallest = 0 if name in ("warmup_steps", "eps_start", "eps_ramp", "seed") else 1
            if name == "context":
                smallest = 2
            if value < smallest:
                raise ValueError(f"{name} must be >= {smallest}, got {value}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps", "tau"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if self.lr <= 0 or self.tau <= 0 or self.grad_clip <= 0:
            raise ValueError("lr, tau and grad_clip must be > 0")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads})")

    def model_config(self) -> "lm.ModelConfig":
        """The model these settings describe (byte vocabulary: 256 bytes, PAD and BOS)."""
        return lm.ModelConfig(vocab_size=ByteTokenizer.vocab_size, context=self.context,
                              n_layers=self.n_layers, n_heads=self.n_heads,
                              d_model=self.d_model, mlp_ratio=self.mlp_ratio,
                              selective=not self.standard,
                              eps=self.eps if not self.standard else 0.0, tau=self.tau)

    def to_dict(self) -> Dict[str, object]:
        """Plain dict (JSON-able)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, object]) -> "TextTrainConfig":
        """Inverse of ``to_dict``; unknown keys are an error."""
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown text training settings: {', '.join(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# Bits per byte


def bits_per_byte(params: Dict[str, np.ndarray], cfg: "lm.ModelConfig", tokens: np.ndarray,
                  targets: np.ndarray, *, attention=None, budgets=None,
                  batch_size: int = 32) -> float:
    """Mean cross-entropy of the next byte, in bits, over every position of the windows.

    Parameters
    ----------
    params, cfg : the model
    tokens, targets : (W, N) windows from ``selattn_lm.text.eval_windows``
    attention : attention backend (``CAttention``, ``NumpyAttention``, or one of the eviction
        baselines of ``selattn_reference.eviction``); default NumPy
    budgets : per-layer KV budgets for backends that take them (pruned cache), or None
    batch_size : windows per forward pass

    Returns
    -------
    bpb : float
    """
    tokens, targets = np.asarray(tokens), np.asarray(targets)
    if tokens.ndim != 2 or tokens.shape != targets.shape or len(tokens) == 0:
        raise ValueError(f"tokens and targets must be (W, N) arrays of one shape with W >= 1, "
                         f"got {tokens.shape} and {targets.shape}")
    total = 0.0
    for i in range(0, len(tokens), batch_size):
        tok, tgt = tokens[i:i + batch_size], targets[i:i + batch_size]
        _, losses, _ = lm.forward(params, replace(cfg, eps=0.0), tok, tgt, attention=attention,
                                  budgets=budgets)
        total += losses["ce"] * len(tok)            # every window has N scored positions
    return total / len(tokens) / LN2


# ----------------------------------------------------------------------------------------------
# The training loop


def train_text(cfg: TextTrainConfig, *, backend: str = "auto",
               progress: Optional[ProgressBar] = None, quiet: bool = False,
               corpus: Optional[TextCorpus] = None
               ) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", Dict]:
    """Train a byte-level model on the corpus' train split.

    Parameters
    ----------
    cfg : TextTrainConfig
    backend : 'auto', 'c' or 'numpy' (``selattn_lm.backends.make_attention``)
    progress : ProgressBar or None (default: one on stderr unless ``quiet``)
    quiet : bool, no progress output
    corpus : TextCorpus or None (default: ``load_corpus(cfg.corpus)``)

    Returns
    -------
    params : dict of float32 arrays
    model_cfg : ModelConfig (``eps`` the final memory-loss weight)
    log : dict (JSON-able): settings, corpus sizes, the curve of (step, seconds, loss, ce, mem,
        lr, eps, valid_bpb), final validation bits per byte, times
    """
    corpus = load_corpus(cfg.corpus) if corpus is None else corpus
    model_cfg = cfg.model_config()
    attention, backend_name = make_attention(backend)
    valid_tokens, valid_targets = eval_windows(corpus.valid, cfg.context, cfg.eval_windows)
    rng = np.random.default_rng([cfg.seed, 1])        # the training stream
    params = lm.init_params(model_cfg, seed=cfg.seed, dtype=np.float32)
    optimizer = AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if progress is None and not quiet:
        progress = ProgressBar(cfg.steps)

    curve: List[Dict[str, float]] = []
    train_seconds, eval_seconds = 0.0, 0.0
    wall_start = time.perf_counter()
    window: List[Tuple[float, float, float]] = []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg)
        eps = memory_loss_weight(step, cfg)
        tokens, targets = random_windows(corpus.train, cfg.batch_size, cfg.context, rng)
        _, losses, cache = lm.forward(params, replace(model_cfg, eps=eps), tokens, targets,
                                      attention=attention)
        apply_gradients(params, cache, losses, optimizer, lr, cfg.grad_clip, step)
        train_seconds += time.perf_counter() - t0
        window.append((losses["total"], losses["ce"], losses["mem"]))

        last = step + 1 == cfg.steps
        if (step + 1) % cfg.eval_every == 0 or last:
            t1 = time.perf_counter()
            bpb = bits_per_byte(params, model_cfg, valid_tokens, valid_targets,
                                attention=attention)
            eval_seconds += time.perf_counter() - t1
            total, ce, mem = (float(np.mean(col)) for col in zip(*window))
            window = []
            curve.append({"step": step + 1, "seconds": round(train_seconds, 3), "loss": total,
                          "ce": ce, "mem": mem, "lr": lr, "eps": eps, "valid_bpb": bpb})
            if progress is not None:
                progress.update(step + 1, train_seconds, total, None, final_line=last,
                                heldout=f"{bpb:.3f} bpb")
        elif progress is not None and progress.tty:
            progress.update(step + 1, train_seconds, losses["total"], None)

    final_cfg = replace(model_cfg, eps=memory_loss_weight(cfg.steps - 1, cfg))
    log = {
        "task": TASK_NAME,
        "train_config": cfg.to_dict(),
        "corpus": corpus.summary(),
        "model_config": final_cfg.to_dict(),
        "seed": cfg.seed,
        "backend": backend_name,
        "num_params": lm.num_params(params),
        "final_valid_bpb": curve[-1]["valid_bpb"],
        "train_seconds": round(train_seconds, 3),
        "eval_seconds": round(eval_seconds, 3),
        "wall_seconds": round(time.perf_counter() - wall_start, 3),
        "curve": curve,
    }
    return params, final_cfg, log


# ----------------------------------------------------------------------------------------------
# Files


def save_text_run(params: Dict[str, np.ndarray], model_cfg: "lm.ModelConfig", log: Dict,
                  checkpoint: Path, log_path: Optional[Path] = None) -> Path:
    """Write the checkpoint (its ``extra`` names the task and the training settings) and the JSON
    log (default: the checkpoint's path with ``.json``). Returns the log's path."""
    checkpoint = Path(checkpoint)
    log_path = checkpoint.with_suffix(".json") if log_path is None else Path(log_path)
    extra = {"task": TASK_NAME, "train_config": log["train_config"], "corpus": log["corpus"],
             "valid_bpb": log["final_valid_bpb"]}
    save_checkpoint(checkpoint, params, model_cfg, extra=extra)
    log_path.write_text(json.dumps(dict(log, checkpoint=checkpoint.name), indent=1) + "\n",
                        encoding="utf-8")
    return log_path


def load_text_model(path) -> Tuple[Dict[str, np.ndarray], "lm.ModelConfig", TextTrainConfig]:
    """Load a checkpoint written by ``save_text_run``: (params, model config, training settings).
    Raises CheckpointError (a ValueError) for a checkpoint of another task."""
    params, model_cfg, extra = load_checkpoint(path)
    if not isinstance(extra, dict) or extra.get("task") != TASK_NAME:
        raise CheckpointError(f"{path}: not a text model (written by selattn train --task text)")
    try:
        cfg = TextTrainConfig.from_dict(extra["train_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad text training settings: {e}") from None
    return params, model_cfg, cfg
