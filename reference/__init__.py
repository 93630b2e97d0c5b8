"""selattn_reference: the NumPy executable spec of selective attention.

See ``selattn_reference.attention`` for the layer and ``docs/selective-attention.md`` for the
line-by-line explanation. ``selattn_reference.model`` is a tiny selective-attention language model
built on it (forward and backward by hand), ``selattn_reference.optim`` its AdamW and
``selattn_reference.checkpoint`` its ``.npz`` checkpoints.
"""

from . import checkpoint, model, optim
from .cache import KVCache
from .attention import (
    Cache,
    accumulated_mask,
    backward,
    eviction_mask,
    forward,
    memory_loss,
    memory_loss_backward,
    rank_penalty,
    rank_penalty_backward,
)

__all__ = [
    "Cache",
    "KVCache",
    "accumulated_mask",
    "backward",
    "eviction_mask",
    "forward",
    "memory_loss",
    "memory_loss_backward",
    "rank_penalty",
    "rank_penalty_backward",
    "checkpoint",
    "model",
    "optim",
]
__version__ = "0.1.0"
