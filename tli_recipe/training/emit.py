"""Plan -> one training config per stage and trainer, written into ``<folder>/<trainer>/``.

Pure data and YAML; no torch. The plan is the single source of truth: which parameter
names train comes from ``StagePlan.parameters`` and ``StagePlan.lora``, the
hyperparameters from ``StagePlan.settings`` (mapped per trainer by
:mod:`tli_recipe.training.fields`). Each trainer's knowledge sits in its own module
(:mod:`~tli_recipe.training.axolotl`, :mod:`~tli_recipe.training.llamafactory`,
:mod:`~tli_recipe.training.builtin`); every emitted selection is checked against the
trainer's own matching rule before it is written, and a trainer that cannot express a
stage exactly gets a :class:`Refusal` (why, and what would work), never an approximate config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from tli_recipe._version import __version__
from tli_recipe.plan.model import Plan
from tli_recipe.training.axolotl import Axolotl
from tli_recipe.training.builtin import Builtin
from tli_recipe.training.llamafactory import LlamaFactory
from tli_recipe.training.stages import (  # noqa: F401  (re-exported: the names callers of emit know)
    EmitContext,
    Refusal,
    StageSpec,
    TrainerFormat,
    dump_yaml,
    frozen_injected_problem,
    resolve_datasets,
    select_stages,
    stage_dir,
    stage_input,
    stage_specs,
)

#: Every trainer, by its folder and ``--format`` name.
FORMATS: dict[str, type[TrainerFormat]] = {t.name: t for t in (Axolotl, LlamaFactory, Builtin)}
TRAINERS: tuple[str, ...] = tuple(FORMATS)


def ranges(values: list[int]) -> str:
    from tli_recipe.plan.report import ranges

    return ranges(values)


def _header(plan: Plan, spec: StageSpec, trainer: str, run: str, notes: Sequence[str] = ()) -> str:
    sp = spec.plan
    what = (
        f"LoRA r={sp.lora.r} on {', '.join(sp.lora.targets)} of output layers {ranges(sp.lora.layers)}"
        if sp.lora
        else f"full weights of {len(sp.parameters)} tensors (output layers {ranges(sp.trainable_layers)}"
        + (f" + {', '.join(sp.trainable_groups)}" if sp.trainable_groups else "")
        + ")"
    )
    return (
        f"# {trainer} config for stage {spec.index} '{sp.name}' of {plan.name}, written by tli-recipe {__version__}\n"
        f"# from plan.json (recipe sha256 {plan.recipe_sha256[:12]}): trains {what}.\n"
        "# Every path here is relative to the grown checkpoint's folder (the one holding plan.json), so the configs\n"
        "# move with the checkpoint: run from that folder.\n"
        f"# Run: {run}\n" + "".join(f"# {line}\n" for line in notes)
    )


def _stage_files(trainer: TrainerFormat, spec: StageSpec, refused: set[int]):
    """The trainer's files for ``spec``; a Refusal also when the stage it starts from was refused (no config of
    this trainer would produce its input)."""
    if spec.plan.mod is not None and trainer.name != Builtin.name:
        raise Refusal(
            f"{trainer.name}: stage '{spec.plan.name}': objective: mod trains a Mixture-of-Depths ensemble "
            f"(new norms and a router over layers {spec.plan.mod.layers[0]}-{spec.plan.mod.layers[-1]}, with "
            f"its own loss), which {trainer.title} has no setting for; so no config is written. Train this "
            "stage with tli-recipe train (the built-in trainer)"
        )
    files = trainer.stage(spec)  # the stage's own refusal comes first
    if spec.index - 1 in refused:
        previous = trainer.ctx.specs[spec.index - 2]
        source = stage_input(trainer.ctx.model_dir, trainer.ctx.specs, spec, trainer.name)
        raise Refusal(
            f"{trainer.name}: stage '{spec.plan.name}': it starts from {trainer.ctx.rel(source)}, the output of "
            f"stage {previous.index} '{previous.plan.name}', which no {trainer.title} config produces (stage "
            f"{previous.index} is refused, see {previous.file_stem}.refused.txt); so no config is written. "
            "Train both stages with another trainer (tli-recipe train expresses every stage)"
        )
    return files


def _write_trainer(
    trainer: TrainerFormat, chosen: list[StageSpec], out: Path, no_data: list[str], refusals: list[Refusal]
) -> list[Path]:
    """One trainer's stage configs (or ``.refused.txt``), its folder files and README.txt in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    commands = []
    probe = type(trainer)(trainer.ctx)  # for the stages before a chosen one that are not written
    refused: set[int] = set()
    for spec in trainer.ctx.specs[: max(s.index for s in chosen)]:
        if spec not in chosen:
            try:
                _stage_files(probe, spec, refused)
            except Refusal:
                refused.add(spec.index)
            continue
        for suffix in (".yaml", ".refused.txt", ".merge.yaml", ".parameters.txt"):
            (out / f"{spec.file_stem}{suffix}").unlink(missing_ok=True)
        try:
            files = _stage_files(trainer, spec, refused)
        except Refusal as refusal:
            refused.add(spec.index)
            refusals.append(refusal)
            (out / f"{spec.file_stem}.refused.txt").write_text(str(refusal) + "\n")
            commands.append(f"# stage {spec.index} '{spec.plan.name}': refused, see {spec.file_stem}.refused.txt")
            continue
        texts = {
            f"{spec.file_stem}.yaml": _header(trainer.ctx.plan, spec, trainer.title, files.run, trainer.notes(spec))
            + dump_yaml(files.config),
            **files.extra,
        }
        for name, text in texts.items():
            (out / name).write_text(text)
            written.append(out / name)
        commands.append(files.run)
    for name, text in trainer.folder_files().items():
        (out / name).write_text(text)
        written.append(out / name)
    note = (
        f"\n# Stages {', '.join(no_data)} name no datasets: add `datasets` to the recipe's stage, or re-emit "
        "with `tli-recipe emit . --data FILE`.\n"
        if no_data
        else ""
    )
    (out / "README.txt").write_text(
        f"# {trainer.name}: the stages of {trainer.ctx.plan.name}, in order. Run from the grown "
        "checkpoint's folder (the one holding plan.json): the paths in the configs are relative "
        f"to it.{note}\n" + "\n".join(commands) + "\n"
    )
    return written


def write_training_configs(
    plan: Plan,
    folder: Path,
    model_dir: Path,
    *,
    formats: Sequence[str] = TRAINERS,
    stages: Optional[Sequence[str]] = None,
    data: Optional[Sequence[str | Path]] = None,
    log: Optional[Callable[[str], None]] = None,
    final_folder: Optional[Path] = None,
) -> tuple[list[Path], list[Refusal]]:
    """Write ``folder/<trainer>/NN-<stage>.yaml`` for each trainer and stage.

    ``final_folder``: where ``folder`` will be once `run` renames its temporary directory into
    place; the paths written inside the configs (commands, LLaMA-Factory's dataset_dir) use it.

    A stage a trainer cannot express gets ``NN-<stage>.refused.txt`` (the reason) instead;
    the refusals are returned, not raised, so that ``run`` always finishes. ``model_dir`` is
    where the grown checkpoint is (or will be); paths in the configs are relative to it.
    """
    specs = stage_specs(plan)
    chosen = select_stages(specs, stages)
    if not chosen:
        return [], []
    model_dir = Path(model_dir).resolve()
    written: list[Path] = []
    refusals: list[Refusal] = []
    no_data = [s.plan.name for s in chosen if not resolve_datasets(s, data)]
    for name in formats:
        shown = Path(final_folder or folder).resolve() / name  # the path the configs will have
        trainer = FORMATS[name](EmitContext(plan, specs, model_dir, data, shown))
        written += _write_trainer(trainer, chosen, folder / name, no_data, refusals)
    if log:
        for line in refusal_warnings(refusals):
            log(line)
    return written, refusals


def refusal_warnings(refusals: Sequence[Refusal]) -> list[str]:
    """How `emit` and `run` show refused stages: one warning each, with its reason (the same text as its
    ``.refused.txt``)."""
    return [f"warning: {refusal}" for refusal in refusals]
