"""Request bodies read the way the OpenAPI document's JSON Schema (2020-12) reads them: `true` is not the number 1
and `"5"` is not 5 (pydantic's lax mode takes both), but a whole number written `4.0` is the integer 4 (JSON
Schema's `integer` is any number without a fraction; pydantic's strict mode refuses it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core.core_schema import ValidatorFunctionWrapHandler


def whole_floats_only(exc: ValidationError) -> bool:
    """True when every error of a strict validation is a whole-number float where an integer was expected: the
    same data is then valid as JSON Schema reads it, and a lax validation takes it (nothing else differs)."""
    errors = exc.errors()
    return bool(errors) and all(
        e["type"] == "int_type" and isinstance(e.get("input"), float) and e["input"].is_integer() for e in errors
    )


class StrictTypes(BaseModel):
    """A request body whose types are read as JSON Schema reads them (see the module); unknown fields kept (an
    OpenAI-shaped body: clients send fields bkg does not use, `user`, `n`, `logprobs`)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # JSON has no NaN, no Infinity

    @model_validator(mode="wrap")
    @classmethod
    def _whole_floats_are_integers(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            if whole_floats_only(exc):
                return cls.model_validate(data, strict=False)
            raise


class StrictBody(StrictTypes):
    """A request body: unknown fields refused, types as JSON Schema reads them (see the module)."""

    model_config = ConfigDict(extra="forbid")
