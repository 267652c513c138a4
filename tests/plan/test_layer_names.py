"""Plan.layer_key / split_layer_key: the executor and LESA name layer tensors from the plan alone."""

from __future__ import annotations

import pytest

from tli_recipe.plan.model import Plan


class Names:  # the two methods only need layer_prefix
    layer_key = Plan.layer_key
    split_layer_key = Plan.split_layer_key

    def __init__(self, prefix: str) -> None:
        self.layer_prefix = prefix


@pytest.mark.parametrize(
    "name,expected",
    [
        ("model.layers.1.mlp.down_proj.weight", (1, "mlp.down_proj.weight")),
        ("model.layers.10.self_attn.q_proj.weight", (10, "self_attn.q_proj.weight")),
        ("model.layers.0.mlp.experts.1.w2.weight", (0, "mlp.experts.1.w2.weight")),
        ("model.layers.01.mlp.down_proj.weight", None),  # not an index this plan writes
        ("model.layers.x.mlp.down_proj.weight", None),
        ("model.layers.3.", None),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
    ],
)
def test_split_layer_key_matches_whole_segments(name, expected):
    assert Names("model.layers.{layer}.").split_layer_key(name) == expected


def test_layer_key_round_trips_under_a_nested_prefix():
    names = Names("model.language_model.layers.{layer}.")
    key = names.layer_key(12, "mlp.up_proj.weight")
    assert key == "model.language_model.layers.12.mlp.up_proj.weight"
    assert names.split_layer_key(key) == (12, "mlp.up_proj.weight")
    assert names.split_layer_key("model.layers.12.mlp.up_proj.weight") is None
