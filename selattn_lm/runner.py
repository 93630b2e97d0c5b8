"""End-to-end CPU inference of a checkpoint from ``selattn train``: one pruned ``KVCache`` per
layer (the C kernels), everything else (embeddings, LayerNorm, projections, MLP, head) in NumPy
with the building blocks of ``selattn_lm.model``.

A prompt is prefilled through every layer's cache at once (the blocked kernel with the cache's
eviction schedule) and each generated token is one ``KVCache.step`` per layer, so a layer never
holds more than its budget of keys and values. Decode = prefill: the logits of a sequence fed token
by token equal those of one prefill, and both equal the reference model's ``forward(...,
budgets=)`` (tests/test_runner.py).

The standard (non-selective) model runs with ``KVCache(..., selective=False)``: its F stays zero,
so a budget evicts the oldest token (a sliding window that keeps BOS).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from selattn_c.kv_cache import KVCache
from selattn_reference.validation import check_budgets

from . import model as lm
from .backends import CAttention
from .calibrate import Score
from .checkpoint import CheckpointError
from .tasks import (
    BOS,
    CharTokenizer,
    Example,
    TaskConfig,
    encode_batch,
    make_split,
    prompts,
)
from .task_registry import load_task_checkpoint

BYTES_PER_VALUE = 4    # keys and values are held in float32


class ModelRunner:
    """A trained tiny LM, ready for token-by-token inference with per-layer KV budgets.

    Parameters
    ----------
    params : dict of arrays (``selattn_lm.model`` names and shapes; cast to float32)
    cfg : ModelConfig
    task : TaskConfig or None, the task the model was trained on (gives the tokenizer and the
        held-out set; None: token ids only)
    extra : dict, the checkpoint's ``extra`` (held-out seed and size, training settings)
    """

    def __init__(self, params: lm.Params, cfg: lm.ModelConfig, task: Optional[TaskConfig] = None,
                 extra: Optional[dict] = None):
        if not isinstance(cfg, lm.ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig, got {type(cfg).__name__}")
        lm.check_params(params, cfg)
        if task is not None and not isinstance(task, TaskConfig):
            raise TypeError(f"task must be a TaskConfig or None, got {type(task).__name__}")
        self.cfg = cfg
        self.params = {name: np.ascontiguousarray(p, dtype=np.float32)
                       for name, p in params.items()}
        self.task = task
        self.tokenizer = CharTokenizer.for_task(task) if task is not None else None
        self.extra = dict(extra or {})
        if self.tokenizer is not None and self.tokenizer.vocab_size != cfg.vocab_size:
            raise ValueError(f"the task's tokenizer has {self.tokenizer.vocab_size} tokens but "
                             f"the model's vocab_size is {cfg.vocab_size}")

    @classmethod
    def load(cls, path) -> "ModelRunner":
        """Load a checkpoint written by ``selattn train`` (task settings in its ``extra``).

        Raises ``CheckpointError`` (a ValueError) naming the file when it is missing, corrupt, or
        has no usable task settings.
        """
        params, cfg, task, extra = load_task_checkpoint(path, expect="assign")
        extra = dict(extra, heldout_size=task.heldout_size, heldout_seed=task.heldout_seed)
        try:
            return cls(params, cfg, task.config(), extra)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    # -- examples -------------------------------------------------------------------------------

    def _need_task(self) -> TaskConfig:
        if self.task is None:
            raise ValueError("this model has no task settings: it takes token ids only")
        return self.task

    def _heldout_split(self) -> Tuple[int, int]:
        """(size, seed) of the held-out set, from the checkpoint's ``extra``."""
        try:
            return int(self.extra["heldout_size"]), int(self.extra["heldout_seed"])
        except (KeyError, TypeError, ValueError):
            raise ValueError("the checkpoint's extra has no usable heldout_size / heldout_seed") \
                from None

    def heldout(self, n: Optional[int] = None) -> List[Example]:
        """The held-out examples the model was evaluated on in training (the first ``n``; the
        split is a deterministic stream, so a prefix of it is the same for any size)."""
        task = self._need_task()
        size, seed = self._heldout_split()
        if n is not None:
            size = min(size, _check_count("n", n))
        return make_split(task, size, seed)

    def calibration_split(self, n: int, seed: int) -> List[Example]:
        """``n`` examples from ``seed`` that share no prompt with the held-out set: budgets are
        fitted on these, so the held-out accuracy under calibrated budgets stays honest."""
        task = self._need_task()
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TypeError(f"seed must be an int >= 0, got {seed!r}")
        size, heldout_seed = self._heldout_split()
        exclude = prompts(make_split(task, size, heldout_seed))
        return make_split(task, _check_count("n", n), int(seed), exclude=exclude)

    def encode(self, text: str) -> np.ndarray:
        """(1, N) token ids of BOS + ``text``."""
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (no task settings)")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.array([[BOS] + self.tokenizer.encode(text)], dtype=np.int64)   # (1, N)

    # -- caches ---------------------------------------------------------------------------------

    def check_budgets(self, budgets) -> List[Optional[int]]:
        """Per-layer budgets: None (no pruning anywhere) or one int >= 2 / None per layer."""
        return check_budgets(budgets, self.cfg.n_layers)

    def new_caches(self, batch: int, budgets=None) -> List[KVCache]:
        """One empty ``KVCache`` per layer with that layer's budget (None: unpruned)."""
        cfg = self.cfg
        return [KVCache(batch, cfg.n_heads, cfg.head_dim, budget,
                        selector_head=cfg.selector_head, selective=cfg.selective)
                for budget in self.check_budgets(budgets)]

    def kv_bytes(self, budgets=None, batch: int = 1) -> int:
        """Bytes of keys and values the caches hold at most for a full-context sequence:
        sum over layers of min(budget, context) x 2 (K, V) x heads x head_dim x 4 (float32)."""
        cfg = self.cfg
        slots = [cfg.context if b is None else min(b, cfg.context)
                 for b in self.check_budgets(budgets)]
        return (_check_count("batch", batch) * sum(slots) * 2 * cfg.n_heads * cfg.head_dim
                * BYTES_PER_VALUE)

    # -- the model ------------------------------------------------------------------------------

    def _blocks(self, tokens: np.ndarray, start: int, attentions: Sequence, need_F: bool = False
                ) -> Tuple[np.ndarray, List[Optional[np.ndarray]]]:
        """The model's blocks (``selattn_lm.model.block_forward``) on tokens (B, N) at
        positions start.., layer l's attention by the backend ``attentions[l]``; returns the
        logits (B, N, V) and each layer's F (B, N, N) when ``need_F`` (else Nones)."""
        p, cfg = self.params, self.cfg
        x = lm.embed(p, tokens, start)                                     # (B, N, d)
        masks = []
        for l in range(cfg.n_layers):
            x, F, _ = lm.block_forward(x, p, l, cfg, attentions[l], need_F)   # (B, N, d)
            masks.append(F)
        return lm.head_logits(x, p), masks                                 # (B, N, V)

    def forward(self, tokens, caches: Sequence[KVCache]) -> np.ndarray:
        """Feed tokens (B, N) after what ``caches`` already hold; return their logits (B, N, V).

        N > 1 prefills every layer's cache (one blocked kernel call per layer on an empty cache),
        N = 1 is one decode step per layer.
        """
        if len(caches) != self.cfg.n_layers or not all(isinstance(c, KVCache) for c in caches):
            raise TypeError(f"caches must be {self.cfg.n_layers} KVCache objects (new_caches)")
        start = caches[0].length
        tokens = lm.check_tokens(tokens, self.cfg, start)
        if tokens.shape[0] != caches[0].B:
            raise ValueError(f"tokens have batch {tokens.shape[0]} but the caches hold "
                             f"{caches[0].B} sequences")
        logits, _ = self._blocks(tokens, start, [_CacheAttention(c) for c in caches])
        return logits

    def logits(self, tokens, budgets=None) -> np.ndarray:
        """Logits of whole sequences from fresh caches: tokens (B, N) -> (B, N, V).

        With ``budgets`` each layer keeps at most its budget of keys; without, this equals the
        reference model's ``forward`` (float32 rounding aside)."""
        tokens = lm.check_tokens(tokens, self.cfg)
        return self.forward(tokens, self.new_caches(tokens.shape[0], budgets))

    def generate(self, prompt, max_new_tokens: int, budgets=None,
                 stop_token: Optional[int] = None) -> Union[np.ndarray, str]:
        """Greedy decoding through the pruned caches.

        Parameters
        ----------
        prompt : str (BOS is prepended; the answer is returned as text and stops after ';'), or
            (B, N) int token ids (every row the same length)
        max_new_tokens : int >= 1, most tokens to generate
        budgets : per-layer budgets or None
        stop_token : int or None, stop once every row has produced it (default for str: ';')

        Returns
        -------
        str for a str prompt, else (B, T) int64 new tokens, T <= max_new_tokens
        """
        as_text = isinstance(prompt, str)
        tokens = self.encode(prompt) if as_text else lm.check_tokens(prompt, self.cfg)
        max_new_tokens = _check_count("max_new_tokens", max_new_tokens)
        if as_text and stop_token is None:
            stop_token = self.tokenizer.encode(";")[0]
        if tokens.shape[1] + max_new_tokens - 1 > self.cfg.context:
            raise ValueError(f"prompt of {tokens.shape[1]} tokens plus {max_new_tokens} new ones "
                             f"does not fit the context of {self.cfg.context}")
        new = self._greedy(tokens, self.new_caches(tokens.shape[0], budgets), max_new_tokens,
                           stop_token)
        if as_text:
            return _answer_text(self.tokenizer.decode(new[0]))
        return new

    def _greedy(self, tokens: np.ndarray, caches: List[KVCache], max_new_tokens: int,
                stop_token: Optional[int]) -> np.ndarray:
        """Prefill ``tokens`` (B, N), then up to ``max_new_tokens`` greedy steps: (B, T) ids."""
        logits = self.forward(tokens, caches)                              # (B, N, V)
        out, done = [], np.zeros(tokens.shape[0], dtype=bool)
        for t in range(max_new_tokens):
            nxt = logits[:, -1].argmax(axis=-1)                            # (B,)
            out.append(nxt)
            if stop_token is not None:
                done |= nxt == stop_token
            if done.all() or t == max_new_tokens - 1:
                break
            logits = self.forward(nxt[:, None], caches)                    # (B, 1, V)
        return np.stack(out, axis=1)                                       # (B, T)

    # -- task-level helpers ---------------------------------------------------------------------

    def answers(self, prompt_texts: Sequence[str], budgets=None) -> List[str]:
        """Greedy answers of many prompts, decoded through the pruned caches: prompts of equal
        length share a batch (one prefill, then one step per answer token)."""
        task = self._need_task()
        if isinstance(prompt_texts, str):
            raise TypeError("prompt_texts must be a sequence of str, got one str")
        encoded = [self.encode(text) for text in prompt_texts]              # (1, N) each
        max_answer = len(str(task.max_value)) + 1                          # digits and ';'
        stop = self.tokenizer.encode(";")[0]
        by_length: Dict[int, List[int]] = {}
        for i, tokens in enumerate(encoded):
            by_length.setdefault(tokens.shape[1], []).append(i)
        result: List[str] = [""] * len(prompt_texts)
        for rows in by_length.values():
            tokens = np.concatenate([encoded[i] for i in rows])            # (B, N)
            steps = min(max_answer, self.cfg.context - tokens.shape[1] + 1)
            new = self._greedy(tokens, self.new_caches(len(rows), budgets), steps, stop)
            for i, ids in zip(rows, new):
                result[i] = _answer_text(self.tokenizer.decode(ids))
        return result

    def evaluate(self, examples: Sequence[Example], budgets=None, batch_size: int = 256) -> Score:
        """Exact-match answer accuracy and mean answer cross-entropy, teacher-forced through the
        pruned caches (exact match of every answer position's argmax = greedy decoding gets the
        whole answer right, since each greedy step then sees the true prefix)."""
        self._need_task()
        if not examples:
            raise ValueError("examples must not be empty")
        batch_size = _check_count("batch_size", batch_size)
        correct, nll_sum, n_answer_tokens = 0, 0.0, 0
        for s in range(0, len(examples), batch_size):
            tokens, targets, mask = encode_batch(self.tokenizer, examples[s:s + batch_size],
                                                 self.cfg.context)         # (B, T) each
            logits = self.logits(tokens, budgets)                          # (B, T, V)
            hit = (logits.argmax(axis=-1) == targets) | ~mask              # (B, T)
            correct += int(hit.all(axis=1).sum())
            z = logits - logits.max(axis=-1, keepdims=True)                # (B, T, V) stable
            logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            nll = -np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]   # (B, T)
            nll_sum += float(nll[mask].sum())
            n_answer_tokens += int(mask.sum())
        return Score(accuracy=correct / len(examples), loss=nll_sum / n_answer_tokens)

    # -- pictures -------------------------------------------------------------------------------

    def accumulated_masks(self, tokens) -> List[np.ndarray]:
        """Every layer's accumulated mask F of whole sequences (unpruned): tokens (B, N) -> one
        (B, N, N) float32 array per layer (all zero for a standard model)."""
        tokens = lm.check_tokens(tokens, self.cfg)
        _, masks = self._blocks(tokens, 0, [CAttention()] * self.cfg.n_layers, need_F=True)
        return masks

    def held_positions(self, text: str, budgets) -> List[np.ndarray]:
        """Per layer, the positions a pruned cache still holds after BOS + ``text``: the keys its
        last token attends to (sorted, int64)."""
        tokens = self.encode(text)                                         # (1, N)
        caches = self.new_caches(1, budgets)
        self.forward(tokens, caches)
        return [cache.held(0)[0] for cache in caches]

    def masks(self, text: str) -> Tuple[List[np.ndarray], List[str]]:
        """Every layer's F for BOS + ``text``, with the token labels (for the mask pictures).

        Returns
        -------
        masks : one (N, N) float32 array per layer
        labels : N strings, '^' for BOS
        """
        masks = self.accumulated_masks(self.encode(text))
        return [F[0] for F in masks], ["^"] + list(text)


def _answer_text(text: str) -> str:
    """A generated answer up to and including its closing ';' (all of it when there is none)."""
    return text[: text.index(";") + 1] if ";" in text else text


class _CacheAttention:
    """One layer's ``KVCache`` as an attention backend of ``selattn_lm.model``: N > 1
    tokens are a prefill, one token a decode step; the cache holds the budget and the selector
    settings it was made with. Inference only: no F, no backward."""

    def __init__(self, cache: KVCache):
        self.cache = cache

    def forward(self, q, k, v, *, selective: bool, selector_head: int, need_F: bool,
                budget: Optional[int] = None):
        if q.shape[2] == 1:                                                # decode: one token
            out = self.cache.step(q[:, :, 0], k[:, :, 0], v[:, :, 0])[:, :, None]
        else:
            out = self.cache.prefill(q, k, v)                              # (B, H, N, hd)
        return out, None, None


def _check_count(name: str, n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return int(n)
