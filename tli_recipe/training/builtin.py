"""The built-in trainer's stage config (``tli-recipe train``): a typed model, written as YAML by emit.

:class:`BuiltinStageConfig` is what ``emit --format builtin`` writes and what ``train`` reads
back (``train --config``) and validates: the checkpoint to start from, the parameter names
that train, LoRA settings, and the keyword arguments of ``transformers.TrainingArguments``
(which transformers validates itself).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field

from tli_recipe.errors import TliError
from tli_recipe.plan.model import SEGMENT, ModPlan, Plan
from tli_recipe.training.distributed import deepspeed_config, fsdp_arguments
from tli_recipe.training.fields import (
    Key,
    is_bf16,
    is_fp16,
    mapped,
    reentrancy,
    true_or_none,
)
from tli_recipe.training.stages import (
    BUILTIN,
    Refusal,
    StageFiles,
    StageSpec,
    TrainerFormat,
    frozen_injected_problem,
    resolve_datasets,
    stage_dir,
    stage_input,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataFile(_Strict):
    path: str
    text_field: str = "text"


class LoraSettings(_Strict):
    r: int = Field(ge=1)
    alpha: float
    dropout: float = Field(ge=0, lt=1)
    targets: list[str] = Field(min_length=1)
    layers: list[int] = Field(description="Output layers that get adapters (peft layers_to_transform).")
    layers_pattern: str = Field(description="peft layers_pattern: the name of the decoder layer list.")
    all_layers: bool = Field(description="Adapters on every layer (no layers_to_transform).")
    quantize: Optional[int] = Field(default=None, description="4 or 8: QLoRA on a bitsandbytes-quantized base.")


class BuiltinStageConfig(_Strict):
    """One stage of the built-in trainer."""

    stage: str = Field(pattern=SEGMENT, max_length=200, description="The stage's name: one plain path segment.")
    root: Optional[str] = Field(
        default=None,
        description="The grown checkpoint's folder, relative to this file's folder; "
        "the other paths are relative to it (None: absolute, or relative to the working directory).",
    )
    index: int = Field(default=1, ge=1)
    stages: int = Field(default=1, ge=1)
    plan: Optional[str] = Field(
        default=None, description="The grown checkpoint's plan.json (copied into the stage output)."
    )
    model: str = Field(description="The checkpoint the stage starts from.")
    output_dir: str
    datasets: list[DataFile]
    sequence_length: int = Field(ge=2)
    validation_fraction: float = Field(default=0.0, ge=0, lt=1)
    trainable_parameters: list[str]
    lora: Optional[LoraSettings] = None
    mod: Optional[ModPlan] = Field(
        default=None, description="objective: mod: the Mixture-of-Depths ensemble head to train beside the parameters."
    )
    precision: Optional[Literal["auto"]] = Field(
        default=None,
        description="auto: train sets bf16 when it starts (bfloat16 on a CUDA GPU with bfloat16, float32 elsewhere), "
        "unless training_arguments set bf16 or fp16; absent: training_arguments decide.",
    )
    training_arguments: dict[str, Any] = Field(
        description="Keyword arguments of transformers.TrainingArguments, less output_dir."
    )


#: ``TrainingArguments`` from the field table, in the order the configs list them.
ARGUMENT_KEYS = (
    Key("learning_rate", "learning_rate"),
    Key("scheduler", "lr_scheduler_type"),
    Key("warmup_steps", "warmup_steps"),
    Key("batch_size", "per_device_train_batch_size"),
    Key("batch_size", "per_device_eval_batch_size"),
    Key("gradient_accumulation", "gradient_accumulation_steps"),
    Key("weight_decay", "weight_decay"),
    Key("optimizer", "optim"),
    # precision auto: no bf16/fp16 key; train chooses them (BuiltinStageConfig.precision)
    Key("precision", "bf16", lambda p: None if p == "auto" else is_bf16(p)),
    Key("precision", "fp16", lambda p: None if p == "auto" else is_fp16(p)),
    Key("max_steps", "max_steps"),
    Key("epochs", "num_train_epochs", float),
    # (renamed activation_checkpointing in recent transformers; train() translates)
    Key("gradient_checkpointing", "gradient_checkpointing", true_or_none),
    Key("gradient_checkpointing", "gradient_checkpointing_kwargs", reentrancy),
    Key("logging_steps", "logging_steps"),
)
SAVE_KEYS = (Key("save_steps", "save_steps"), Key("save_total_limit", "save_total_limit"), Key("seed", "seed"))


def training_arguments(plan: Plan, spec: StageSpec) -> dict:
    """Keyword arguments of ``transformers.TrainingArguments`` (also valid for TRL's ``SFTConfig``), less output_dir."""
    s = spec.settings
    args = mapped(s, plan.seed, ARGUMENT_KEYS)
    args.update(
        {
            "logging_first_step": True,
            "eval_strategy": "steps" if s.validation_fraction > 0 else "no",
            "save_strategy": "steps",
            **mapped(s, plan.seed, SAVE_KEYS),
            "report_to": "none",
        }
    )
    args.update(mapped(s, plan.seed, (Key("eval_steps", "eval_steps"),)))
    d = spec.plan.distributed
    if d.strategy == "fsdp":
        args.update(fsdp_arguments(d))
    elif d.strategy == "deepspeed":  # inline: TrainingArguments takes the JSON as a dict
        args["deepspeed"] = deepspeed_config(d)
    return args


def lora_settings(plan: Plan, spec: StageSpec) -> Optional[LoraSettings]:
    lora = spec.plan.lora
    if lora is None:
        return None
    return LoraSettings(
        r=lora.r,
        alpha=lora.alpha,
        dropout=lora.dropout,
        targets=list(lora.targets),
        layers=list(lora.layers),
        layers_pattern=plan.layers_pattern,
        all_layers=lora.layers == [e.output for e in plan.layers],
        quantize=spec.settings.lora.quantize if spec.settings.lora is not None else None,
    )


def builtin_config(
    plan: Plan,
    specs: list[StageSpec],
    spec: StageSpec,
    model_dir: Path,
    data: Optional[Sequence[str | Path]] = None,
    into: Optional[Path] = None,
) -> BuiltinStageConfig:
    """The built-in trainer's stage config: what to load, which names train, and the TrainingArguments."""
    problem = frozen_injected_problem(spec)
    if problem:
        raise Refusal(problem)
    if spec.plan.lora is not None and spec.plan.distributed.zero_stage == 3:
        # Merging loads the base again in rank 0 alone, which ZeRO-3's sharded loading (zero.Init) cannot do.
        raise Refusal(
            f"{BUILTIN}: stage '{spec.plan.name}': LoRA with deepspeed zero_stage 3 is not supported by the built-in "
            "trainer (the adapters are merged in one process); use zero_stage 2 or fsdp, or Axolotl or LLaMA-Factory"
        )
    return BuiltinStageConfig(
        stage=spec.plan.name,
        index=spec.index,
        stages=len(specs),
        plan=str(model_dir / "plan.json"),
        model=str(stage_input(model_dir, specs, spec, BUILTIN, into)),
        output_dir=str(stage_dir(model_dir, spec.plan.name, BUILTIN, into)),
        datasets=[DataFile(path=d.path, text_field=d.text_field) for d in resolve_datasets(spec, data)],
        sequence_length=spec.settings.sequence_length,
        validation_fraction=spec.settings.validation_fraction,
        trainable_parameters=list(spec.plan.parameters),
        lora=lora_settings(plan, spec),
        mod=spec.plan.mod,
        precision="auto" if spec.settings.precision == "auto" else None,
        training_arguments=training_arguments(plan, spec),
    )


PATH_FIELDS = ("plan", "model", "output_dir")


def relative_config(cfg: BuiltinStageConfig, ctx) -> BuiltinStageConfig:
    """``cfg`` with its paths relative to the grown checkpoint's folder, and ``root`` leading there from
    the config's folder."""
    update: dict[str, Any] = {k: ctx.rel(getattr(cfg, k)) for k in PATH_FIELDS if getattr(cfg, k) is not None}
    update["datasets"] = [d.model_copy(update={"path": ctx.rel(d.path)}) for d in cfg.datasets]
    update["root"] = os.path.relpath(ctx.model_dir, ctx.shown)
    return cfg.model_copy(update=update)


def absolute_config(cfg: BuiltinStageConfig, folder: Path) -> BuiltinStageConfig:
    """``cfg`` (read from a file in ``folder``) with every path absolute: relative ones join ``folder/root``."""
    if cfg.root is None:
        return cfg
    base = Path(folder).resolve() / cfg.root

    def absolute(path: str) -> str:
        return os.path.normpath(base / Path(path).expanduser())

    update: dict[str, Any] = {k: absolute(getattr(cfg, k)) for k in PATH_FIELDS if getattr(cfg, k) is not None}
    update["datasets"] = [d.model_copy(update={"path": absolute(d.path)}) for d in cfg.datasets]
    update["root"] = None
    return cfg.model_copy(update=update)


def check_layout(cfg: BuiltinStageConfig, path: Path, into: bool = False) -> None:
    """Refuse a stage config read from ``path`` whose paths are not where emit puts them.

    A config file decides where ``train`` writes, so it is hostile input: emit writes the grown
    checkpoint's ``plan.json``, starts stage 1 from that checkpoint and stage k from the previous
    stage's sibling folder, and writes the stage to ``<checkpoint>-<stage>`` beside it. Anything
    else (an edited ``output_dir`` three levels up, a ``model`` elsewhere) is refused before any
    file is read or written; ``--into DIR`` chooses another place for the output (``into``: it was
    given, so ``output_dir`` is not used).
    """
    fix = "emit the configs again (tli-recipe emit), or pass --into DIR to write the stage elsewhere"
    if cfg.plan is None or Path(cfg.plan).name != "plan.json":
        raise TliError(f"{path}: plan: expected the grown checkpoint's plan.json, as emit writes it; {fix}")
    grown = Path(cfg.plan).parent
    wanted = stage_dir(grown, cfg.stage)
    if not into and Path(cfg.output_dir) != wanted:
        raise TliError(
            f"{path}: output_dir: stage '{cfg.stage}' of {grown} is written to {wanted}, and this config "
            f"names another folder ({_shown(cfg.output_dir)}); {fix}"
        )
    model = Path(cfg.model)
    stage = model.name.removeprefix(f"{grown.name}-")
    if model != grown and not (model.parent == grown.parent and model.name != stage and re.fullmatch(SEGMENT, stage)):
        raise TliError(
            f"{path}: model: a stage starts from the grown checkpoint {grown} or an earlier stage's folder "
            f"beside it ({grown.name}-<stage>), and this config names another ({_shown(cfg.model)}); {fix}"
        )


def _shown(value: str, limit: int = 200) -> str:
    """A path from a file, shown on one line and bounded."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


class Builtin(TrainerFormat):
    name = BUILTIN
    title = "tli-recipe (Hugging Face Trainer)"

    def notes(self, spec: StageSpec) -> list[str]:
        return {
            "auto": [
                "Precision: auto (no bf16 key): `tli-recipe train` chooses bfloat16 on a CUDA GPU with bfloat16",
                "and float32 elsewhere (on a CPU bfloat16 is many times slower), and says which. Fixed:",
                "re-emit or train with --set 'stages[*].precision=float32' (or bfloat16).",
            ],
            "bfloat16": [
                "Precision: bfloat16 autocast on any device; on a CPU it is many times slower than float32",
                "(train warns). By device: --set 'stages[*].precision=auto'; off: --set 'stages[*].precision=float32'.",
            ],
            "float16": [
                "Precision: float16 autocast (needs a GPU). Off: re-emit or train with",
                "--set 'stages[*].precision=float32'.",
            ],
            "float32": ["Precision: float32 (bf16 and fp16 off)."],
        }[spec.settings.precision]

    def stage(self, spec: StageSpec) -> StageFiles:
        ctx = self.ctx
        cfg = relative_config(builtin_config(ctx.plan, ctx.specs, spec, ctx.model_dir, ctx.data), ctx)
        run = f"tli-recipe train . --stage {spec.plan.name}   (or: tli-recipe train --config {self.shown(spec)})"
        return StageFiles(
            cfg.model_dump(), run, {f"{spec.file_stem}.parameters.txt": "\n".join(spec.plan.parameters) + "\n"}
        )
