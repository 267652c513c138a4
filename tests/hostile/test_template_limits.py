"""Hostile templates: recipe templates and lm-eval task templates render under CPU-time and memory
limits in a child process (library/sandbox.py); lm-eval task includes stay in the task's folder.

The limits are lowered through their environment variables so each case costs about two seconds
of CPU; every case asserts the limit that was hit by name.
"""

from __future__ import annotations

import json
import time

import pytest

from tli_recipe.errors import TliError

FRONT = "---\nvariables:\n  base: {type: str, default: org/model}\n---\n"
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HOARD = "{% set ns = namespace(s=[]) %}{% for i in range(100000) %}{% set ns.s = ns.s + ['x' * 999999] %}{% endfor %}"


@pytest.fixture
def low_limits(monkeypatch):
    monkeypatch.setenv("TLI_RECIPE_TEMPLATE_CPU_SECONDS", "2")
    monkeypatch.setenv("TLI_RECIPE_TEMPLATE_MEMORY", "256MiB")


def test_nested_loops_stop_at_the_cpu_limit(tmp_path, hostile_cli, refused, low_limits):
    template = tmp_path / "loops.yaml.j2"
    template.write_text(FRONT + LOOPS + "\nbase_model: {{ base }}\n")
    started = time.process_time()
    result = hostile_cli("render", template)
    refused(
        result,
        "loops.yaml.j2:5:1: template: rendering was stopped: it used more than the CPU-time limit of 2 s "
        "(TLI_RECIPE_TEMPLATE_CPU_SECONDS raises it)",
    )
    assert time.process_time() - started < 1.5  # the child spent the time, and was stopped; not this process


def test_a_template_hoarding_memory_stops_at_the_memory_limit(tmp_path, hostile_cli, refused, low_limits):
    template = tmp_path / "hoard.yaml.j2"
    template.write_text(FRONT + HOARD + "\nbase_model: {{ base }}\n")
    refused(
        hostile_cli("render", template),
        "rendering was stopped: it needed more than the memory limit of 256 MiB (TLI_RECIPE_TEMPLATE_MEMORY raises it)",
    )


def test_raising_the_limit_lets_a_slow_template_render(tmp_path, hostile_cli, monkeypatch):
    """A template that needs a few seconds of CPU: refused under a 1 s limit, rendered under the default."""
    template = tmp_path / "slow.yaml.j2"
    template.write_text(
        FRONT
        + "{% for i in range(3000) %}{% for j in range(1000) %}{% if i * j == -1 %}x{% endif %}{% endfor %}"
        + "{% endfor %}base_model: {{ base }}\n"
    )
    monkeypatch.setenv("TLI_RECIPE_TEMPLATE_CPU_SECONDS", "1")
    started = time.process_time()
    tight = hostile_cli("render", template)
    monkeypatch.delenv("TLI_RECIPE_TEMPLATE_CPU_SECONDS")
    ok = hostile_cli("render", template)
    assert ok.exit_code == 0 and ok.stdout.startswith("base_model: org/model"), ok.output
    if tight.exit_code == 0:  # a fast machine rendered it within 1 s: nothing to compare
        pytest.skip("the template rendered within 1 s of CPU here")
    assert "CPU-time limit of 1 s" in tight.output
    assert time.process_time() - started < 1.5


def test_the_sandbox_refuses_a_huge_product_before_computing_it(tmp_path, hostile_cli, refused):
    template = tmp_path / "big.yaml.j2"
    template.write_text(FRONT + "{{ 'x' * 10**9 }}\nbase_model: {{ base }}\n")
    refused(hostile_cli("render", template), "refused by the sandbox: a sequence of 1000000000 items")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TLI_RECIPE_TEMPLATE_CPU_SECONDS", "soon", "TLI_RECIPE_TEMPLATE_CPU_SECONDS='soon': expected a whole number"),
        ("TLI_RECIPE_TEMPLATE_MEMORY", "lots", "TLI_RECIPE_TEMPLATE_MEMORY='lots': expected a size in bytes"),
    ],
)
def test_a_bad_limit_is_named(tmp_path, hostile_cli, refused, monkeypatch, name, value, message):
    template = tmp_path / "t.yaml.j2"
    template.write_text(FRONT + "base_model: {{ base }}\n")
    monkeypatch.setenv(name, value)
    refused(hostile_cli("render", template), message)


# --- lm-eval task files ----------------------------------------------------------------------------

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'tli-recipe[eval]')")


def write_task(folder, **fields):
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"context": "the cat sat on", "choices": ["the mat", "a tree"], "answer": 0}] * 3
    (folder / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    spec = {
        "task": "tiny_hostile",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "t.jsonl"}, "cache_dir": str(folder / "cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        **fields,
    }
    path = folder / "t.yaml"
    path.write_text(json.dumps(spec, indent=1))
    return path


def test_an_include_outside_the_task_folder_is_refused_unread(tmp_path):
    from tli_recipe.training.lmeval import TaskSet

    secret = tmp_path / "secret.yaml"
    secret.write_text("api_key_SECRET_FIRST_KEY: 1\n")
    (tmp_path / "task").mkdir()
    task = tmp_path / "task" / "t.yaml"
    task.write_text("include: ../secret.yaml\n")
    with pytest.raises(TliError, match=r"include: '\.\./secret\.yaml' is outside the task's folder") as err:
        TaskSet([str(task)])
    assert "SECRET" not in str(err.value)


def test_an_include_through_a_link_out_of_the_folder_is_refused(tmp_path):
    from tli_recipe.training.lmeval import TaskSet

    (tmp_path / "outside.yaml").write_text("task: x\n")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "shared.yaml").symlink_to(tmp_path / "outside.yaml")
    task = tmp_path / "task" / "t.yaml"
    task.write_text("include: shared.yaml\ntask: t\n")
    with pytest.raises(TliError, match="is outside the task's folder"):
        TaskSet([str(task)])


def test_an_include_inside_the_task_folder_is_followed(tmp_path):
    from tli_recipe.training.task_files import load_task_file

    folder = tmp_path / "task"
    (folder / "common").mkdir(parents=True)
    (folder / "common" / "base.yaml").write_text("output_type: multiple_choice\ntask: base\n")
    (folder / "t.yaml").write_text("include: common/base.yaml\ntask: mine\n")
    assert load_task_file(folder / "t.yaml") == {"output_type": "multiple_choice", "task": "mine"}


def test_a_huge_product_in_a_task_template_is_refused_at_once(tmp_path):
    from tli_recipe.training.lmeval import TaskSet

    task = write_task(tmp_path / "task", doc_to_text="{{ 'x' * 10**9 }}")
    started = time.monotonic()
    with pytest.raises(TliError, match=r"lm-eval could not load it \(SecurityError: a sequence of 1000000000 items"):
        TaskSet([str(task)])
    assert time.monotonic() - started < 60


def test_nested_loops_in_a_task_template_stop_at_the_cpu_limit(tmp_path, low_limits):
    from tli_recipe.training.lmeval import TaskSet

    task = write_task(tmp_path / "task", doc_to_text=LOOPS + "{{context}}")
    with pytest.raises(
        TliError,
        match=r"task '.*t\.yaml': rendering its templates was stopped: it used more than the CPU-time limit of 2 s",
    ):
        TaskSet([str(task)])


def test_a_good_task_file_still_loads_under_the_limits(tmp_path, low_limits):
    from tli_recipe.training.lmeval import TaskSet

    task_set = TaskSet([str(write_task(tmp_path / "task"))])
    assert isinstance(task_set.items[0], dict)
