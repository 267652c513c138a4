"""Init policies: how a new tensor starts from its source tensor (``copy``, ``zero``, ``{noise: std}``...).
The recipe forms, their parsing and their JSON schema; no I/O, no torch."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

from tli_recipe.errors import did_you_mean
from tli_recipe.recipe.base import Strict, fail

POLICY_FORMS = "copy, zero, zero_gain, lesa, {scale: x}, {noise: std}, {random: std}, {interpolate: w}"
SIMPLE_POLICIES = ("copy", "zero", "zero_gain", "lesa")
VALUE_POLICIES = ("scale", "noise", "random", "interpolate")


class Policy(Strict):
    """How an injected layer's tensor is initialised from its source tensor.

    ``copy``: the source unchanged. ``zero``: all zeros. ``scale``: source times
    ``value``. ``noise``: source plus N(0, value^2), seeded. ``random``: N(0, value^2), seeded.
    ``zero_gain``: a norm gain whose effective value is 0, in the form the architecture stores
    it (0 for most models, -1 for Gemma's ``1 + w``). ``interpolate``: ``(1 - w) * previous + w *
    next`` layer. ``lesa``: predicted from both neighbours through an SVD basis (LESA). ``hidden``
    (an upcycled router only): rows from the MLP inputs of each expert's prompts.
    """

    kind: Literal["copy", "zero", "zero_gain", "lesa", "scale", "noise", "random", "interpolate", "hidden"]
    value: Optional[float] = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}({self.value:g})"


def parse_policy(value: Any) -> Any:
    """A policy as written (``zero``, ``{noise: 0.01}``) -> ``Policy`` fields, or the error saying what is expected."""
    if isinstance(value, Policy):
        return value
    if isinstance(value, str):
        if value in SIMPLE_POLICIES:
            return {"kind": value}
        raise fail(
            f"'{value}' is not an init policy{did_you_mean(value, SIMPLE_POLICIES)}; expected one of: {POLICY_FORMS}"
        )
    if isinstance(value, dict) and len(value) == 1:
        ((kind, number),) = value.items()
        if kind not in VALUE_POLICIES:
            raise fail(
                f"'{kind}' is not an init policy{did_you_mean(kind, VALUE_POLICIES)}; expected one of: {POLICY_FORMS}"
            )
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise fail(f"{kind} needs a number, got {number!r}; expected for example {{{kind}: 0.01}}")
        if not math.isfinite(number):  # refused by Policy.value (allow_inf_nan), reported once by the loader
            return {"kind": kind, "value": number}
        if kind in ("noise", "random") and number < 0:
            raise fail(f"{kind} is a standard deviation and must be >= 0, got {number}")
        if kind == "interpolate" and not 0 <= number <= 1:
            raise fail(f"interpolate is a weight in [0, 1], got {number}; expected (1 - w) * previous + w * next")
        return {"kind": kind, "value": float(number)}
    raise fail(f"{value!r} is not an init policy; expected one of: {POLICY_FORMS}")


def dump_policy(policy: Policy) -> Any:
    """A ``Policy`` back in the form a recipe writes it."""
    return policy.kind if policy.value is None else {policy.kind: policy.value}


POLICY_SCHEMA = {
    "oneOf": [
        {"enum": list(SIMPLE_POLICIES)},
        {
            "type": "object",
            "properties": {"scale": {"type": "number"}},
            "required": ["scale"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"noise": {"type": "number", "minimum": 0}},
            "required": ["noise"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"random": {"type": "number", "minimum": 0}},
            "required": ["random"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "properties": {"interpolate": {"type": "number", "minimum": 0, "maximum": 1}},
            "required": ["interpolate"],
            "additionalProperties": False,
        },
    ],
    "description": (
        "copy: the source tensor; zero: zeros; zero_gain: a norm gain set to an effective 0 (Gemma: -1); scale: "
        "source times x; noise: source plus seeded N(0, std^2); random: seeded N(0, std^2); interpolate: (1 - w) * "
        "previous + w * next layer; lesa: predicted from both neighbours (LESA)."
    ),
}

PolicyField = Annotated[
    Policy,
    BeforeValidator(parse_policy),
    PlainSerializer(dump_policy),
    WithJsonSchema(POLICY_SCHEMA),
]
