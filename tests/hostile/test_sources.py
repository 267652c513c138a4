"""Hostile source checkpoints for plan and run: an upcycle source with biases, a config that disagrees
with its weights. Both are refused at plan time, at the recipe line, before anything is written."""

from __future__ import annotations

import json
import re
import shutil

import pytest


def upcycle_recipe(tmp_path, base, other):
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"base_model: {base}\noutput: {tmp_path / 'out'}\n"
        f"upcycle:\n  experts: 2\n  top_k: 1\n  sources: [{{model: {base}}}, {{model: {other}}}]\n"
    )
    return path


@pytest.mark.parametrize("command", ["plan", "run"])
def test_an_upcycle_source_with_mlp_biases_is_refused_at_its_line(
    tmp_path, tiny, hostile_cli, refused, snapshot, command
):
    base, biased = tiny(layers=4), tiny(layers=4, mlp_bias=True)
    inputs = snapshot(base, biased)
    result = hostile_cli(command, upcycle_recipe(tmp_path, base, biased))
    refused(
        result,
        re.compile(
            r"recipe\.yaml:6:\d+: upcycle\.sources\[1\]\.model: Mixtral experts have no bias, and the config of "
            r"upcycle\.sources\[1\] does not meet `not mlp_bias`"
        ),
        inputs=inputs,
        target=tmp_path / "out",
    )
    assert not (tmp_path / "out").exists()


def test_an_upcycle_source_without_biases_still_plans(tmp_path, tiny, hostile_cli):
    base, other = tiny(layers=4), tiny(layers=4, seed=1)
    result = hostile_cli("plan", upcycle_recipe(tmp_path, base, other))
    assert result.exit_code == 0, result.output


# --- a config.json that disagrees with the weights --------------------------------------------------


def edited_copy(tmp_path, base, **changes):
    copy = tmp_path / "model"
    shutil.copytree(base, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize("command", ["plan", "run"])
def test_a_config_that_disagrees_with_the_weights_is_refused_with_tensor_names(
    tmp_path, tiny, hostile_cli, refused, snapshot, command
):
    model = edited_copy(tmp_path, tiny(layers=4), hidden_size=128)  # the weights are 32 wide
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {model}\noutput: {tmp_path / 'out'}\ninject: {{every: 2}}\n")
    inputs = snapshot(model)
    result = hostile_cli(command, recipe)
    refused(
        result,
        re.compile(
            r"recipe\.yaml:1:\d+: base_model: .*/model: config\.json disagrees with the weights \(\d+ tensors\): "
            r"'lm_head\.weight' is \[64, 32\] in the weights, config\.json gives \[64, 128\]; .*; and "
            r"\d+ more; expected a config\.json that describes these weights"
        ),
        inputs=inputs,
        target=tmp_path / "out",
    )
    assert not (tmp_path / "out").exists()
    assert len(result.output) < 2000  # the first disagreements, then a count


def test_bias_tensors_the_config_denies_are_named(tmp_path, tiny, hostile_cli, refused):
    """Weights with MLP biases under a config without mlp_bias: upcycling would drop them silently."""
    model = edited_copy(tmp_path, tiny(layers=4, mlp_bias=True), mlp_bias=False)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {model}\nupcycle: {{experts: 2, top_k: 1}}\n")
    refused(
        hostile_cli("plan", recipe),
        "config.json disagrees with the weights (12 tensors): 'model.layers.0.mlp.down_proj.bias' is in the "
        "weights, and config.json says the projection has no bias",
    )
