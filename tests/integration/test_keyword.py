"""The copy's keyword ranking (processors/keyword.py) against LanceDB's own full-text index, built as the sink
builds it (``FTS()``, infra/lance_store.py ensure_text_index) on a table of one scope: the same tokens (stop words,
stemming, folding, long tokens, apostrophes) and, the statistics then being the same, the same BM25 scores.

LanceDB on local disk only: no broker or Redis."""

from __future__ import annotations

import re
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
import Stemmer
from lancedb.index import FTS

from processors.keyword import STOP_WORDS, KeywordIndex, terms

TEXTS = [
    "The runners were Running quickly!",
    "snake_case and kebab-case, 2024",
    "Café in Zürich, Straße",
    "this is it",  # no term at all: counted in neither N nor the mean length
    "x" * 39 + " " + "y" * 40,
    "apple pie with apples",
    "apple",
    "generously given generous gifts",
    "Dee lives in Porto",
    "Porto wine and port",
    "ŁÓDŹ and æon ølø",
    "she isn't here, they're there; o'neil",
    "running man ran only once, very early, doing nothing",
]
QUERIES = [
    *(
        [
            "run",
            "runner",
            "cafe",
            "café",
            "strasse",
            "straße",
            "snake",
            "case",
            "2024",
            "apple",
            "x39",
            "y40",
            "generous",
            "generosity",
            "porto",
            "port",
            "lodz",
        ]
    ),
    *(
        [
            "aeon",
            "olo",
            "isn",
            "t",
            "they",
            "re",
            "o",
            "neil",
            "only",
            "onli",
            "once",
            "very",
            "veri",
            "early",
            "doing",
            "nothing",
        ]
    ),
    "apples pie",
    "ran man",
    "Porto wine",
]


async def lancedb_scores(tmp_path: Path, texts: list[str], queries: list[str]) -> list[dict[int, float]]:
    db = await lancedb.connect_async(str(tmp_path))
    table = await db.create_table("t", pa.table({"id": list(range(len(texts))), "text": texts}))
    await table.create_index("text", config=FTS())
    out = []
    for query in queries:
        got = await table.query().nearest_to_text(query).limit(len(texts)).select(["id", "_score"]).to_arrow()
        out.append(dict(zip(got.column("id").to_pylist(), got.column("_score").to_pylist(), strict=True)))
    return out


def expanded(query: str) -> str:
    return {"x39": "x" * 39, "y40": "y" * 40}.get(query, query)


async def test_the_copys_bm25_is_lancedbs_on_a_table_of_one_scope(tmp_path: Path) -> None:
    queries = [expanded(q) for q in QUERIES]
    index = KeywordIndex.build(TEXTS)
    for query, lance in zip(queries, await lancedb_scores(tmp_path, TEXTS, queries), strict=True):
        ours = {row: score for row, score in enumerate(index.scores(query).tolist()) if score > 0}
        assert set(ours) == set(lance), (query, terms(query), ours, lance)
        assert ours == pytest.approx(lance, rel=1e-5), query  # LanceDB scores in float32


async def test_the_stop_words_are_lancedbs(tmp_path: Path) -> None:
    """Every stop word and its stem, one text each: LanceDB finds a text by its word exactly where ``terms`` keeps
    the word (lance drops a token whose stem is a stop word: "doing" goes, "very", stemmed "veri", stays)."""
    stemmer = Stemmer.Stemmer("english")
    words = sorted(STOP_WORDS | {stemmer.stemWord(w) for w in STOP_WORDS} | {"apple", "running", "only", "onli"})
    assert all(re.fullmatch(r"[a-z]+", w) for w in words)
    found = await lancedb_scores(tmp_path, [f"{w} zzqq" for w in words], words)
    assert {w for w, hits in zip(words, found, strict=True) if hits} == {w for w in words if terms(w)}
