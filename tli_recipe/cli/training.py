"""The training commands of `tli-recipe`: emit, train, eval, compare.

`emit` needs no torch (it reads plan.json, or compiles a recipe); `train` and `eval`
import torch, transformers and peft only when they run. Errors follow the rest of the
CLI: a message, exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tli_recipe.cli.common import SET_HELP, reported
from tli_recipe.errors import TliError
from tli_recipe.training.emit import TRAINERS

DATA_HELP = (
    "Training text, repeatable; replaces the stages' datasets. A plain-text file (one document per line), or "
    'JSONL (.jsonl, .json, .gz) with one record per line: raw text {"text": ...}; a chat {"messages": '
    '[{"role": "user", "content": ...}, ...]} (the tokenizer\'s chat template); or an instruction '
    '{"instruction": ..., "input": ..., "output": ...} (chat template, else the Alpaca prompt).'
)


@click.command()
@click.argument("source", type=click.Path(exists=True))
@click.option(
    "--format",
    "formats",
    type=click.Choice([*TRAINERS, "all"]),
    multiple=True,
    default=("all",),
    show_default=True,
    help="Which trainer's configs to write; repeatable.",
)
@click.option(
    "--stage", "stages", multiple=True, metavar="NAME", help="Only this stage (repeatable; default: every stage)."
)
@click.option("--data", multiple=True, type=click.Path(dir_okay=False), help=DATA_HELP)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    help="Folder for the configs (default: SOURCE/training when SOURCE is a grown checkpoint).",
)
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False),
    help="With a recipe: where the grown checkpoint is or will be (default: the recipe's output).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help=SET_HELP + " On a grown checkpoint: stage settings only, such as 'stages[*].precision=float32'.",
)
@click.option("--strict", is_flag=True, help="Exit 2 when any stage is refused by any trainer (default: a warning).")
@reported
def emit(
    source: str,
    formats: tuple[str, ...],
    stages: tuple[str, ...],
    data: tuple[str, ...],
    output: str | None,
    model_dir: str | None,
    overrides: tuple[str, ...],
    strict: bool,
) -> None:
    """Write one training config per stage for Axolotl, LLaMA-Factory and the built-in trainer.

    SOURCE is a directory written by `run` (its plan.json) or a recipe file. The configs
    select exactly the plan's parameters; a stage a trainer cannot express exactly is
    refused instead of an approximate config: the files written are listed, each refusal is a
    warning with its reason (and a .refused.txt), and the exit status is 0 unless nothing could
    be written (2), or any stage was refused with --strict (2).
    """
    from tli_recipe.training.emit import write_training_configs

    path = Path(source)
    if path.is_dir():
        from tli_recipe.execute.verify import load_plan
        from tli_recipe.training.settings import override_stages

        plan = override_stages(load_plan(path), overrides, str(path))
        folder = Path(output) if output else path / "training"
        where = Path(model_dir) if model_dir else path
    else:
        from tli_recipe.cli.common import compile_recipe

        plan = compile_recipe(source, overrides)
        if output is None:
            raise TliError(
                f"{source}: emitting from a recipe needs --output DIR (`run` writes the configs into the "
                "grown checkpoint by itself)"
            )
        folder = Path(output)
        where = Path(model_dir or plan.output)
    if not plan.stages:
        raise TliError(f"{source}: the recipe defines no stages; nothing to emit (add `stages`, see docs/recipes.md)")
    chosen = TRAINERS if "all" in formats else tuple(dict.fromkeys(formats))
    written, refusals = write_training_configs(
        plan, folder, where, formats=chosen, stages=stages or None, data=data or None
    )
    for file in written:
        click.echo(f"wrote {file}")
    from tli_recipe.training.emit import refusal_warnings, select_stages, stage_specs

    for line in refusal_warnings(refusals):
        click.echo(line, err=True)
    tried = len(chosen) * len(select_stages(stage_specs(plan), stages or None))
    if refusals and len(refusals) >= tried:
        raise TliError(
            f"nothing could be written: each of the {tried} stage configs asked for was refused (reasons above); "
            "choose another --format (tli-recipe train expresses every stage)"
        )
    if refusals and strict:
        raise TliError(f"{len(refusals)} of {tried} stage configs were refused (reasons above) and --strict is given")


@click.command()
@click.argument("model_dir", required=False, type=click.Path(file_okay=False))
@click.option("--data", multiple=True, type=click.Path(dir_okay=False), help=DATA_HELP)
@click.option(
    "--stage", "stages", multiple=True, metavar="NAME|all", help="Stage to train (repeatable; default: all, in order)."
)
@click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, exists=True),
    help="Train one stage from a config written by `emit --format builtin` (instead of MODEL_DIR).",
)
@click.option(
    "--into",
    type=click.Path(file_okay=False),
    help="Write stage N to INTO/<stage> (default: MODEL_DIR-<stage>, beside it).",
)
@click.option(
    "--device", default="auto", show_default=True, help="auto, cpu or cuda (one process; several GPUs: --print-launch)."
)
@click.option(
    "--tokenizer",
    type=click.Path(file_okay=False, exists=True),
    help="Tokenizer directory when the checkpoint has none.",
)
@click.option("--restart", is_flag=True, help="Discard an interrupted run's checkpoints instead of resuming from them.")
@click.option("--force", is_flag=True, help="Train a stage again even when its directory is complete.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--print-launch",
    is_flag=True,
    help="Print the `accelerate launch` and `torchrun` lines for all visible GPUs (and for --machines) and exit.",
)
@click.option(
    "--machines",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --print-launch: also the lines for this many machines.",
)
@click.option(
    "--gpus-per-machine",
    type=click.IntRange(min=1),
    help="With --print-launch --machines: GPUs of each machine (default: as many as this one has, at least 1).",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change a stage setting of the plan: stages[N].FIELD=VALUE or stages[*].FIELD=VALUE (YAML value), "
    "e.g. 'stages[*].precision=float32'. Repeatable.",
)
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps of every stage (replaces epochs).")
@click.option("--learning-rate", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate of every stage.")
@click.option(
    "--report-to",
    type=click.Choice(["none", "tensorboard", "wandb"]),
    default="none",
    show_default=True,
    help="Where the Trainer also logs (tensorboard and wandb must be installed).",
)
@reported
def train(
    model_dir: str | None,
    data: tuple[str, ...],
    stages: tuple[str, ...],
    config: str | None,
    into: str | None,
    device: str,
    tokenizer: str | None,
    restart: bool,
    force: bool,
    no_progress: bool,
    print_launch: bool,
    machines: int,
    gpus_per_machine: int | None,
    overrides: tuple[str, ...],
    max_steps: int | None,
    learning_rate: float | None,
    report_to: str,
) -> None:
    """Train the stages of a grown checkpoint in order (Hugging Face Trainer; peft for LoRA).

    Each stage freezes everything it does not name, trains on packed text, merges LoRA
    adapters at its end, and writes MODEL_DIR-<stage> with the plan, metrics, a CSV of
    losses and a plot. Rerunning an interrupted command resumes from its last checkpoint.
    """
    from tli_recipe.training import launch
    from tli_recipe.training import train as trainer

    if (model_dir is None) == (config is None):
        raise TliError(
            "give either MODEL_DIR (a directory written by `run`) or --config FILE (from `emit --format builtin`)"
        )
    if config is not None and overrides:
        raise TliError(
            "--set changes the stage settings of a grown checkpoint (MODEL_DIR); with --config, edit the "
            "file (its training_arguments are transformers.TrainingArguments)"
        )
    trainer.require_train_extra()
    trainer.check_report_to(report_to)
    # This same command, for a launcher that runs it in every process (each then takes its own GPU).
    argv = launch.train_argv(
        model_dir,
        config,
        data=data,
        stages=stages,
        into=into,
        tokenizer=tokenizer,
        restart=restart,
        force=force,
        no_progress=no_progress,
        overrides=overrides,
        max_steps=max_steps,
        learning_rate=learning_rate,
        report_to=report_to,
    )
    import torch

    gpus = torch.cuda.device_count()
    if print_launch:
        click.echo("\n".join(launch.launch_lines(argv, gpus, machines, gpus_per_machine)))
        return
    if gpus > 1 and not launch.under_launcher():
        click.echo(
            f"note: {gpus} GPUs are visible and this process uses one; for all of them run:\n  "
            + launch.launch_command(argv, gpus),
            err=True,
        )
    try:
        outputs = trainer.run_train(
            model_dir,
            config,
            data=data,
            stages=stages,
            into=into,
            overrides=overrides,
            max_steps=max_steps,
            learning_rate=learning_rate,
            device=device,
            tokenizer=tokenizer,
            restart=restart,
            force=force,
            progress=not no_progress,
            log=lambda msg: click.echo(msg, err=True),
            report_to=report_to,
        )
    except (KeyboardInterrupt, trainer.Preempted) as exc:
        # SIGTERM (a preemption) saved a checkpoint at a step boundary; Ctrl-C keeps the last saved one.
        if launch.is_main_process():
            click.echo(
                f"interrupted: {exc}"
                if isinstance(exc, trainer.Preempted)
                else f"interrupted: the last saved checkpoint is kept; {trainer.RESUME}",
                err=True,
            )
        sys.exit(exc.exit_code if isinstance(exc, trainer.Preempted) else 130)
    if launch.is_main_process():  # one process speaks for all of them
        for out in outputs:
            click.echo(str(out))


TASKS_HELP = (
    "lm-evaluation-harness tasks: NAME[,NAME] or a task YAML file (a local JSONL multiple-choice set); "
    "repeatable. Needs pip install 'tli-recipe[eval]'."
)


@click.command(name="eval")
@click.argument("models", nargs=-1, required=True, type=click.Path(file_okay=False, exists=True))
@click.option(
    "--data",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Held-out text for the loss: plain text (one document per line) or JSONL; repeatable.",
)
@click.option("--tasks", multiple=True, metavar="NAME[,NAME]|FILE.yaml", help=TASKS_HELP)
@click.option("--limit", type=click.IntRange(min=1), help="Score only the first N documents of each task.")
@click.option(
    "--online", is_flag=True, help="Let lm-eval fetch task data from the Hugging Face hub (default: offline)."
)
@click.option("--text-field", default="text", show_default=True, help="The JSONL field holding the text.")
@click.option(
    "--sequence-length",
    type=click.IntRange(min=2),
    help="Tokens per sequence (default: min(1024, the first model's context)).",
)
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--max-sequences", type=click.IntRange(min=1), help="Evaluate only the first N sequences.")
@click.option(
    "--tokenizer",
    type=click.Path(file_okay=False, exists=True),
    help="Tokenizer directory (default: the first model's).",
)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Also write the JSON results to this file (and a PNG of them beside it); missing folders are created.",
)
@click.option("--force", is_flag=True, help="Replace an existing --output file.")
@reported
def eval_(
    models: tuple[str, ...],
    data: tuple[str, ...],
    tasks: tuple[str, ...],
    limit: int | None,
    online: bool,
    text_field: str,
    sequence_length: int | None,
    batch_size: int,
    max_sequences: int | None,
    tokenizer: str | None,
    dtype: str,
    device: str,
    as_json: bool,
    output: str | None,
    force: bool,
) -> None:
    """Held-out loss (--data) and task accuracy (--tasks) of each model: base vs grown vs trained."""
    from tli_recipe.files import write_output
    from tli_recipe.training.eval_report import run_eval

    png = None
    if output:
        png = Path(output).with_suffix(".png") if Path(output).suffix != ".png" else Path(output + ".png")
        for path in (Path(output), png):
            if path.exists() and not force:
                raise TliError(f"{path}: exists; pass --force to replace it (or choose another --output)")
    report = run_eval(
        models,
        data=data,
        tasks=tasks,
        limit=limit,
        online=online,
        tokenizer=tokenizer,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
        text_field=text_field,
        sequence_length=sequence_length,
        max_sequences=max_sequences,
        log=lambda msg: click.echo(msg, err=True),
    )
    if output:
        from tli_recipe.training.eval_report import plot_report

        click.echo(write_output(output, report.to_json() + "\n", force=True), err=True)  # --force checked above
        if plot_report(report, png):
            click.echo(f"wrote {png}", err=True)
    click.echo(report.to_json() if as_json else report.table())


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False, exists=True))
@click.option("--data", multiple=True, required=True, type=click.Path(dir_okay=False, exists=True), help=DATA_HELP)
@click.option(
    "--heldout",
    multiple=True,
    required=True,
    type=click.Path(dir_okay=False, exists=True),
    help="Held-out text for the losses at init and after training (same formats as --data).",
)
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True, help="Optimizer steps per recipe.")
@click.option("--stage", help="The stage to train in every recipe (default: each recipe's first stage).")
@click.option("--sequence-length", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--eval-sequences", type=click.IntRange(min=1), help="Held-out sequences to score (default: all).")
@click.option(
    "--work",
    type=click.Path(file_okay=False),
    default="out/compare",
    show_default=True,
    help="Where grown and trained models go.",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--device", default="auto", show_default=True)
@click.option(
    "--tasks",
    multiple=True,
    metavar="NAME[,NAME]|FILE.yaml",
    help="Also score each model on these lm-eval tasks at init and after training. " + TASKS_HELP,
)
@click.option("--task-limit", type=click.IntRange(min=1), help="Score only the first N documents of each task.")
@click.option(
    "--online", is_flag=True, help="Let lm-eval fetch task data from the Hugging Face hub (default: offline)."
)
@reported
def compare(
    recipes: tuple[str, ...],
    data: tuple[str, ...],
    heldout: tuple[str, ...],
    steps: int,
    stage: str | None,
    sequence_length: int,
    batch_size: int,
    eval_sequences: int | None,
    work: str,
    overrides: tuple[str, ...],
    device: str,
    tasks: tuple[str, ...],
    task_limit: int | None,
    online: bool,
) -> None:
    """Grow the same base model with each recipe, train each for the same token budget, compare held-out losses.

    Writes compare.md, compare.csv, compare.json and compare.png (loss curves) into --work.
    """
    from tli_recipe.training.compare import compare_recipes, table, write_outputs
    from tli_recipe.training.train import Preempted

    try:
        rows = compare_recipes(
            recipes,
            data,
            heldout,
            work=Path(work),
            steps=steps,
            stage=stage,
            overrides=overrides,
            sequence_length=sequence_length,
            batch_size=batch_size,
            eval_sequences=eval_sequences,
            device=device,
            tasks=tasks,
            task_limit=task_limit,
            online=online,
            log=lambda msg: click.echo(msg, err=True),
        )
    except Preempted as exc:  # SIGTERM or a first Ctrl-C, at a step boundary
        click.echo(f"interrupted: {exc}", err=True)
        sys.exit(exc.exit_code)
    files = write_outputs(rows, Path(work), steps)
    click.echo(table(rows, steps))
    click.echo(f"wrote {', '.join(str(f) for f in files)}", err=True)


COMMANDS = (emit, train, eval_, compare)
