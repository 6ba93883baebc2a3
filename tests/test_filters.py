"""Every filter operator, checked against a Python oracle over a real DuckDB collection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store import Store

DOCS: list[dict[str, Any] | None] = [
    {
        "lang": "en",
        "year": 2021,
        "tags": ["ml", "nlp"],
        "title": "Deep learning for text",
        "ok": True,
        "meta": {"src": "arxiv"},
    },
    {
        "lang": "de",
        "year": 2019,
        "tags": ["cv"],
        "title": "Bilder erkennen",
        "ok": False,
        "meta": {"src": "blog"},
    },
    {"lang": "en", "year": 2023, "tags": ["cv", "ml"], "title": "Vision transformers", "ok": True},
    {"lang": "fr", "year": 2020.5, "tags": [], "title": "Apprentissage", "n": None},
    {"lang": "en", "year": "2022", "title": "year stored as a string"},
    None,
]


@pytest.fixture
def coll(store: Store) -> Any:
    c = store.create_collection("f", dim=2)
    c.upsert(ids=list(range(len(DOCS))), vectors=np.ones((len(DOCS), 2)), payloads=DOCS)
    return c


CASES: list[tuple[dict[str, Any], list[int]]] = [
    ({"lang": "en"}, [0, 2, 4]),
    ({"lang": {"$eq": "de"}}, [1]),
    ({"year": 2021}, [0]),
    ({"year": {"$eq": 2022}}, []),  # the string "2022" is not the number 2022
    ({"year": {"$eq": "2022"}}, [4]),
    ({"ok": True}, [0, 2]),
    ({"ok": {"$eq": False}}, [1]),
    ({"n": None}, [0, 1, 2, 3, 4, 5]),  # missing or null
    ({"lang": {"$ne": "en"}}, [1, 3, 5]),  # $ne also matches a missing field
    ({"year": {"$gt": 2020}}, [0, 2, 3]),
    ({"year": {"$gte": 2021}}, [0, 2]),
    ({"year": {"$lt": 2020.5}}, [1]),
    ({"year": {"$lte": 2020.5}}, [1, 3]),
    ({"year": {"$gte": 2019, "$lt": 2022}}, [0, 1, 3]),
    ({"title": {"$gte": "V"}}, [2, 4]),  # strings compare as strings
    ({"lang": {"$in": ["de", "fr"]}}, [1, 3]),
    ({"lang": {"$in": []}}, []),
    ({"year": {"$in": [2019, 2023]}}, [1, 2]),
    ({"lang": {"$nin": ["en"]}}, [1, 3, 5]),
    ({"tags": {"$contains": "ml"}}, [0, 2]),
    ({"title": {"$contains": "trans"}}, [2]),
    ({"meta.src": "arxiv"}, [0]),
    ({"lang": "en", "year": {"$gte": 2020}}, [0, 2]),
    ({"$and": [{"lang": "en"}, {"tags": {"$contains": "cv"}}]}, [2]),
    ({"$or": [{"lang": "de"}, {"year": {"$gt": 2022}}]}, [1, 2]),
    ({"$or": [{"lang": "fr"}, {"$and": [{"lang": "en"}, {"ok": True}]}]}, [0, 2, 3]),
]


@pytest.mark.parametrize(("flt", "expected"), CASES, ids=[str(c[0]) for c in CASES])
def test_operator(coll: Any, flt: dict[str, Any], expected: list[int]) -> None:
    assert coll.count(flt) == len(expected)
    hits = coll.query([1, 1], k=10, filter=flt)
    assert sorted(hits.ids) == expected


def test_every_operator_is_covered() -> None:
    from bkg_kernel.store.filters import OPERATORS

    used = {op for flt, _ in CASES for op in _ops(flt)}
    assert set(OPERATORS) <= used


def _ops(node: Any) -> set[str]:
    if isinstance(node, dict):
        return {k for k in node if k.startswith("$")} | {o for v in node.values() for o in _ops(v)}
    if isinstance(node, list):
        return {o for v in node for o in _ops(v)}
    return set()


@pytest.mark.parametrize(
    ("flt", "field", "words"),
    [
        ({"year": {"$regex": "x"}}, "filter.year.$regex", "unknown operator '$regex'"),
        ({"$nor": []}, "filter.$nor", "unknown logical operator"),
        ({"$or": []}, "filter.$or", "non-empty list"),
        ({"$and": {"a": 1}}, "filter.$and", "non-empty list"),
        ({"year": {"$gt": [1]}}, "filter.year.$gt", "numbers or strings"),
        ({"lang": {"$in": "en"}}, "filter.lang.$in", "list of values"),
        ({"tags": {"$contains": ["a"]}}, "filter.tags.$contains", "string, number or boolean"),
        ({"bad..name'": 1}, "filter.bad..name'", "bad field name"),  # any key may be named, but not an empty one
        ({"lang": {"x": 1}}, "filter.lang", "operators"),
        ({"lang": [1, {"a": 1}]}, "filter.lang[1]", "can only compare"),  # a list is an operand, an object in it not
    ],
)
def test_bad_filter(coll: Any, flt: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as err:
        coll.query([1, 1], k=3, filter=flt)
    assert err.value.field == field
    assert words in err.value.message


def test_filter_must_be_object(coll: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        coll.count(["lang"])  # type: ignore[arg-type]
    assert err.value.field == "filter"


MIXED: list[Any] = ["abc", [1], {"a": 1}, 10**20, "true", 5, True, 2.5, None]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"n": {"$ne": 5}}, [0, 1, 2, 3, 4, 6, 7, 8, 9]),
        ({"n": {"$ne": True}}, [0, 1, 2, 3, 4, 5, 7, 8, 9]),
        ({"n": {"$ne": 1.5}}, list(range(10))),
        ({"n": {"$nin": [5]}}, [0, 1, 2, 3, 4, 6, 7, 8, 9]),
        ({"n": {"$nin": [True]}}, [0, 1, 2, 3, 4, 5, 7, 8, 9]),
        ({"n": {"$in": [5, "abc"]}}, [0, 5]),
        ({"n": {"$in": [5, True]}}, [5, 6]),
        ({"n": {"$gt": 3}}, [3, 5]),
    ],
    ids=str,
)
def test_a_field_of_mixed_types_never_fails_a_filter(store: Store, flt: dict[str, Any], expected: list[int]) -> None:
    """Found by a review: `$ne`, `$nin` and an `$in` of two types were a 500 (a cast error) as soon as one point
    held a string, a list, an object or a huge integer in that field: one upsert broke a filter that worked."""
    c = store.create_collection("mixed", dim=2)
    payloads = [{"n": v} for v in MIXED] + [{}]  # and one without the field
    c.upsert(ids=list(range(len(payloads))), vectors=np.ones((len(payloads), 2)), payloads=payloads)
    assert sorted(p.id for p in c.scroll(flt, limit=100)) == expected
    assert c.count(flt) == len(expected)
    assert sorted(c.query([1, 1], k=100, filter=flt).ids) == expected
