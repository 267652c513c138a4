"""tli-recipe: grow a trained decoder-only language model deeper, exactly, from a YAML recipe.

The pipeline, one function per step (each imports its own dependencies when called,
so ``import tli_recipe`` stays light)::

    loaded = load_recipe("recipes/llama3-8b-k4.yaml", ["base_model=/models/llama"])
    plan = compile_plan(loaded)            # pure data; no tensor is read
    out = execute_plan(plan, "out/llama")  # shards, config, plan.json, training configs
    report = verify_output(out)            # tensors against the plan, logits against the base
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional

from tli_recipe._version import __version__

if TYPE_CHECKING:  # pragma: no cover
    from tli_recipe.execute.verify import VerifyReport
    from tli_recipe.plan.model import Plan
    from tli_recipe.recipe.load import LoadedRecipe
    from tli_recipe.source.hub import Access

__all__ = ["__version__", "load_recipe", "compile_plan", "execute_plan", "verify_output", "load_mod_model"]


def load_recipe(path: str | Path, overrides: Iterable[str] = (), text: Optional[str] = None) -> "LoadedRecipe":
    """Read a recipe file, apply ``key.path=value`` overrides and validate it (raises RecipeError)."""
    from tli_recipe.recipe.load import load_recipe as load

    return load(path, overrides, text)


def compile_plan(loaded: "LoadedRecipe", access: "Optional[Access]" = None) -> "Plan":
    """Compile a loaded recipe against its checkpoints' configs and headers into a Plan.

    ``access`` (tli_recipe.source.hub.Access) says how far a hub id may be fetched: by default
    only the local Hugging Face cache is read; ``Access("headers")`` fetches config.json, the
    index and the safetensors headers, ``Access("weights")`` downloads the files."""
    from tli_recipe.plan.compile import compile_plan as compile_

    return compile_(loaded, access)


def execute_plan(
    plan: "Plan", output: Optional[str | Path] = None, *, training_configs: bool = True, **options
) -> Path:
    """Write the grown checkpoint of ``plan``; with ``training_configs`` also one config per
    stage and trainer into ``<output>/training/``. ``options``: device, force, progress, sync, rehash, log."""
    from tli_recipe.execute.executor import execute_plan as execute

    side_writers = []
    if training_configs:
        side_writers.append(_training_configs(options.get("log", print)))
    return execute(plan, output, side_writers=side_writers, **options)


def _training_configs(log):
    def write(plan: "Plan", folder: Path, target: Path) -> None:
        from tli_recipe.training.emit import write_training_configs

        write_training_configs(plan, folder / "training", target, log=log, final_folder=target / "training")

    return write


def verify_output(folder: str | Path, **options) -> "VerifyReport":
    """Check a grown checkpoint against its plan.json (tensors) and its base model (logits)."""
    from tli_recipe.execute.verify import verify_output as verify

    return verify(folder, **options)


def load_mod_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu"):
    """The output of a stage with ``objective: mod`` as a transformers model whose forward and
    ``generate`` use the Mixture-of-Depths ensemble's logits (``trust_remote_code=False``)."""
    from tli_recipe.training.mod import load

    return load(path, dtype=dtype, device=device)
