"""What every command shares: the error-to-exit-code wrapper and recipe loading.

Commands never print a traceback for bad input: a RecipeError prints its located
problems and exits 2, a TliError its message and its exit code (1 for a failed check).
"""

from __future__ import annotations

import functools
import sys

import click

from tli_recipe.errors import RecipeError, TliError

SET_HELP = "Override a recipe field: key.path=value (value parsed as YAML), e.g. base_model=/models/llama. Repeatable."


def reported(func):
    """Turn the project's errors into messages and exit codes (2: bad input, 1: failed check)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            click.echo(str(exc), err=True)
            sys.exit(2)
        except TliError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except BrokenPipeError:
            raise  # a reader that stopped early (`| head`): click's main exits 1 quietly, as Unix tools do
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}; check the path, permissions and free space", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)

    return wrapper


def library_file(arg: str, kind: str = "recipe") -> str:
    """A command's file argument, or the library file it names (``qwen3-4b-k4``, ``tli``, or
    ``recipes/...`` outside a checkout): see ``library.catalog.find_in_library``."""
    from tli_recipe.library.catalog import find_in_library

    return find_in_library(arg, kind, log=lambda msg: click.echo(msg, err=True))


def load(recipe: str, overrides: tuple[str, ...]):
    from tli_recipe import load_recipe

    return load_recipe(recipe, overrides)


def compile_recipe(
    recipe: str, overrides: tuple[str, ...], fetch: str = "headers", offline: bool = False, progress: bool = True
):
    """Load and compile a recipe; a hub id not in the cache is fetched as ``fetch`` says (plan: config, index and
    headers; run: the files), its progress and what was fetched on stderr."""
    from tli_recipe import compile_plan
    from tli_recipe.source.hub import Access

    access = Access(fetch=fetch, offline=offline, progress=progress, log=lambda msg: click.echo(msg, err=True))
    return compile_plan(load(recipe, overrides), access)
