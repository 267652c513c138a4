"""Stage settings changed on a grown checkpoint: ``emit --set`` and ``train --set`` (pure data, no torch).

A grown checkpoint's ``plan.json`` is final for its layers and tensors, and for which parameters each
stage trains (resolved against the model when the recipe was compiled). What a stage trains *with*
(learning rate, steps, precision, batch size, datasets, LoRA rank and alpha...) can still change: the
overrides are applied to the stages' settings (``StagePlan.settings``, whose JSON has the recipe
stage's shape) with the recipe's own ``--set`` machinery (``stages[*].precision=float32`` sets every
stage), validated by the recipe schema, and copied back into the plan's own type.
"""

from __future__ import annotations

import os
from typing import Sequence

from tli_recipe.errors import TliError
from tli_recipe.plan.model import Plan, StageSettings
from tli_recipe.plan.stages import resolve_distributed
from tli_recipe.recipe.base import Strict
from tli_recipe.recipe.load import Marks, apply_overrides, validate_model
from tli_recipe.recipe.schema import Stage

#: Stage fields that decide which parameters train: resolved against the model at compile time.
RESOLVED = {"name", "trainable", "lora.targets"}


class _Stages(Strict):
    stages: list[Stage]


def _refused(item: str, source: str) -> str | None:
    key = item.partition("=")[0].strip()
    parts = key.replace("[", ".").replace("]", "").split(".")
    if parts[0] != "stages" or len(parts) < 3:
        return (
            f"--set {item}: {source} is a grown checkpoint, whose layers and tensors are final; only the stages' "
            "training settings can change there (stages[N].FIELD or stages[*].FIELD, such as "
            f"stages[*].precision=float32); to change {key}, edit the recipe and run it again"
        )
    field = ".".join(parts[2:4]) if parts[2] == "lora" and len(parts) > 3 else parts[2]
    if field in RESOLVED or field == "lora":
        return (
            f"--set {item}: {field} decides which parameters train, which plan.json resolved against the grown "
            f"model; on {source} only the other stage settings can change (learning_rate, max_steps, precision, "
            "datasets, lora.r...): to change it, edit the recipe and run it again"
        )
    return None


def override_stages(plan: Plan, overrides: Sequence[str], source: str = "the checkpoint") -> Plan:
    """``plan`` with ``overrides`` (``stages[N].FIELD=VALUE``, ``stages[*].FIELD=VALUE``) applied to its stages."""
    if not overrides:
        return plan
    refused = [why for item in overrides if (why := _refused(item, source))]
    if refused:
        raise TliError("\n".join(refused))
    data = {"stages": [sp.settings.model_dump(mode="json", exclude_none=True) for sp in plan.stages]}
    marks = Marks("plan.json")
    apply_overrides(data, marks, overrides)
    for stage in data["stages"]:  # FIELD=null: back to the field's default (epochs=null under max_steps)
        for key in [k for k, v in stage.items() if v is None] if isinstance(stage, dict) else []:
            del stage[key]
    stages = validate_model(_Stages, data, marks).stages  # type: ignore[attr-defined]
    for i, stage in enumerate(stages):
        if stage.max_steps is not None and stage.epochs is not None:
            raise TliError(
                f"stages[{i}]: both max_steps ({stage.max_steps}) and epochs ({stage.epochs:g}) are given; "
                f"expected one of them (--set stages[{i}].epochs=null drops the epochs)"
            )
    resolved = []
    for sp, stage in zip(plan.stages, stages):
        # Datasets given with --set are relative to the working directory, as in a recipe.
        stage = stage.model_copy(
            update={
                "datasets": [
                    d.model_copy(update={"path": os.path.abspath(os.path.expanduser(d.path))}) for d in stage.datasets
                ]
            }
        )
        lora = (
            sp.lora.model_copy(update={"r": stage.lora.r, "alpha": stage.lora.alpha, "dropout": stage.lora.dropout})
            if sp.lora is not None and stage.lora is not None
            else sp.lora
        )
        count = (
            sp.trainable_parameters * lora.r // sp.lora.r
            if lora is not None and sp.lora is not None
            else sp.trainable_parameters
        )
        distributed, why = resolve_distributed(stage)
        if why:
            raise TliError(f"--set: stages[{len(resolved)}].distributed: {why}")
        resolved.append(
            sp.model_copy(
                update={
                    "settings": StageSettings.of(stage),
                    "lora": lora,
                    "trainable_parameters": count,
                    "distributed": distributed,
                }
            )
        )
    return plan.model_copy(update={"stages": resolved})


def flag_overrides(max_steps: int | None = None, learning_rate: float | None = None) -> list[str]:
    """``--max-steps`` and ``--learning-rate`` as ``--set`` overrides of every stage (max_steps replaces epochs)."""
    out = []
    if max_steps is not None:
        out += [f"stages[*].max_steps={max_steps}", "stages[*].epochs=null"]
    if learning_rate is not None:
        out.append(f"stages[*].learning_rate={learning_rate!r}")
    return out
