"""`--set` overrides: `[*]` sets a field of every item of a list."""

from __future__ import annotations

import pytest

from tli_recipe.errors import RecipeError
from tli_recipe.recipe.load import Marks, apply_overrides, load_recipe

RECIPE = """base_model: some/model
inject: {every: 2}
stages:
  - name: a
    trainable: [injected]
  - name: b
    trainable: [all]
    precision: float16
    lora: {r: 4, alpha: 8, targets: [o_proj]}
"""


def test_star_sets_the_field_of_every_stage(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    loaded = load_recipe(path, ["stages[*].precision=float32", "stages[*].learning_rate=0.5"])
    assert [(s.precision, s.learning_rate) for s in loaded.recipe.stages] == [("float32", 0.5), ("float32", 0.5)]
    assert loaded.marks.locate(("stages", 1, "precision"))[0] == "--set stages[*].precision=float32"
    # A mapping the first stage lacks is created there, and then validated as any lora.
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["stages[*].lora.r=8"])
    assert [p.path for p in err.value.problems] == [("stages", 0, "lora", "alpha"), ("stages", 0, "lora", "targets")]


def test_star_located_errors(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, ["stages[*].precision=float8"])
    assert [str(p).split(": ", 1)[0] for p in err.value.problems] == [
        "--set stages[*].precision=float8",
        "--set stages[*].precision=float8",
    ]
    assert all("stages[" in str(p) and "precision" in str(p) for p in err.value.problems)
    data = {"stages": [], "slices": {"a": 1}}
    for key, why in (
        ("stages[*].precision", "stages[*]: no list items to set (an empty list)"),
        ("slices[*].x", "slices[*]: no list items to set (not a list)"),
        ("inject[*].x", "inject[*]: no list items to set (not a list)"),
    ):
        with pytest.raises(RecipeError) as err:
            apply_overrides(data, Marks("r.yaml"), [f"{key}=1"])
        assert why in str(err.value.problems[0])


def test_each_item_gets_its_own_copy_of_the_value():
    data = {"stages": [{"name": "a"}, {"name": "b"}]}
    apply_overrides(data, Marks("r.yaml"), ["stages[*].datasets=[{path: x.txt}]"])
    data["stages"][0]["datasets"].append("changed")
    assert data["stages"][1]["datasets"] == [{"path": "x.txt"}]
