"""The model card of a run output: honest front matter, no placeholder links, no local paths published."""

from __future__ import annotations

import yaml
from growing import grow

from tli_recipe.execute.card import model_card


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_of_a_local_base_names_no_base_model_and_no_placeholder_link(tmp_path, tiny):
    plan, out = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n")
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "tli-recipe" in meta["tags"]
    assert "base_model" not in meta  # a directory of this machine means nothing on the hub
    assert "https://github.com/)" not in card and "](https://" not in card
    assert "license is the base model's" in card


def test_card_of_a_hub_base_names_it(tmp_path, tiny):
    plan, _ = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n")
    base = plan.sources[plan.base_model]
    for ref, named in (("HuggingFaceTB/SmolLM2-135M", True), (base.path, False), ("../x/y", False), ("a/b/c", False)):
        hub = plan.model_copy(update={"sources": {plan.base_model: base.model_copy(update={"ref": ref})}})
        meta = front_matter(model_card(hub))
        assert (meta.get("base_model") == ref) is named, ref
