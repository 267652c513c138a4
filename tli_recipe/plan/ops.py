"""The op table: the single place that says what each ``TensorOp.op`` means.

Every consumer (the plan's identity judgement, stages, the executor, verify, the report)
asks this table instead of keeping its own if-chain over op names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class OpSpec:
    name: str  # "copy", "zero", "fill", "scale", "noise", "random", "interpolate", "lesa", "hidden", "widen"
    reads_source: bool  # reads op.source_name from op.source
    reads_second: bool  # also reads op.second_name from op.second_source
    seeded: bool  # draws from op.seed
    value: Optional[str]  # what op.value means ("factor", "std", "fill value", "weight") or None
    summary: str  # one line for reports


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec("copy", True, False, False, None, "the source tensor (cast to the output dtype)"),
        OpSpec("zero", False, False, False, None, "all zeros"),
        OpSpec(
            "fill",
            False,
            False,
            False,
            "fill value",
            "every element set to the value (zero_gain: a gain at its effective 0)",
        ),
        OpSpec("scale", True, False, False, "factor", "the source tensor times the factor"),
        OpSpec("noise", True, False, True, "std", "the source tensor plus seeded N(0, std^2)"),
        OpSpec("random", False, False, True, "std", "seeded N(0, std^2)"),
        OpSpec("interpolate", True, True, False, "weight", "(1 - w) * this layer's tensor + w * the next layer's"),
        OpSpec("lesa", True, True, False, None, "predicted from both neighbours through an SVD basis (LESA)"),
        OpSpec(
            "widen",
            True,
            False,
            True,
            "factor",
            "the source gathered along its widened axes (Plan.widen), reading sides scaled, times the factor",
        ),
        OpSpec(
            "hidden", False, False, False, None, "router rows: the normalised mean MLP input of each expert's prompts"
        ),
    )
}


def is_byte_copy(op) -> bool:
    """A copy in the source's own dtype: written as the source's raw bytes."""
    return op.op == "copy" and op.dtype == op.source_dtype


def writes_zeros(op) -> bool:
    """Every element of the output tensor is exactly 0 (zero, scale by 0, fill 0)."""
    return op.op == "zero" or (op.op in ("scale", "fill") and op.value == 0)


def needs_torch(op) -> bool:
    """False for tensors written without arithmetic: a byte copy, or zeros."""
    return not (is_byte_copy(op) or op.op == "zero")


def zero_effect(op, offset: Optional[float] = 0.0) -> bool:
    """The tensor's effective value is exactly 0. A norm stored as ``offset + w`` (Gemma: 1 + w)
    is at its effective 0 when filled with ``-offset``; ``offset=None`` (not known) takes a fill
    as that, since the plan makes fills only for zero_gain."""
    if op.op == "fill":
        return offset is None or op.value == -offset
    return (offset is None or offset == 0) and writes_zeros(op)
