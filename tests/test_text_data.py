"""The real-text pipeline (``selattn_lm.text``): markup stripping, parsing a MediaWiki dump,
the deterministic split by article, byte tokens and windows, and clear errors for bad paths.

Most tests run on a small dump the test writes itself; ``test_the_wikipedia_sample`` runs on the
sample in the gensim wheel (installed by the ``test`` extra) and pins its split's sizes, so any
change to the stripping or the split rule shows up there.
"""

from __future__ import annotations

import bz2
import importlib.util

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from selattn_lm import text
from selattn_lm.text import (
    BOS,
    ByteTokenizer,
    CorpusNotFound,
    eval_windows,
    find_wiki_sample,
    load_corpus,
    random_windows,
    read_articles,
    split_articles,
    strip_wiki_markup,
)

HEADER = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n'
          '<siteinfo><sitename>Test</sitename></siteinfo>\n')


def page(title: str, body: str, ns: int = 0, redirect: bool = False) -> str:
    body = body.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    red = f'<redirect title="{title} (other)" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}<revision><id>2</id>"
            f'<text xml:space="preserve">{body}</text></revision></page>\n')


def article_body(i: int) -> str:
    sentence = f"Article {i} is about the number {i} and what [[Mathematics|mathematicians]] say. "
    return "{{Infobox|x=1}}\n'''Article " + str(i) + "''' " + sentence * 6


def write_dump(path, n_articles: int = 23, compress: bool = False):
    pages = [page(f"Title {i}", article_body(i)) for i in range(n_articles)]
    pages.insert(3, page("Redirected", "#REDIRECT [[Title 1]]", redirect=True))
    pages.insert(5, page("Talk:Title 2", "talk page " * 40, ns=1))
    pages.insert(7, page("Stub", "too short"))
    data = (HEADER + "".join(pages) + "</mediawiki>\n").encode("utf-8")
    path.write_bytes(bz2.compress(data) if compress else data)
    return path


# ----------------------------------------------------------------------------------------------
# Markup


@pytest.mark.parametrize("wikitext, plain", [
    ("'''Bold''' and ''italic''", "Bold and italic"),
    ("see [[Paris]] and [[France|the country]]", "see Paris and the country"),
    ("a{{cite|x={{nested|y}}}}b", "ab"),
    ("x<ref name=a>{{cite web|url=u}}</ref>y<ref name=b/>z", "xyz"),
    ("before\n{| class=wikitable\n|-\n| cell\n|}\nafter", "before\n\nafter"),
    ("== History ==\ntext", "History\ntext"),
    ("[[File:a.png|thumb|a [[link]] inside]]kept", "kept"),
    ("[[Category:Things]]", ""),
    ("[http://example.org the site] and http://bare.example", "the site and"),
    ("a &amp;lt;b&amp;gt; <!-- hidden --> c&amp;nbsp;d", "a <b> c d"),
    ("* one\n* two\n# three", "one\ntwo\nthree"),
    ("p<math>x^2</math>q", "pq"),
    ("many\n\n\n\n\nblanks", "many\n\nblanks"),
])
def test_strip_wiki_markup(wikitext, plain):
    assert strip_wiki_markup(wikitext) == plain


def test_strip_wiki_markup_is_idempotent_on_plain_text():
    plain = "Plain text, with commas; and numbers 1, 2 and 3.\n\nA second paragraph."
    assert strip_wiki_markup(plain) == plain


# ----------------------------------------------------------------------------------------------
# Parsing and the split


@pytest.mark.parametrize("compress", [False, True])
def test_read_articles_keeps_main_namespace_pages_without_redirects(tmp_path, compress):
    dump = write_dump(tmp_path / ("d.xml.bz2" if compress else "d.xml"), compress=compress)
    articles = read_articles(dump)
    titles = [t for t, _ in articles]
    assert titles == [f"Title {i}" for i in range(5)] + ["Stub"] + \
        [f"Title {i}" for i in range(5, 23)]
    assert articles[0][1].startswith("{{Infobox")          # raw wikitext, entities decoded


def test_split_is_deterministic_and_by_article(tmp_path):
    dump = write_dump(tmp_path / "d.xml")
    a = split_articles(read_articles(dump), source="d.xml")
    b = split_articles(read_articles(dump), source="d.xml")
    assert a == b
    # the stub is dropped, so the 23 real articles are counted 0..22 in dump order
    assert a.titles["test"] == ("Title 9", "Title 19")
    assert a.titles["valid"] == ("Title 8", "Title 18")
    assert len(a.titles["train"]) == 19
    everything = sum((a.titles[s] for s in text.SPLITS), ())
    assert sorted(everything) == sorted(f"Title {i}" for i in range(23))   # each exactly once
    assert b"Title 9\n\nArticle 9 Article 9 is about the number 9" in a.test
    assert b"Article 9 " not in a.train and b"Article 9 " not in a.valid
    assert b"{{" not in a.train and b"[[" not in a.train
    assert a.summary()["test_articles"] == 2 and a.summary()["test_bytes"] == len(a.test)


def test_too_few_articles_for_a_split(tmp_path):
    dump = write_dump(tmp_path / "d.xml", n_articles=8)
    with pytest.raises(ValueError, match="too few"):
        split_articles(read_articles(dump))


def test_bad_paths_and_files_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.xml.bz2"
    with pytest.raises(CorpusNotFound, match="nope.xml.bz2"):
        load_corpus(missing)
    with pytest.raises(FileNotFoundError):                  # CorpusNotFound is one
        find_wiki_sample(tmp_path)                          # a folder is not a dump
    garbage = tmp_path / "garbage.xml"
    garbage.write_text("this is not xml <<<")
    with pytest.raises(ValueError, match="not a readable MediaWiki XML dump"):
        load_corpus(garbage)
    bad_bz2 = tmp_path / "bad.xml.bz2"
    bad_bz2.write_bytes(b"not bzip2 at all")
    with pytest.raises(ValueError, match="not a readable"):
        read_articles(bad_bz2)
    empty = tmp_path / "empty.xml"
    empty.write_text(HEADER + page("Talk:x", "y" * 300, ns=1) + "</mediawiki>")
    with pytest.raises(ValueError, match="holds no article"):
        read_articles(empty)


def test_missing_gensim_says_what_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusNotFound, match=r"pip install '\.\[text\]'"):
        find_wiki_sample()


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None,
                    reason="gensim (the text extra, part of the test extra) is not installed")
def test_the_wikipedia_sample():
    corpus = load_corpus()
    assert corpus.source == text.WIKI_SAMPLE
    # The sizes of this pipeline's split of the sample: a change to the stripping or the split
    # rule changes them (and then docs/results-text.md must be regenerated).
    assert corpus.summary() == {
        "source": text.WIKI_SAMPLE,
        "train_bytes": 2301087, "valid_bytes": 376382, "test_bytes": 231224,
        "train_articles": 86, "valid_articles": 10, "test_articles": 10}
    assert corpus.test.startswith(b"Academy Award for Best Production Design\n\n")
    for marker in (b"{{", b"}}", b"[[", b"]]", b"<ref", b"&amp;", b"'''"):
        for split in text.SPLITS:
            assert corpus.split(split).count(marker) <= 2, (marker, split)
    corpus.train.decode("utf-8")                           # whole UTF-8 characters only
    assert load_corpus() is corpus                         # parsed once per process


# ----------------------------------------------------------------------------------------------
# Tokens and windows


@given(st.binary(max_size=200))
def test_byte_tokens_round_trip(data):
    ids = ByteTokenizer.encode(data)
    assert ids.dtype == np.int64 and len(ids) == len(data)
    assert ((ids >= 2) & (ids < ByteTokenizer.vocab_size)).all()
    assert ByteTokenizer.decode(ids) == data
    assert ByteTokenizer.decode(np.concatenate([[BOS], ids, [0]])) == data   # BOS, PAD dropped


@given(st.integers(2, 40), st.integers(1, 9), st.integers(0, 2**31))
def test_random_windows_are_shifted_targets(context, batch, seed):
    data = bytes(range(256)) * 2
    tokens, targets = random_windows(data, batch, context, np.random.default_rng(seed))
    assert tokens.shape == targets.shape == (batch, context)
    assert (tokens[:, 0] == BOS).all()
    assert (tokens[:, 1:] == targets[:, :-1]).all()
    # every target row is a run of consecutive bytes of the text
    starts = targets[:, 0] - 2
    expected = (starts[:, None] + np.arange(context)) % 256 + 2
    assert (targets == expected).all()
    again, _ = random_windows(data, batch, context, np.random.default_rng(seed))
    assert (again == tokens).all()


def test_eval_windows_cover_the_text_without_overlap():
    data = bytes(range(100))
    tokens, targets = eval_windows(data, 16)
    assert targets.shape == (6, 16)                        # 100 // 16, the tail left out
    assert ByteTokenizer.decode(targets) == data[:96]
    assert (tokens[:, 0] == BOS).all()
    assert eval_windows(data, 16, max_windows=2)[1].shape == (2, 16)


@pytest.mark.parametrize("call, message", [
    (lambda: eval_windows(b"abc", 8), "fewer than one window"),
    (lambda: eval_windows(b"abcdef", 1), "context must be an int >= 2"),
    (lambda: eval_windows(b"abcdef", 2, max_windows=0), "max_windows"),
    (lambda: random_windows(b"ab", 1, 4, np.random.default_rng(0)), "fewer than one window"),
])
def test_window_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_split_name_is_checked(tmp_path):
    corpus = split_articles(read_articles(write_dump(tmp_path / "d.xml")))
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.split("validation")
