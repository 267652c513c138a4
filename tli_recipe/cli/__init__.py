"""The `tli-recipe` command line: one click group, one module per command group.

    build.py     validate, plan, run, verify, architectures, schema
    training.py  emit, train, eval, compare
    recipes.py   render, variants, list, diff, pin

Each command module imports only click and ``cli.common`` at start-up; the work it
calls is imported when the command runs. Arrows point down: no command module
imports this package.
"""

from __future__ import annotations

import click

from tli_recipe._version import __version__
from tli_recipe.cli import build, recipes, training


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tli-recipe")
def main() -> None:
    """Grow a trained decoder-only language model deeper, exactly, from a YAML recipe.

    recipe -> plan -> run (checkpoint + plan.json) -> verify.
    """


for _module in (build, training, recipes):
    for _command in _module.COMMANDS:
        main.add_command(_command)
