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


def close_report():
    from tli_recipe.training.eval_report import EvalReport
    from tli_recipe.training.evaluate import EvalResult
    from tli_recipe.training.lmeval import TaskScore

    models = ["/m/base", "/m/grown"]
    return EvalReport(
        models=models,
        loss=[EvalResult(models[0], 4.2, math.exp(4.2), 100, 2), EvalResult(models[1], 3.98, math.exp(3.98), 100, 2)],
        tasks=[
            TaskScore(models[0], "arc", 100, acc=0.61, acc_stderr=0.02),
            TaskScore(models[1], "arc", 100, acc=0.64, acc_stderr=0.025),
            TaskScore(models[1], "boolq", 100),  # no accuracy: no bar, no label
        ],
        asked_tasks=True,
    )


def test_eval_plot_labels_every_value_and_its_axes_span_the_data(tmp_path):
    pytest.importorskip("matplotlib")
    from tli_recipe.training.eval_report import plot_report, report_figure

    loss_ax, task_ax = report_figure(close_report()).axes
    assert [t.get_text() for t in loss_ax.texts] == ["4.200", "3.980"]
    bottom, top = loss_ax.get_ylim()
    # not from 0: 4.20 against 3.98 takes most of the axis, and the labels fit above the bars
    assert 3.5 < bottom < 3.98 and top > 4.2 and (4.2 - 3.98) / (top - bottom) > 0.4
    assert [t.get_text() for t in task_ax.texts] == ["0.610±0.020", "0.640±0.025"]
    bottom, top = task_ax.get_ylim()
    assert 0.45 < bottom < 0.59 and top > 0.665
    png = tmp_path / "report.png"
    assert plot_report(close_report(), png) and png.read_bytes()[:4] == b"\x89PNG"


def test_the_value_axis_stays_above_zero_and_gives_one_value_room():
    from tli_recipe.training.eval_report import value_axis

    assert value_axis([0.01, 0.5], [0.01, 0.5])[0] == 0.0  # accuracies near 0: the axis starts at 0, not below
    bottom, top = value_axis([4.2], [4.2])  # one model: a bar of visible height around its value
    assert 3.9 < bottom < 4.2 < top < 4.5
