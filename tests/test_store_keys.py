"""Payload keys a filter can name, exact integer comparisons, and snapshots whose collection goes mid-export: real
DuckDB files, real FAISS, and a real gateway for the 422s."""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gateway_harness import Gateway

from bkg_kernel.errors import Conflict, InvalidInput, NotFound
from bkg_kernel.store import Store, snapshots
from bkg_kernel.store.filters import field_name

PLUGINS = ["sysinfo"]  # the gateway's own routes are under test; sysinfo stands for any plugin

# (the payload's key, the field name that names it): every key a payload can hold, and how a filter writes it
KEYS: list[tuple[str, str]] = [
    ("größe", "größe"),
    ("名前", "名前"),
    ("a b", "a b"),
    ('q"k', 'q"k'),
    ("sq'", "sq'"),
    ("x'); DROP TABLE collections; --", "x'); DROP TABLE collections; --"),
    ("br[0]", "br[0]"),
    ("*", "*"),
    ("@", "@"),
    ("c\nd\t\x01", "c\nd\t\x01"),
    ("nul\x00x", "nul\x00x"),
    ("t~0x", "t~0x"),
    ("s/l", "s/l"),
    ("0", "0"),
    ("-", "-"),
    ("a.b", "a\\.b"),
    ("b\\s", "b\\\\s"),
    ("$price", "\\$price"),
    ("q.$.\\", "q\\.$\\.\\\\"),
]


def _points(store: Store, name: str, payloads: list[dict[str, Any]]) -> Any:
    c = store.create_collection(name, dim=2)
    c.upsert(ids=list(range(len(payloads))), vectors=np.ones((len(payloads), 2)), payloads=payloads)
    return c


@pytest.mark.parametrize(("key", "field"), KEYS, ids=[repr(k) for k, _ in KEYS])
def test_every_key_a_payload_holds_can_be_filtered(store: Store, key: str, field: str) -> None:
    """Found by a review: a filter named only ASCII letters, digits, _ and - (a 422 for any other key), though an
    upsert stores any key; now any key is named, bound as a JSON pointer, never written into the SQL."""
    c = _points(store, "k", [{key: 1}, {key: 2}, {"meta": {key: 1}}, {"other": 1}, {key: "1"}])
    assert c.count({field: 1}) == 1
    assert [p.id for p in c.scroll({field: {"$gte": 1}})] == [0, 1]
    assert c.count({f"meta.{field}": 1}) == 1
    assert sorted(c.query([1, 1], k=10, filter={field: {"$in": [2, "1"]}}).ids) == [1, 4]
    assert c.count({field: {"$ne": 1}}) == 4
    assert c.count_distinct(field) == 3 and c.count_distinct(f"meta.{field}") == 1
    assert c.delete(filter={field: 2}) == 1 and c.count() == 4
    assert store.list_collections().names == ["k"]  # the catalog is whole


def test_field_name_writes_a_key_as_a_filter_names_it() -> None:
    """`field_name` (what brainml.train names its label field by) escapes a key as this table writes it."""
    assert [field_name(key) for key, _ in KEYS] == [field for _, field in KEYS]


def test_a_dotted_name_is_a_path_and_an_escaped_dot_is_a_key(store: Store) -> None:
    c = _points(store, "dots", [{"a": {"b": 1}}, {"a.b": 1}, {"a": {"b.c": 1}}, {"tags": ["x", "y"]}])
    assert [p.id for p in c.scroll({"a.b": 1})] == [0]
    assert [p.id for p in c.scroll({"a\\.b": 1})] == [1]
    assert [p.id for p in c.scroll({"a.b\\.c": 1})] == [2]
    assert [p.id for p in c.scroll({"tags.1": "y"})] == [3]  # digits pick a list's element, as in MongoDB


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("", "it is empty"),
        ("a..b", "empty key"),
        (".a", "empty key"),
        ("a.", "empty key"),
        ("a\\b", "a backslash escapes only"),
        ("a\\", "a backslash escapes only"),
        ("x.\ud800", "lone surrogate"),
    ],
)
def test_a_name_that_names_no_key_is_a_422_saying_why(store: Store, name: str, words: str) -> None:
    c = _points(store, "bad", [{"a": 1}])
    for call, field in (
        (lambda: c.count({name: 1}), f"filter.{name}"),
        (lambda: c.count({"$or": [{"a": 1}, {"x": {"$gt": 0}, name: {"$in": [1]}}]}), f"filter.$or[1].{name}"),
        (lambda: c.count_distinct(name), "field"),
    ):
        with pytest.raises(InvalidInput) as err:
            call()
        assert err.value.field == field and words in err.value.message and "bad field name" in err.value.message


def test_a_name_that_starts_with_a_dollar_is_an_operator(store: Store) -> None:
    c = _points(store, "dollar", [{"$x": 1}])
    with pytest.raises(InvalidInput, match="unknown logical operator") as err:
        c.count({"$x": 1})
    assert err.value.field == "filter.$x" and "\\$" in err.value.message
    with pytest.raises(InvalidInput, match="starts with \\$") as err:
        c.count_distinct("$x")
    assert err.value.field == "field"
    with pytest.raises(InvalidInput) as err:
        c.count_distinct(5)  # type: ignore[arg-type]
    assert err.value.field == "field" and "string" in err.value.message
    assert c.count({"\\$x": 1}) == 1 and c.count_distinct("\\$x") == 1


def test_non_ascii_keys_over_http(gw: Gateway) -> None:
    """The 422 the issue showed: a filter on a key the same gateway had just stored."""
    c = gw.client()
    assert c.post("/api/collections", json={"name": "keys", "dim": 2}).status_code == 201
    points = [
        {"id": 1, "vector": [1, 0], "payload": {"größe": 3, "名前": "x", "meta": {"ñ": True}}},
        {"id": 2, "vector": [0, 1], "payload": {"größe": 4, "名前": "y", "it's": 1}},
    ]
    assert c.put("/api/collections/keys/points", json={"points": points}).status_code == 200
    for flt, want in (({"größe": 3}, 1), ({"名前": {"$in": ["x", "y"]}}, 2), ({"meta.ñ": True}, 1), ({"it's": 1}, 1)):
        r = c.post("/api/collections/keys/points/count", json={"filter": flt})
        assert r.status_code == 200 and r.json()["count"] == want, r.text
    r = c.post("/api/collections/keys/query", json={"vector": [1, 0], "k": 5, "filter": {"größe": {"$gt": 3}}})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [2], r.text
    r = c.post("/api/collections/keys/points/count", json={"filter": {"größe..x": 3}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "filter.größe..x" and "empty key" in error["message"]


# -- numbers ---------------------------------------------------------------------------------------
BIG = 2**53
STORED: list[Any] = [
    BIG - 1, BIG, BIG + 1, BIG + 2, 2**63 - 1, -(2**63), -(2**63) + 1, 2**64 - 1, 2**64 - 2,
    float(BIG), float(BIG + 2), 1.5, 1, 1.0, -0.0, 0, 2, "9007199254740993", True, None, [BIG + 1],
]  # fmt: skip
PROBES: list[Any] = [
    BIG, BIG + 1, BIG - 1, BIG + 2, BIG + 3, float(BIG), 2**63 - 1, -(2**63), 2**64 - 1, 2**64 - 2, 2**64,
    2**100, -(2**100), 1, 1.0, 1.5, 0, 2.0, 10**40,
]  # fmt: skip
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "$eq": operator.eq,
    "$ne": operator.ne,
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _same(stored: Any, probe: Any) -> bool:
    """Equal as a filter means: numbers by value, anything else of the same JSON type only."""
    if _number(stored) or _number(probe):
        return _number(stored) and _number(probe) and stored == probe
    return type(stored) is type(probe) and stored == probe


def _each(v: Any) -> list[Any]:
    """A stored value as a filter's scalar operand sees it: an array as its elements."""
    return v if isinstance(v, list) else [v]


def _oracle(op: str, probe: Any) -> list[int]:
    """What Python says: numbers by their exact values, an array's elements each; anything else a number never
    matches ($ne: always)."""
    if op == "$ne":
        return [i for i, v in enumerate(STORED) if not any(_same(e, probe) for e in _each(v))]
    return [i for i, v in enumerate(STORED) if any(_number(e) and _OPS[op](e, probe) for e in _each(v))]


@pytest.fixture
def numbers(store: Store) -> Any:
    return _points(store, "numbers", [{"n": v} for v in STORED])


@pytest.mark.parametrize("op", list(_OPS))
def test_numbers_compare_by_their_exact_values(numbers: Any, op: str) -> None:
    """Found by a review: numbers compared as doubles, so a stored 2**53 + 1 matched a filter of 2**53 (and
    `$gt 2**53` missed it); now an integer compares exactly with a stored integer or double, as Python compares."""
    for probe in PROBES:
        want = _oracle(op, probe)
        assert sorted(p.id for p in numbers.scroll({"n": {op: probe}}, limit=100)) == want, (op, probe)
        assert numbers.count({"n": {op: probe}}) == len(want), (op, probe)


def test_in_lists_of_integers_compare_exactly(numbers: Any) -> None:
    for probes in ([BIG], [BIG + 1, 1.5], [2**64 - 1, -(2**63), "9007199254740993", True], [1, float(BIG + 2)]):
        want = [i for i, v in enumerate(STORED) if any(_same(e, p) for e in _each(v) for p in probes)]
        assert sorted(p.id for p in numbers.scroll({"n": {"$in": probes}}, limit=100)) == want, probes
        rest = sorted(set(range(len(STORED))) - set(want))
        assert sorted(p.id for p in numbers.scroll({"n": {"$nin": probes}}, limit=100)) == rest, probes
    assert numbers.count({"n": BIG + 1}) == 2  # the number and [BIG + 1], never the string "9007199254740993"
    assert numbers.count({"n": "9007199254740993"}) == 1


def test_contains_finds_a_number_in_a_list_as_eq_matches_it(store: Store) -> None:
    """Found by a review: `$contains` looked for the JSON number as written, so [1.0] did not contain 1, nor [1]
    1.0, where `$eq` matches 1 and 1.0 alike."""
    lists = [[1.0, 2], [1], [2**53 + 1], [float(2**53)], ["1"], [True], [1.5]]
    c = _points(store, "lists", [{"tags": v} for v in lists])
    lists += [[-0.0], [0], [float(2**200)]]
    c = _points(store, "lists2", [{"tags": v} for v in lists])
    cases = [(1, [0, 1]), (1.0, [0, 1]), (2**53, [3]), (2**53 + 1, [2]), (1.5, [6]), (True, [5]), (0, [7, 8]),
             (-0.0, [7, 8]), (2**200, [9])]  # fmt: skip
    for probe, want in cases:
        assert sorted(p.id for p in c.scroll({"tags": {"$contains": probe}}, limit=100)) == want, probe
        assert c.count({"tags": {"$eq": probe}}) == len(want)  # an array matches by its elements
    with pytest.raises(InvalidInput) as err:  # past any double: a 422 as with $eq, not an OverflowError
        c.count({"tags": {"$contains": 10**400}})
    assert err.value.field == "filter.tags.$contains"


def test_integers_past_a_double_are_counted_apart(store: Store) -> None:
    values = [BIG, BIG + 1, float(BIG), 1, 1.0, -0.0, 0, 1.5, "1", 2**64 - 1, 2**64 - 2]
    c = _points(store, "distinct", [{"n": v} for v in values])
    assert c.count_distinct("n") == 8  # 2**53 (and 2.0**53), 2**53 + 1, 1 (1.0), 0 (-0.0), 1.5, "1", 2**64 - 1, - 2


def test_numbers_over_http_keep_their_precision(gw: Gateway) -> None:
    c = gw.client()
    assert c.post("/api/collections", json={"name": "ids", "dim": 2}).status_code == 201
    points = [{"id": i, "vector": [1, 0], "payload": {"n": BIG + i}} for i in range(4)]
    assert c.put("/api/collections/ids/points", json={"points": points}).status_code == 200
    for flt, want in (
        ({"n": BIG + 1}, [1]),
        ({"n": {"$gt": BIG}}, [1, 2, 3]),
        ({"n": {"$lte": BIG + 2, "$gte": BIG + 1}}, [1, 2]),
        ({"n": {"$in": [BIG, BIG + 3]}}, [0, 3]),
    ):
        r = c.post("/api/collections/ids/points/scroll", json={"filter": flt})
        assert r.status_code == 200 and [p["id"] for p in r.json()["points"]] == want, (flt, r.text)


# -- snapshots -------------------------------------------------------------------------------------
def _during_export(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> None:
    """Run `action` once, after a snapshot's rows are exported and before its archive is named (the first part's
    hashing: the store's lock is not held then)."""
    real, done = snapshots._sha256, []

    def hashing(path: Path) -> str:
        if not done:
            done.append(True)
            action()
        return real(path)

    monkeypatch.setattr(snapshots, "_sha256", hashing)


def _filled(store: Store, name: str, n: int = 50) -> Any:
    c = store.create_collection(name, dim=4)
    rng = np.random.default_rng(len(name))
    c.upsert(ids=list(range(n)), vectors=rng.random((n, 4)), payloads=[{"i": i} for i in range(n)])
    return c


def _work_folders(store: Store) -> list[Path]:
    return list(store.snapshot_dir.glob("*/.tmp-*"))


def test_a_snapshot_of_a_collection_dropped_meanwhile_is_not_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: the export runs outside the store's lock, and one whose collection was dropped meanwhile
    still wrote its archive, listed under the name as if taken before the drop."""
    _filled(store, "docs")
    _filled(store, "other", 30)
    earlier = store.snapshot("docs").id
    other = store.snapshot("other").id
    _during_export(monkeypatch, lambda: store.drop_collection("docs"))
    with pytest.raises(NotFound, match="dropped while its snapshot was written"):
        store.snapshot("docs")
    assert [s.id for s in store.list_snapshots("docs")] == [earlier]  # the one from before the drop stays
    assert _work_folders(store) == []
    assert "docs" not in store
    assert store.collection("other").count() == 30 and [s.id for s in store.list_snapshots("other")] == [other]
    assert store.restore_snapshot("docs", earlier).count() == 50


def test_a_first_snapshot_of_a_collection_dropped_meanwhile_leaves_nothing(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    _filled(store, "docs")
    _during_export(monkeypatch, lambda: store.drop_collection("docs"))
    with pytest.raises(NotFound, match="no snapshot was kept"):
        store.snapshot("docs")
    assert list(store.snapshot_dir.iterdir()) == []
    assert len(store.list_snapshots()) == 0


def test_a_snapshot_is_not_filed_under_a_new_collection_of_the_name(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dropped and made again while the old one's rows were exported: the old rows must not become a snapshot of
    the new collection (its restore would have replaced the new collection with the dropped one)."""
    _filled(store, "docs")

    def drop_and_remake() -> None:
        store.drop_collection("docs")
        _filled(store, "docs", 7)

    _during_export(monkeypatch, drop_and_remake)
    with pytest.raises(Conflict, match="dropped or replaced"):
        store.snapshot("docs")
    assert len(store.list_snapshots("docs")) == 0 and _work_folders(store) == []
    monkeypatch.undo()
    snap = store.snapshot("docs")
    assert snap.points == 7 and [s.id for s in store.list_snapshots("docs")] == [snap.id]


def test_a_snapshot_of_a_collection_restored_over_meanwhile_is_not_kept(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = _filled(store, "docs")
    first = store.snapshot("docs").id
    c.upsert(ids=[100], vectors=np.ones((1, 4)))
    _during_export(monkeypatch, lambda: store.restore_snapshot("docs", first))
    with pytest.raises(Conflict, match="no snapshot was kept"):
        store.snapshot("docs")
    assert [s.id for s in store.list_snapshots("docs")] == [first] and store.collection("docs").count() == 50
