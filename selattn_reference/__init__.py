"""selattn_reference: the NumPy executable spec of selective attention.

See ``selattn_reference.attention`` for the layer and ``docs/selective-attention.md`` for the
line-by-line explanation; ``cache`` is the pruned KV cache as a readable data structure,
``validation`` the input checks every implementation shares, ``explain`` the worked example
(``python -m selattn_reference explain``) and ``eviction_baselines`` the H2O and sliding-window
baselines. ``conformance`` is the conformance kit: it checks anyone's implementation against this
one and names known mistakes (``python -m selattn_reference check``, docs/conformance.md). The
tiny language model built on it is ``selattn_lm``.
"""

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
]
__version__ = "0.1.0"
