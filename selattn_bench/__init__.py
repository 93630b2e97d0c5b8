"""Benchmarks of selattn, one module per job, each run as ``python -m selattn_bench.<job>``:

- ``kernels``: the C forward and backward against the NumPy reference and PyTorch, the speed
  targets, ``--threads 1,2`` and ``--memory`` (``peak_memory``, ``memory_probe``),
- ``decode``: token-by-token decoding with the pruned KV cache and the budgeted prefill,
- ``model``: one training step of the tiny LM on each attention backend,
- ``torch_compare``: the PyTorch bridge against what a PyTorch user would otherwise write
  (``torch.compile``d ``flex_attention`` with F as a ``score_mod``, eager autograd, SDPA),
- the other modules of this package (their docstrings say what they time).

``common`` holds what they share. Nothing here imports NumPy at package import: the
benchmarks set the BLAS threads first."""
