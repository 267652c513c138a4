"""The `plan` printout: long lists summarised one way, slices shown, a fixed policy order, one form of path,
no empty keys."""

from __future__ import annotations

import os

from conftest import write_recipe

from tli_recipe import compile_plan, load_recipe
from tli_recipe.plan.report import plan_table, summarize


def planned(tmp_path, text: str, name: str = "recipe.yaml"):
    return compile_plan(load_recipe(write_recipe(tmp_path, text, name)))


def test_summarize_keeps_short_lists_and_shortens_long_ones():
    assert summarize([4, 9, 14]) == "[4, 9, 14]"
    assert summarize(list(range(4, 480, 5))) == "[4, 9, 14, ..., 479] (96 entries, every 5th)"
    assert summarize([1, 2, 3] + list(range(10, 30))) == "[1, 2, 3, ..., 29] (23 entries)"
    assert summarize(list(range(0, 26, 2))) == "[0, 2, 4, ..., 24] (13 entries, every 2nd)"
    assert (
        summarize(["sliding_attention"] * 20)
        == "[sliding_attention, sliding_attention, sliding_attention, ..., sliding_attention] (20 entries)"
    )


def test_many_injected_layers_are_summarised_the_same_on_every_line(tmp_path, tiny):
    plan = planned(tmp_path, f"base_model: {tiny(layers=30)}\ninject: {{every: 2}}\n")  # 15 injected: 2, 5, ..., 44
    text = plan_table(plan)
    summary = "[2, 5, 8, ..., 44] (15 entries, every 3rd)"
    assert f"layers      30 -> 45 (15 injected: {summary})" in text
    assert f"config      requires_grad_layers: None -> {summary}" in text
    assert "entries]" not in text  # the old "[15 entries]" of the config line


def test_a_dus_plan_shows_its_slices_and_writes_no_empty_keys(tmp_path, tiny):
    plan = planned(
        tmp_path, f"base_model: {tiny(layers=4)}\nslices:\n  - layer_range: [0, 3]\n  - layer_range: [1, 4]\n"
    )
    text = plan_table(plan)
    lines = text.splitlines()
    assert lines[1].split() == ["out", "source", "role", "slice", "policy"]
    assert lines[2].split() == ["0", "0", "original", "0", "copy"] and lines[5].split() == [
        "3",
        "1",
        "original",
        "1",
        "copy",
    ]
    assert "slice 0     layers [0, 3) -> output 0-2" in text and "slice 1     layers [1, 4) -> output 3-5" in text
    assert "injected" not in text  # no "(0 injected: [])"
    assert "requires_grad_layers" not in plan.config and "requires_grad_layers" not in text
    plain = plan_table(planned(tmp_path, f"base_model: {tiny(layers=4)}\ninject: {{every: 2}}\n", "tli.yaml"))
    assert "slice" not in plain  # a stack without slices has no slice column


def test_init_policies_have_one_order_whatever_the_recipe_wrote(tmp_path, tiny):
    base = tiny(layers=4)
    one = planned(
        tmp_path, f"base_model: {base}\ninject: {{every: 2, init: {{o_proj: zero, down_proj: zero}}}}\n", "a.yaml"
    )
    two = planned(
        tmp_path, f"base_model: {base}\ninject: {{every: 2, init: {{down_proj: zero, o_proj: zero}}}}\n", "b.yaml"
    )
    assert list(one.init) == list(two.init) == ["o_proj", "down_proj"]
    line = next(x for x in plan_table(two).splitlines() if x.startswith("init"))
    assert line.startswith("init        o_proj=zero, down_proj=zero;")
    injected = next(x for x in plan_table(two).splitlines() if "injected*" in x)
    assert injected.endswith("o_proj=zero, down_proj=zero, rest copy")


def test_output_is_printed_as_an_absolute_path(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = tiny(layers=4)
    default = plan_table(planned(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\nname: k2\n"))
    assert f"output      {tmp_path / 'out' / 'k2'}\n" in default + "\n"
    (tmp_path / "sub").mkdir()
    written = plan_table(planned(tmp_path / "sub", f"base_model: {base}\ninject: {{every: 2}}\noutput: grown\n"))
    assert f"output      {tmp_path / 'sub' / 'grown'}\n" in written + "\n"
    rel = os.path.relpath(base, tmp_path)  # a base written relative is shown by its absolute directory
    shown = plan_table(planned(tmp_path, f"base_model: {rel}\ninject: {{every: 2}}\n", "rel.yaml"))
    assert shown.splitlines()[0].endswith(f"from {base}")
