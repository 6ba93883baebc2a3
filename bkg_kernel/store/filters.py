"""Payload filters (`{"lang": "en", "year": {"$gte": 2020}}`) compiled to a parameterised DuckDB WHERE clause.

Semantics follow MongoDB / Qdrant where they agree:
- `{"f": v}` is `{"f": {"$eq": v}}`; several keys in one object are ANDed; `$and` / `$or` take lists of filters.
- `$eq`/`$ne` compare scalars of the same JSON type (the number 1 never equals the string "1"); `$ne`, `$nin`
  also match points where the field is missing; `{"f": None}` matches a missing or null field.
- `$gt $gte $lt $lte` compare numbers with numbers and strings with strings (ISO dates sort as strings).
- `$contains` is true when an array field holds the value, or a string field contains the string.
- Field names are dotted paths into the payload object (`"meta.source"`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from bkg_kernel.errors import InvalidInput

OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains")
FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*(\.[A-Za-z_][A-Za-z0-9_\-]*)*$")
_NUMERIC = "('BIGINT','UBIGINT','DOUBLE')"
_SQL_OP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def compile_filter(
    flt: dict[str, Any] | None, column: str = "payload", *, tests_a_field: bool = False
) -> tuple[str, list[Any]]:
    """Return (sql, params) for a filter; an empty or missing filter is `TRUE`. `tests_a_field`: a filter that
    tests no field at all (it matches every point, or none) is the caller's 422 (a delete's)."""
    if flt is None:
        return "TRUE", []
    params: list[Any] = []
    compiler = _Compiler(column, params)
    sql = compiler.node(flt, "filter")
    if tests_a_field and not compiler.tests:
        raise InvalidInput("this filter tests no field: it matches every point or none; name a field "
                           "(or drop the collection to delete every point)", field="filter")  # fmt: skip
    return sql, params


MAX_DEPTH = 16  # $and / $or nesting
MAX_VALUES = 10_000  # values compared in one filter ($in lists included)
MAX_CONDITIONS = 1_000  # conditions in one filter (an $in list is one): the SQL stays small to prepare


class _Compiler:
    def __init__(self, column: str, params: list[Any]) -> None:
        self.col = column
        self.params = params
        self.values = 0  # compared so far, each element of an $in list included
        self.conditions = 0
        self.tests = 0  # conditions that look at a field (not `$in: []` / `$nin: []`)

    def _count(self, values: int, where: str) -> None:
        self.values += values
        self.conditions += 1
        if self.values > MAX_VALUES:
            raise InvalidInput(f"a filter compares at most {MAX_VALUES:,} values", field=where)
        if self.conditions > MAX_CONDITIONS:
            raise InvalidInput(f"a filter holds at most {MAX_CONDITIONS:,} conditions (many values of one field "
                               "go in one $in list)", field=where)  # fmt: skip

    def node(self, flt: Any, where: str, depth: int = 0) -> str:
        if not isinstance(flt, dict):
            raise InvalidInput(f"a filter must be a JSON object, got {type(flt).__name__}", field=where)
        if depth > MAX_DEPTH:
            raise InvalidInput(f"filters nest $and / $or at most {MAX_DEPTH} deep", field=where)
        if depth and not flt:
            raise InvalidInput("an empty filter inside $and / $or matches every point: leave it out", field=where)
        parts = []
        for key, value in flt.items():
            if key in ("$and", "$or"):
                if not isinstance(value, list) or not value:
                    raise InvalidInput(f"{key} takes a non-empty list of filters", field=f"{where}.{key}")
                subs = [self.node(v, f"{where}.{key}[{i}]", depth + 1) for i, v in enumerate(value)]
                parts.append("(" + (" AND " if key == "$and" else " OR ").join(subs) + ")")
            elif key.startswith("$"):
                raise InvalidInput(
                    f"unknown logical operator {key!r} (use $and or $or, or a field name)",
                    field=f"{where}.{key}",
                )
            else:
                parts.append(self.field(key, value, f"{where}.{key}"))
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

    def field(self, name: str, cond: Any, where: str) -> str:
        if not FIELD.fullmatch(name):
            raise InvalidInput(f"bad field name {name!r} (letters, digits, _ and - joined by dots)", field=where)
        path = "'$." + name + "'"
        if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
            return "(" + " AND ".join(self.op(path, op, v, f"{where}.{op}") for op, v in cond.items()) + ")"
        if isinstance(cond, dict):
            raise InvalidInput("a condition object must use operators like $eq or $gte", field=where)
        return self.op(path, "$eq", cond, where)

    def op(self, path: str, op: str, value: Any, where: str) -> str:
        typ = f"json_type({self.col}, {path})"
        if op in ("$in", "$nin") and isinstance(value, list) and len(value) > MAX_VALUES:
            raise InvalidInput(f"{op} takes at most {MAX_VALUES:,} values, got {len(value):,}", field=where)
        self._count(len(value) if op in ("$in", "$nin") and isinstance(value, list) else 1, where)
        if not (op in ("$in", "$nin") and value == []):
            self.tests += 1
        if op == "$eq":
            return self.eq(path, value, where)
        if op == "$ne":
            return f"NOT coalesce({self.eq(path, value, where)}, FALSE)"
        if op in _SQL_OP:
            if not _is_number(value) and not isinstance(value, str):
                raise InvalidInput(f"{op} compares numbers or strings, got {_json_type(value)}", field=where)
            kind, bound = _scalar(value, where)
            self.params.append(bound)
            return self.typed(path, kind, f"{_SQL_OP[op]} ?")
        if op in ("$in", "$nin"):
            if not isinstance(value, list):
                raise InvalidInput(f"{op} takes a list of values, got {_json_type(value)}", field=where)
            if not value:
                return "FALSE" if op == "$in" else "TRUE"
            anyof = "(" + " OR ".join(self.any_of(path, value, where)) + ")"
            return anyof if op == "$in" else f"NOT coalesce({anyof}, FALSE)"
        if op == "$contains":
            if not _is_scalar(value) or value is None:
                raise InvalidInput(f"$contains takes a string, number or boolean, got {_json_type(value)}", field=where)
            self.params.append(json.dumps(value))
            in_array = f"({typ} = 'ARRAY' AND json_contains(json_extract({self.col}, {path}), CAST(? AS JSON)))"
            if isinstance(value, str):
                self.params.append(value)
                return f"({in_array} OR ({typ} = 'VARCHAR' AND contains(json_extract_string({self.col}, {path}), ?)))"
            return in_array
        raise InvalidInput(f"unknown operator {op!r} (expected one of {', '.join(OPERATORS)})", field=where)

    def any_of(self, path: str, values: list[Any], where: str) -> list[str]:
        """The tests of an $in list, one per JSON type in it: each type's values bound as one list (however long
        the list, the SQL stays this size, and DuckDB looks the field up in a hash of them)."""
        groups: dict[str, list[Any]] = {}
        null = False
        for i, v in enumerate(values):
            if v is None:
                null = True
                continue
            kind, bound = _scalar(v, f"{where}[{i}]")
            groups.setdefault(kind, []).append(bound)
        tests = [self.null(path)] if null else []
        for kind, bound_values in groups.items():
            self.params.append(bound_values)
            tests.append(self.typed(path, kind, f"IN (SELECT unnest(?::{_SQL_TYPE[kind]}[]))"))
        return tests

    def eq(self, path: str, value: Any, where: str) -> str:
        if value is None:
            return self.null(path)
        kind, bound = _scalar(value, where)
        self.params.append(bound)
        return self.typed(path, kind, "= ?")

    def null(self, path: str) -> str:
        """A field that is null or missing."""
        return f"coalesce(json_type({self.col}, {path}) = 'NULL', TRUE)"

    def typed(self, path: str, kind: str, rhs: str) -> str:
        """A field of JSON type `kind` (as `_scalar` names it), read as that type and compared by `rhs`. The cast
        is a TRY_CAST: DuckDB may evaluate it before the type test in front of it (under `NOT coalesce(...)`, in
        an `$in` of two types), and a point holding "abc" or a list there must not fail the whole query."""
        typ = f"json_type({self.col}, {path})"
        if kind == "boolean":
            return f"({typ} = 'BOOLEAN' AND TRY_CAST(json_extract({self.col}, {path}) AS BOOLEAN) {rhs})"
        if kind == "number":
            return f"({typ} IN {_NUMERIC} AND TRY_CAST(json_extract({self.col}, {path}) AS DOUBLE) {rhs})"
        return f"({typ} = 'VARCHAR' AND json_extract_string({self.col}, {path}) {rhs})"


_SQL_TYPE = {"boolean": "BOOLEAN", "number": "DOUBLE", "string": "VARCHAR"}


def _scalar(value: Any, where: str) -> tuple[str, Any]:
    """A compared value's JSON type (boolean, number, string) and the value as bound (a number as a double)."""
    if isinstance(value, bool):
        return "boolean", value
    if _is_number(value):
        return "number", _double(value, where)
    if isinstance(value, str):
        return "string", value
    raise InvalidInput(f"can only compare with a string, number, boolean or null, got {_json_type(value)}", field=where)


def _double(v: int | float, where: str) -> float:
    """A filter's number as the double it is compared as (an integer past a double's range is the caller's 422)."""
    try:
        return float(v)
    except OverflowError:
        raise InvalidInput("the number is too large to compare (numbers are compared as doubles, up to about "
                           "1.8e308)", field=where) from None  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(v), type(v).__name__)
