"""A form built from an object's JSON Schema, the widgets twin of the lab's `settingsform.tsx`: one ipywidget
per property by its type, the description as its tooltip, the schema's rules checked as you type, and room
next to each field for what is wrong with it (the form's own checks or the gateway's 422)."""

from __future__ import annotations

import json
import operator
import re
from html import escape
from typing import Any

import ipywidgets as W

MASK = "********"  # what the gateway sends in place of a secret's value; sent back, the secret is kept
SECRET = re.compile(r"(^|_)(key|password|secret|token)$")
WIDE = W.Layout(width="380px")
BOUNDS = (
    ("minimum", operator.lt, ">="),
    ("maximum", operator.gt, "<="),
    ("exclusiveMinimum", operator.le, ">"),
    ("exclusiveMaximum", operator.ge, "<"),
)


def _deref(s: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    for _ in range(8):  # a self-referencing schema gets a JSON box, not a hang
        rest = {k: v for k, v in s.items() if k not in ("$ref", "allOf")}
        if "$ref" in s:
            s = {**defs.get(str(s["$ref"]).rsplit("/", 1)[-1], {}), **rest}
        elif isinstance(s.get("allOf"), list) and len(s["allOf"]) == 1:
            s = {**s["allOf"][0], **rest}
        else:
            break
    return s


def resolve(prop: dict[str, Any], defs: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return a property's schema with `$ref`s resolved and `null` split off, and whether it may be null."""
    s, nullable = _deref(prop, defs), False
    for key in ("anyOf", "oneOf"):
        options = s.get(key)
        if isinstance(options, list):
            rest = [o for o in options if o.get("type") != "null"]
            nullable = nullable or len(rest) < len(options)
            if len(rest) == 1:
                s = {**_deref(rest[0], defs), **{k: v for k, v in s.items() if k != key}}
    if isinstance(s.get("type"), list):
        kinds = [t for t in s["type"] if t != "null"]
        nullable = nullable or len(kinds) < len(s["type"])
        s = {**s, "type": kinds[0] if len(kinds) == 1 else kinds}
    if "const" in s:
        s = {**s, "enum": [s["const"]]}
    if None in s.get("enum", ()):
        nullable, s = True, {**s, "enum": [v for v in s["enum"] if v is not None]}
    return s, nullable


def kind_of(s: dict[str, Any]) -> str:
    """Return which input a resolved schema gets: enum, boolean, integer, number, string, lines or json."""
    if "enum" in s:
        return "enum"
    if s.get("type") in ("boolean", "integer", "number", "string"):
        return str(s["type"])
    items = s.get("items") or {}
    if s.get("type") == "array" and items.get("type") == "string" and "enum" not in items:
        return "lines"  # a list of strings: one per line
    return "json"  # objects, other arrays, unions: edited as JSON


def problem(s: dict[str, Any], value: Any, nullable: bool) -> str | None:
    """Return what is wrong with `value` under the resolved schema `s` (None when nothing is)."""
    if value is None:
        return None if nullable else "must be set"
    t = s.get("type")
    if "enum" in s and value not in s["enum"]:
        return "must be one of " + ", ".join(json.dumps(v) for v in s["enum"])
    if t in ("integer", "number"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "must be a number"
        if t == "integer" and value != int(value):
            return "must be a whole number"
        for key, outside, text in BOUNDS:
            if key in s and outside(value, s[key]):
                return f"must be {text} {s[key]}"
    if t == "string" and isinstance(value, str):
        if len(value) < s.get("minLength", 0):
            return f"must have at least {s['minLength']} character(s)"
        if "maxLength" in s and len(value) > s["maxLength"]:
            return f"must have at most {s['maxLength']} characters"
        if "pattern" in s and value != MASK and not re.search(s["pattern"], value):
            return f"must match {s['pattern']}"
    if t == "array" and not isinstance(value, list):
        return "must be a JSON list"
    if t == "object" and not isinstance(value, dict):
        return "must be a JSON object"
    if isinstance(value, list) and len(value) < s.get("minItems", 0):
        return f"must have at least {s['minItems']} item(s)"
    if isinstance(value, list) and "maxItems" in s and len(value) > s["maxItems"]:
        return f"must have at most {s['maxItems']} items"
    return None


class Field:
    """One property: its input, a `set` box when it may be null, and its error shown next to it."""

    def __init__(self, name: str, prop: dict[str, Any], defs: dict[str, Any], value: Any) -> None:
        self.name = name
        self.schema, self.nullable = resolve(prop, defs)
        self.kind = kind_of(self.schema)
        self.input = self._input(value)
        self.input.tooltip = self._tooltip()
        self.input.add_class(f"bkg-field-{name}")
        self.unset = (
            W.Checkbox(description="set", indent=False, layout=W.Layout(width="60px")) if self.nullable else None
        )
        if self.unset is not None:
            self.unset.tooltip = "Unchecked: no value (null), the plugin's default."
        self.error = W.HTML()
        label = W.Label(str(self.schema.get("title") or name), layout=W.Layout(width="200px"))
        label.tooltip = self.input.tooltip
        self.row = W.HBox([label, self.input, *([self.unset] if self.unset else []), self.error])
        self.set(value)
        for w in (self.input, self.unset):
            if w is not None:
                w.observe(lambda _: self._changed(), "value")

    def _tooltip(self) -> str:
        s = self.schema
        lo = next((f"{text} {s[key]}" for key, _, text in BOUNDS[::2] if key in s), "")
        hi = next((f"{text} {s[key]}" for key, _, text in BOUNDS[1::2] if key in s), "")
        limits = ", ".join(x for x in (lo, hi) if x)
        return " ".join(x for x in (s.get("description", ""), f"({limits})" if limits else "") if x) or self.name

    def _input(self, value: Any) -> W.Widget:
        s, kind = self.schema, self.kind
        if kind == "enum":
            return W.Dropdown(options=[(str(v), v) for v in s["enum"]])
        if kind == "boolean":
            return W.Checkbox(indent=False)
        if kind in ("integer", "number"):
            lo = s.get("minimum", s.get("exclusiveMinimum"))
            hi = s.get("maximum", s.get("exclusiveMaximum"))
            cast = int if kind == "integer" else float
            if lo is not None and hi is not None:  # ipywidgets' bounded inputs need both ends
                bounded = W.BoundedIntText if kind == "integer" else W.BoundedFloatText
                return bounded(min=cast(lo), max=cast(hi), value=cast(lo))
            start = cast(lo) if lo is not None else cast(0)  # what a null field shows once it is set
            return W.IntText(value=start) if kind == "integer" else W.FloatText(value=start)
        if kind == "string":
            # a secret the gateway masks, or one not set yet, which the schema does not mark: go by its name
            secret = value == MASK or s.get("format") == "password" or s.get("writeOnly") or SECRET.search(self.name)
            return (W.Password if secret else W.Text)(layout=WIDE)
        placeholder = "one per line" if kind == "lines" else "JSON"
        return W.Textarea(placeholder=placeholder, layout=W.Layout(width="380px", height="70px"))

    def set(self, value: Any) -> None:
        """Show `value` (None unchecks `set` and keeps the input as it was)."""
        if self.unset is not None:
            self.unset.value = value is not None
            self.input.disabled = value is None
        if value is None:
            return
        if self.kind == "lines":
            self.input.value = "\n".join(str(v) for v in value)
        elif self.kind == "json":
            self.input.value = json.dumps(value, indent=1)
        else:
            self.input.value = value

    def get(self) -> Any:
        """Return the value to send; raise ValueError when the input cannot be read (not JSON)."""
        if self.unset is not None and not self.unset.value:
            return None
        v = self.input.value
        if self.kind == "lines":
            return [line.strip() for line in v.splitlines() if line.strip()]
        if self.kind == "json":
            if not v.strip():
                return {"object": {}, "array": []}.get(self.schema.get("type", ""))
            try:
                return json.loads(v)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        return v

    def check(self) -> str | None:
        """Return what is wrong with the field's value, by the schema (None when nothing is)."""
        try:
            return problem(self.schema, self.get(), self.nullable)
        except ValueError as exc:
            return str(exc)

    def show(self, message: str | None) -> None:
        """Show `message` next to the field (None clears it)."""
        self.error.value = f"<span class='bkg-error bkg-field-error'>{escape(message)}</span>" if message else ""

    def _changed(self) -> None:
        if self.unset is not None:
            self.input.disabled = not self.unset.value
        self.show(self.check())


class SchemaForm:
    """Inputs for the properties of an object's JSON Schema, in the schema's order, filled from `value`."""

    def __init__(self, schema: dict[str, Any], value: dict[str, Any]) -> None:
        defs = schema.get("$defs") or schema.get("definitions") or {}
        props = schema.get("properties") or {}
        self.fields = {name: Field(name, prop, defs, value.get(name)) for name, prop in props.items()}
        self.widget = W.VBox([f.row for f in self.fields.values()])

    def value(self) -> tuple[dict[str, Any], dict[str, str]]:
        """Return the form's data and, by field, what is wrong with it (also shown next to each field)."""
        data: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, f in self.fields.items():
            wrong = f.check()
            f.show(wrong)
            if wrong:
                errors[name] = wrong
            else:
                data[name] = f.get()
        return data, errors

    def set_value(self, value: dict[str, Any]) -> None:
        """Fill the form from `value` and clear every error."""
        for name, f in self.fields.items():
            f.set(value.get(name))
            f.show(None)

    def show_error(self, name: str, message: str) -> bool:
        """Show `message` next to the field `name`; return False when the form has no such field."""
        if name not in self.fields:
            return False
        self.fields[name].show(message)
        return True
