"""Commands for recipes shared in git: render, variants, list, diff, pin.

Registered on the main group by ``register(main)``. jinja2 is imported only by
``render`` and ``variants``; ``list``, ``diff`` and ``pin`` need neither torch nor jinja2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from tli_recipe.cli.common import library_file, reported
from tli_recipe.errors import RecipeError, TliError

CONFIGS_HELP = (
    "Folder of stored configs (org__name/config.json) for models that are neither local nor in the "
    "Hugging Face cache; repeatable. Default: $TLI_RECIPE_CONFIGS, else the configs shipped in the package."
)


def _configs(given: tuple[str, ...]) -> list[Path]:
    from tli_recipe.library.catalog import default_configs

    return [Path(c) for c in given] if given else default_configs()


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (no half-written recipe), mode 0644."""
    from tli_recipe.files import write_text_atomic

    write_text_atomic(path, text, mode=0o644, log=lambda msg: click.echo(msg, err=True))


@click.command()
@click.argument("template", type=click.Path(dir_okay=False))
@click.option(
    "--var",
    "var_items",
    multiple=True,
    metavar="NAME=VALUE",
    help="A template variable, parsed as its declared type. Repeatable.",
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False),
    help="Write the recipe here instead of stdout (missing folders are created).",
)
@click.option("--configs", multiple=True, type=click.Path(file_okay=False), help=CONFIGS_HELP)
@click.option("--force", is_flag=True, help="Replace an existing --output file whose text differs.")
@reported
def render(
    template: str, var_items: tuple[str, ...], output: str | None, configs: tuple[str, ...], force: bool
) -> None:
    """Render one recipe from a template (sandboxed jinja2) and validate it.

    The recipe is also planned when its base model's config is found (local, hub cache or
    stored configs), so plan-time errors show too; nothing is written if anything is wrong.
    TEMPLATE is a file, or a library template by name (tli, dus, llama-pro): recipes/templates/NAME.yaml.j2
    here, else in the library installed with tli-recipe.
    """
    from tli_recipe.library.templates import (
        generated_by,
        read_template,
        render_recipe,
        shown_path,
    )
    from tli_recipe.library.values import complete, parse_var_options

    template = library_file(template, "template")
    parsed = read_template(template)
    values = complete(parsed, parse_var_options(parsed, var_items))
    command = " ".join([f"tli-recipe render {shown_path(template)}", *(f"--var {shlex.quote(i)}" for i in var_items)])
    generated = generated_by(command.replace("\n", " "), template)  # a one-off: no matrix
    folder = Path(output).parent if output else Path(".")  # standard output: a file written here, presumably
    rendered = render_recipe(parsed, values, output or "<stdout>", _configs(configs), generated, folder=folder)
    if output is None:
        click.echo(rendered.text, nl=False)
        return
    from tli_recipe.files import write_output

    click.echo(write_output(output, rendered.text, force=force, what="the rendering"), err=True)


@click.command()
@click.argument("source", type=click.Path(dir_okay=False))
@click.option(
    "--var", "var_items", multiple=True, metavar="NAME=VALUE", help="A value every combination shares. Repeatable."
)
@click.option(
    "--grid",
    "grid_items",
    multiple=True,
    metavar="NAME=V1,V2",
    help="Values of one variable to sweep; one recipe per combination of all --grid options. Repeatable.",
)
@click.option(
    "--out-dir", type=click.Path(file_okay=False), help="Where the recipes go (default: the matrix file's out_dir)."
)
@click.option("--configs", multiple=True, type=click.Path(file_okay=False), help=CONFIGS_HELP)
@click.option("--force", is_flag=True, help="Replace existing recipes whose text differs.")
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing; exit 1 when a recipe on disk differs from its rendering or is missing.",
)
@reported
def variants(
    source: str,
    var_items: tuple[str, ...],
    grid_items: tuple[str, ...],
    out_dir: str | None,
    configs: tuple[str, ...],
    force: bool,
    check: bool,
) -> None:
    """Write one recipe per combination of a template's variables.

    SOURCE is a template (.yaml.j2, with --var and --grid) or a matrix file (.yaml: template,
    out_dir, configs, vars, grid). Every combination is rendered, validated and, where its
    model's config is found, planned; if any is invalid, each is named and nothing is written.
    SOURCE may also be a library name: recipes/matrices/NAME.yaml, else recipes/templates/NAME.yaml.j2,
    here or in the library installed with tli-recipe (whose recipes are written only with --out-dir).
    """
    from tli_recipe.library.catalog import from_installed_library
    from tli_recipe.library.variants import (
        render_variants,
        sweep_from_matrix,
        sweep_from_options,
    )

    source = library_file(source, "sweep")
    if source.endswith(".j2"):
        sweep = sweep_from_options(source, var_items, grid_items)
    else:
        if var_items or grid_items:
            raise TliError(
                f"{source} is a matrix file: its vars and grid replace --var and --grid; edit the file, "
                "or pass the template itself"
            )
        sweep = sweep_from_matrix(source, out_dir_given=out_dir is not None)
    target = Path(out_dir) if out_dir else sweep.out_dir
    if target is not None and not out_dir and not check and from_installed_library(source):
        raise TliError(
            f"{source} is the library installed with tli-recipe: its recipes are not written there; "
            "give --out-dir DIR (or --check to compare the installed recipes with their template)"
        )
    if target is None:
        raise TliError("--out-dir is required with a template (a matrix file names its out_dir)")
    made = render_variants(sweep, target, _configs(configs))
    status = {}
    for v in made:
        old = v.file.read_text(encoding="utf-8") if v.file.is_file() else None
        status[v.file] = "new" if old is None else "unchanged" if old == v.rendered.text else "differs"
    drift = [f for f, s in status.items() if s != "unchanged"]
    if check:
        _table(made, {f: ("missing" if s == "new" else s) for f, s in status.items()})
        if drift:
            click.echo(
                f"{len(drift)} of {len(made)} recipes differ from their template's rendering or are missing; "
                "regenerate them: tli-recipe variants "
                f"{source}{' --force' if any(status[f] == 'differs' for f in drift) else ''}",
                err=True,
            )
            sys.exit(1)
        click.echo(f"ok: {len(made)} recipes match their template", err=True)
        return
    clash = [str(f) for f, s in status.items() if s == "differs"]
    if clash and not force:
        raise TliError(
            f"{len(clash)} recipes exist and differ from the rendering: {', '.join(clash)}; nothing was written; "
            "pass --force to replace them (see the change with --check, then git diff)"
        )
    foreign = [str(f) for f in map(Path, clash) if not sweep.owns(f.read_text(encoding="utf-8"))]
    if foreign:  # --force replaces this sweep's own files only, never a hand-written or another sweep's recipe
        raise TliError(
            f"{len(foreign)} recipes exist and were not generated by `{sweep.generated['command']}`"
            + ("" if sweep.generated["matrix"] else " (or another grid of the same template)")
            + f": {', '.join(foreign)}; nothing was written, not even with --force; choose another --out-dir, "
            "or move those files away first"
        )
    for v in made:
        if status[v.file] != "unchanged":
            _write(v.file, v.rendered.text)
    _table(made, {f: {"new": "written", "differs": "replaced"}.get(s, s) for f, s in status.items()})


def _table(made, status) -> None:
    from tli_recipe.library.catalog import format_columns
    from tli_recipe.plan.report import human_count

    rows = [("name", "file", "layers", "parameters", "counts from", "status")]
    for v in made:
        plan = v.rendered.plan
        layers = f"{plan.totals.layers_before} -> {plan.totals.layers_after}" if plan else "?"
        params = human_count(plan.totals.parameters_after) if plan else "?"
        rows.append(
            (
                v.rendered.loaded.recipe.name or v.file.stem,
                str(v.file),
                layers,
                params,
                v.rendered.found,
                status[v.file],
            )
        )
    click.echo(format_columns(rows))


@click.command(name="list")
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--configs", multiple=True, type=click.Path(file_okay=False), help=CONFIGS_HELP)
@click.option("--markdown", is_flag=True, help="Print a Markdown table (for docs/library.md).")
@reported
def list_recipes(paths: tuple[str, ...], configs: tuple[str, ...], markdown: bool) -> None:
    """Show the recipe library: name, base model, method, layers and parameters before -> after.

    PATHS are recipe files or folders (default: recipes/, else the library installed with tli-recipe;
    matrices/ and templates/ are skipped).
    Counts come from the plan against the local model, the hub cache, or a stored config: the
    last column says which.
    """
    from tli_recipe.library.catalog import format_rows, library_roots, list_rows, recipe_files

    if not paths:
        roots = library_roots()
        if not roots:
            raise TliError("no recipes/ folder here; give recipe files or folders: tli-recipe list PATH...")
        if roots[0] != Path("."):
            click.echo(f"note: no recipes/ folder here; the library installed with tli-recipe ({roots[0]})", err=True)
        paths = (str(roots[0] / "recipes") if roots[0] != Path(".") else "recipes",)
    files = recipe_files(paths)
    rows, problems = list_rows(files, _configs(configs))
    click.echo(format_rows(rows, markdown))
    if problems:
        raise RecipeError(problems)


@click.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--configs", multiple=True, type=click.Path(file_okay=False), help=CONFIGS_HELP)
@reported
def diff(a: str, b: str, configs: tuple[str, ...]) -> None:
    """Show how two recipes differ: their fields, then their plans (layer maps, init policies,
    output config, stages), as a reviewer of a recipe change wants to see them. A and B are files or
    library recipes by name (llama3.2-1b-k4)."""
    from tli_recipe import load_recipe
    from tli_recipe.library.catalog import diff_plans, diff_recipes, plan_recipe

    a, b = library_file(a), library_file(b)
    problems = []
    loaded = []
    for path in (a, b):
        try:
            loaded.append(load_recipe(path))
        except RecipeError as exc:
            problems += exc.problems
    if problems:
        raise RecipeError(problems)
    la, lb = loaded
    click.echo(f"A: {a}\nB: {b}")
    fields = diff_recipes(la.resolved(), lb.resolved())
    click.echo("\nrecipe (A -> B)" if fields else "\nrecipe: same fields")
    for line in fields:
        click.echo(line)
    stored = _configs(configs)
    (pa, fa), (pb, fb) = plan_recipe(la, a, configs=stored), plan_recipe(lb, b, configs=stored)
    missing = [f"{ld.recipe.base_model} ({path})" for ld, p, path in ((la, pa, a), (lb, pb, b)) if p is None]
    if missing:
        click.echo(
            f"\nplans not compared: no config of {', '.join(missing)} (not local, not in the hub cache, not in the "
            "stored configs); give --configs DIR"
        )
        return
    click.echo(f"\nplans (A | B; configs from: {fa} | {fb})")
    for line in diff_plans(pa, pb):
        click.echo(line)


@click.command()
@click.argument("model")
@click.option(
    "--offline",
    is_flag=True,
    help="Only the local cache: a branch resolves through the cache's refs/, which may be stale.",
)
@click.option(
    "--rehash",
    is_flag=True,
    help="Hash every local file, even those whose digest is known from a hub blob name or the digest cache.",
)
@reported
def pin(model: str, offline: bool, rehash: bool) -> None:
    """Print a base_model block pinning MODEL (a directory or a hub id) to its revision and the sha256
    of its files, to paste into a recipe; `run` then refuses other files. A hub branch or tag is
    resolved to its commit on the hub. An uncached hub model's weights are not downloaded: their
    sha256 is the one the hub records for them (Git LFS), which names their blobs once downloaded;
    `run --rehash` hashes the bytes themselves."""
    from tli_recipe.source.checksums import pin_block
    from tli_recipe.source.hub import pin_sources, pin_target

    def log(message: str) -> None:
        click.echo(message, err=True)

    warnings: list[str] = []
    ckpt, known = pin_sources(pin_target(model, offline, log), offline, log)
    block = pin_block(model, ckpt, warnings, known, rehash)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    click.echo(block, nl=False)


COMMANDS = (render, variants, list_recipes, diff, pin)
