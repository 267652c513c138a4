"""The build commands: validate, plan, run, verify, architectures, schema.

`validate` and `plan` never import torch or transformers; `run` and `verify` import
tensor code only when they start working.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tli_recipe.cli.common import SET_HELP, compile_recipe, library_file, load, reported
from tli_recipe.errors import RecipeError, TliError


@click.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@reported
def validate(recipes: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Check recipe files against the schema (no checkpoint needed). All errors at once.

    A recipe is a file, or a library recipe by name (qwen3-4b-k4: recipes/NAME.yaml here, else in the
    library installed with tli-recipe); the same holds for plan and run."""
    problems = []
    for recipe in recipes:
        try:
            load(library_file(recipe), overrides)
            click.echo(f"ok: {recipe}")
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(problems)


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the whole plan as JSON, with the memory estimates under the key `estimates`.",
)
@click.option(
    "--gpus",
    type=click.IntRange(1, 1 << 20),
    default=None,
    help="Processes (GPUs) a sharded stage (fsdp, deepspeed) is divided over in the memory estimates [default: "
    "per GPU of one, naming the parts to divide].",
)
@reported
def plan(recipe: str, overrides: tuple[str, ...], as_json: bool, gpus: int | None) -> None:
    """Compile a recipe against its base model's config and headers; print the layer map, the totals, and
    the memory each training stage and `verify` will need (weights, gradients and Adam state per GPU, from
    the parameter counts; activations not counted).

    A hub id not in the local Hugging Face cache: config.json and the index are fetched and the
    safetensors headers read by range requests; the weights are not downloaded. When the base model
    cannot be opened (offline, the hub unreachable, a gated model) and its published config is stored
    in the package, the plan is made from that config, and a note says so."""
    recipe = library_file(recipe)
    try:
        compiled = compile_recipe(recipe, overrides)
    except RecipeError as exc:
        compiled = _from_stored_config(recipe, overrides, exc)
    if as_json:
        from tli_recipe.plan.cost import estimates

        # the plan's own JSON, then its estimates: derived, so Plan drops them when this JSON is read back
        text = compiled.model_dump_json(indent=2)
        extra = json.dumps({"estimates": estimates(compiled, gpus)}, indent=2)
        click.echo(text[: text.rindex("}")].rstrip() + ",\n" + extra[1:].lstrip("\n"))
        return
    from tli_recipe.plan.report import plan_table

    click.echo(plan_table(compiled, gpus))


def _from_stored_config(recipe: str, overrides: tuple[str, ...], failed: RecipeError):
    """The plan against the stored config of the base model when opening the model itself failed (as `list`,
    `diff` and `render` plan the library); ``failed`` is raised when that does not apply or fails too."""
    from tli_recipe.library.catalog import default_configs, stored_config

    # Only a base model that could not be opened (located at base_model itself, not at a pin's revision or checksum)
    if not failed.problems or any(
        tuple(p.path) not in (("base_model",), ("base_model", "path")) for p in failed.problems
    ):
        raise failed
    folder = stored_config(load(recipe, overrides).recipe.base_model, default_configs())
    if folder is None:
        raise failed
    notes = (
        f"note: {failed.problems[0].message}\n"
        f"note: so the plan is made from the stored config {folder / 'config.json'} (the published layer and "
        "parameter counts; no revision or checksum is checked); `run` needs the weights: it downloads them when the "
        "hub is reachable, or give a local copy with --set base_model=/path/to/model"
    )
    try:
        compiled = compile_recipe(recipe, (*overrides, f"base_model={folder}"))
    except RecipeError as exc:
        if all(tuple(p.path)[:1] == ("base_model",) for p in exc.problems):
            raise failed from None
        click.echo(notes, err=True)  # the recipe's own problems, found against the stored config
        raise
    click.echo(notes, err=True)
    return compiled


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option(
    "--output",
    "-o",
    type=click.Path(file_okay=False),
    help="Output directory (default: the recipe's output, else out/<name>).",
)
@click.option(
    "--device", default="auto", show_default=True, help="Where tensor arithmetic runs: auto, cpu, cuda or cuda:N."
)
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option(
    "--sync", is_flag=True, help="fsync every output file before the final rename (durable against power loss; slower)."
)
@click.option("--rehash", is_flag=True, help="Hash every source byte (ignore hub blob names and the digest cache).")
@click.option(
    "--offline",
    is_flag=True,
    help="Never download: a hub id must be in the local Hugging Face cache (as HF_HUB_OFFLINE=1).",
)
@reported
def run(
    recipe: str,
    overrides: tuple[str, ...],
    output: str | None,
    device: str,
    force: bool,
    no_progress: bool,
    sync: bool,
    rehash: bool,
    offline: bool,
) -> None:
    """Write the grown checkpoint: shards, index, config, tokenizer, recipe, plan.json, model card.

    A hub id not in the local Hugging Face cache is downloaded first (config, safetensors, tokenizer
    and generation files only), unless --offline."""
    recipe = library_file(recipe)
    compiled = compile_recipe(recipe, overrides, fetch="weights", offline=offline, progress=not no_progress)
    for warning in compiled.warnings:
        click.echo(f"warning: {warning}", err=True)
    from tli_recipe import execute_plan

    click.echo(
        f"output: {Path(output or compiled.output).resolve()}", err=True
    )  # where a shared recipe makes run write
    execute_plan(
        compiled,
        output,
        device=device,
        force=force,
        progress=not no_progress,
        sync=sync,
        rehash=rehash,
        log=lambda msg: click.echo(msg, err=True),
    )


@click.command()
@click.argument("output", type=click.Path(file_okay=False, exists=True))
@click.option(
    "--atol",
    default=1e-5,
    show_default=True,
    help="Tolerance of a function-preserving plan, relative: |logits - base logits| may reach atol x max |base "
    "logits| (at least atol), and each layer's residual atol x its max |value|.",
)
@click.option("--no-tensors", is_flag=True, help="Skip the tensor-by-tensor check against the plan.")
@click.option("--no-logits", is_flag=True, help="Skip running both models with transformers.")
@click.option(
    "--whole",
    is_flag=True,
    help="Load both models whole (from_pretrained) instead of streaming one decoder layer at a time.",
)
@click.option("--device", default="cpu", show_default=True, help="Device that runs each layer (cpu, cuda, cuda:1).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16", "stored"]),
    default="float32",
    show_default=True,
    help="Compute dtype of both models; stored: the output's stored dtype.",
)
@click.option(
    "--text",
    type=click.Path(dir_okay=False, exists=True),
    help="Measure on this UTF-8 text, tokenised by the base model's tokenizer (default: random token ids).",
)
@click.option("--batch", default=2, show_default=True, type=click.IntRange(1, 1024), help="Rows of tokens.")
@click.option("--length", default=24, show_default=True, type=click.IntRange(1, 65536), help="Tokens per row.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (the per-layer numbers included).")
@click.option("-o", "--plot", type=click.Path(dir_okay=False), help="Write a plot of the difference by layer (PNG).")
@reported
def verify(
    output: str,
    atol: float,
    no_tensors: bool,
    no_logits: bool,
    whole: bool,
    device: str,
    dtype: str,
    text: str | None,
    batch: int,
    length: int,
    as_json: bool,
    plot: str | None,
) -> None:
    """Check an output directory against its plan.json and its base model.

    Every tensor is recomputed from the plan and compared bit for bit; then base and output run on
    the same tokens, one decoder layer at a time, and the report gives, for every output layer,
    the largest difference of the residual stream to the base layer at the same position, and for
    the logits the largest difference, KL divergence and top-1 agreement."""
    from tli_recipe import verify_output
    from tli_recipe.execute.layerwise import plot_report, report_table
    from tli_recipe.execute.verify import raise_for

    report = verify_output(
        output,
        atol=atol,
        tensors=not no_tensors,
        logits=not no_logits,
        device=device,
        whole=whole,
        dtype=dtype,
        text=Path(text) if text else None,
        batch=batch,
        length=length,
        log=lambda msg: click.echo(msg, err=True),
    )
    check = report.function
    if check is not None and plot:
        plot_report(check, Path(plot), atol=atol)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "output": output,
                    "ok": report.ok,
                    "function_preserving": report.function_preserving,
                    "atol": atol,
                    "tensors_checked": report.tensors_checked,
                    "tensor_problems": report.tensor_problems,
                    "nonfinite_sources": report.nonfinite_sources,
                    "function": check.to_json() if check is not None else None,
                },
                indent=2,
            )
        )
    else:
        if not no_tensors:
            click.echo(
                f"tensors: {report.tensors_checked} checked against the plan, {len(report.tensor_problems)} problems"
            )
        if check is not None:
            for line in report_table(check, atol=atol, preserving=report.function_preserving):
                click.echo(line)
            verdict = ("within" if check.logits_max_abs_diff <= check.logits_tolerance else "BEYOND") + (
                f" tolerance {check.logits_tolerance:.3g} = {atol:g} x max(1, max |base logits| "
                f"{check.logits_scale:.3g})"
            )
            if not report.function_preserving:
                verdict = "the plan is not function-preserving, so a difference is expected"
            click.echo(
                f"logits: max |output - base| = {check.logits_max_abs_diff:.3g} over {check.tokens} tokens ({verdict})"
            )
        if plot and check is not None:
            click.echo(f"wrote {plot}")
    raise_for(report, Path(output))
    if not as_json:
        click.echo(f"ok: {output}")


@click.command()
@click.option("--markdown", is_flag=True, help="Print the README's table.")
def architectures(markdown: bool) -> None:
    """List the supported architectures (from tli_recipe/_data/architectures/)."""
    from tli_recipe.plan.report import architecture_table
    from tli_recipe.source.arch import load_architectures

    if markdown:
        click.echo(architecture_table())
        return
    for name, arch in sorted(load_architectures().items()):
        click.echo(f"{name:<12} {', '.join(arch.architectures)}")
        if arch.notes:
            click.echo(f"{'':<12} {arch.notes}")


SCHEMA_FILES = {"recipe": "schemas/recipe.schema.json", "matrix": "schemas/matrix.schema.json"}


@click.command()
@click.argument("kind", type=click.Choice(sorted(SCHEMA_FILES)), default="recipe")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write the schema here instead of stdout (missing folders are created; the file is replaced).",
)
@click.option("--check", is_flag=True, help="Exit 1 if --output differs from the current schema.")
@reported
def schema(kind: str, output: str | None, check: bool) -> None:
    """Print (or write) the JSON schema of a recipe (KIND recipe, the default) or of a matrix file
    of `variants` (KIND matrix), generated from the pydantic models."""
    if kind == "matrix":
        from tli_recipe.library.variants import matrix_schema as make
    else:
        from tli_recipe.recipe.schema import recipe_schema as make

    text = json.dumps(make(), indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    elif check:
        if not Path(output).is_file() or Path(output).read_text() != text:
            raise TliError(f"{output} is stale; regenerate it with `tli-recipe schema {kind} -o {output}`")
        click.echo(f"ok: {output} is current")
    else:
        from tli_recipe.files import write_output

        click.echo(write_output(output, text, replace=True), err=True)


COMMANDS = (validate, plan, run, verify, architectures, schema)
