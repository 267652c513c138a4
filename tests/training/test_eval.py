"""`tli-recipe eval`: the same held-out tokens for every model; a TLI output scores exactly its base."""

from __future__ import annotations

import json
import math

import pytest
from conftest import build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_jsonl, write_text


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base with a tokenizer and its TLI output (K = 4, zero o_proj/down_proj)."""
    from tli_recipe import compile_plan, execute_plan, load_recipe

    root = tmp_path_factory.mktemp("eval")
    base = add_char_tokenizer(build_tiny(root / "base", layers=8))
    recipe = write_recipe(root, f"base_model: {base}\ninject: {{every: 4}}\noutput: {root / 'grown'}\n")
    grown = execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)
    return root, base, grown


def test_base_and_tli_output_give_equal_losses(models, cli):
    root, base, grown = models
    held = write_jsonl(root / "held.jsonl", 40)
    result = cli(
        "eval", base, grown, "--data", held, "--json", "--sequence-length", "64", "--output", root / "res" / "eval.json"
    )
    assert result.exit_code == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert json.loads((root / "res" / "eval.json").read_text()) == [first, second]
    assert first["tokens"] == second["tokens"] == first["sequences"] * 63 > 0
    assert second["loss"] == pytest.approx(first["loss"], abs=1e-6)
    assert first["perplexity"] == pytest.approx(math.exp(first["loss"]))
    assert 0 < first["loss"] < 10


def test_table_and_short_data(models, cli):
    root, base, grown = models
    short = write_text(root / "short.txt", 1)  # fewer tokens than one sequence: evaluated as one shorter sequence
    result = cli("eval", base, grown, "--data", short)
    assert result.exit_code == 0, result.stderr
    header, first, second = result.stdout.splitlines()
    assert header.split() == ["model", "loss", "perplexity", "vs", "first", "tokens"]
    assert first.split()[0] == str(base) and second.split()[3] in ("+0.0000", "-0.0000")


def test_eval_errors(models, tmp_path, cli):
    root, base, grown = models
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    result = cli("eval", base, "--data", bad)
    assert (
        result.exit_code == 2
        and f"{bad}:2: no string field 'text'" in result.stderr
        and "Traceback" not in result.stderr
    )
    other = build_tiny(tmp_path / "other", layers=2)  # no tokenizer of its own
    result = cli("eval", other, "--data", write_text(tmp_path / "t.txt", 3))
    assert (
        result.exit_code == 2 and "no tokenizer could be loaded" in result.stderr and "--tokenizer DIR" in result.stderr
    )
    result = cli("eval", other, base, "--data", write_text(tmp_path / "t.txt", 3), "--tokenizer", base)
    assert result.exit_code == 0, result.stderr
