"""The stage-selection core every trainer shares: which stages, where they read and write, their data.

Pure data; no torch. A :class:`StageSpec` is one stage of the plan with its position
and its training settings (``StagePlan.settings``, copied from the recipe at compile time); the plan is the only input.

Stages chain: stage 1 starts from the grown checkpoint, stage k from stage k-1's
output (for a LoRA stage, its merged output). Stage outputs are siblings of the
model directory: ``<model>-<stage>`` (built-in trainer), ``<model>-<stage>-axolotl``,
``<model>-<stage>-llamafactory``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from tli_recipe.errors import TliError, did_you_mean
from tli_recipe.plan.model import Plan, SettingsDataset, StagePlan, StageSettings
from tli_recipe.recipe.schema import LINEAR_PROJECTIONS

#: The built-in trainer's folder and ``--format`` name.
BUILTIN = "builtin"


class Refusal(TliError):
    """A trainer cannot express a stage exactly; the message says why and what would work."""


@dataclass(frozen=True)
class StageSpec:
    """One stage: its position (1-based) and what the plan resolved, its training settings included."""

    index: int
    plan: StagePlan

    @property
    def settings(self) -> StageSettings:
        return self.plan.settings

    @property
    def file_stem(self) -> str:
        return f"{self.index:02d}-{self.plan.name}"


def stage_specs(plan: Plan) -> list[StageSpec]:
    """The plan's stages, numbered from 1."""
    return [StageSpec(i, sp) for i, sp in enumerate(plan.stages, 1)]


def select_stages(specs: list[StageSpec], names: Optional[Sequence[str]]) -> list[StageSpec]:
    if not names:
        return specs
    known = [s.plan.name for s in specs]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise TliError(
            f"--stage {unknown[0]}: no such stage{did_you_mean(unknown[0], known)}; "
            f"the plan's stages: {', '.join(known) or 'none (add stages to the recipe)'}"
        )
    return [s for s in specs if s.plan.name in names]


# --- where stages read and write -----------------------------------------------------------


def stage_dir(model_dir: Path, stage: str, trainer: str = BUILTIN, into: Optional[Path] = None) -> Path:
    """Output directory of a stage: a sibling of the model directory (or ``into/<stage>``)."""
    if into is not None:
        return Path(into) / stage
    suffix = "" if trainer == BUILTIN else f"-{trainer}"
    return model_dir.parent / f"{model_dir.name}-{stage}{suffix}"


def stage_input(
    model_dir: Path, specs: list[StageSpec], spec: StageSpec, trainer: str = BUILTIN, into: Optional[Path] = None
) -> Path:
    """The checkpoint a stage starts from: the grown model, or the previous stage's (merged) output."""
    if spec.index == 1:
        return model_dir
    previous = specs[spec.index - 2]
    out = stage_dir(model_dir, previous.plan.name, trainer, into)
    # Axolotl and LLaMA-Factory keep the adapter in output_dir and write the merged model below it.
    return out / "merged" if previous.plan.lora is not None and trainer != BUILTIN else out


def resolve_datasets(spec: StageSpec, data: Optional[Sequence[str | Path]] = None) -> list[SettingsDataset]:
    """The stage's datasets (or ``data``, which replaces them), with absolute paths."""
    chosen = [SettingsDataset(path=str(p)) for p in data] if data else list(spec.settings.datasets)
    return [SettingsDataset(path=str(Path(d.path).expanduser().resolve()), text_field=d.text_field) for d in chosen]


# --- facts about the plan every trainer needs ------------------------------------------------


def layer_prefix(plan: Plan) -> tuple[str, str]:
    """The architecture's layer prefix split at ``{layer}``: ``("model.layers.", ".")``."""
    head, _, tail = plan.layer_prefix.partition("{layer}")
    return head, tail


def tensor_names(plan: Plan) -> list[str]:
    return [op.name for op in plan.tensors]


def loaded_name_map(plan: Plan) -> dict[str, str]:
    """Checkpoint name -> parameter name once transformers (>= 5) loads the output, for the tensors it
    renames (MoE routers and fused experts); empty when the output's architecture renames none."""
    from tli_recipe.source.arch import load_architectures

    arch = load_architectures().get(plan.upcycle.output_architecture if plan.upcycle else plan.architecture)
    if arch is None or not arch.loaded_names:
        return {}
    renamed = {name: arch.loaded_name(name) for name in tensor_names(plan)}
    return {k: v for k, v in renamed.items() if k != v}


def integer_alpha(spec: StageSpec, trainer: str) -> int:
    """The stage's LoRA alpha as the integer Axolotl and LLaMA-Factory take, or a Refusal."""
    alpha = spec.plan.lora.alpha  # type: ignore[union-attr]
    if alpha != int(alpha):
        raise Refusal(
            f"{trainer}: stage '{spec.plan.name}': lora.alpha {alpha:g} is not an integer and {trainer} "
            "takes an integer lora_alpha; use an integer alpha, or the built-in trainer (tli-recipe train)"
        )
    return int(alpha)


def frozen_injected_problem(spec: StageSpec) -> Optional[str]:
    """Why a LoRA stage can never move the injected layers it names, or None.

    In an injected layer whose o_proj and down_proj are zero (or whose output norm gain
    is zero), the block's output is exactly 0, so the gradient reaching the adapters on
    every other projection of that block is 0 too. compile_plan judged which layers that
    leaves frozen (``LoraPlan.frozen_injected``); the recipe may say this is intended.
    """
    lora = spec.plan.lora
    if lora is None or not lora.frozen_injected:
        return None
    if spec.settings.lora is not None and spec.settings.lora.allow_frozen_injected:
        return None
    injected, missing = lora.frozen_injected, lora.frozen_by
    linear = [p for p in missing if p in LINEAR_PROJECTIONS]
    fix = (
        f"add {', '.join(linear)} to lora.targets, or "
        if linear == missing
        else f"LoRA cannot adapt {', '.join(p for p in missing if p not in linear)}, so "
    )
    return (
        f"stage '{spec.plan.name}': LoRA targets {', '.join(lora.targets)} leave out {', '.join(missing)}, which "
        f"{'is' if len(missing) == 1 else 'are'} zero in the injected layers {injected}: those blocks output "
        "exactly 0, so adapters on their other projections get no gradient and the injected layers never move. "
        f"To fix it, {fix}train the injected layers fully in an earlier stage; or set lora.allow_frozen_injected: "
        "true if this is intended"
    )


# --- the interface every trainer implements ----------------------------------------------------


@dataclass(frozen=True)
class EmitContext:
    """What a trainer's configs are made from: the plan, its stages, where the model and configs are."""

    plan: Plan
    specs: list[StageSpec]
    model_dir: Path
    data: Optional[Sequence[str | Path]] = None
    shown: Path = Path(".")  # the folder this trainer's configs will be in (commands and dataset_dir name it)

    def rel(self, path: str | Path) -> str:
        """``path`` relative to the grown checkpoint's folder: what every path in an emitted config is."""
        return os.path.relpath(Path(path), self.model_dir)


@dataclass(frozen=True)
class StageFiles:
    """A stage's config (written as ``NN-<stage>.yaml`` under a header), its run command, other files by name."""

    config: dict
    run: str
    extra: dict[str, str]


class TrainerFormat:
    """One trainer's configs. Subclasses set ``name`` (the folder and ``--format``) and ``title``,
    and implement :meth:`stage`; a stage they cannot express exactly raises :meth:`refuse`."""

    name: str = ""
    title: str = ""

    def __init__(self, ctx: EmitContext) -> None:
        self.ctx = ctx

    def stage(self, spec: StageSpec) -> StageFiles:
        raise NotImplementedError

    def notes(self, spec: StageSpec) -> list[str]:
        """Comment lines for the config's header (precision, what needs a GPU)."""
        return []

    def folder_files(self) -> dict[str, str]:
        """Files beside the stage configs once every stage is done (name -> text)."""
        return {}

    def refuse(self, spec: StageSpec, why: str) -> Refusal:
        return Refusal(f"{self.name}: stage '{spec.plan.name}': {why}")

    def check_frozen_injected(self, spec: StageSpec) -> None:
        problem = frozen_injected_problem(spec)
        if problem:
            raise Refusal(f"{self.name}: {problem}")

    def shown(self, spec: StageSpec, suffix: str = ".yaml") -> str:
        """Where a stage's file will be, relative to the grown checkpoint's folder (the path commands name)."""
        return self.ctx.rel(self.ctx.shown / f"{spec.file_stem}{suffix}")


def dump_yaml(data: dict) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=120)
