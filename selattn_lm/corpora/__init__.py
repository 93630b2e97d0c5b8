"""Corpora for the byte-level language models, one module each.

Every corpus module exposes ``NAME`` (str), ``DESCRIPTION`` (one line), ``LICENCE`` (str),
``load(path=None)`` returning a ``selattn_lm.text.TextCorpus`` (cached per process), and
``fetch`` (a function that downloads what ``load`` needs, or None).
"""
