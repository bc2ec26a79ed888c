"""BM25 over one user's memories: a hybrid search's keyword ranking from the user's hot copy, without LanceDB.

Why: a user-scoped hybrid search took its vector ranking from the hot copy (processors/hot_vectors.py) but still
asked LanceDB's full-text index per request, ~3-4 ms of serve CPU each (issue 24: 437 hybrid searches/s, p99
269 ms at 32 connections). A user holds a few dozen memories: scoring them in numpy costs tens of microseconds.

The tokenizer is the one LanceDB's ``FTS()`` index is built with here (lancedb 0.40, infra/lance_store.py
``ensure_text_index``; lance's ``InvertedIndexParams::default`` and ``build``): the ``simple`` base tokenizer
(runs of Unicode letters and digits), tokens of 40 bytes or more dropped, lowercased, Snowball English stemming,
Snowball's English stop words removed (after stemming, as lance orders its filters), then ASCII folding. The
folding is Unicode decomposition without combining marks plus the letters that do not decompose (ß, æ, ø...);
tantivy's table covers more symbols, which only a query with such symbols could notice.

Scores are BM25 as lance computes them (k1 1.2, b 0.75, idf ``ln(1 + (N - n + 0.5) / (n + 0.5))``, each distinct
query term once, a text without a term counted in neither N nor the mean length), with the statistics of the
user's own memories: N, n and the mean length are the scope's, as Elasticsearch's query_then_fetch scores each
shard with its own. LanceDB's are the whole table's (every tenant's memories, and only those folded into the index
yet). On a table of one scope the two are equal (tests/integration/test_keyword.py). The search fuses ranks, not
scores (reciprocal rank fusion), so only the order within the user matters: for a one-term query the idf is one
factor for every row and only the mean length can move a rank; scope-local statistics keep one tenant's ranking
from moving with another tenant's writes or with the sink's folding (tenants are walls) and need no table-wide
term counts kept by each reader.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import Stemmer

K1 = 1.2
B = 0.75
MAX_TOKEN_BYTES = 40  # lance's default max_token_length: tantivy's RemoveLongFilter keeps tokens shorter than it
# lance's English stop words (Snowball's list, as NLTK spells it; lance-tokenizer's StopWordFilter), less the
# entries with an apostrophe, which no token of the simple tokenizer can equal. Matched against the stemmed token:
# "doing" (stem "do") is dropped, "very" (stem "veri") is kept, as LanceDB does (tests/integration/test_keyword.py)
STOP_WORDS = frozenset(
    [
        "i",
        "me",
        "my",
        "myself",
        "we",
        "our",
        "ours",
        "ourselves",
        "you",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "her",
        "hers",
        "herself",
        "it",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "these",
        "those",
        "am",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "a",
        "an",
        "the",
        "and",
        "but",
        "if",
        "or",
        "because",
        "as",
        "until",
        "while",
        "of",
        "at",
        "by",
        "for",
        "with",
        "about",
        "against",
        "between",
        "into",
        "through",
        "during",
        "before",
        "after",
        "above",
        "below",
        "to",
        "from",
        "up",
        "down",
        "in",
        "out",
        "on",
        "off",
        "over",
        "under",
        "again",
        "further",
        "then",
        "once",
        "here",
        "there",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "no",
        "nor",
        "not",
        "only",
        "own",
        "same",
        "so",
        "than",
        "too",
        "very",
        "s",
        "t",
        "can",
        "will",
        "just",
        "don",
        "should",
        "now",
        "d",
        "ll",
        "m",
        "o",
        "re",
        "ve",
        "y",
        "ain",
        "aren",
        "couldn",
        "didn",
        "doesn",
        "hadn",
        "hasn",
        "haven",
        "isn",
        "ma",
        "mightn",
        "mustn",
        "needn",
        "shan",
        "shouldn",
        "wasn",
        "weren",
        "won",
        "wouldn",
    ]
)
_WORD = re.compile(r"[^\W_]+")  # tantivy's SimpleTokenizer: maximal runs of alphanumeric characters
# letters with no Unicode decomposition that tantivy's AsciiFoldingFilter folds
_UNDECOMPOSED = str.maketrans({"ß": "ss", "æ": "ae", "ø": "o", "œ": "oe", "đ": "d", "ł": "l", "þ": "th", "ð": "d"})
_MEMO_LIMIT = 200_000  # distinct words remembered by ``terms``; past it the memo starts over
ROW_OVERHEAD_BYTES = 120  # rough cost of one row's length and postings entries beside its terms


class _Analyzer:
    """Word -> index term (None: dropped), remembered: a user's texts and the queries repeat most words, and
    stemming a word costs a few microseconds of Python and C."""

    def __init__(self) -> None:
        self._stemmer = Stemmer.Stemmer("english")
        self._memo: dict[str, str | None] = {}

    def term(self, word: str) -> str | None:
        term = self._memo.get(word, "")
        if term != "":
            return term
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        term = self._analyzed(word)
        self._memo[word] = term
        return term

    def _analyzed(self, word: str) -> str | None:
        if len(word.encode()) >= MAX_TOKEN_BYTES:
            return None
        stemmed = self._stemmer.stemWord(word.lower())
        if not stemmed or stemmed in STOP_WORDS:
            return None
        return fold_ascii(stemmed)


_ANALYZER = _Analyzer()


def fold_ascii(term: str) -> str:
    """Accents dropped (café -> cafe) and the undecomposable letters spelt in ASCII."""
    if term.isascii():
        return term
    decomposed = unicodedata.normalize("NFKD", term.translate(_UNDECOMPOSED))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def terms(text: str) -> list[str]:
    """The index terms of a text, in order, repeats kept (a document's term frequencies come from them)."""
    out = []
    for word in _WORD.findall(text):
        term = _ANALYZER.term(word)
        if term is not None:
            out.append(term)
    return out


def idf(containing: int, docs: int) -> float:
    """lance's BM25 idf: never negative, so a term in every document still counts a little."""
    return math.log((docs - containing + 0.5) / (containing + 0.5) + 1.0)


@dataclass(frozen=True, slots=True)
class KeywordIndex:
    """Postings of one user's memories, row for row with the user's copy (row i is the copy's row i)."""

    # term -> {row: frequency}: plain dicts, arrays made for a query's few terms only (an array per term at build
    # was most of a build's ~2 ms for 50 texts; a user's first hybrid search pays the build)
    postings: dict[str, dict[int, int]]
    norms: npt.NDArray[np.float64]  # per row, BM25's length normalization k1 * (1 - b + b * len / mean len)
    docs: int  # rows with a term: lance leaves a text without one out of N and of the mean length
    nbytes: int

    @classmethod
    def build(cls, texts: Iterable[str | None]) -> KeywordIndex:
        counts: dict[str, dict[int, int]] = {}
        lengths = []
        held = 0
        for row, text in enumerate(texts):
            row_terms = terms(text or "")
            lengths.append(len(row_terms))
            held += ROW_OVERHEAD_BYTES + len(row_terms) * 16
            for term in row_terms:
                per_row = counts.setdefault(term, {})
                per_row[row] = per_row.get(row, 0) + 1
        length = np.asarray(lengths, dtype=np.float64)
        docs = int(np.count_nonzero(length))
        mean = float(length.sum()) / docs if docs else 1.0
        return cls(counts, K1 * (1.0 - B + B * length / mean), docs, held + 64 * len(counts))

    def __len__(self) -> int:
        return len(self.norms)

    def scores(self, query: str) -> npt.NDArray[np.float64]:
        """Each row's BM25 score for the query's distinct terms (0: it holds none of them)."""
        total = np.zeros(len(self.norms), dtype=np.float64)
        for term in dict.fromkeys(terms(query)):
            posting = self.postings.get(term)
            if posting is None:
                continue
            rows = np.fromiter(posting, np.intp, len(posting))
            freq = np.fromiter(posting.values(), np.float64, len(posting))
            weight = idf(len(rows), self.docs)
            total[rows] += weight * freq * (K1 + 1.0) / (freq + self.norms[rows])
        return total

    def top(self, query: str, k: int, candidates: Sequence[int] | npt.NDArray[np.intp]) -> list[tuple[int, float]]:
        """The best ``k`` of the candidate rows that hold a query term: ``(row, score)``, best first, ties by row
        (the copy's rows are in key order)."""
        cands = np.asarray(candidates, dtype=np.intp)
        if not len(cands) or k <= 0:
            return []
        scores = self.scores(query)[cands]
        matching = scores > 0
        cands, scores = cands[matching], scores[matching]
        order = np.lexsort((cands, -scores))[:k]
        return [(int(cands[i]), float(scores[i])) for i in order.tolist()]
