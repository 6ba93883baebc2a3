"""Payload filters (`{"lang": "en", "year": {"$gte": 2020}}`) compiled to a parameterised DuckDB WHERE clause.

Semantics follow MongoDB / Qdrant where they agree:
- `{"f": v}` is `{"f": {"$eq": v}}`; several keys in one object are ANDed; `$and` / `$or` take lists of filters.
- `$eq`/`$ne` compare scalars of the same JSON type (the number 1 never equals the string "1"); `$ne`, `$nin`
  also match points where the field is missing; `{"f": None}` matches a missing or null field.
- `$gt $gte $lt $lte` compare numbers with numbers and strings with strings (ISO dates sort as strings).
- Numbers compare by their exact values, as Python compares them: 1 equals 1.0, a stored 1.5 is `$gt` 1, and
  2**53 + 1 never equals 2**53 (nor the double 2.0**53). Only a stored integer past 64 bits (DuckDB reads it as a
  double) and a filter's integer past 128 bits compare as the doubles nearest them.
- `$contains` is true when an array field holds the value, or a string field contains the string.
- Field names are dotted paths into the payload object (`"meta.source"`); any key can be named: `\\.` is a dot
  inside a key, `\\\\` a backslash, `\\$` a `$` (a name that starts with `$` is an operator); a key of digits also
  picks that element of a list. A path is bound as a parameter (a JSON pointer), never written into the SQL.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bkg_kernel.errors import InvalidInput, is_utf8

OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains")
_SQL_OP = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
# the JSON types (DuckDB's names) a value of each kind is compared with, and the SQL type both are read as
_READ = {
    "boolean": ("('BOOLEAN')", "BOOLEAN"),
    "integer": ("('BIGINT','UBIGINT')", "HUGEINT"),
    "number": ("('BIGINT','UBIGINT','DOUBLE')", "DOUBLE"),
    "string": ("('VARCHAR')", "VARCHAR"),
    "double": ("('DOUBLE')", "DOUBLE"),  # a stored double, with an integer filter value
}
_HUGEINT = 2**127  # a filter's integer within +-this is compared exactly (stored integers are 64-bit at most)
_ESCAPED = (".", "\\", "$")


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
    assert sql.count("?") == len(params), "a filter's parameters fell out of step with its SQL"
    if tests_a_field and not compiler.tests:
        raise InvalidInput("this filter tests no field: it matches every point or none; name a field "
                           "(or drop the collection to delete every point)", field="filter")  # fmt: skip
    return sql, params


def field_path(name: Any, where: str) -> str:
    """Return the JSON pointer (RFC 6901) a dotted field name addresses; a name that addresses no key is a 422."""
    if not isinstance(name, str):
        raise InvalidInput(f"bad field name: a field name is a string, got {_json_type(name)}", field=where)
    if not name:
        raise InvalidInput("bad field name '': it is empty", field=where)
    if not is_utf8(name):
        shown = name.encode("utf-8", "backslashreplace").decode()
        raise InvalidInput(f"bad field name {shown!r}: it holds a lone surrogate, not valid Unicode", field=where)
    if name.startswith("$"):
        raise InvalidInput(f"bad field name {name!r}: a name that starts with $ is an operator (write \\$ for a key "
                           "that starts with $)", field=where)  # fmt: skip
    keys = _unescaped(name, where) if "\\" in name else name.split(".")
    if "" in keys:
        raise InvalidInput(f"bad field name {name!r}: it has an empty key (a dot at its start or end, or two in a "
                           "row; write \\. for a dot inside a key)", field=where)  # fmt: skip
    return "/" + "/".join(k.replace("~", "~0").replace("/", "~1") for k in keys)


def field_name(key: str) -> str:
    """The field name that addresses the top-level payload key `key` itself (`field_path`'s escapes: a dot or a
    backslash in it, and a leading `$`)."""
    name = key.replace("\\", "\\\\").replace(".", "\\.")
    return "\\" + name if name.startswith("$") else name


def _unescaped(name: str, where: str) -> list[str]:
    """The keys of a field name that holds a backslash: `\\.`, `\\\\` and `\\$` write the character itself."""
    keys: list[str] = []
    key: list[str] = []
    chars = iter(name)
    for ch in chars:
        if ch == ".":
            keys.append("".join(key))
            key = []
            continue
        if ch == "\\":
            ch = next(chars, "")
            if ch not in _ESCAPED:
                raise InvalidInput(f"bad field name {name!r}: a backslash escapes only '.', '\\' or '$' (write \\\\ "
                                   "for a backslash in a key)", field=where)  # fmt: skip
        key.append(ch)
    keys.append("".join(key))
    return keys


MAX_DEPTH = 16  # $and / $or nesting
MAX_VALUES = 10_000  # values compared in one filter ($in lists included)
MAX_CONDITIONS = 1_000  # conditions in one filter (an $in list is one): the SQL stays small to prepare


class _Compiler:
    """Writes a filter's SQL. Every fragment binds its parameters as it is written, left to right, and fragments are
    joined in the order they were written, so the `?`s and `params` stay in step; a field's path is one of them."""

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

    def bind(self, value: Any) -> str:
        """A parameter placeholder for `value`, bound now."""
        self.params.append(value)
        return "?"

    def type_at(self, path: str) -> str:
        """The JSON type of the value at `path` (NULL when it is missing)."""
        return f"json_type({self.col}, {self.bind(path)})"

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
            elif isinstance(key, str) and key.startswith("$"):
                raise InvalidInput(
                    f"unknown logical operator {key!r} (use $and or $or, or a field name: write \\$ for a key that "
                    "starts with $)",
                    field=f"{where}.{key}",
                )
            else:
                parts.append(self.field(key, value, f"{where}.{key}"))
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

    def field(self, name: Any, cond: Any, where: str) -> str:
        path = field_path(name, where)
        if isinstance(cond, dict) and cond and all(isinstance(k, str) and k.startswith("$") for k in cond):
            return "(" + " AND ".join(self.op(path, op, v, f"{where}.{op}") for op, v in cond.items()) + ")"
        if isinstance(cond, dict):
            raise InvalidInput("a condition object must use operators like $eq or $gte", field=where)
        return self.op(path, "$eq", cond, where)

    def op(self, path: str, op: str, value: Any, where: str) -> str:
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
            return self.typed(path, kind, _SQL_OP[op], bound)
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
            needles = _json_forms(value, where)
            is_array = f"{self.type_at(path)} = 'ARRAY'"  # bound first: the SQL holds it first
            contained = " OR ".join(
                f"json_contains(json_extract({self.col}, {self.bind(path)}), CAST({self.bind(x)} AS JSON))"
                for x in needles
            )
            in_array = f"({is_array} AND ({contained}))"
            if isinstance(value, str):
                in_string = (
                    f"({self.type_at(path)} = 'VARCHAR' AND "
                    f"contains(json_extract_string({self.col}, {self.bind(path)}), {self.bind(value)}))"
                )
                return f"({in_array} OR {in_string})"
            return in_array
        raise InvalidInput(f"unknown operator {op!r} (expected one of {', '.join(OPERATORS)})", field=where)

    def any_of(self, path: str, values: list[Any], where: str) -> list[str]:
        """The tests of an $in list, one per kind of value in it: each kind's values bound as one list (however long
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
        tests += [self.typed(path, kind, "IN", bound_values) for kind, bound_values in groups.items()]
        return tests

    def eq(self, path: str, value: Any, where: str) -> str:
        if value is None:
            return self.null(path)
        kind, bound = _scalar(value, where)
        return self.typed(path, kind, "=", bound)

    def null(self, path: str) -> str:
        """A field that is null or missing."""
        return f"coalesce({self.type_at(path)} = 'NULL', TRUE)"

    def typed(self, path: str, kind: str, cmp: str, bound: Any) -> str:
        """A field of a JSON type that `kind` (as `_scalar` names it) compares with, read as `kind`'s SQL type and
        compared by `cmp` (`=`, `>`, ..., or `IN` a list) with `bound`. An integer compares exactly with a stored
        number, integer or double."""
        if kind != "integer":
            return self.compare(path, kind, cmp, bound)
        if cmp in ("=", "IN"):
            return self.equal_integer(path, cmp, bound)
        near_cmp, near = _as_double(cmp, bound)
        return f"({self.compare(path, kind, cmp, bound)} OR {self.compare(path, 'double', near_cmp, near)})"

    def equal_integer(self, path: str, cmp: str, bound: Any) -> str:
        """A stored number equal to an integer (`=`) or to one of a list (`IN`, one hash lookup however long the
        list): a stored integer read as HUGEINT, a stored double as the integer it is (one with a fraction is none)."""
        rhs = "(SELECT unnest(?::HUGEINT[]))" if cmp == "IN" else "?::HUGEINT"
        x = f"json_extract({self.col}, ?)"
        d = f"TRY_CAST({x} AS DOUBLE)"
        sql = (
            f"(CASE WHEN json_type({self.col}, ?) IN ('BIGINT','UBIGINT') THEN TRY_CAST({x} AS HUGEINT) "
            f"WHEN json_type({self.col}, ?) = 'DOUBLE' AND {d} = trunc({d}) THEN TRY_CAST({d} AS HUGEINT) END "
            f"{cmp} {rhs})"
        )
        self.params += [path] * (sql.count("?") - 1) + [bound]  # every ? but the last is the path
        return sql

    def compare(self, path: str, kind: str, cmp: str, bound: Any) -> str:
        """One JSON type test and comparison. The cast is a TRY_CAST: DuckDB may evaluate it before the type test
        in front of it (under `NOT coalesce(...)`, in an `$in` of two types), and a point holding "abc" or a list
        there must not fail the whole query."""
        types, sql_type = _READ[kind]
        typ = self.type_at(path)  # first: the parameters are bound in the order the SQL holds them
        if sql_type == "VARCHAR":
            read = f"json_extract_string({self.col}, {self.bind(path)})"
        else:
            read = f"TRY_CAST(json_extract({self.col}, {self.bind(path)}) AS {sql_type})"
        rhs = f"(SELECT unnest({self.bind(bound)}::{sql_type}[]))" if cmp == "IN" else f"{self.bind(bound)}::{sql_type}"
        return f"({typ} IN {types} AND {read} {cmp} {rhs})"


def _scalar(value: Any, where: str) -> tuple[str, Any]:
    """A compared value's kind (boolean, integer, number, string) and the value as bound: a whole number within 128
    bits as an integer (compared exactly with stored numbers), any other number as a double."""
    if isinstance(value, bool):
        return "boolean", value
    if isinstance(value, int) and -_HUGEINT <= value < _HUGEINT:
        return "integer", int(value)
    if isinstance(value, float) and value.is_integer() and -_HUGEINT <= value < _HUGEINT:
        return "integer", int(value)  # 2.0 is 2, compared exactly with a stored integer
    if _is_number(value):
        return "number", _double(value, where)
    if isinstance(value, str):
        return "string", value
    raise InvalidInput(f"can only compare with a string, number, boolean or null, got {_json_type(value)}", field=where)


def _json_forms(value: Any, where: str) -> list[str]:
    """The JSON texts `$contains` looks for in a list: a number as each JSON number `$eq` finds equal to it
    (json_contains tells 1 from 1.0 and 0 from -0.0), anything else as itself."""
    if not _is_number(value):
        return [json.dumps(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidInput(f"$contains takes a finite number, got {value}", field=where)
    if isinstance(value, float) and not value.is_integer():
        return [json.dumps(value)]
    n = int(value)
    forms = [json.dumps(n)]
    as_double = _double(n, where)  # past any double: the 422 `$eq` gives too
    if as_double == n:
        forms.append(json.dumps(as_double))
    if n == 0:
        forms.append("-0.0")
    return forms


def _as_double(cmp: str, n: int) -> tuple[str, float]:
    """How a stored double compares with the integer `n` (`cmp` one of > >= < <=), exactly: as with the double
    nearest `n`, by an operator adjusted when `n` is not one itself (no double lies between the two)."""
    near = float(n)
    if near == n:
        return cmp, near
    if cmp.startswith(">"):
        return (">=" if near > n else ">"), near
    return ("<" if near > n else "<="), near


def _double(v: int | float, where: str) -> float:
    """A filter's number as the double it is compared as (an integer past a double's range is the caller's 422)."""
    try:
        return float(v)
    except OverflowError:
        raise InvalidInput("the number is too large to compare (an integer past 128 bits is compared as a double, "
                           "up to about 1.8e308)", field=where) from None  # fmt: skip


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_scalar(v: Any) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", type(None): "null"}.get(type(v), type(v).__name__)
