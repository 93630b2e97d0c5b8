"""The tiny selective-attention LM of ``selattn_lm.model`` in PyTorch, attention on the C
kernels through ``selattn_c.torch`` (CPU, float32). Optional: ``pip install '.[torch]'``.

Same architecture, parameter shapes and losses as the NumPy model: token and learned positional
embeddings, pre-LayerNorm blocks (``SelectiveSelfAttention``, then a GELU (tanh) MLP), a final
LayerNorm and a head tied to the token embedding; the loss is the weighted cross-entropy plus
``eps`` times the memory loss (F from ``selattn_c.torch.accumulated_mask``, differentiated by
autograd). ``TinyLM.from_reference`` loads the weights of ``selattn_lm.model.init_params``
(or of a checkpoint); ``reference_grads`` returns the gradients under the reference's names and
layouts, so the two models can be compared tensor by tensor.

``train`` runs the recipe of ``selattn_lm.training.train`` (the same ``TrainConfig``, initial
weights, batches, learning-rate and memory-loss schedules) with ``torch.optim.AdamW`` and
``torch.nn.utils.clip_grad_norm_``; ``generate`` decodes greedily through one pruned
``TorchKVCache`` per layer. docs/torch.md compares the two training runs.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from selattn_c.torch import SelectiveSelfAttention, TorchKVCache, memory_loss
from selattn_reference.validation import check_budgets

from . import model as lm
from .tasks import CharTokenizer, encode_batch

__all__ = ["Block", "TinyLM", "answer_accuracy", "train"]


class Block(nn.Module):
    """One pre-LayerNorm block: x + attn(ln1(x)), then + mlp(ln2(.)). x (B, N, d) -> (B, N, d)."""

    def __init__(self, cfg: lm.ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.ln1 = nn.LayerNorm(d, eps=lm.LAYERNORM_EPS)
        self.attn = SelectiveSelfAttention(d, cfg.n_heads, selector_head=cfg.selector_head,
                                           selective=cfg.selective)
        self.ln2 = nn.LayerNorm(d, eps=lm.LAYERNORM_EPS)
        self.fc1 = nn.Linear(d, cfg.mlp_ratio * d)
        self.fc2 = nn.Linear(cfg.mlp_ratio * d, d)

    def forward(self, x: torch.Tensor, *, need_F: bool = False, budget: Optional[int] = None,
                cache: Optional[TorchKVCache] = None):
        """x (B, N, d) -> x (B, N, d), F (B, N, N) when ``need_F`` else None."""
        h = self.ln1(x)
        if need_F:
            a, F = self.attn(h, return_mask=True)                          # (B, N, d), (B, N, N)
        else:
            a, F = self.attn(h, budget=budget, cache=cache), None          # (B, N, d)
        x = x + a
        h = nn.functional.gelu(self.fc1(self.ln2(x)), approximate="tanh")  # (B, N, r d)
        return x + self.fc2(h), F


class TinyLM(nn.Module):
    """``selattn_lm.model`` in torch: tokens (B, N) -> logits (B, N, V) and the losses.

    Parameters
    ----------
    cfg : selattn_lm.model.ModelConfig (its ``eps`` and ``tau`` are the memory loss')
    """

    def __init__(self, cfg: lm.ModelConfig):
        super().__init__()
        if not isinstance(cfg, lm.ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.wte = nn.Parameter(torch.zeros(cfg.vocab_size, cfg.d_model))   # (V, d)
        self.wpe = nn.Parameter(torch.zeros(cfg.context, cfg.d_model))      # (context, d)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.lnf = nn.LayerNorm(cfg.d_model, eps=lm.LAYERNORM_EPS)

    # -- the reference's names -----------------------------------------------------------------

    def _by_reference_name(self) -> Dict[str, Tuple[nn.Parameter, bool]]:
        """reference name -> (parameter, transposed). nn.Linear keeps its weight as (out, in),
        the reference as (in, out)."""
        table: Dict[str, Tuple[nn.Parameter, bool]] = {"wte": (self.wte, False),
                                                        "wpe": (self.wpe, False)}
        for l, b in enumerate(self.blocks):
            table.update({
                f"h{l}.ln1.g": (b.ln1.weight, False), f"h{l}.ln1.b": (b.ln1.bias, False),
                f"h{l}.attn.wqkv": (b.attn.qkv.weight, True),
                f"h{l}.attn.bqkv": (b.attn.qkv.bias, False),
                f"h{l}.attn.wo": (b.attn.out.weight, True),
                f"h{l}.attn.bo": (b.attn.out.bias, False),
                f"h{l}.ln2.g": (b.ln2.weight, False), f"h{l}.ln2.b": (b.ln2.bias, False),
                f"h{l}.mlp.w1": (b.fc1.weight, True), f"h{l}.mlp.b1": (b.fc1.bias, False),
                f"h{l}.mlp.w2": (b.fc2.weight, True), f"h{l}.mlp.b2": (b.fc2.bias, False),
            })
        table.update({"lnf.g": (self.lnf.weight, False), "lnf.b": (self.lnf.bias, False)})
        return table

    @classmethod
    def from_reference(cls, params: lm.Params, cfg: lm.ModelConfig) -> "TinyLM":
        """A model holding ``params`` (the names and shapes of ``selattn_lm.model``, e.g.
        from ``init_params`` or a checkpoint), cast to float32."""
        model = cls(cfg)
        model.load_reference(params)
        return model

    def load_reference(self, params: lm.Params) -> None:
        """Copy ``params`` (reference names and layouts) into this model's parameters."""
        lm.check_params(params, self.cfg)
        with torch.no_grad():
            for name, (p, transposed) in self._by_reference_name().items():
                value = np.asarray(params[name], dtype=np.float32)
                p.copy_(torch.from_numpy(value.T.copy() if transposed else value))

    def reference_params(self) -> lm.Params:
        """The parameters as float32 arrays under the reference's names and layouts."""
        return {name: _reference_layout(p.detach(), transposed)
                for name, (p, transposed) in self._by_reference_name().items()}

    def reference_grads(self) -> lm.Params:
        """The parameters' ``.grad`` under the reference's names and layouts (zeros where None)."""
        return {name: _reference_layout(p.grad if p.grad is not None else torch.zeros_like(p),
                                        transposed)
                for name, (p, transposed) in self._by_reference_name().items()}

    # -- forward -------------------------------------------------------------------------------

    def forward(self, tokens, targets=None, target_mask=None, *, eps: Optional[float] = None,
                budgets: Optional[Sequence[Optional[int]]] = None,
                caches: Optional[Sequence[TorchKVCache]] = None):
        """Logits, and with targets the losses (as ``selattn_lm.model.forward``).

        Parameters
        ----------
        tokens : (B, N) int tensor or array, id 0 is PAD
        targets : (B, N) int or None (inference); target_mask : (B, N) bool/float or None
        eps : float or None, weight of the memory loss (None: ``cfg.eps``)
        budgets : per-layer KV budgets (pruned attention, inference only) or None
        caches : one TorchKVCache per layer (``new_caches``): tokens continue what they hold

        Returns
        -------
        logits : (B, N, V) float32 tensor
        losses : {"ce", "mem", "total"} 0-d tensors (total = ce + eps * mem), or None
        """
        cfg = self.cfg
        start = 0 if caches is None else caches[0].length
        if caches is not None and len(caches) != cfg.n_layers:
            raise ValueError(f"caches must hold one TorchKVCache per layer ({cfg.n_layers})")
        if caches is not None and budgets is not None:
            raise ValueError("pass either budgets or caches: the caches have their budgets")
        tokens_np = lm.check_tokens(_as_numpy(tokens), cfg, start)
        budgets = check_budgets(budgets, cfg.n_layers)
        eps = cfg.eps if eps is None else float(eps)
        with_loss = targets is not None
        need_F = with_loss and cfg.selective and eps != 0.0
        tok = torch.from_numpy(tokens_np).long()                           # (B, N)
        N = tok.shape[1]
        x = self.wte[tok] + self.wpe[start:start + N]                      # (B, N, d)
        Fs = []
        for l, block in enumerate(self.blocks):
            x, F = block(x, need_F=need_F, budget=budgets[l],
                         cache=None if caches is None else caches[l])      # (B, N, d)
            Fs.append(F)
        logits = self.lnf(x) @ self.wte.T                                  # (B, N, V) tied head
        if not with_loss:
            return logits, None
        targets, weights = _targets(targets, target_mask, tokens_np, cfg)
        nll = nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                          torch.from_numpy(targets).long().reshape(-1),
                                          reduction="none").view(tok.shape)  # (B, N)
        w = torch.from_numpy(weights)                                      # (B, N)
        ce = (w * nll).sum() / w.sum()
        mem = logits.new_zeros(())
        if need_F:
            mem = _memory(Fs, tok, cfg.tau)
        return logits, {"ce": ce, "mem": mem, "total": ce + eps * mem}

    # -- decoding ------------------------------------------------------------------------------

    def new_caches(self, batch: int, budgets: Optional[Sequence[Optional[int]]] = None
                   ) -> List[TorchKVCache]:
        """One empty TorchKVCache per layer (``budgets``: one int >= 2 or None per layer)."""
        budgets = check_budgets(budgets, self.cfg.n_layers)
        return [block.attn.new_cache(batch, budget)
                for block, budget in zip(self.blocks, budgets)]

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens: int,
                 budgets: Optional[Sequence[Optional[int]]] = None,
                 stop_token: Optional[int] = None) -> torch.Tensor:
        """Greedy decoding: prefill ``tokens`` (B, N) through fresh pruned caches, then one
        ``TorchKVCache.step`` per layer and new token.

        Returns
        -------
        new : (B, T) int64 tensor, T <= max_new_tokens (stops once every row has produced
            ``stop_token``)
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        tokens_np = lm.check_tokens(_as_numpy(tokens), self.cfg)
        if tokens_np.shape[1] + max_new_tokens - 1 > self.cfg.context:
            raise ValueError(f"prompt of {tokens_np.shape[1]} tokens plus {max_new_tokens} new "
                             f"ones does not fit the context of {self.cfg.context}")
        caches = self.new_caches(tokens_np.shape[0], budgets)
        logits, _ = self(tokens_np, caches=caches)                         # (B, N, V)
        out, done = [], torch.zeros(tokens_np.shape[0], dtype=torch.bool)
        for t in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1)                             # (B,)
            out.append(nxt)
            if stop_token is not None:
                done |= nxt == stop_token
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            logits, _ = self(nxt[:, None], caches=caches)                  # (B, 1, V)
        for cache in caches:
            cache.close()
        return torch.stack(out, dim=1)                                     # (B, T)


def _reference_layout(p: torch.Tensor, transposed: bool) -> np.ndarray:
    a = p.detach().to(torch.float32).numpy()
    return np.ascontiguousarray(a.T if transposed else a)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _targets(targets, target_mask, tokens: np.ndarray, cfg: lm.ModelConfig
             ) -> Tuple[np.ndarray, np.ndarray]:
    """(targets (B, N) int, weights (B, N) float32), checked as the reference model checks them."""
    targets = lm.check_tokens(_as_numpy(targets), cfg, name="targets")
    if targets.shape != tokens.shape:
        raise ValueError(f"targets must have the shape of tokens {tokens.shape}, got "
                         f"{targets.shape}")
    if target_mask is None:
        weights = np.ones(tokens.shape, dtype=np.float32)                  # every position
    else:
        target_mask = _as_numpy(target_mask)
        if target_mask.shape != tokens.shape:
            raise ValueError(f"target_mask must have the shape of tokens {tokens.shape}, got "
                             f"{target_mask.shape}")
        if target_mask.dtype.kind not in "biuf":
            raise TypeError(f"target_mask must be bool or numeric, got {target_mask.dtype}")
        weights = target_mask.astype(np.float32)
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("target_mask must be finite and >= 0")
    if not weights.sum() > 0:
        raise ValueError("target_mask selects no position: the cross-entropy is undefined")
    return targets, weights


def _memory(Fs: Sequence[torch.Tensor], tokens: torch.Tensor, tau: float) -> torch.Tensor:
    """``selattn_lm.model.memory_forward`` in torch: the layers' memory losses summed
    over the batch, divided by n_layers x non-PAD tokens; PAD query rows count as fully evicted
    (F = tau), so padding changes neither the loss nor its gradient."""
    pad_rows = (tokens == lm.PAD)[:, :, None]                              # (B, N, 1)
    non_pad = int((tokens != lm.PAD).sum())
    if non_pad == 0:
        raise ValueError("tokens are all PAD (0): the memory loss has nothing to normalise by")
    total = sum(memory_loss(torch.where(pad_rows, torch.full_like(F, tau), F), tau).sum()
                for F in Fs)
    return total / (len(Fs) * non_pad)


# ----------------------------------------------------------------------------------------------
# Training: the recipe of selattn_lm.training.train


@torch.no_grad()
def answer_accuracy(model: TinyLM, tokenizer: CharTokenizer, examples, batch_size: int = 256
                    ) -> float:
    """Exact-match answer accuracy (teacher-forced argmax at every answer position), as
    ``selattn_lm.training.answer_accuracy``."""
    correct = 0
    for i in range(0, len(examples), batch_size):
        tokens, targets, mask = encode_batch(tokenizer, examples[i:i + batch_size],
                                             model.cfg.context)
        logits, _ = model(tokens)                                          # (B, T, V)
        hit = (logits.argmax(dim=-1).numpy() == targets) | ~mask           # (B, T)
        correct += int(hit.all(axis=1).sum())
    return correct / len(examples)


def optimizer_for(model: TinyLM, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """torch AdamW as ``selattn_lm.optim.AdamW``: betas (0.9, 0.95), eps 1e-8, decoupled
    weight decay on the 2-D parameters only (embeddings and projections)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), eps=1e-8)


def train(cfg, *, eval_every: Optional[int] = None, heldout_size: Optional[int] = None,
          step_losses: bool = False) -> Tuple[TinyLM, Dict]:
    """Train the torch port with the recipe of ``selattn_lm.training.train``.

    The same initial weights (``init_params(model_cfg, seed=cfg.seed)``), the same stream of
    training batches (``default_rng([seed, 1])``, held-out prompts excluded), the same learning
    rate and memory-loss schedules, AdamW with the same hyperparameters and gradient clipping to
    ``cfg.grad_clip``. The log's curve has the same entries as ``training.train``'s (the means
    of loss, ce and mem over each ``eval_every`` window, and the held-out accuracy).

    Parameters
    ----------
    cfg : selattn_lm.training.TrainConfig (no soft_budgets, no init_from)
    eval_every, heldout_size : int or None, override the config's (None: the config's)
    step_losses : bool, also log every step's (total, ce, mem) in ``log["steps"]``

    Returns
    -------
    model : TinyLM, the trained model
    log : dict with "curve" (list of dicts: step, seconds, loss, ce, mem, lr, eps,
        heldout_accuracy), "train_seconds", and "steps" when ``step_losses``
    """
    from .task_assign import AssignTask
    from .training import learning_rate, memory_loss_weight   # the schedules of the NumPy run

    if cfg.soft_budgets is not None or cfg.init_from is not None:
        raise ValueError("the torch port trains from init_params only, without the rank "
                         "penalty: soft_budgets and init_from must be None")
    if not isinstance(cfg.task, AssignTask):
        raise ValueError(f"the torch port trains the variable-assignment task, got "
                         f"{cfg.task.describe()}")
    if eval_every is not None or heldout_size is not None:
        task = cfg.task if heldout_size is None else replace(cfg.task, heldout_size=heldout_size)
        cfg = replace(cfg, eval_every=cfg.eval_every if eval_every is None else eval_every,
                      task=task)
    assign = cfg.task
    tokenizer = assign.tokenizer
    model_cfg = cfg.model_config()
    heldout = assign.heldout
    rng = np.random.default_rng([cfg.seed, 1])        # the training stream of training.train
    model = TinyLM.from_reference(lm.init_params(model_cfg, seed=cfg.seed, dtype=np.float32),
                                  model_cfg)
    optimizer = optimizer_for(model, cfg.lr, cfg.weight_decay)
    curve, steps, window = [], [], []
    train_seconds = 0.0
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, cfg)
        eps = memory_loss_weight(step, cfg)
        tokens, targets, mask = assign.batch(rng, cfg.batch_size, model_cfg.context)
        _, losses = model(tokens, targets, mask, eps=eps)
        optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        values = tuple(losses[k].item() for k in ("total", "ce", "mem"))
        if not all(math.isfinite(x) for x in values):
            raise FloatingPointError(f"loss is not finite at step {step}: {values}")
        train_seconds += time.perf_counter() - t0
        window.append(values)
        if step_losses:
            steps.append(values)
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            accuracy = answer_accuracy(model, tokenizer, heldout)
            total, ce, mem = (float(np.mean(col)) for col in zip(*window))
            window = []
            curve.append({"step": step + 1, "seconds": round(train_seconds, 3), "loss": total,
                          "ce": ce, "mem": mem, "lr": lr, "eps": eps,
                          "heldout_accuracy": accuracy})
    log = {"curve": curve, "train_seconds": round(train_seconds, 3),
           "threads": torch.get_num_threads()}
    if step_losses:
        log["steps"] = steps
    return model, log
