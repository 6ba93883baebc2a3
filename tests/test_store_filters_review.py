"""Payload filters as a review found them against a real gateway: equality that ignored array elements (and
`$ne`/`$nin` that kept a point whose array held the value), date ranges compared as plain strings, no way into
arrays of objects (`arr[].k`), and no `$exists` / `$size` / `$not` / `{"f": []}`. A real DuckDB store, and a real
gateway for the REST routes."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gateway_harness import Gateway

from bkg_kernel.errors import InvalidInput
from bkg_kernel.store import Store
from bkg_kernel.store.filters import field_name

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin (none means all)
BIG = 2**53


def _points(store: Store, name: str, payloads: list[dict[str, Any]]) -> Any:
    c = store.create_collection(name, dim=2)
    c.upsert(ids=list(range(len(payloads))), vectors=np.ones((len(payloads), 2)), payloads=payloads)
    return c


def _ids(c: Any, flt: dict[str, Any]) -> list[int]:
    """The points a filter matches, as scroll finds them; count and a filtered query agree."""
    found = sorted(p.id for p in c.scroll(flt, limit=1000))
    assert c.count(flt) == len(found), flt
    assert sorted(c.query([1, 1], k=1000, filter=flt).ids) == found, flt
    return found


TAGS: list[dict[str, Any]] = [{"tags": ["a", "b"]}, {"tags": ["c"]}, {"tags": "a"}, {"n": 5}, {"tags": []}]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"tags": "a"}, [0, 2]),
        ({"tags": {"$eq": "c"}}, [1]),
        ({"tags": {"$in": ["a", "c"]}}, [0, 1, 2]),
        ({"tags": {"$ne": "a"}}, [1, 3, 4]),  # the array holding "a" is excluded, a missing field included
        ({"tags": {"$nin": ["a"]}}, [1, 3, 4]),
        ({"tags": {"$nin": ["a", "c"]}}, [3, 4]),
        ({"$or": [{"n": 5}, {"tags": "c"}]}, [1, 3]),
        ({"tags": {"$gt": "b"}}, [1]),  # ranges look at the elements too, as in MongoDB and Qdrant
        ({"tags": {"$in": ["a"] + [f"z{i}" for i in range(100)]}}, [0, 2]),  # a long list: looked up by a hash join
        ({"tags": {"$nin": ["a"] + [f"z{i}" for i in range(100)]}}, [1, 3, 4]),
    ],
    ids=str,
)
def test_equality_and_in_match_an_array_by_its_elements(store: Store, flt: dict[str, Any], expected: list[int]) -> None:
    c = _points(store, "tags", TAGS)
    assert _ids(c, flt) == expected


def test_a_delete_by_filter_removes_the_array_point(store: Store) -> None:
    c = _points(store, "del", TAGS)
    assert c.delete(filter={"tags": "a"}) == 2
    assert _ids(c, {}) == [1, 3, 4]
    c = _points(store, "del2", TAGS)
    assert c.delete(filter={"tags": {"$ne": "a"}}) == 3  # what holds "a", in an array or not, stays
    assert _ids(c, {}) == [0, 2]
    c = _points(store, "del3", TAGS)
    assert c.delete(filter={"tags": {"$in": ["c", "zz"]}}) == 1
    assert _ids(c, {"tags": {"$exists": True}}) == [0, 2, 4]


def test_array_elements_keep_the_type_and_exact_number_rules(store: Store) -> None:
    c = _points(store, "elements", [{"n": [1, "x"]}, {"n": ["1"]}, {"n": [BIG + 1]}, {"n": [1.0]}, {"n": [True]},
                                    {"n": [[1]]}, {"n": [1.5, 7]}])  # fmt: skip
    assert _ids(c, {"n": 1}) == [0, 3]  # 1 and 1.0, never "1", true or [1]
    assert _ids(c, {"n": "1"}) == [1]
    assert _ids(c, {"n": True}) == [4]
    assert _ids(c, {"n": BIG}) == []  # 2**53 + 1 is not 2**53
    assert _ids(c, {"n": BIG + 1}) == [2]
    assert _ids(c, {"n": {"$in": [BIG + 1, 7]}}) == [2, 6]
    assert _ids(c, {"n": {"$gt": BIG}}) == [2]
    assert _ids(c, {"n": {"$gt": 1, "$lt": 2}}) == [6]  # 1.5
    assert _ids(c, {"n": {"$ne": 1}}) == [1, 2, 4, 5, 6]


def test_an_array_operand_matches_an_equal_array(store: Store) -> None:
    stored: list[Any] = [["a", "b"], ["b", "a"], ["a", "b", "c"], [["a", "b"]], [], [1, None], "a"]
    c = _points(store, "arrays", [*({"tags": v} for v in stored), {}])
    assert _ids(c, {"tags": ["a", "b"]}) == [0]  # in order, as long, and never an element that is the list
    assert _ids(c, {"tags": []}) == [4]
    assert _ids(c, {"tags": {"$eq": [1.0, None]}}) == [5]
    assert _ids(c, {"tags": [["a", "b"]]}) == [3]
    assert _ids(c, {"tags": {"$in": [[], ["b", "a"], "c"]}}) == [1, 2, 4]  # "c": an element of [a, b, c]
    assert _ids(c, {"tags": {"$ne": []}}) == [0, 1, 2, 3, 5, 6, 7]
    with pytest.raises(InvalidInput) as err:
        c.count({"tags": ["a", {"b": 1}]})
    assert err.value.field == "filter.tags[1]" and "can only compare" in err.value.message


DATES: list[dict[str, Any]] = [
    {"d": "2024-01-01T00:30:00+01:00"},  # 2023-12-31T23:30Z: the day before
    {"d": "2024-01-01 00:10:00"},  # no offset: UTC
    {"d": "2024-01-01T00:10:00.5Z"},
    {"d": "2024-01-01"},  # a date alone: its midnight UTC
    {"d": "not a date"},
    {"d": 20240101},
    {"d": "2024-01-01t00:20:00z"},
    {"d": ["2023-06-01T00:00:00Z", "2025-06-01T00:00:00Z"]},
]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"d": {"$gte": "2024-01-01T00:00:00Z"}}, [1, 2, 3, 6, 7]),
        ({"d": {"$lt": "2024-01-01T00:00:00Z"}}, [0, 7]),
        ({"d": {"$lt": "2024-01-01T00:10:00Z"}}, [0, 3, 7]),  # 00:10:00 is not before 00:10:00Z
        ({"d": {"$gt": "2024-01-01T00:10:00Z"}}, [2, 6, 7]),  # 00:10:00.5 is after it
        ({"d": {"$lte": "2024-01-01T01:10:00+01:00"}}, [0, 1, 3, 7]),  # an offset in the operand
        ({"d": {"$gte": "2024-01-01"}}, [1, 2, 3, 6, 7]),  # a date alone: midnight UTC
        ({"d": {"$gt": "2023-12-31T23:00:00", "$lt": "2023-12-31T23:59:59.999Z"}}, [0, 7]),  # each on its own
    ],
    ids=str,
)
def test_date_ranges_compare_instants(store: Store, flt: dict[str, Any], expected: list[int]) -> None:
    c = _points(store, "dates", DATES)
    assert _ids(c, flt) == expected


def test_other_strings_and_equality_still_compare_as_strings(store: Store) -> None:
    c = _points(store, "strings", DATES)
    assert _ids(c, {"d": {"$gt": "2024-01-01T00:10:00Z", "$lt": "2024-01-01T00:15:00Z"}}) == [2, 7]
    assert _ids(c, {"d": {"$gte": "n"}}) == [4]  # a string that is no date compares as a string
    assert _ids(c, {"d": {"$eq": "2024-01-01"}}) == [3]  # equality stays a string compare
    assert _ids(c, {"d": {"$ne": "2024-01-01 00:10:00"}}) == [0, 2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("bad", ["2024-13-01T00:00:00Z", "2024-01-01T00:00", "2024-01-01T00:00:00+0100", "2024-02-30"])
def test_an_operand_that_begins_as_a_date_must_be_one(store: Store, bad: str) -> None:
    c = _points(store, "baddates", DATES)
    with pytest.raises(InvalidInput) as err:
        c.count({"d": {"$gt": bad}})
    assert err.value.field == "filter.d.$gt" and "date" in err.value.message


OBJECTS: list[dict[str, Any]] = [
    {"arr": [{"k": 1}, {"k": 2}]},
    {"arr": [{"k": [3, 4]}, {}]},
    {"arr": {"k": 2}},  # an object: no elements to go into
    {"arr": []},
    {},
    {"a": [{"b": [{"c": 1}, {"c": 2}]}, {"b": [{"c": 3}]}]},
    {"x[]": 1, "arr": [{"k": None}]},
]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"arr[].k": 2}, [0]),
        ({"arr[].k": 4}, [1]),  # the array rules for the value found
        ({"arr[].k": {"$in": [3, 1]}}, [0, 1]),
        ({"arr[].k": {"$in": [4] + list(range(100, 200))}}, [1]),  # a long list: a hash join
        ({"arr[].k": {"$ne": 2}}, [1, 2, 3, 4, 5, 6]),  # true of no element
        ({"arr[].k": {"$gt": 1}}, [0, 1]),
        ({"arr[].k": None}, [1, 2, 3, 4, 5, 6]),  # an element without k, or no element at all: missing
        ({"arr[].k": {"$exists": True}}, [0, 1, 6]),
        ({"arr[].k": {"$exists": False}}, [2, 3, 4, 5]),
        ({"arr[].k": [3, 4]}, [1]),
        ({"arr[].k": {"$size": 2}}, [1]),
        ({"arr[].k": {"$contains": 3}}, [1]),
        ({"a[].b[].c": 3}, [5]),
        ({"a[].b[].c": {"$gte": 2}}, [5]),
        ({"a[].b[].c": {"$not": {"$lt": 5}}}, [0, 1, 2, 3, 4, 6]),
        ({"x\\[]": 1}, [6]),  # the key "x[]" itself
        ({"arr[]": {"$size": 0}}, []),  # an element that is an empty list: none
    ],
    ids=str,
)
def test_brackets_go_into_an_array_of_objects(store: Store, flt: dict[str, Any], expected: list[int]) -> None:
    c = _points(store, "objects", OBJECTS)
    assert _ids(c, flt) == expected


def test_bracket_paths_in_deletes_and_names(store: Store) -> None:
    c = _points(store, "objdel", OBJECTS)
    assert _ids(c, {"arr[].k": 1}) == [0]
    assert _ids(c, {"arr.1.k": 2}) == [0]  # a key of digits still picks an element
    assert _ids(c, {"arr.k": 2}) == [2]  # without [], a path does not go into a list
    with pytest.raises(InvalidInput, match="operators"):
        c.count({"arr[]": {"k": {"$eq": 1}}})  # an object is no operand
    assert c.delete(filter={"arr[].k": {"$in": [2, 3]}}) == 2
    assert _ids(c, {}) == [2, 3, 4, 5, 6]
    assert field_name("x[]") == "x\\[]" and field_name("br[0]") == "br[0]"
    with pytest.raises(InvalidInput) as err:  # one value per point: no []
        c.count_distinct("arr[].k")
    assert err.value.field == "field" and "[]" in err.value.message
    with pytest.raises(InvalidInput, match="empty key"):
        c.count({"[]": 1})


MISSING: list[dict[str, Any]] = [{}, {"f": None}, {"f": 0}, {"f": []}, {"f": [1, 2]}, {"f": [None]}, {"f": "ab"}]


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        ({"f": None}, [0, 1, 5]),  # missing, null, or an array holding null
        ({"f": {"$exists": True}}, [1, 2, 3, 4, 5, 6]),  # null is there
        ({"f": {"$exists": False}}, [0]),
        ({"f": {"$size": 0}}, [3]),
        ({"f": {"$size": 2}}, [4]),
        ({"f": []}, [3]),
        ({"f": {"$not": {"$gt": 0}}}, [0, 1, 2, 3, 5, 6]),
        ({"f": {"$not": {"$size": 2}}}, [0, 1, 2, 3, 5, 6]),
        ({"f": {"$not": {"$exists": True}}}, [0]),
        ({"f": {"$not": {"$not": {"$eq": 0}}}}, [2]),
        ({"f": {"$not": {"$in": [1, "ab"]}}}, [0, 1, 2, 3, 5]),
        ({"f": {"$exists": True, "$ne": None}}, [2, 3, 4, 6]),
    ],
    ids=str,
)
def test_null_missing_and_empty_are_told_apart(store: Store, flt: dict[str, Any], expected: list[int]) -> None:
    c = _points(store, "missing", MISSING)
    assert _ids(c, flt) == expected


@pytest.mark.parametrize(
    ("flt", "field", "words"),
    [
        ({"f": {"$exists": 1}}, "filter.f.$exists", "true or false"),
        ({"f": {"$size": -1}}, "filter.f.$size", "whole number"),
        ({"f": {"$size": True}}, "filter.f.$size", "whole number"),
        ({"f": {"$not": 5}}, "filter.f.$not", "object of operators"),
        ({"f": {"$not": {}}}, "filter.f.$not", "object of operators"),
        ({"f": {"$not": {"x": 1}}}, "filter.f.$not", "object of operators"),
        ({"f": {"$regex": "a"}}, "filter.f.$regex", "$exists, $size, $not"),
    ],
)
def test_the_new_operators_refuse_what_they_cannot_take(store: Store, flt: Any, field: str, words: str) -> None:
    c = _points(store, "badops", MISSING)
    with pytest.raises(InvalidInput) as err:
        c.count(flt)
    assert err.value.field == field and words in err.value.message, err.value.message


def test_a_not_of_no_field_deletes_nothing_by_accident(store: Store) -> None:
    c = _points(store, "notdel", MISSING)
    with pytest.raises(InvalidInput, match="tests no field"):
        c.delete(filter={"f": {"$not": {"$in": []}}})  # matches every point
    assert c.delete(filter={"f": {"$not": {"$exists": True}}}) == 1
    assert c.count() == len(MISSING) - 1


def test_filters_over_rest(gw: Gateway) -> None:
    """The review's reproduction, through a real gateway's query, count, scroll and delete routes."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "review", "dim": 2}).status_code == 201
    payloads = [*TAGS, {"d": "2024-01-01T00:30:00+01:00"}, {"d": "2024-01-01T00:10:00.5Z"}, *OBJECTS[:2]]
    points = [{"id": i, "vector": [1, i], "payload": p} for i, p in enumerate(payloads)]
    assert c.put("/api/collections/review/points", json={"points": points}).is_success

    def query(flt: dict[str, Any]) -> list[int]:
        r = c.post("/api/collections/review/query", json={"vector": [1, 1], "k": 50, "filter": flt})
        assert r.status_code == 200, r.text
        hits = sorted(h["id"] for h in r.json()["results"])
        r = c.post("/api/collections/review/points/count", json={"filter": flt})
        assert r.status_code == 200 and r.json()["count"] == len(hits), r.text
        r = c.post("/api/collections/review/points/scroll", json={"filter": flt})
        assert r.status_code == 200 and sorted(p["id"] for p in r.json()["points"]) == hits, r.text
        return hits

    assert query({"tags": "a"}) == [0, 2]
    assert query({"tags": {"$nin": ["a"]}}) == [1, 3, 4, 5, 6, 7, 8]
    assert query({"d": {"$gte": "2024-01-01T00:00:00Z"}}) == [6]
    assert query({"arr[].k": 2}) == [7]
    assert query({"tags": []}) == [4]
    assert query({"tags": {"$exists": False}}) == [3, 5, 6, 7, 8]
    r = c.post("/api/collections/review/query", json={"vector": [1, 1], "filter": {"tags": {"$size": -1}}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "filter.tags.$size", r.text
    r = c.post("/api/collections/review/points/delete", json={"filter": {"tags": {"$in": ["a"]}}})
    assert r.status_code == 200 and r.json()["deleted"] == 2, r.text
    assert query({"tags": {"$exists": True}}) == [1, 4]
