"""Real text for byte-level language modelling: a Wikipedia sample that ships inside a PyPI wheel.

The corpus is the English Wikipedia excerpt in gensim's test data
(``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
a 1.7 MB bz2 of a 2017 dump: the first pages of enwiki, some articles shortened). It is in the
gensim wheel, so ``pip install gensim`` (or this project's ``text`` extra) is the whole download;
nothing is fetched at run time. Wikipedia's text is licensed CC BY-SA (see docs/results-text.md).
gensim itself is never imported (it would need scipy): only its folder is located.

The pipeline, each step a function here:

1. ``find_wiki_sample``  locate the file (or take a path), with a clear error when it is missing;
2. ``read_articles``     parse the XML dump: main-namespace pages only, redirects dropped;
3. ``strip_wiki_markup`` turn wikitext into plain text (templates, tables, references, links,
                         emphasis, headings, HTML);
4. ``split_articles``    a deterministic split by article: article i (in dump order) goes to
                         test when i % 10 == 9, to validation when i % 10 == 8, else to train;
5. ``ByteTokenizer``     bytes of UTF-8 -> token ids (0 PAD, 1 BOS, byte b -> b + 2);
6. ``random_windows`` / ``eval_windows``  (B, N) model inputs and next-byte targets.

A window is ``[BOS, b_0, ..., b_{N-2}]`` with targets ``[b_0, ..., b_{N-1}]``: every position is
scored, so the mean cross-entropy over a window divided by ln 2 is its bits per byte.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
PAD, BOS = 0, 1            # token ids; byte b is token b + 2
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET
SPLITS = ("train", "valid", "test")


class CorpusNotFound(FileNotFoundError):
    """The text corpus is not installed (or a given path does not exist)."""


# ----------------------------------------------------------------------------------------------
# 1. Where the corpus is


def find_wiki_sample(path=None) -> Path:
    """The Wikipedia sample: ``path`` if given (it must exist), else the file in the installed
    gensim package.

    Raises
    ------
    CorpusNotFound (a FileNotFoundError) saying what to install or which path is wrong.
    """
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CorpusNotFound(f"text corpus {str(p)!r} does not exist or is not a file")
        return p
    spec = importlib.util.find_spec("gensim")      # locates the package without importing it
    if spec is None or spec.origin is None:
        raise CorpusNotFound("the Wikipedia sample ships in the gensim wheel, which is not "
                             "installed: pip install '.[text]' (or pip install gensim), or pass "
                             "the path of a MediaWiki XML dump (.xml or .xml.bz2)")
    p = Path(spec.origin).parent / "test" / "test_data" / WIKI_SAMPLE
    if not p.is_file():
        raise CorpusNotFound(f"gensim is installed but its test data has no {WIKI_SAMPLE} "
                             "(a build without test data?): pass the path of a MediaWiki XML dump")
    return p


# ----------------------------------------------------------------------------------------------
# 2. Articles of a MediaWiki XML dump


def read_articles(path) -> List[Tuple[str, str]]:
    """(title, wikitext) of every main-namespace page that is not a redirect, in dump order.

    ``path`` is a ``.xml`` or ``.xml.bz2`` MediaWiki export. Raises ValueError when the file is
    not such an XML document or holds no article.
    """
    p = Path(path)
    opener = bz2.open if p.suffix == ".bz2" else open
    articles = []
    try:
        with opener(p, "rb") as f:
            for _, elem in ET.iterparse(f, events=("end",)):
                if _local(elem.tag) != "page":
                    continue
                fields = {_local(c.tag): c for c in elem.iter()}
                ns = fields.get("ns")
                text = fields.get("text")
                if (ns is not None and (ns.text or "").strip() == "0" and "redirect" not in fields
                        and text is not None and text.text):
                    articles.append(((fields["title"].text or "").strip(), text.text))
                elem.clear()                       # keep memory flat on a large dump
    except (ET.ParseError, OSError, EOFError) as e:
        raise ValueError(f"{str(p)!r} is not a readable MediaWiki XML dump: {e}") from None
    if not articles:
        raise ValueError(f"{str(p)!r} holds no article (main-namespace page that is not a "
                         "redirect)")
    return articles


def _local(tag: str) -> str:
    """'{http://www.mediawiki.org/xml/export-0.10/}page' -> 'page'."""
    return tag.rsplit("}", 1)[-1]


# ----------------------------------------------------------------------------------------------
# 3. Wikitext -> plain text

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_DROP_ELEMENTS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|pre)\b[^>]*>"
                            r".*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):", re.I)
_LINK = re.compile(r"\[\[([^\[\]|]*)(?:\|([^\[\]]*))?\]\]")
_EXT_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"\b(?:https?|ftp)://\S+")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_INTERWIKI = re.compile(r"^\[\[[a-z\-]{2,12}:[^\]]*\]\]\s*$", re.M)
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span, e.g. templates ``{{...}}``."""
    out, depth, i = [], 0, 0
    n_open, n_close = len(open_), len(close)
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += n_open
        elif depth and text.startswith(close, i):
            depth -= 1
            i += n_close
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def _drop_file_links(text: str) -> str:
    """Remove ``[[File:...]]``, ``[[Image:...]]``, ``[[Category:...]]`` with nested links."""
    while True:
        m = _FILE_LINK.search(text)
        if m is None:
            return text
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text.startswith("[[", i):
                depth, i = depth + 1, i + 2
            elif text.startswith("]]", i):
                depth, i = depth - 1, i + 2
            else:
                i += 1
        text = text[:m.start()] + text[i:]


def strip_wiki_markup(wikitext: str) -> str:
    """Plain text of an article: templates, tables, references, comments, images, categories
    and HTML removed; links replaced by their label; emphasis and list marks dropped; headings
    kept as their own line; runs of blank lines folded to one. Entities (``&amp;``, ``&nbsp;``)
    are decoded. Deterministic: the same wikitext always gives the same text."""
    t = html.unescape(wikitext)                     # the dump escapes < > & inside <text>
    t = _COMMENT.sub("", t)
    t = _REF.sub("", t)
    t = _DROP_ELEMENTS.sub("", t)
    t = _drop_nested(t, "{{", "}}")                 # templates (infoboxes, citations, ...)
    t = _drop_nested(t, "{|", "|}")                 # tables
    t = _drop_file_links(t)
    t = _INTERWIKI.sub("", t)
    for _ in range(2):                              # a label may itself hold a link
        t = _LINK.sub(lambda m: m.group(2) if m.group(2) is not None else m.group(1), t)
    t = _EXT_LINK.sub(r"\1", t)
    t = _BARE_URL.sub("", t)
    t = _TAG.sub("", t)
    t = html.unescape(t)                            # entities that were double-escaped
    t = _HEADING.sub(r"\1", t)
    t = _EMPHASIS.sub("", t)
    t = _LIST_MARK.sub("", t)
    t = t.replace("\u00a0", " ")
    t = _SPACES.sub(" ", t)
    t = "\n".join(line.strip() for line in t.split("\n"))
    t = _BLANKS.sub("\n\n", t)
    return t.strip()


# ----------------------------------------------------------------------------------------------
# 4. The split


@dataclass(frozen=True)
class TextCorpus:
    """Plain text of the three splits as UTF-8 bytes, and the titles in each."""

    train: bytes
    valid: bytes
    test: bytes
    titles: Dict[str, Tuple[str, ...]]
    source: str                                    # file name of the dump

    def split(self, name: str) -> bytes:
        """The bytes of split ``name`` ('train', 'valid' or 'test')."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {name!r}")
        return getattr(self, name)

    def summary(self) -> Dict[str, object]:
        """Sizes of the splits (JSON-able), for logs and checkpoints."""
        return {"source": self.source,
                **{f"{s}_bytes": len(self.split(s)) for s in SPLITS},
                **{f"{s}_articles": len(self.titles[s]) for s in SPLITS}}


ARTICLE_SEPARATOR = "\n\n"
MIN_ARTICLE_CHARS = 200        # stubs shorter than this (after stripping) are left out


def split_articles(articles: Sequence[Tuple[str, str]], source: str = "") -> TextCorpus:
    """Strip every article and split whole articles by their position: counting the articles
    kept after stripping (stubs under ``MIN_ARTICLE_CHARS`` are left out), article i goes to
    test when i % 10 == 9, to valid when i % 10 == 8, else to train. For a given dump this is
    one fixed assignment, and no text of a held-out article is ever trained on."""
    parts: Dict[str, List[str]] = {s: [] for s in SPLITS}
    titles: Dict[str, List[str]] = {s: [] for s in SPLITS}
    kept = 0
    for title, wikitext in articles:
        text = strip_wiki_markup(wikitext)
        if len(text) < MIN_ARTICLE_CHARS:
            continue
        split = "test" if kept % 10 == 9 else "valid" if kept % 10 == 8 else "train"
        parts[split].append(f"{title}\n\n{text}")
        titles[split].append(title)
        kept += 1
    if not parts["test"] or not parts["valid"]:
        raise ValueError(f"the corpus has {kept} articles of at least {MIN_ARTICLE_CHARS} "
                         "characters: too few for a train/valid/test split (need >= 10)")
    return TextCorpus(**{s: ARTICLE_SEPARATOR.join(parts[s]).encode("utf-8") for s in SPLITS},
                      titles={s: tuple(titles[s]) for s in SPLITS}, source=source)


_CORPUS_CACHE: Dict[str, TextCorpus] = {}


def load_corpus(path=None) -> TextCorpus:
    """The split corpus from ``path`` (default: the Wikipedia sample in gensim). Parsed once per
    process and path."""
    p = find_wiki_sample(path)
    key = str(p.resolve())
    if key not in _CORPUS_CACHE:
        _CORPUS_CACHE[key] = split_articles(read_articles(p), source=p.name)
    return _CORPUS_CACHE[key]


# ----------------------------------------------------------------------------------------------
# 5-6. Bytes -> tokens -> windows


class ByteTokenizer:
    """UTF-8 bytes <-> token ids: 0 is PAD, 1 is BOS, byte b is b + 2 (vocabulary 258)."""

    vocab_size = VOCAB_SIZE
    pad, bos = PAD, BOS

    @staticmethod
    def encode(data: bytes) -> np.ndarray:
        """bytes -> (len,) int64 token ids."""
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET

    @staticmethod
    def decode(ids) -> bytes:
        """Token ids -> bytes (PAD and BOS are dropped)."""
        ids = np.asarray(ids, dtype=np.int64).ravel()
        ids = ids[ids >= BYTE_OFFSET]
        if (ids >= VOCAB_SIZE).any():
            raise ValueError(f"token ids must be < {VOCAB_SIZE}")
        return (ids - BYTE_OFFSET).astype(np.uint8).tobytes()


def _check_window(data: bytes, context: int) -> np.ndarray:
    if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or context < 2:
        raise ValueError(f"context must be an int >= 2, got {context!r}")
    ids = ByteTokenizer.encode(data)
    if len(ids) < context:
        raise ValueError(f"the text has {len(ids)} bytes, fewer than one window of {context}")
    return ids


def _windows_at(ids: np.ndarray, starts: np.ndarray, context: int) -> Tuple[np.ndarray, np.ndarray]:
    offsets = starts[:, None] + np.arange(context)                         # (B, N)
    targets = ids[offsets]                                                 # (B, N) b_0 .. b_{N-1}
    tokens = np.empty_like(targets)                                        # (B, N)
    tokens[:, 0] = BOS
    tokens[:, 1:] = targets[:, :-1]                                        # BOS, b_0 .. b_{N-2}
    return tokens, targets


def random_windows(data: bytes, batch_size: int, context: int, rng: np.random.Generator
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """A training batch: ``batch_size`` windows at uniform random offsets of ``data``.

    Returns tokens (B, N) starting with BOS and targets (B, N), the next byte at every position.
    """
    ids = _check_window(data, context)
    starts = rng.integers(0, len(ids) - context + 1, size=batch_size)      # (B,)
    return _windows_at(ids, starts, context)


def eval_windows(data: bytes, context: int, max_windows: Optional[int] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Non-overlapping windows covering ``data`` from its start (the tail shorter than a window
    is left out), the first ``max_windows`` of them when given. Deterministic.

    Returns tokens (W, N), targets (W, N).
    """
    ids = _check_window(data, context)
    count = len(ids) // context
    if max_windows is not None:
        if isinstance(max_windows, bool) or not isinstance(max_windows, (int, np.integer)) \
                or max_windows < 1:
            raise ValueError(f"max_windows must be an int >= 1, got {max_windows!r}")
        count = min(count, int(max_windows))
    return _windows_at(ids, np.arange(count) * context, context)
