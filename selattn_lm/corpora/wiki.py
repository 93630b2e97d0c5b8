"""The Wikipedia sample in gensim's wheel: English prose, split by article (``selattn_lm.text``)."""

from __future__ import annotations

from ..text import load_corpus

NAME = "wiki"
DESCRIPTION = ("English Wikipedia, the 2017 sample in gensim's wheel, markup stripped, split by "
               "article (pip install '.[text]')")
LICENCE = "CC BY-SA 3.0 (Wikipedia text; older revisions also GFDL)"
fetch = None          # it comes with an extra: pip install '.[text]' (or pip install gensim)


def load(path=None):
    """The split Wikipedia sample (``selattn_lm.text.load_corpus``); ``path`` a MediaWiki XML
    dump to use instead."""
    return load_corpus(path)
