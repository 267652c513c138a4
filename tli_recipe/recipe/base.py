"""The base of every recipe model, the error its validators raise, and the JSON schema of a file. No I/O."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, field_validator
from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticCustomError

NULL_MESSAGE = "is empty (null); expected a value, or remove the key"


def fail(message: str) -> PydanticCustomError:
    """The error a recipe validator raises: pydantic keeps its location, the loader prints ``message``."""
    return PydanticCustomError("tli", "{message}", {"message": message})


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, instances are immutable."""

    # allow_inf_nan=False: every float field of every recipe model refuses NaN and infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    key_noun: ClassVar[str] = "key"  # what "unknown ..." errors call a key of this mapping


class NoNulls(Strict):
    """A model only ever read from a user's file: a field given as null (``inject: null``) is an error,
    as the loader says for any key written with no value. (Models that plan.json also carries, such as
    ``Stage``, keep accepting the nulls their own dumps hold.)"""

    @field_validator("*", mode="before")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise fail(NULL_MESSAGE)
        return value


class FileSchema(GenerateJsonSchema):
    """The JSON schema of a file a user writes: a key is absent or holds a value, never null (the
    loader refuses ``key:`` with no value), so optional fields are their type alone, with no
    ``default: null``."""

    def nullable_schema(self, schema):
        return self.generate_inner(schema["schema"])

    def default_schema(self, schema):
        out = super().default_schema(schema)
        if out.get("default", ...) is None:
            del out["default"]
        return out


def file_schema(model: type[BaseModel], title: str) -> dict:
    """``model``'s JSON schema (draft 2020-12) for files of that kind, titled ``title``."""
    schema = model.model_json_schema(schema_generator=FileSchema)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = title
    return schema
