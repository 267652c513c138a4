"""The JSON schemas in schemas/: generated from the pydantic models, committed, and as strict as the loader."""

from __future__ import annotations

import json

import pytest
from conftest import RECIPES, ROOT
from pydantic import ValidationError

from tli_recipe.library.variants import matrix_schema
from tli_recipe.recipe.schema import Inject, Recipe, Slice, Stage, recipe_schema

SCHEMAS = {"recipe": recipe_schema, "matrix": matrix_schema}


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_committed_schema_equals_a_fresh_one(kind, cli):
    path = ROOT / "schemas" / f"{kind}.schema.json"
    assert json.loads(path.read_text()) == SCHEMAS[kind](), f"{path} is stale: run `tli-recipe schema {kind} -o {path}`"
    assert cli("schema", kind, "--check", "-o", path).exit_code == 0
    assert json.loads(cli("schema", kind).stdout) == SCHEMAS[kind]()


def test_schema_check_fails_on_a_stale_file(tmp_path, cli):
    stale = tmp_path / "matrix.schema.json"
    stale.write_text(json.dumps(recipe_schema()))
    result = cli("schema", "matrix", "--check", "-o", stale)
    assert result.exit_code == 2 and "is stale; regenerate it with `tli-recipe schema matrix -o" in result.stderr


def _walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _walk(child)


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_no_key_may_be_null(kind):
    """The loader refuses `key:` with no value everywhere, so the schema offers null nowhere."""
    nodes = list(_walk(SCHEMAS[kind]()))
    assert {"type": "null"} not in nodes
    assert not [n for n in nodes if isinstance(n, dict) and "default" in n and n["default"] is None]


def test_inject_is_an_object_never_null():
    schema = recipe_schema()
    assert schema["properties"]["inject"] == {
        "$ref": "#/$defs/Inject",
        "description": schema["properties"]["inject"]["description"],
    }
    with pytest.raises(ValidationError, match="is empty"):
        Recipe.model_validate({"base_model": "x", "inject": None})
    with pytest.raises(ValidationError, match="is empty"):
        Inject.model_validate({"every": None, "after": [3]})
    with pytest.raises(ValidationError, match="is empty"):
        Slice.model_validate({"layer_range": [0, 4], "model": None})
    assert Recipe.model_validate({"base_model": "x"}).inject is None  # absent still means no injection


def test_plan_json_stages_keep_their_nulls():
    """Stage is also read back from plan.json, whose dump holds nulls (lora: null)."""
    stage = Stage.model_validate({"name": "a", "trainable": ["all"]})
    assert Stage.model_validate(stage.model_dump()) == stage


def test_layer_ranges_start_at_zero():
    defs = recipe_schema()["$defs"]
    ranges = [
        defs["Slice"]["properties"]["layer_range"],
        defs["Inject"]["properties"]["between"],
        defs["LayerSpan"]["properties"]["layers"],
    ]
    for r in ranges:
        start, end = r["prefixItems"]
        assert (start["minimum"], end["minimum"], end["maximum"]) == (0, 1, 1024), r
    assert defs["Inject"]["properties"]["after"]["items"]["minimum"] == 0


def test_matrix_schema_describes_the_committed_matrices():
    schema = matrix_schema()
    for matrix in sorted((RECIPES / "matrices").glob("*.yaml")):
        text = matrix.read_text()
        assert text.startswith("# yaml-language-server: $schema=../../schemas/matrix.schema.json\n"), matrix
    assert set(schema["properties"]) == {"template", "out_dir", "configs", "vars", "grid"}
    assert schema["required"] == ["template"] and schema["additionalProperties"] is False
