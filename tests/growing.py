"""Grow a tiny checkpoint from a recipe body and read every tensor back (shared by the executor tests)."""

from __future__ import annotations

import torch
from conftest import write_recipe
from safetensors.torch import load_file

from tli_recipe import compile_plan, execute_plan, load_recipe


def grow(tmp_path, base, body: str, name="grown", **kwargs):
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / name}\n{body}", f"{name}.yaml")
    plan = compile_plan(load_recipe(recipe))
    return plan, execute_plan(plan, progress=False, log=lambda m: None, **kwargs)


def load_all(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out
