"""lm-evaluation-harness on local models: a tiny JSONL multiple-choice task end to end.

The accuracies come from lm-eval itself; the test recomputes them from the models' logits
(so a row that ignored its model, or swapped acc and acc_norm, fails), and a TLI output must
score exactly its base model: the same function gives the same choices.
"""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from conftest import build_tiny, write_recipe
from tiny_text import add_char_tokenizer

from tli_recipe.errors import TliError

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'tli-recipe[eval]')")

#: Contexts and choices in the tiny character vocabulary; the choices differ in length, so acc
#: (log-likelihood) and acc_norm (per character) can disagree.
DOCS = [
    ("the cat sat on", ["the mat", "a tree", "the big river", "a box"], 0),
    ("a dog ran to", ["the house", "a tree", "my friend", "the red mat"], 1),
    ("the bird looked at", ["an old man", "the river", "a cat", "the mat"], 2),
    ("my friend jumped over", ["the box", "a red box", "a dog", "the house"], 3),
    ("an old man slept near", ["the tree", "a river", "the mat", "my dog"], 0),
    ("the cat ran to", ["a box", "the house", "an old cat", "the bird"], 1),
    ("a dog slept near", ["the old tree", "a mat", "the river", "a house"], 2),
    ("the bird sat on", ["a tree", "the box", "a red mat", "the man"], 3),
]


def write_task(folder, name="tiny_mc", docs=DOCS, **fields) -> "os.PathLike":
    """A task YAML with its JSONL beside it (a relative data path) and a dataset cache inside ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"context": c, "choices": ch, "answer": a} for c, ch, a in docs]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{name}.jsonl"}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        **fields,
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec, indent=1))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny base with a tokenizer, its TLI output (K = 4) and an unrelated model of the same shape."""
    from tli_recipe import compile_plan, execute_plan, load_recipe

    root = tmp_path_factory.mktemp("lmeval")
    base = add_char_tokenizer(build_tiny(root / "base", layers=8))
    recipe = write_recipe(root, f"base_model: {base}\ninject: {{every: 4}}\noutput: {root / 'grown'}\n")
    grown = execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)
    other = add_char_tokenizer(build_tiny(root / "other", layers=8, seed=7))
    return root, base, grown, other


def expected_accuracy(model_dir, docs=DOCS) -> tuple[float, float]:
    """acc and acc_norm by hand: the choice with the highest log-likelihood (per character for acc_norm)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tli_recipe.training import mod

    tok = AutoTokenizer.from_pretrained(model_dir)
    if mod.has_mod_head(model_dir):  # the ensemble's logits, as a MoD output predicts
        model = mod.load(model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = [0, 0]
    for context, choices, answer in docs:
        scores = []
        for choice in choices:
            ctx, cont = tok(context).input_ids, tok(" " + choice).input_ids
            with torch.no_grad():
                logp = model(input_ids=torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        by_byte = [s / len(c) for s, c in zip(scores, choices)]  # lm-eval divides by the characters of the choice
        hits[0] += max(range(len(scores)), key=scores.__getitem__) == answer
        hits[1] += max(range(len(by_byte)), key=by_byte.__getitem__) == answer
    return hits[0] / len(docs), hits[1] / len(docs)


@pytest.fixture(scope="module")
def scored(models):
    from tli_recipe.training.lmeval import run_tasks

    root, base, grown, other = models
    task = write_task(root / "task")
    return task, run_tasks([base, grown, other], [str(task)], device="cpu")


@pytest.mark.slow  # three models through lm-eval (a few seconds on 2 cores)
def test_tiny_task_runs_through_lm_eval(models, scored):
    root, base, grown, other = models
    task, rows = scored
    assert [(r.model, r.task, r.samples) for r in rows] == [
        (str(m), "tiny_mc", len(DOCS)) for m in (base, grown, other)
    ]
    for row, model in zip(rows, (base, grown, other)):
        assert (row.acc, row.acc_norm) == pytest.approx(expected_accuracy(model))
        n = len(DOCS)
        assert row.acc_stderr == pytest.approx(math.sqrt(row.acc * (1 - row.acc) / (n - 1)))
    # The unrelated model must score differently, or the next test could not tell models apart.
    assert (rows[2].acc, rows[2].acc_norm) != (rows[0].acc, rows[0].acc_norm)


@pytest.mark.slow  # three models through lm-eval (a few seconds on 2 cores)
def test_tli_output_scores_exactly_its_base(scored):
    base, grown, _ = scored[1]
    assert (grown.acc, grown.acc_stderr, grown.acc_norm, grown.acc_norm_stderr) == (
        base.acc,
        base.acc_stderr,
        base.acc_norm,
        base.acc_norm_stderr,
    )


@pytest.mark.slow  # three models through lm-eval (a few seconds on 2 cores)
def test_table_and_json(scored):
    from tli_recipe.training.lmeval import scores_json, scores_table

    rows = scored[1]
    header, *lines = scores_table(rows).splitlines()
    assert header.split() == ["model", "task", "samples", "acc", "±", "stderr", "acc_norm", "±", "stderr"]
    assert len(lines) == 3 and lines[0].split()[:3] == [rows[0].model, "tiny_mc", str(len(DOCS))]
    assert f"{rows[0].acc:.4f} ± {rows[0].acc_stderr:.4f}" in lines[0]
    data = json.loads(scores_json(rows))
    assert data[0] == {
        "model": rows[0].model,
        "task": "tiny_mc",
        "samples": len(DOCS),
        "acc": rows[0].acc,
        "acc_stderr": rows[0].acc_stderr,
        "acc_norm": rows[0].acc_norm,
        "acc_norm_stderr": rows[0].acc_norm_stderr,
        "metrics": {},
    }


def test_run_is_offline_and_restores_the_environment(models, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from tli_recipe.training.lmeval import session

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with session():
        assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
        assert lm_eval.utils.env.is_safe_attribute is not None  # the Jinja sandbox
    assert "HF_HUB_OFFLINE" not in os.environ and huggingface_hub.constants.HF_HUB_OFFLINE is False


def test_a_template_cannot_reach_python(models, tmp_path):
    """lm-eval renders task templates with plain Jinja; here they render in a sandbox."""
    from tli_recipe.training.lmeval import run_tasks

    marker = tmp_path / "pwned"
    task = write_task(
        tmp_path / "task", doc_to_text="{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    )
    with pytest.raises(TliError, match=r"lm-eval (could not load it|failed).*(unsafe|SecurityError)"):
        run_tasks([models[1]], [str(task)], device="cpu")
    assert not marker.exists()


def test_without_lm_eval_the_message_names_the_extra(monkeypatch):
    from tli_recipe.training.lmeval import TaskSet

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    with pytest.raises(TliError, match=r"pip install 'tli-recipe\[eval\]'"):
        TaskSet(["tiny.yaml"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("task: [unclosed\n", r"bad\.yaml:2:1: not valid YAML \(expected ',' or '\]'"),
        ("task: t\nprocess_docs: !function utils.process\n", r"bad\.yaml:2:15: !function runs Python code"),
        ("- a list\n", r"bad\.yaml: a list at the top level; expected a mapping"),
        ("dataset_path: json\n", r"bad\.yaml: task: missing; expected the task's name"),
        ("task: t\nclass: !!python/name:os.system\n", r"bad\.yaml:2:\d+: not valid YAML"),
        (
            "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: nothere.jsonl}}\n",
            r"dataset_kwargs\.data_files: 'nothere\.jsonl' does not exist",
        ),
        ("include: bad.yaml\ntask: t\n", r"includes itself again"),
    ],
)
def test_bad_task_files_get_located_messages(tmp_path, text, message):
    from tli_recipe.training.lmeval import TaskSet

    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TliError, match=message):
        TaskSet([str(path)])


def test_a_task_whose_fields_do_not_match_its_data(models, tmp_path):
    from tli_recipe.training.lmeval import run_tasks

    task = write_task(tmp_path / "task", doc_to_choice="options")  # the data has "choices"
    with pytest.raises(TliError, match=r"task '.*tiny_mc\.yaml': lm-eval could not load it|lm-eval failed"):
        run_tasks([models[1]], [str(task)], device="cpu")


def test_task_lists_and_models_are_checked_first(models, tmp_path):
    from tli_recipe.training.lmeval import run_tasks
    from tli_recipe.training.task_files import split_specs

    assert split_specs(["a,b", "c.yaml"]) == ["a", "b", "c.yaml"]
    with pytest.raises(TliError, match="an empty task name"):
        split_specs(["a,,b"])
    task = write_task(tmp_path / "task")
    with pytest.raises(TliError, match=r"nowhere: no config.json"):
        run_tasks([models[1], tmp_path / "nowhere"], [str(task)])


@pytest.fixture
def one_task_manager(monkeypatch):
    """One lm-eval TaskManager per set of arguments for the test: each new one indexes lm-eval's built-in
    task files again (about 14,000 YAML files, 20 s on a loaded 2-core machine)."""
    import lm_eval.tasks

    made = {}
    real = lm_eval.tasks.TaskManager

    def shared(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in made:
            made[key] = real(*args, **kwargs)
        return made[key]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", shared)
    return made


@pytest.mark.slow  # lm-eval indexes its ~200 built-in task folders (seconds)
def test_unknown_and_hub_task_names(one_task_manager):
    from tli_recipe.training.lmeval import TaskSet

    with pytest.raises(TliError, match=r"no lm-eval task named 'hellaswg' \(did you mean 'hellaswag'\?\)"):
        TaskSet(["hellaswg"])
    with pytest.raises(TliError, match=r"task 'kobest_copa' reads its data from the Hugging Face hub.*--online"):
        TaskSet(["kobest_copa"])
    assert len(one_task_manager) == 1  # both names were looked up in lm-eval's full built-in index


@pytest.mark.slow  # two models through lm-eval and the loss, via the CLI
def test_eval_command_prints_one_table_and_writes_json(models, tmp_path, cli):
    root, base, grown, _ = models
    task = write_task(tmp_path / "task")
    held = tmp_path / "held.txt"
    held.write_text("the cat sat on the mat\na dog ran to the house\n" * 4)
    report = tmp_path / "report.json"
    result = cli("eval", base, grown, "--tasks", task, "--data", held, "--output", report, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    loss_table, task_table = result.stdout.strip().split("\n\n")
    assert loss_table.splitlines()[0].split()[:3] == ["model", "loss", "perplexity"]
    assert [line.split()[:2] for line in task_table.splitlines()[1:]] == [
        [str(base), "tiny_mc"],
        [str(grown), "tiny_mc"],
    ]
    data = json.loads(report.read_text())
    assert data["models"] == [str(base), str(grown)] and len(data["loss"]) == 2
    assert report.with_suffix(".png").read_bytes()[:4] == b"\x89PNG" and "report.png" in result.stderr
    first, second = data["tasks"]
    assert (first["acc"], first["acc_norm"]) == pytest.approx(expected_accuracy(base))
    assert {k: v for k, v in second.items() if k != "model"} == {k: v for k, v in first.items() if k != "model"}
    assert data["loss"][0]["loss"] == pytest.approx(data["loss"][1]["loss"], abs=1e-6)
    again = cli("eval", base, "--tasks", task, "--output", report)
    assert again.exit_code == 2 and "report.json: exists; pass --force" in again.stderr
    assert json.loads(report.read_text()) == data  # untouched


def test_eval_needs_data_or_tasks_and_checks_tasks_first(models, tmp_path, cli):
    root, base, grown, _ = models
    result = cli("eval", base)
    assert result.exit_code == 2 and "nothing to evaluate: pass --data FILE" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    held = tmp_path / "held.txt"
    held.write_text("the cat sat on the mat\n")
    result = cli("eval", base, "--data", held, "--tasks", bad)
    assert result.exit_code == 2 and "bad.yaml:2:1: not valid YAML" in result.stderr
    assert "sequences of" not in result.stderr  # the loss never ran: the task file failed first
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # grows, trains and scores two tiny models
def test_compare_adds_task_accuracy_at_init_and_after(tmp_path, cli):
    import csv

    from tiny_text import write_text

    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=4))
    data = write_text(tmp_path / "train.txt")
    stage = "stages:\n  - name: new\n    trainable: [{t}]\n    learning_rate: 0.01\n"
    recipes = [
        write_recipe(
            tmp_path, f"name: tli\nbase_model: {base}\ninject: {{every: 2}}\n" + stage.format(t="injected"), "tli.yaml"
        ),
        write_recipe(tmp_path, f"name: control\nbase_model: {base}\n" + stage.format(t="all"), "control.yaml"),
    ]
    task = write_task(tmp_path / "task")
    args = (
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
        "--device",
        "cpu",
        "--tasks",
        task,
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: t\nprocess_docs: !function utils.process\n")
    result = cli("compare", *recipes, *args[:-1], bad, "--work", tmp_path / "refused")
    assert result.exit_code == 2 and "!function runs Python code" in result.stderr
    assert not (tmp_path / "refused").exists()  # the task failed before anything was grown
    result = cli("compare", *recipes, *args, "--work", tmp_path / "cmp")
    assert result.exit_code == 0, result.stderr
    rows = {r["recipe"]: r for r in csv.DictReader(open(tmp_path / "cmp" / "compare.csv"))}
    tli, control = rows["tli"], rows["control"]
    expected = expected_accuracy(base)[0]
    assert float(tli["tiny_mc_acc_init"]) == float(control["tiny_mc_acc_init"]) == pytest.approx(expected)
    for name, row in rows.items():  # after training: the trained model's own accuracy, recomputed by hand
        [trained] = [p.parent for p in (tmp_path / "cmp" / name / "trained").rglob("config.json")]
        assert float(row["tiny_mc_acc_final"]) == pytest.approx(expected_accuracy(trained)[0])
    assert "tiny_mc acc at init | after 3 steps |" in result.stdout.splitlines()[0]


@pytest.mark.slow  # two models through lm-eval
def test_a_mod_output_is_scored_with_its_ensemble_head(models, tmp_path):
    """A MoD stage's output (a model folder with mod_head.safetensors) is scored through the head."""
    import shutil

    import torch

    from tli_recipe.training import mod
    from tli_recipe.training.lmeval import run_tasks
    from tli_recipe.training.loading import load_model

    root, base, grown, other = models
    folder = tmp_path / "mod-output"
    shutil.copytree(other, folder)
    model = load_model(folder, dtype=torch.float32)
    head = mod.new_head(model, [5, 6, 7], "exact")
    with torch.no_grad():  # a head that changes the prediction a lot: the ensemble of the exits
        head.gate.fill_(1.0)
        head.router.weight.normal_(0, 3, generator=torch.Generator().manual_seed(0))
    mod.save_head(head, folder, 0.1)
    task = write_task(tmp_path / "task")
    plain, with_head = run_tasks([other, folder], [str(task)], device="cpu")
    assert (with_head.acc, with_head.acc_norm) != (plain.acc, plain.acc_norm)  # the head changed the choices
    assert (with_head.acc, with_head.acc_norm) == pytest.approx(expected_accuracy(folder))
    assert (plain.acc, plain.acc_norm) == pytest.approx(expected_accuracy(other))
