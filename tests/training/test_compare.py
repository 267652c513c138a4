"""compare: several recipes, one base model, the same token budget."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import build_tiny, write_recipe
from tiny_text import add_char_tokenizer, write_text


@pytest.mark.slow  # grows and trains three tiny models
def test_compare_grows_trains_and_reports(tmp_path, cli):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt")
    held = write_text(tmp_path / "held.txt")
    stage = (
        "stages:\n  - name: warm\n    trainable: [all]\n"
        "  - name: new\n    trainable: [{trainable}]\n    learning_rate: 0.001\n"
    )
    recipes = [
        write_recipe(
            tmp_path,
            f"name: tli\nbase_model: {base}\ninject: {{every: 2}}\n"
            + stage.format(trainable="injected")
            + "    warmup_steps: 4\n",
            "tli.yaml",
        ),
        write_recipe(
            tmp_path,
            f"name: copy\nbase_model: {base}\ninject: {{every: 2, init: {{}}}}\n" + stage.format(trainable="injected"),
            "copy.yaml",
        ),
        write_recipe(
            tmp_path,
            f"name: control\nbase_model: {base}\n" + stage.format(trainable="{layers: [2, 4]}"),
            "control.yaml",
        ),
    ]
    result = cli(
        "compare",
        *recipes,
        "--stage",
        "new",
        "--data",
        data,
        "--heldout",
        held,
        "--steps",
        "4",
        "--sequence-length",
        "32",
        "--batch-size",
        "2",
        "--work",
        tmp_path / "cmp",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    rows = {r["recipe"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    assert set(rows) == {"tli", "copy", "control"}
    # a function-preserving plan starts exactly where the base model (the control) starts
    assert float(rows["tli"]["init_loss"]) == float(rows["control"]["init_loss"])
    assert float(rows["copy"]["init_loss"]) != float(rows["control"]["init_loss"])
    assert rows["tli"]["layers"] == "6" and rows["control"]["layers"] == "4"
    assert all(float(r["final_loss"]) < float(r["init_loss"]) for r in rows.values())
    curves = {r["name"]: r["curve"] for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())}
    assert all(len(c) == 4 for c in curves.values())
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000
    assert "| tli | new | 6 |" in result.stdout
    assert all(int(r["active_parameters"]) == int(r["parameters"]) for r in rows.values())  # dense: all of them
    assert all(float(r["forward_tokens_per_second"]) > 0 for r in rows.values())
    # tli warms up for all 4 steps: its peak learning rate is never reached, and compare says so
    assert "warning: tli: stage 'new' warms up for 4 steps and compare trains 4" in result.stderr
    assert "warning: copy" not in result.stderr
    # each member's own loss plot is titled with its recipe's name
    assert (tmp_path / "cmp" / "copy" / "trained" / "new" / "losses.png").is_file()


def test_compare_plot_legend_explains_its_markers(tmp_path):
    pytest.importorskip("matplotlib")
    from tli_recipe.training.compare import CompareRow, plot_compare

    row = CompareRow(
        recipe="r.yaml",
        name="tli",
        stage="new",
        layers=6,
        parameters=1,
        trainable=1,
        function_preserving=True,
        init_loss=2.0,
        final_loss=1.5,
        grow_seconds=0,
        train_seconds=0,
        curve=[(1, 2.0), (2, 1.8)],
    )
    labels = plot_compare([row], tmp_path / "c.png", 2)
    assert labels == [
        "tli (new)",
        "lines: training loss (per step)",
        "held-out loss at init (step 0)",
        "held-out loss after 2 steps",
    ]
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_compare_plot_axis_names_one_quantity_and_the_legend_the_series():
    pytest.importorskip("matplotlib")
    from tli_recipe.training.compare import CompareRow, compare_figure

    curve = [(s, 3.0 - s / 20) for s in range(1, 21)]
    rows = [
        CompareRow(recipe=f"{n}.yaml", name=n, stage="new", layers=6, parameters=1, trainable=1,
                   function_preserving=True, init_loss=3.0, final_loss=2.1, grow_seconds=0, train_seconds=0,
                   curve=curve)
        for n in ("tli", "copy")
    ]  # fmt: skip
    [ax] = compare_figure(rows, 20).axes
    assert ax.get_ylabel() == "loss (nats/token)" and ax.get_xlabel() == "optimizer step"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[:3] == ["tli (new)", "copy (new)", "lines: training loss (moving average over 4 steps)"]
    assert labels[3:] == ["held-out loss at init (step 0)", "held-out loss after 20 steps"]


def test_compare_checks_every_recipe_before_growing(tmp_path, cli):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt")
    ok = write_recipe(
        tmp_path,
        f"name: ok\nbase_model: {base}\ninject: {{every: 2}}\nstages:\n  - name: new\n    trainable: [injected]\n",
        "ok.yaml",
    )
    bare = write_recipe(tmp_path, f"name: bare\nbase_model: {base}\ninject: {{every: 2}}\n", "bare.yaml")
    result = cli("compare", ok, bare, "--data", data, "--heldout", data, "--steps", "1", "--work", tmp_path / "cmp")
    assert result.exit_code == 2 and "bare.yaml: defines no stages" in result.stderr
    assert not (tmp_path / "cmp").exists()
    result = cli(
        "compare", ok, "--stage", "nope", "--data", data, "--heldout", data, "--steps", "1", "--work", tmp_path / "cmp"
    )
    assert result.exit_code == 2 and "has no stage 'nope'; its stages: new" in result.stderr


def test_a_stage_named_all_is_that_stage(tmp_path):
    from tli_recipe import compile_plan, execute_plan, load_recipe
    from tli_recipe.training.train import stage_configs

    base = build_tiny(tmp_path / "base", layers=4)
    recipe = write_recipe(
        tmp_path,
        f"base_model: {base}\noutput: {tmp_path / 'out'}\ninject: {{every: 2}}\nstages:\n"
        "  - name: new\n    trainable: [injected]\n  - name: all\n    trainable: [all]\n",
    )
    out = execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)
    assert [c.stage for c in stage_configs(out, stages=["all"])] == ["all"]
    assert [c.stage for c in stage_configs(out)] == ["new", "all"]


@pytest.mark.slow  # grows and trains two tiny models
def test_compare_scores_a_mod_stage_with_its_head(tmp_path, cli):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt")
    stage = "stages:\n  - name: new\n    trainable: [injected]\n    learning_rate: 0.001\n"
    recipes = [
        write_recipe(tmp_path, f"name: tli\nbase_model: {base}\ninject: {{every: 2}}\n" + stage, "tli.yaml"),
        write_recipe(
            tmp_path,
            f"name: mod\nbase_model: {base}\ninject: {{every: 2}}\n"
            + stage
            + "    objective: mod\n    mod: {layers: 2, learning_rate: 0.05}\n",
            "mod.yaml",
        ),
    ]
    result = cli(
        "compare",
        *recipes,
        "--data",
        data,
        "--heldout",
        data,
        "--steps",
        "3",
        "--sequence-length",
        "32",
        "--batch-size",
        "2",
        "--work",
        tmp_path / "cmp",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    rows = {r["recipe"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    assert rows["mod"]["objective"] == "mod" and rows["tli"]["objective"] == "lm"
    assert float(rows["mod"]["init_loss"]) == float(rows["tli"]["init_loss"])  # the exact start
    assert int(rows["mod"]["trainable"]) == int(rows["tli"]["trainable"]) + 2 * 32 + 32 * 2 + 2 + 1
    assert float(rows["mod"]["step_seconds"]) > 0 and "| mod | new (MoD) |" in result.stdout
    assert list((tmp_path / "cmp" / "mod" / "trained").rglob("mod_head.safetensors"))


def test_the_table_shows_active_parameters_and_forward_throughput():
    from tli_recipe.training.compare import CompareRow, table

    row = CompareRow(
        recipe="moe.yaml",
        name="moe",
        stage="new",
        layers=30,
        parameters=214_000_000,
        trainable=43_400_000,
        function_preserving=True,
        init_loss=2.9,
        final_loss=2.5,
        grow_seconds=1.0,
        train_seconds=60.0,
        step_seconds=2.0,
        forward_tokens_per_second=1234.4,
        active_parameters=134_500_000,
    )
    line = table([row], 30).splitlines()[2]
    assert line == "| moe | new | 30 | 214.0M (134.5M) | 43.4M | yes | 2.900 | 2.500 | 60 | 2.00 | 1234 |"
