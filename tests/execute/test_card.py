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


def test_card_of_a_local_base_says_how_to_set_base_model_and_names_only_its_folder(tmp_path, tiny):
    base = tiny(layers=4)
    plan, out = grow(tmp_path, base, "inject: {every: 2}\n")
    card = (out / "README.md").read_text()
    assert f"# base_model: the hub id of {base.name} (a local folder here)" in card
    assert f"Grown from `{base.name}` (llama)" in card
    assert str(base.parent) not in card and "../" not in card  # no path of this machine, relative or absolute
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-generation" and meta["tags"][:3] == [
        "tli-recipe",
        "depth-up-scaling",
        "transformer-layer-injection",
    ]


def test_a_base_in_the_hub_cache_is_named_by_its_hub_id(tmp_path, tiny):
    plan, _ = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n")
    base = plan.sources[plan.base_model]
    snapshot = "/home/me/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/" + "a" * 40
    cached = plan.model_copy(
        update={"sources": {plan.base_model: base.model_copy(update={"ref": snapshot, "path": snapshot})}}
    )
    card = model_card(cached)
    meta = front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M" and meta["base_model_relation"] == "finetune"
    assert "Grown from `HuggingFaceTB/SmolLM2-135M`" in card and "/home/me" not in card


def test_card_gives_the_commands_to_verify_and_train_each_stage_from_its_folder(tmp_path, tiny):
    stages = (
        "stages:\n  - name: new\n    trainable: [injected]\n"
        "  - name: tuned\n    trainable: [all]\n    lora: {r: 4, alpha: 8, targets: [q_proj, o_proj, down_proj]}\n"
        "    datasets: [{path: data.txt}]\n"
    )
    (tmp_path / "data.txt").write_text("hello\n")
    plan, out = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n" + stages)
    card = (out / "README.md").read_text()
    assert "```sh\ntli-recipe verify .    # tensors against plan.json" in card
    assert "tli-recipe train . --stage new --data train.txt    # stage 1\n" in card
    assert "tli-recipe train . --stage tuned    # stage 2\n" in card  # its recipe names its data
    assert "`training/axolotl/`" in card and (out / "training" / "axolotl").is_dir()


def test_layer_map_is_a_table_of_runs(tmp_path, tiny):
    plan, out = grow(tmp_path, tiny(layers=8), "inject: {every: 4}\n")
    card = (out / "README.md").read_text()
    table = card.split("## Layer map\n\n")[1].split("\n\n")[0].splitlines()
    assert table == [
        "| output layers | source layers | role | init |",
        "|---|---|---|---|",
        "| 0-3 | 0-3 | original | copy |",
        "| 4 | 3 | injected | o_proj=zero, down_proj=zero, rest copy |",
        "| 5-8 | 4-7 | original | copy |",
        "| 9 | 7 | injected | o_proj=zero, down_proj=zero, rest copy |",
    ]


def test_a_long_layer_map_shows_its_ends(tmp_path, tiny):
    plan, out = grow(tmp_path, tiny(layers=60), "inject: {every: 2}\n")  # 30 injected: 60 runs
    card = (out / "README.md").read_text()
    table = card.split("## Layer map\n\n")[1].split("\n\n")[0].splitlines()
    assert len(table) == 2 + 32 + 1 + 8 and "| ... | 20 more rows: see plan.json |  |  |" in table
    assert table[-1] == "| 89 | 59 | injected | o_proj=zero, down_proj=zero, rest copy |"
    assert "[2, 5, 8, ..., 89] (30 entries, every 3rd)" in card


def stage_card_of(plan, model: str) -> str:
    from types import SimpleNamespace

    from tli_recipe.training.finish import stage_card

    cfg = SimpleNamespace(
        stage="new", index=1, stages=1, model=model, lora=None, trainable_parameters=["w"], training_arguments={}
    )
    metrics = dict(
        global_step=3, tli_recipe_version="0", trainable_parameters=10, tokens=100, train_sequences=2,
        validation_sequences=1, sequence_length=8, train_loss_first=2.0, train_loss_last=1.0,
        eval_loss_before=2.0, eval_loss_after=1.5,
    )  # fmt: skip
    return stage_card(cfg, metrics, plan)


def test_the_stage_card_names_the_base_by_the_model_cards_rule(tmp_path, tiny):
    """A trained stage's card: base_model is a hub id (the id written, or a cache snapshot's) or absent with
    the folder named in a comment; never a path, relative or absolute, nor the source's plan key."""
    plan, out = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n")
    base = plan.sources[plan.base_model]
    snapshot = "/home/me/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M/snapshots/" + "a" * 40
    cases = [
        ({"ref": "HuggingFaceTB/SmolLM2-135M"}, "HuggingFaceTB/SmolLM2-135M"),  # resolved into the hub cache
        ({"ref": snapshot, "path": snapshot}, "HuggingFaceTB/SmolLM2-135M"),
        ({"ref": "models/tiny", "path": "/work/models/tiny"}, None),  # a relative folder that looks like an id
        ({"ref": base.path}, None),
    ]
    for update, hub in cases:
        src = base.model_copy(update=update)
        card = stage_card_of(plan.model_copy(update={"sources": {plan.base_model: src}}), "../runs/grown")
        meta = front_matter(card)
        assert meta.get("base_model") == hub and meta["library_name"] == "transformers", update
        named = hub or src.path.rsplit("/", 1)[1]
        assert f"grown from `{named}` with 4 -> 6 layers" in card
        if hub is None:
            assert f"# base_model: the hub id of {named} (a local folder here)" in card
        assert "from `grown`" in card and "../" not in card and "/work/" not in card and "/home/me" not in card
