"""selattn_c.hf: selective attention in Hugging Face transformers models (CPU).

Optional: ``pip install '.[hf]'`` (torch and a pinned transformers; docs/torch.md says which
versions). Importing this module registers the attention function under the name
``"selective"`` with transformers' ``AttentionInterface``, so that

    model = AutoModelForCausalLM.from_config(config, attn_implementation="selective")

runs every self-attention layer of a decoder (Llama and GPT-2 families, tested) through
``selattn_c.torch.selective_attention`` (training and a plain forward), and

    model.generate(input_ids, cache=SelectiveCache(model.config, budgets=[8, 4]))

decodes through one pruned KV cache per layer (``selattn_c.KVCache``: it holds at most that
layer's budget of tokens, evicting the one with the largest accumulated mask F).

Options, read from the model's config (any config takes extra attributes):
``selattn_selector_head`` (default 0: the query head whose logits build F),
``selattn_protect_bos`` (default True) and ``selattn_selective`` (default True; False gives
standard causal attention, what "sdpa" computes: a baseline through the same code). The logit
scale is the model's (``scaling``).

What it refuses, with a ``ValueError`` saying why:

- padding (an attention mask with a zero): the kernels have no key-padding mask; batch
  sequences of equal length. (Checked in eager mode; a compiled graph does not read the mask.)
- attention dropout > 0 (set ``attn_pdrop`` / ``attention_dropout`` to 0 in the config),
  non-causal attention (encoders, cross-attention).
- decoding (queries after the first forward) with any cache but ``SelectiveCache``: selective
  attention needs the selector's earlier queries, which a plain KV cache does not keep.
- beam search (``reorder_cache``) and cache cropping (assisted decoding).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function

from selattn_reference.validation import check_budget
from .torch import TorchKVCache, selective_attention

__all__ = ["ATTENTION_NAME", "SelectiveCache", "SelectiveCacheLayer", "register",
           "selective_attention_forward", "selective_mask"]

ATTENTION_NAME = "selective"
_LAYER_TAG = "_selattn_cache_layer"   # set on the key tensor a SelectiveCacheLayer returns


def _options(config) -> Tuple[int, bool, bool]:
    """(selector_head, protect_bos, selective) from a model config (defaults 0, True, True)."""
    return (getattr(config, "selattn_selector_head", 0),
            getattr(config, "selattn_protect_bos", True),
            getattr(config, "selattn_selective", True))


def _check_no_padding(attention_mask: Optional[torch.Tensor]) -> None:
    if attention_mask is None or torch.compiler.is_compiling():
        return
    if attention_mask.dim() == 2:          # (B, seen + new) 1 = token, 0 = padding
        padded = not bool(attention_mask.bool().all())
    elif attention_mask.dtype == torch.bool:   # a prepared 4-D mask: only the causal one is
        N, S = attention_mask.shape[-2:]       # what selective attention computes anyway
        causal = torch.ones(N, S, dtype=torch.bool).tril(S - N)
        padded = not bool((attention_mask == causal).all())
    else:
        padded = True
    if padded:
        raise ValueError("selective attention takes no padding or custom attention mask (the "
                         "kernels have none): batch sequences of equal length, without padding")


def selective_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                   kv_offset: int = 0, mask_function=causal_mask_function,
                   attention_mask: Optional[torch.Tensor] = None, **kwargs) -> None:
    """The mask function transformers calls for ``attn_implementation="selective"``: there is no
    mask to build (the kernels are causal), so it returns None, after refusing what the kernels
    cannot honour: padding in ``attention_mask`` (B, kv_length), and any mask but the causal one
    (sliding windows, packed sequences, bidirectional blocks: ``mask_function`` other than
    transformers' ``causal_mask_function``)."""
    if mask_function is not causal_mask_function:
        raise ValueError("selective attention computes the causal mask only: sliding windows, "
                         "packed sequences and other mask functions are not supported")
    _check_no_padding(attention_mask)
    return None


def selective_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                dropout: float = 0.0, scaling: Optional[float] = None,
                                is_causal: Optional[bool] = None, **kwargs
                                ) -> Tuple[torch.Tensor, None]:
    """The attention function transformers calls for ``attn_implementation="selective"``.

    Parameters
    ----------
    module : the attention layer (its ``config`` gives the options, its ``is_causal`` must be
        True)
    query : (B, H, N, D); key : (B, H_kv, S, D); value : (B, H_kv, S, Dv), H_kv dividing H. S = N
        (a forward over the whole sequence), or key and value came from a ``SelectiveCache``
        (then they are the N new tokens, and the cache holds the earlier ones)
    attention_mask : None, or a mask without padding
    dropout : 0.0 only
    scaling : float or None, the logit scale (default ``1/sqrt(D)``)

    Returns
    -------
    out : (B, N, H, Dv), and None (no attention weights)
    """
    if is_causal is False or not getattr(module, "is_causal", True):
        raise ValueError("selective attention is causal: it cannot serve a non-causal layer "
                         "(an encoder or cross-attention); keep another attn_implementation")
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not implemented by selective "
                         "attention: set the config's attention dropout (attn_pdrop, "
                         "attention_dropout) to 0.0")
    _check_no_padding(attention_mask)
    selector_head, protect_bos, selective = _options(getattr(module, "config", None))
    layer = getattr(key, _LAYER_TAG, None)
    if layer is not None:                                                  # decoding
        out = layer.attend(query, key, value, scale=scaling, selector_head=selector_head,
                           protect_bos=protect_bos, selective=selective)  # (B, H, N, Dv)
    else:
        if key.shape[-2] != query.shape[-2]:
            raise ValueError(f"{query.shape[-2]} queries over {key.shape[-2]} keys: decoding "
                             "with selective attention needs its pruned KV cache, which keeps "
                             "the selector's state; pass cache=selattn_c.hf.SelectiveCache("
                             "model.config, budgets) to generate() or forward()")
        out = selective_attention(query, key, value, scale=scaling,
                                  enable_gqa=key.shape[-3] != query.shape[-3],
                                  selector_head=selector_head, protect_bos=protect_bos,
                                  selective=selective)
    return out.transpose(1, 2).contiguous(), None                          # (B, N, H, Dv)


def register(name: str = ATTENTION_NAME) -> None:
    """Register ``selective_attention_forward`` with transformers' ``AttentionInterface``, and
    ``selective_mask`` with its ``AttentionMaskInterface``, as ``name`` (done on import with
    "selective"; registering again replaces them)."""
    AttentionInterface.register(name, selective_attention_forward)
    AttentionMaskInterface.register(name, selective_mask)


register()


# ----------------------------------------------------------------------------------------------
# The pruned KV cache for generate()


class SelectiveCacheLayer(CacheLayerMixin):
    """One layer's pruned KV cache for transformers (a ``TorchKVCache``, made on first use).

    ``update`` keeps nothing itself: it returns the new keys and values marked as this layer's,
    and the attention function hands them, with the queries, to ``attend``, which attends from
    them and keeps them (``selattn_c.KVCache`` needs the queries: the selector's logits decide
    what is evicted). With H_kv < H key/value heads, the cache holds them repeated to H heads.

    Parameters
    ----------
    budget : int or None, most tokens held (None: no limit)
    evict_threshold : float or None, as in ``selattn_c.KVCache``
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, budget: Optional[int] = None, *,
                 evict_threshold: Optional[float] = None):
        super().__init__()
        self.budget = budget
        self.evict_threshold = evict_threshold
        self.cache: Optional[TorchKVCache] = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The new keys (B, H_kv, N, D) and values, marked for ``attend``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        key_states = key_states.view_as(key_states)        # a new tensor object to mark
        setattr(key_states, _LAYER_TAG, self)
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: Optional[float], selector_head: int, protect_bos: bool,
               selective: bool = True) -> torch.Tensor:
        """Attend from the N new tokens and keep them: query (B, H, N, D), key and value
        (B, H_kv, N, D) -> out (B, H, N, D). Inference only (no backward)."""
        B, H, N, D = query.shape
        if value.shape[-1] != D:
            raise ValueError(f"SelectiveCache needs value's width ({value.shape[-1]}) equal to "
                             f"the head dim ({D})")
        if key.shape[-3] != H:                            # grouped-query: repeat to H heads
            key = key.repeat_interleave(H // key.shape[-3], dim=1)
            value = value.repeat_interleave(H // value.shape[-3], dim=1)
        if self.cache is None:
            self.cache = TorchKVCache(B, H, D, self.budget, selector_head=selector_head,
                                      protect_bos=protect_bos, selective=selective, scale=scale,
                                      evict_threshold=self.evict_threshold)
        elif self.cache.cache.B != B:
            raise ValueError(f"batch of {B} sequences, but this cache holds {self.cache.cache.B}: "
                             "use one SelectiveCache per generate() call")
        with torch.no_grad():
            return self.cache(query, key, value)

    def get_seq_length(self) -> int:
        """Tokens seen (the next token's position), not tokens held."""
        return 0 if self.cache is None else self.cache.length

    def get_mask_sizes(self, query_length: int) -> Tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def held(self) -> torch.Tensor:
        """(B,) int64: tokens held (at most the budget)."""
        return torch.zeros(0, dtype=torch.int64) if self.cache is None else self.cache.size

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.close()
        self.cache = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise ValueError("SelectiveCache does not support beam search (num_beams > 1): use greedy "
                         "or sampled decoding")

    def __repr__(self) -> str:
        return f"SelectiveCacheLayer(budget={self.budget}, cache={self.cache!r})"


class SelectiveCache(Cache):
    """Pruned KV caches, one ``SelectiveCacheLayer`` per decoder layer, for ``model.generate``
    (``cache=SelectiveCache(model.config, budgets)``) or a forward with ``use_cache``.

    Parameters
    ----------
    config : the model's config (its ``num_hidden_layers``)
    budgets : int, None, or one int-or-None per layer: the most tokens each layer holds
        (None: no limit; with BOS protection at least 2)
    evict_threshold : float or None, as in ``selattn_c.KVCache``
    """

    def __init__(self, config, budgets: Union[None, int, Sequence[Optional[int]]] = None, *,
                 evict_threshold: Optional[float] = None):
        n_layers = getattr(config, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError("config must be a transformers config with num_hidden_layers >= 1")
        _, protect_bos, _ = _options(config)
        if budgets is None or isinstance(budgets, int):
            budgets = [budgets] * n_layers
        budgets = list(budgets)
        if len(budgets) != n_layers:
            raise ValueError(f"budgets: {len(budgets)} given for {n_layers} layers")
        budgets = [check_budget(b, bool(protect_bos)) for b in budgets]
        super().__init__(layers=[SelectiveCacheLayer(b, evict_threshold=evict_threshold)
                                 for b in budgets])

    @property
    def budgets(self) -> List[Optional[int]]:
        """Each layer's budget."""
        return [layer.budget for layer in self.layers]

    @property
    def nbytes(self) -> int:
        """Bytes of every buffer the layers' caches hold."""
        return sum(layer.cache.nbytes for layer in self.layers if layer.cache is not None)
