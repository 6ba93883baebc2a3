"""Payload filters (`{"lang": "en", "year": {"$gte": 2020}}`) compiled to a parameterised DuckDB WHERE clause.

Semantics follow MongoDB / Qdrant where they agree:
- `{"f": v}` is `{"f": {"$eq": v}}`; several keys in one object, and several operators on one field, are ANDed;
  `$and` / `$or` take non-empty lists of filters.
- Scalars compare only with the same JSON type: the number 1 never equals the string "1", nor true. Numbers
  compare by their exact values, as Python compares them: 1 equals 1.0, a stored 1.5 is `$gt` 1, and 2**53 + 1
  never equals 2**53 (nor the double 2.0**53). Only a stored integer past 64 bits (DuckDB reads it as a double)
  and a filter's integer past 128 bits compare as the doubles nearest them.
- Arrays: `$eq`, `$in`, `$gt $gte $lt $lte` with a scalar or null operand match a field holding an array when the
  array has an element that matches (`{"tags": "a"}` matches `["a", "b"]`), one level deep (`[["a"]]` holds no
  "a"). Each operator looks at the elements on its own: `{"$gt": 1, "$lt": 3}` matches `[0, 5]`, as in MongoDB.
  `$ne` / `$nin` are exactly `NOT $eq` / `NOT $in`: a point whose value or any element matches is excluded, and a
  point without the field is included.
- An array operand (`{"tags": ["a", "b"]}`, `{"tags": []}`, a list inside `$in`) matches a field holding an equal
  array: as long, and each element equal to the operand's by the scalar rules (a null to a null, a list to a
  list alike; an object in it is a 422). It never matches an element of the stored array (MongoDB's does).
- `{"f": None}` (a None in `$in`) matches a field that is missing or null, or an array holding a null.
  `{"f": {"$exists": true}}` matches a field that is there, null included; `false` one that is missing.
  `{"f": {"$size": n}}` matches an array of n elements. `{"f": {"$not": {...}}}` matches exactly the points the
  operator object does not (a point without the field included), as MongoDB's `$not`.
- `$gt $gte $lt $lte` compare numbers with numbers and strings with strings (by code point), except dates: an
  operand that begins with a date (`YYYY-MM-DD`, then its end, `T`, `t` or a space) must be a date or an RFC 3339
  date-time, `YYYY-MM-DD[T ]HH:MM:SS[.fraction]` with an optional `Z` or `+HH:MM` / `-HH:MM` (anything else is a
  422). It then compares instants: a stored string of that form is the instant it writes (no offset: UTC; a date
  alone: its midnight UTC; fractions to the microsecond), and a stored value of any other form or type does not
  match. `$eq`, `$ne`, `$in`, `$nin` compare date strings as strings.
- `$contains` is true when an array field holds the value (a number as any JSON number equal to it), or a string
  field contains the string.
- Field names are dotted paths into the payload object (`"meta.source"`); any key can be named: `\\.` is a dot
  inside a key, `\\\\` a backslash, `\\$` a `$` (a name that starts with `$` is an operator), `\\[` / `\\]` a
  bracket; a key of digits also picks that element of a list. `[]` ending a key (`"arr[].k"`, `"a[].b[].c"`,
  `"tags[]"`, `"m[][]"`) goes into each element of the array there (an object, a scalar or a missing value has
  none): a condition is true when it is true of the value found in any element, by the rules above (`$ne`,
  `$nin`, `$not`, `$exists: false`: of none). An element without the key counts as a missing value, and so does a
  path that reaches no element at all. A `[` or `]` anywhere else is itself (`"br[0]"`); write `"x\\[]"` for the
  key "x[]". A path is bound as a parameter (JSON pointers), never written into the SQL.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from bkg_kernel.errors import InvalidInput, is_utf8

OPERATORS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$contains")  # comparisons
FIELD_OPERATORS = ("$exists", "$size", "$not")  # what a field holds, and a negation
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
_ESCAPED = (".", "\\", "$", "[", "]")
_EACH = re.compile(r"(?:\[\])+$")  # `[]` ending a key: each element of the array there
# Dates (the same patterns in Python and in DuckDB's RE2; constants, so they are written into the SQL).
_DATE = "[0-9]{4}-[0-9]{2}-[0-9]{2}"
_TIME = "[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]+){0,1}"  # no `?` (the SQL's `?`s are its parameters)
_NAIVE = f"{_DATE}({_TIME}){{0,1}}"
_ZONED = f"{_DATE}{_TIME}([Zz]|[+-][0-9]{{2}}:[0-9]{{2}})"
_DATE_START = re.compile(f"{_DATE}([Tt ]|$)")
_NAIVE_RE, _ZONED_RE = re.compile(_NAIVE), re.compile(_ZONED)
_TOKENS = re.compile(r"(@type|@text|@|\?)")  # in `_Compiler.fill`'s templates
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
SMALL_LIST = 64  # an $in list longer than this looks in an array's elements by a hash join, not a scan per element


class _At(NamedTuple):
    """A JSON value in the SQL: `base` (the payload column, or a list's element) at the JSON pointer `pointer`."""

    base: str
    pointer: str


_Test = Callable[[_At, bool], str]  # the SQL testing one value; the flag: written inside a lambda (no subquery)


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
    """Return the JSON pointer (RFC 6901) a dotted field name addresses; a name that addresses no key, or more
    than one value (`[]`), is a 422."""
    pointers = field_pointers(name, where)
    if len(pointers) > 1:
        raise InvalidInput(f"bad field name {name!r}: `[]` (each element of a list) is for filters; this field "
                           "names one value (write \\[ for a [ in a key)", field=where)  # fmt: skip
    return pointers[0]


def field_pointers(name: Any, where: str) -> list[str]:
    """Return the JSON pointers a field name addresses: one for a plain path; for a path with `[]`s, the pointer
    to the first array, then within each element to the next array, ..., then to the value ("" for the element)."""
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
    pointers: list[str] = []
    keys: list[str] = []
    for raw, eaches in _keys(name, where):
        if raw == "":
            raise InvalidInput(f"bad field name {name!r}: it has an empty key (a dot at its start or end, two in "
                               "a row, or a [] with no key before it; write \\. for a dot inside a key)",
                               field=where)  # fmt: skip
        keys.append(raw)
        for _ in range(eaches):
            pointers.append(_pointer(keys))
            keys = []
    pointers.append(_pointer(keys))
    return pointers


def field_name(key: str) -> str:
    """The field name that addresses the top-level payload key `key` itself (`field_path`'s escapes: a dot or a
    backslash in it, a leading `$`, and a `[` of the `[]`s that end it)."""
    name = key.replace("\\", "\\\\").replace(".", "\\.")
    each = _EACH.search(name)
    if each:
        name = name[: each.start()] + each.group().replace("[", "\\[")
    return "\\" + name if name.startswith("$") else name


def _pointer(keys: list[str]) -> str:
    return "".join("/" + k.replace("~", "~0").replace("/", "~1") for k in keys)


def _keys(name: str, where: str) -> list[tuple[str, int]]:
    """The keys of a field name, each with the number of `[]`s that end it: `\\.`, `\\\\`, `\\$`, `\\[` and `\\]`
    write the character itself (an escaped `[` starts no `[]`)."""
    keys: list[tuple[str, int]] = []
    key: list[str] = []
    plain = 0  # how many characters at the end of `key` were written unescaped
    chars = iter(name)

    def end() -> None:
        text = "".join(key)
        each = _EACH.search(text[len(text) - plain :])
        eaches = len(each.group()) // 2 if each else 0
        keys.append((text[: len(text) - 2 * eaches], eaches))

    for ch in chars:
        if ch == ".":
            end()
            key, plain = [], 0
            continue
        if ch == "\\":
            ch = next(chars, "")
            if ch not in _ESCAPED:
                raise InvalidInput(f"bad field name {name!r}: a backslash escapes only '.', '\\', '$', '[' or ']' "
                                   "(write \\\\ for a backslash in a key)", field=where)  # fmt: skip
            plain = 0
        else:
            plain += 1
        key.append(ch)
    end()
    return keys


MAX_DEPTH = 16  # $and / $or / $not nesting, and lists nested in an operand
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

    def at(self, at: _At, function: str = "json_extract") -> str:
        """The JSON value at `at` (SQL NULL where it is missing) as `function` reads it, its pointer bound now."""
        if at.pointer:
            return f"{function}({at.base}, {self.bind(at.pointer)})"
        if function == "json_extract":
            return at.base
        return f"json_type({at.base})" if function == "json_type" else f"{function}({at.base}, '$')"

    def fill(self, template: str, at: _At, values: tuple[Any, ...] = ()) -> str:
        """`template` with each `@type`, `@text` and `@` written as the JSON type, the string and the JSON value at
        `at` (read straight from the payload: one parse each), and each `?` binding the next of `values`, each
        bound in turn."""
        functions = {"@type": "json_type", "@text": "json_extract_string", "@": "json_extract"}
        rest = iter(values)
        parts = []
        for p in _TOKENS.split(template):
            parts.append(self.at(at, functions[p]) if p in functions else self.bind(next(rest)) if p == "?" else p)
        assert next(rest, parts) is parts, "a template's values fell out of step with its ?s"
        return "".join(parts)

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
                parts.append(self.field(key, value, f"{where}.{key}", depth))
        return "(" + " AND ".join(parts) + ")" if parts else "TRUE"

    def field(self, name: Any, cond: Any, where: str, depth: int) -> str:
        pointers = field_pointers(name, where)
        if _is_operators(cond):
            return self.ops(pointers, cond, where, depth)
        if isinstance(cond, dict):
            raise InvalidInput("a condition object must use operators like $eq or $gte", field=where)
        return self.op(pointers, "$eq", cond, where, depth)

    def ops(self, pointers: list[str], cond: dict[str, Any], where: str, depth: int) -> str:
        return "(" + " AND ".join(self.op(pointers, op, v, f"{where}.{op}", depth) for op, v in cond.items()) + ")"

    def op(self, pointers: list[str], op: str, value: Any, where: str, depth: int) -> str:
        if op == "$not":
            if not _is_operators(value):
                raise InvalidInput('$not takes an object of operators, like {"$gt": 5}', field=where)
            if depth >= MAX_DEPTH:
                raise InvalidInput(f"filters nest $and / $or / $not at most {MAX_DEPTH} deep", field=where)
            return f"NOT coalesce({self.ops(pointers, value, where, depth + 1)}, FALSE)"
        listed = op in ("$in", "$nin") and isinstance(value, list)
        if listed and len(value) > MAX_VALUES:
            raise InvalidInput(f"{op} takes at most {MAX_VALUES:,} values, got {len(value):,}", field=where)
        self._count(sum(_size(v, where) for v in value) if listed else _size(value, where), where)
        if not (op in ("$in", "$nin") and value == []):
            self.tests += 1
        if op == "$eq":
            return self.eq(pointers, value, where)
        if op == "$ne":
            return f"NOT coalesce({self.eq(pointers, value, where)}, FALSE)"
        if op in _SQL_OP:
            return self.ordered(pointers, _SQL_OP[op], value, where)
        if op in ("$in", "$nin"):
            if not isinstance(value, list):
                raise InvalidInput(f"{op} takes a list of values, got {_json_type(value)}", field=where)
            if not value:
                return "FALSE" if op == "$in" else "TRUE"
            anyof = self.any_of(pointers, value, where)
            return anyof if op == "$in" else f"NOT coalesce({anyof}, FALSE)"
        if op == "$contains":
            if not _is_scalar(value) or value is None:
                raise InvalidInput(f"$contains takes a string, number or boolean, got {_json_type(value)}", field=where)
            needles = _json_forms(value, where)
            return self.each_value(pointers, lambda at, _: self.contains(at, value, needles))
        if op == "$exists":
            if not isinstance(value, bool):
                raise InvalidInput(f"$exists takes true or false, got {_json_type(value)}", field=where)
            there = self.each_value(pointers, lambda at, _: f"({self.at(at)} IS NOT NULL)")
            return there if value else f"NOT coalesce({there}, FALSE)"
        if op == "$size":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise InvalidInput(f"$size takes a whole number >= 0, got {_json_type(value)}", field=where)
            size = "(@type = 'ARRAY' AND json_array_length(@)"
            return self.each_value(pointers, lambda at, _: f"{self.fill(size, at)} = {self.bind(value)})")
        raise InvalidInput(
            f"unknown operator {op!r} (expected one of {', '.join(OPERATORS + FIELD_OPERATORS)})", field=where
        )

    # -- where a field's values are -----------------------------------------------------------------
    def any_value(self, pointers: list[str], tests: _Tests, long: bool = False) -> str:
        """True when `tests` hold for a value the field names or for an element of one that is an array (a missing
        value is tested as SQL NULL); NULL or FALSE when not. A plain path: one CASE on the value's JSON type, so a
        scalar costs what a scalar test does, and only an array's elements are looked at in a lambda. `long`: the
        tests look values up in a long list (by a hash join: a subquery, which no lambda can hold)."""
        if len(pointers) == 1:
            return self.case(_At(self.col, pointers[0]), tests, in_lambda=False, array=True)
        if not long:
            found = self.leaves(pointers)  # bound first: the SQL holds it first
            return f"list_bool_or(list_transform({found}, lambda _v: {self.case(_At('_v', ''), tests, True, True)}))"
        each = "CASE WHEN json_type(_v) = 'ARRAY' THEN json_extract(_v, '$[*]') ELSE [_v] END"
        values = f"flatten(list_transform({self.leaves(pointers)}, lambda _v: {each}))"
        test = self.case(_At("_e", ""), tests, in_lambda=False, array=False)
        return f"EXISTS (SELECT 1 FROM (SELECT unnest({values}) AS _e) WHERE {test})"

    def case(self, at: _At, tests: _Tests, in_lambda: bool, array: bool) -> str:
        """The value at `at` tested by the branch of `tests` its JSON type takes (each JSON type read once, however
        many branches a value passes before its own); `array`: an array by its elements (in a lambda), each by the
        branch its own type takes. NULL when no branch is taken."""
        parts = []
        for branch in _merged(tests(in_lambda)):
            guard = self.fill(_guard(branch.types), at)  # bound first: the SQL holds it first
            parts.append(f"WHEN {guard} THEN {self.fill(branch.sql, at, branch.values)}")
        if array:
            is_array = self.fill("@type = 'ARRAY'", at)  # bound first: the SQL holds it first
            parts.append(f"WHEN {is_array} THEN {self.elements(at, tests)}")
        return "(CASE " + " ".join(parts) + " END)"

    def elements(self, at: _At, tests: _Tests) -> str:
        """True when `tests` hold for an element of the array at `at` (in a lambda); NULL or FALSE when not."""
        elements = self.fill("json_extract(@, '$[*]')", at)
        element = self.case(_At("_e", ""), tests, in_lambda=True, array=False)
        return f"list_bool_or(list_transform({elements}, lambda _e: {element}))"

    def equal_string(self, at: _At, value: str) -> str:
        """A string equal to `value`, or an array holding one. First a cheap test no such value fails: the JSON text
        there (one read of the payload) holds `value`'s JSON text (both written by one writer); only a value that
        passes it is read as `any_value` reads one."""
        tests = _always(_branches("string", "=", value))
        text = self.fill("contains(CAST(@ AS VARCHAR), CAST(to_json(?::VARCHAR) AS VARCHAR))", at, (value,))
        return f"(CASE WHEN {text} THEN {self.case(at, tests, in_lambda=False, array=True)} END)"

    def each_value(self, pointers: list[str], test: _Test) -> str:
        """True when `test` holds for a value the field names (as a whole: an array is not looked into)."""
        if len(pointers) == 1:
            return test(_At(self.col, pointers[0]), False)
        return f"list_bool_or(list_transform({self.leaves(pointers)}, lambda _v: {test(_At('_v', ''), True)}))"

    def leaves(self, pointers: list[str]) -> str:
        """The values a field names, as a JSON list: one for a plain path (SQL NULL where it is missing); for a `[]`
        path one per element (NULL where an element lacks it), or a single NULL where the path reaches none."""
        if len(pointers) == 1:
            return f"[{self.at(_At(self.col, pointers[0]))}]"
        found = self.fill("json_extract(@, '$[*]')", _At(self.col, pointers[0]))
        for n, pointer in enumerate(pointers[1:-1], 1):
            inner = self.fill("json_extract(@, '$[*]')", _At(f"_l{n}", pointer))
            found = f"flatten(list_transform({found}, lambda _l{n}: {inner}))"
        if pointers[-1]:
            found = f"list_transform({found}, lambda _l: {self.at(_At('_l', pointers[-1]))})"
        return f"coalesce(nullif({found}, []::JSON[]), [NULL::JSON])"

    # -- tests of one value ---------------------------------------------------------------------------
    def eq(self, pointers: list[str], value: Any, where: str) -> str:
        if isinstance(value, list):
            return self.each_value(pointers, self.equal_to(value, where))
        if value is None:
            return self.any_value(pointers, _always([_NULL]))
        kind, bound = _scalar(value, where)
        if kind == "string" and len(pointers) == 1:
            return self.equal_string(_At(self.col, pointers[0]), bound)
        return self.any_value(pointers, _always(_branches(kind, "=", bound)))

    def ordered(self, pointers: list[str], cmp: str, value: Any, where: str) -> str:
        """`cmp` (> >= < <=) with a number, a string, or a date-time (compared as instants)."""
        if not _is_number(value) and not isinstance(value, str):
            raise InvalidInput(f"{where.rsplit('.', 1)[-1]} compares numbers or strings, got {_json_type(value)}",
                               field=where)  # fmt: skip
        instant = _instant(value, where) if isinstance(value, str) else None
        if instant is not None:
            return self.any_value(pointers, _always([_Branch(("VARCHAR",), f"({_AS_INSTANT} {cmp} ?)", (instant,))]))
        kind, bound = _scalar(value, where)
        return self.any_value(pointers, _always(_branches(kind, cmp, bound)))

    def any_of(self, pointers: list[str], values: list[Any], where: str) -> str:
        """The test of an $in list: each kind of scalar in it bound as one list (however long the list, the SQL
        stays this size), and each list in it on its own. Outside a lambda the field is looked up in a hash of a
        kind's values; inside one (an array's elements) a short list is scanned, a long one hashed per array."""
        groups: dict[str, list[Any]] = {}
        null = False
        lists: list[tuple[list[Any], str]] = []
        for i, v in enumerate(values):
            if v is None:
                null = True
            elif isinstance(v, list):
                lists.append((v, f"{where}[{i}]"))
            else:
                kind, bound = _scalar(v, f"{where}[{i}]")
                groups.setdefault(kind, []).append(bound)

        def scalars(in_lambda: bool) -> list[_Branch]:
            branches = [_NULL] if null else []
            for kind, bound_values in groups.items():
                branches += _branches(kind, "IN_LAMBDA" if in_lambda else "IN", bound_values)
            return branches

        tests = []
        if len(pointers) == 1 and (null or groups):
            at = _At(self.col, pointers[0])
            if null:
                tests.append(self.fill(_guard(_NULL.types), at))
            array = True  # an array is looked into once, by the first kind's read (or on its own)
            for kind, bound_values in groups.items():
                read, sql_type = _EXACT[kind]
                sql = self.fill(read, at)
                if array:  # an array holding a match reads as one of the values: the hash join finds it
                    is_array = self.fill("@type = 'ARRAY'", at)
                    sql += f" WHEN {is_array} AND {self.elements(at, scalars)} THEN {self.bind(bound_values[0])}"
                    array = False
                tests.append(f"{sql} END) IN (SELECT unnest({self.bind(bound_values)}::{sql_type}[])))")
            if array:
                is_array = self.fill("@type = 'ARRAY'", at)
                tests.append(f"(CASE WHEN {is_array} THEN {self.elements(at, scalars)} END)")
        elif null or groups:
            long = any(len(bound_values) > SMALL_LIST for bound_values in groups.values())
            tests.append(self.any_value(pointers, scalars, long=long))
        for value, at_where in lists:
            tests.append(self.each_value(pointers, self.equal_to(value, at_where)))
        return "(" + " OR ".join(tests) + ")"

    def equal_to(self, value: list[Any], where: str) -> _Test:
        """The test of a value equal to the list `value`."""

        def test(at: _At, in_lambda: bool) -> str:
            return self.equal_list(at, value, where)

        return test

    def equal_list(self, at: _At, value: list[Any], where: str, depth: int = 0) -> str:
        """An array as long as `value`, each element equal to its element (the scalar rules; no looking inside)."""
        if depth >= MAX_DEPTH:
            raise InvalidInput(f"a list in a filter nests at most {MAX_DEPTH} deep", field=where)
        length = self.fill("(@type = 'ARRAY' AND json_array_length(@)", at)
        tests = [f"{length} = {self.bind(len(value))})"]
        for i, v in enumerate(value):
            element = _At(at.base, f"{at.pointer}/{i}")
            if v is None:
                tests.append(self.fill("@type = 'NULL'", element))
            elif isinstance(v, list):
                tests.append(self.equal_list(element, v, f"{where}[{i}]", depth + 1))
            else:
                kind, bound = _scalar(v, f"{where}[{i}]")
                tests.append(self.case(element, _always(_branches(kind, "=", bound)), False, False))
        return "(" + " AND ".join(tests) + ")"

    def contains(self, at: _At, value: Any, needles: list[str]) -> str:
        """An array holding `value` (as one of the JSON texts `needles`), or a string holding the string."""
        is_array = self.fill("@type = 'ARRAY'", at)  # bound first: the SQL holds it first
        held = " OR ".join(f"json_contains({self.at(at)}, CAST({self.bind(x)} AS JSON))" for x in needles)
        in_array = f"({is_array} AND ({held}))"
        if not isinstance(value, str):
            return in_array
        string = self.fill("@type = 'VARCHAR' AND contains(@text", at)
        in_string = f"({string}, {self.bind(value)}))"
        return f"({in_array} OR {in_string})"


class _Branch(NamedTuple):
    """One branch of a CASE on a value's JSON type: the types (DuckDB's names; "" a missing value) that take it,
    and the SQL then testing the value (a `fill` template; its `?`s bind `values`, in order)."""

    types: tuple[str, ...]
    sql: str
    values: tuple[Any, ...] = ()


_Tests = Callable[[bool], list[_Branch]]  # a scalar test's branches; the flag: written inside a lambda
_NULL = _Branch(("NULL", ""), "TRUE")  # a null or missing value
_INTEGERS = ("BIGINT", "UBIGINT")
# A stored string as the instant it writes (microseconds since 1970 UTC; no offset: UTC), NULL when it writes none.
_AS_INSTANT = (
    f"(CASE WHEN regexp_full_match(@text, '{_NAIVE}') THEN epoch_us(TRY_CAST(upper(@text) AS TIMESTAMP)) "
    f"WHEN regexp_full_match(@text, '{_ZONED}') THEN epoch_us(TRY_CAST(upper(@text) AS TIMESTAMPTZ)) END)"
)
# A stored double that is a whole number, as that integer (NULL for one with a fraction, or past 128 bits).
_WHOLE_DOUBLE = (
    "(CASE WHEN TRY_CAST(@ AS DOUBLE) = trunc(TRY_CAST(@ AS DOUBLE)) "
    "THEN TRY_CAST(TRY_CAST(@ AS DOUBLE) AS HUGEINT) END)"
)


# A value of a JSON type each kind (as `_scalar` names it) compares with, read as the SQL type it is compared as
# (NULL for another type), for a hash join with a list of values; a double that is a whole number as that integer
# (its CASE unended: a caller adds a branch).
_EXACT = {
    "integer": (
        "((CASE WHEN @type IN ('BIGINT','UBIGINT') THEN TRY_CAST(@ AS HUGEINT) "
        f"WHEN @type = 'DOUBLE' THEN {_WHOLE_DOUBLE}",
        "HUGEINT",
    ),
    "number": ("((CASE WHEN @type IN ('BIGINT','UBIGINT','DOUBLE') THEN TRY_CAST(@ AS DOUBLE)", "DOUBLE"),
    "boolean": ("((CASE WHEN @type = 'BOOLEAN' THEN TRY_CAST(@ AS BOOLEAN)", "BOOLEAN"),
    "string": ("((CASE WHEN @type = 'VARCHAR' THEN @text", "VARCHAR"),
}


def _always(branches: list[_Branch]) -> _Tests:
    """The tests `branches`, in a lambda or not."""

    def tests(in_lambda: bool) -> list[_Branch]:
        return branches

    return tests


def _branches(kind: str, cmp: str, bound: Any) -> list[_Branch]:
    """A stored value of a JSON type that `kind` (as `_scalar` names it) compares with, compared by `cmp` (`=`, `>`,
    ..., `IN` a list by a hash join, `IN_LAMBDA` a list by a scan) with `bound`. An integer compares exactly with a
    stored number, integer or double. A cast is a TRY_CAST: DuckDB may evaluate one before the type test in front
    of it (a subquery's argument is), and a point holding "abc" or a list there must not fail the whole query."""
    if kind == "integer" and cmp in ("=", "IN", "IN_LAMBDA"):
        return [
            _Branch(_INTEGERS, _compare("TRY_CAST(@ AS HUGEINT)", cmp, "HUGEINT"), (bound,)),
            _Branch(("DOUBLE",), _compare(_WHOLE_DOUBLE, cmp, "HUGEINT"), (bound,)),
        ]
    if kind == "integer":
        near_cmp, near = _as_double(cmp, bound)
        return [
            _Branch(_INTEGERS, f"(TRY_CAST(@ AS HUGEINT) {cmp} ?::HUGEINT)", (bound,)),
            _Branch(("DOUBLE",), f"(TRY_CAST(@ AS DOUBLE) {near_cmp} ?::DOUBLE)", (near,)),
        ]
    if kind == "number":
        return [_Branch((*_INTEGERS, "DOUBLE"), _compare("TRY_CAST(@ AS DOUBLE)", cmp, "DOUBLE"), (bound,))]
    if kind == "boolean":
        return [_Branch(("BOOLEAN",), _compare("TRY_CAST(@ AS BOOLEAN)", cmp, "BOOLEAN"), (bound,))]
    return [_Branch(("VARCHAR",), _compare("@text", cmp, "VARCHAR"), (bound,))]


def _compare(value: str, cmp: str, sql_type: str) -> str:
    """A `fill` template comparing `value` with one `?` (a list of them for `IN` / `IN_LAMBDA`) of `sql_type`."""
    if cmp == "IN":
        return f"({value} IN (SELECT unnest(?::{sql_type}[])))"
    if cmp == "IN_LAMBDA":
        return f"list_contains(?::{sql_type}[], {value})"
    return f"({value} {cmp} ?::{sql_type})"


def _merged(branches: list[_Branch]) -> list[_Branch]:
    """`branches` ORed by JSON type: one branch per set of types, as a CASE takes only the first it matches (an
    $in list of integers and fractions: both test a double)."""
    sets = {b.types for b in branches}
    split = any(a != b and set(a) & set(b) for a in sets for b in sets)
    out: dict[tuple[str, ...], list[_Branch]] = {}
    for b in branches:
        for types in [(t,) for t in b.types] if split and b is not _NULL else [b.types]:
            out.setdefault(types, []).append(b)
    return [
        _Branch(types, "(" + " OR ".join(b.sql for b in bs) + ")", tuple(v for b in bs for v in b.values))
        if len(bs) > 1
        else bs[0]._replace(types=types)
        for types, bs in out.items()
    ]


def _guard(types: tuple[str, ...]) -> str:
    """A `fill` template: the value is of one of `types` ("" a missing value)."""
    if "" in types:
        assert set(types) == {"NULL", ""}, "a missing value takes only the null branch"
        return "coalesce(@type = 'NULL', TRUE)"
    return "@type IN (" + ",".join(f"'{t}'" for t in types) + ")"


def _instant(value: str, where: str) -> int | None:
    """A range operand that begins with a date as its instant (microseconds since 1970 UTC; no offset: UTC, a date
    alone: its midnight); None for any other string; a 422 when it is no valid date or date-time."""
    if not _DATE_START.match(value):
        return None
    if not (_ZONED_RE.fullmatch(value) or _NAIVE_RE.fullmatch(value)):
        raise InvalidInput(f"{value!r} begins with a date but is no date (YYYY-MM-DD) nor RFC 3339 date-time "
                           "(YYYY-MM-DDTHH:MM:SS[.fraction][Z or +HH:MM])", field=where)  # fmt: skip
    text = re.sub(r"([.][0-9]{6})[0-9]+", r"\1", value.upper())  # to the microsecond, as DuckDB reads it
    try:
        when = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError as e:
        raise InvalidInput(f"{value!r} is no valid date-time: {e}", field=where) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - _EPOCH) // timedelta(microseconds=1)


def _is_operators(cond: Any) -> bool:
    """A non-empty object whose every key is an operator."""
    return isinstance(cond, dict) and bool(cond) and all(isinstance(k, str) and k.startswith("$") for k in cond)


def _size(value: Any, where: str, depth: int = 0) -> int:
    """How many values an operand compares (a list: its elements, nested lists' too)."""
    if not isinstance(value, list):
        return 1
    if depth >= MAX_DEPTH:
        raise InvalidInput(f"a list in a filter nests at most {MAX_DEPTH} deep", field=where)
    return max(1, sum(_size(v, where, depth + 1) for v in value))


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
    raise InvalidInput(f"can only compare with a string, number, boolean, null or list, got {_json_type(value)}",
                       field=where)  # fmt: skip


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
