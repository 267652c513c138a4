"""Messages of recipe validation that name what the user probably meant."""

from __future__ import annotations

import pytest

from tli_recipe import load_recipe
from tli_recipe.errors import RecipeError


@pytest.mark.parametrize("module, projection", [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")])
def test_mixtral_module_names_are_told_apart_from_typos(module, projection):
    text = (
        f"base_model: m\ninject:\n  every: 4\n  init: {{{module}: zero}}\nstages:\n  - name: s\n    trainable: [all]\n"
        f"    lora: {{r: 8, alpha: 16, targets: [{module}]}}\n"
    )
    with pytest.raises(RecipeError) as exc:
        load_recipe("x.yaml", text=text)
    hint = f"('{module}' is {projection} here: recipes name projections, and Mixtral's experts call"
    init, target = str(exc.value).splitlines()
    assert init.startswith(f"x.yaml:4:10: inject.init.{module}: unknown projection '{module}' {hint}")
    assert target.startswith(f"x.yaml:8:39: stages[0].lora.targets[0]: '{module}' is not a valid LoRA target {hint}")
