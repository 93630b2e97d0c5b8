"""The PyTorch adapter of the conformance kit: a torch function or module, as it is, seen as a
NumPy function (and a torch KV cache as a NumPy cache).

torch is imported only when an adapter is made, so the kit works without it. The adapter turns
the kit's float64 arrays into tensors of ``dtype`` on ``device``, calls the candidate, and turns
the tensor it returns back into an array; ``gradients`` runs autograd on ``sum(out * dout)``,
which is how the kit checks a differentiable implementation's backward.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional, Tuple

import numpy as np


def _torch():
    try:
        import torch
    except ImportError as exc:
        raise ImportError("the PyTorch adapter needs torch (pip install torch; on a CPU-only "
                          "machine, the CPU build)") from exc
    return torch


def is_torch_module(obj: Any) -> bool:
    """True when ``obj`` is a ``torch.nn.Module`` (without importing torch if nobody has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _resolve_dtype(torch, dtype, fn) -> Any:
    if dtype is None:
        params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
        return params[0].dtype if params else torch.float64
    names = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str) and dtype in names:
        return names[dtype]
    if dtype in names.values():
        return dtype
    raise ValueError(f"dtype must be float32 or float64 (or torch's), got {dtype!r}: the kit's "
                     "tolerances are those of float32")


def _to_array(value: Any) -> Any:
    """A returned tensor as a NumPy array; anything else is handed back for the kit to refuse."""
    torch = _torch()
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        # floating tensors as float64 (NumPy has no bfloat16); others keep their dtype, which
        # the kit then refuses
        return value.double().numpy() if value.is_floating_point() else value.numpy()
    return value


class TorchFunction:
    """A torch forward ``fn(q, k, v, **options) -> out`` (tensors) as a NumPy function.

    Parameters
    ----------
    fn : function or ``torch.nn.Module`` taking (B, H, N, D) tensors
    dtype : torch dtype or its name; default: a module's parameter dtype, else float64
    device : where the tensors go (default "cpu")
    """

    def __init__(self, fn: Callable, dtype=None, device: str = "cpu"):
        torch = _torch()
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.dtype = _resolve_dtype(torch, dtype, fn)
        self.device = torch.device(device)

    def _tensor(self, x: np.ndarray, grad: bool = False):
        torch = _torch()
        return torch.tensor(np.asarray(x), dtype=self.dtype, device=self.device,
                            requires_grad=grad)

    def __call__(self, q, k, v, **options) -> Any:
        """q, k, v : (B, H, N, D) arrays -> out (B, H, N, D) float64 array (or what fn returned,
        when that is not a tensor)."""
        torch = _torch()
        with torch.no_grad():
            out = self.fn(self._tensor(q), self._tensor(k), self._tensor(v), **options)
        return _to_array(out)

    def gradients(self, q, k, v, dout, **options) -> Tuple[Any, Any, Any]:
        """(dq, dk, dv) of ``sum(out * dout)`` by autograd, as float64 arrays.

        Raises ``ValueError`` when the output is not a tensor or does not depend on the inputs.
        """
        torch = _torch()
        tq, tk, tv = (self._tensor(x, grad=True) for x in (q, k, v))
        with torch.enable_grad():
            out = self.fn(tq, tk, tv, **options)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"returned {type(out).__name__}, expected a tensor")
            if not out.requires_grad:
                raise ValueError("the output does not require grad (computed under no_grad, "
                                 "or detached)")
            (out * self._tensor(dout)).sum().backward()
        return tuple(np.zeros(np.shape(q)) if t.grad is None else _to_array(t.grad)
                     for t in (tq, tk, tv))


class TorchCacheFactory:
    """A torch KV-cache factory ``make(batch, heads, head_dim, budget, **options)`` whose object
    has ``step(q, k, v) -> out`` on (B, H, D) tensors, as a NumPy factory."""

    def __init__(self, make: Callable, dtype=None, device: str = "cpu"):
        torch = _torch()
        if not callable(make):
            raise TypeError(f"make must be callable, got {type(make).__name__}")
        self.make = make
        self.dtype = _resolve_dtype(torch, dtype, make)
        self.device = torch.device(device)

    def __call__(self, batch: int, heads: int, head_dim: int, budget: Optional[int],
                 **options) -> Any:
        """The made cache, wrapped; as it is when it has no ``step`` (for the kit to refuse)."""
        cache = self.make(batch, heads, head_dim, budget, **options)
        return TorchCache(cache, self) if callable(getattr(cache, "step", None)) else cache


class TorchCache:
    """One cache made by a ``TorchCacheFactory``: its ``step`` takes and returns arrays."""

    def __init__(self, cache: Any, factory: TorchCacheFactory):
        self.cache = cache
        self.factory = factory

    def step(self, q, k, v) -> Any:
        """q, k, v : (B, H, D) arrays -> out (B, H, D) float64 array (or what step returned)."""
        torch = _torch()
        f = self.factory
        args = (torch.tensor(np.asarray(x), dtype=f.dtype, device=f.device) for x in (q, k, v))
        with torch.no_grad():
            out = self.cache.step(*args)
        return _to_array(out)
