"""The base of every recipe model, and the error its validators raise. No I/O."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("tli", "{message}", {"message": message})


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors, instances are immutable."""

    # allow_inf_nan=False: every float field of every recipe model refuses NaN and infinity.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    key_noun: ClassVar[str] = "key"  # what "unknown ..." errors call a key of this mapping
