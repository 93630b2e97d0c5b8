"""selattn_lm: the tiny selective-attention language model and everything around it.

``model`` (forward and backward by hand, on the spec ``selattn_reference``), ``backends``
(``NumpyAttention``, ``CAttention`` on the C kernels of ``selattn_c``, ``make_attention``),
``optim`` (AdamW), ``checkpoint`` (.npz checkpoints), ``tasks`` (the variable-assignment task's
data), ``text`` (the text pipeline), ``corpora`` (one module per text corpus), the training tasks
``task_assign`` / ``task_text`` (by name in ``task_registry``), ``training`` (the one training
loop) with ``run_state`` (resumable runs), ``stop_signals``, ``output_files``, ``progress`` and
``threads``,
``runner`` (token-by-token inference with per-layer KV caches), ``calibrate`` (greedy
per-layer budgets), ``demo``, ``mask_plot``, ``text_results``, ``torch_model`` (the LM in
PyTorch) and ``cli`` (the ``selattn`` command); ``data/`` holds the trained checkpoints.
"""
