"""One table of the training hyperparameters every trainer sets, and how each trainer spells them.

:data:`FIELDS` says what each hyperparameter of a stage is (from ``StagePlan.settings``
and ``Plan.seed``); a trainer lists :class:`Key` entries that name a field, the trainer's
own key for it, and an optional conversion. :func:`mapped` turns such a list into the
trainer's keys, in the list's order. A field (or a conversion) giving None sets no key:
``max_steps`` and the epoch count exclude each other, for instance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from tli_recipe.plan.model import StageSettings

#: The HF scheduler of each recipe schedule, without and with warmup.
SCHEDULERS = {
    "cosine": ("cosine", "cosine"),
    "linear": ("linear", "linear"),
    "constant": ("constant", "constant_with_warmup"),
}


@dataclass(frozen=True)
class Field:
    """One hyperparameter: what it means and its value for a stage (None: not set)."""

    doc: str
    value: Callable[[StageSettings, int], Any]


FIELDS: dict[str, Field] = {
    "sequence_length": Field("tokens per packed sequence", lambda s, seed: s.sequence_length),
    "validation_fraction": Field("share of sequences held out", lambda s, seed: s.validation_fraction),
    "learning_rate": Field("peak AdamW learning rate", lambda s, seed: s.learning_rate),
    "scheduler": Field(
        "HF scheduler name (with warmup when warmup_steps > 0)",
        lambda s, seed: SCHEDULERS[s.scheduler][s.warmup_steps > 0],
    ),
    "warmup_steps": Field("linear warmup steps", lambda s, seed: s.warmup_steps),
    "optimizer": Field("the optimizer", lambda s, seed: "adamw_torch"),
    "weight_decay": Field("AdamW weight decay", lambda s, seed: s.weight_decay),
    "batch_size": Field("sequences per device and forward pass", lambda s, seed: s.batch_size),
    "gradient_accumulation": Field("micro batches per optimizer step", lambda s, seed: s.gradient_accumulation),
    "max_steps": Field("optimizer steps (None: train for epochs)", lambda s, seed: s.max_steps),
    "epochs": Field(
        "passes over the data (None when max_steps is given)",
        lambda s, seed: None if s.max_steps is not None else s.epochs or 1,
    ),
    "precision": Field("mixed-precision compute dtype", lambda s, seed: s.precision),
    "gradient_checkpointing": Field("recompute activations", lambda s, seed: s.gradient_checkpointing),
    "logging_steps": Field("steps between loss logs", lambda s, seed: 1),
    "save_steps": Field("steps between resumable checkpoints", lambda s, seed: s.save_steps),
    "save_total_limit": Field("checkpoints kept", lambda s, seed: 2),
    "eval_steps": Field(
        "steps between validation losses (None without validation)",
        lambda s, seed: s.eval_steps if s.validation_fraction > 0 else None,
    ),
    "seed": Field("the recipe seed", lambda s, seed: seed),
}


@dataclass(frozen=True)
class Key:
    """A trainer's key for a field of :data:`FIELDS`, with a conversion of the value (None: no key)."""

    field: str
    key: str
    convert: Optional[Callable[[Any], Any]] = None


def mapped(stage: StageSettings, seed: int, keys: Sequence[Key]) -> dict[str, Any]:
    """The trainer's keys for ``keys``, in order, with the stage's values."""
    out: dict[str, Any] = {}
    for k in keys:
        value = FIELDS[k.field].value(stage, seed)
        if value is not None and k.convert is not None:
            value = k.convert(value)
        if value is not None:
            out[k.key] = value
    return out


# Conversions the trainers share.
def is_bf16(precision: str) -> bool:
    return precision == "bfloat16"


def is_fp16(precision: str) -> bool:
    return precision == "float16"


def true_or_none(value: bool) -> Optional[bool]:
    """A flag the trainer's default already leaves off: written only when on."""
    return True if value else None


NON_REENTRANT = {"use_reentrant": False}


def reentrancy(on: bool) -> Optional[dict]:
    """gradient_checkpointing_kwargs: non-reentrant checkpointing (works with frozen inputs), only when on."""
    return dict(NON_REENTRANT) if on else None
