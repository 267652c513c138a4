"""tli-recipe never runs Python code from a checkpoint.

transformers runs a model's own ``modeling_*.py`` when its config has ``auto_map`` and
``trust_remote_code`` is true, and at a terminal it *asks* when the argument is missing:
one ``y`` runs whatever the directory holds. So every ``*.from_pretrained`` call in the
package passes ``trust_remote_code=False`` literally (checked here on the source), and a
model that needs its own code gets a clear error from ``verify`` and ``eval`` (checked end
to end with a planted module that would leave a marker file if it were ever imported,
and a ``y`` waiting on stdin for a prompt that must never come).
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tli_recipe"


def untrusting(call: ast.Call) -> bool:
    """Whether a call passes ``trust_remote_code=False`` as a literal keyword."""
    return any(
        k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
        for k in call.keywords
    )


def from_pretrained_problems(source: str, name: str) -> list[str]:
    """Every ``x.from_pretrained`` in ``source`` that is not a call with ``trust_remote_code=False``
    (an alias such as ``load = AutoModel.from_pretrained`` would hide the call from this check)."""
    tree = ast.parse(source)
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "from_pretrained":
            # peft loads an adapter's weights and JSON config, never model code; the trainer loads
            # only the adapter it has just written itself.
            if ast.unparse(node.func) == "PeftModel.from_pretrained":
                continue
            if not untrusting(node):
                problems.append(f"{name}:{node.lineno}: {ast.unparse(node.func)}(...) without trust_remote_code=False")
        elif isinstance(node, ast.Attribute) and node.attr == "from_pretrained" and id(node) not in called:
            problems.append(
                f"{name}:{node.lineno}: {ast.unparse(node)} used without calling it (call it with "
                "trust_remote_code=False instead of aliasing it)"
            )
    return problems


def test_the_check_catches_what_it_must():
    bad = (
        "from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer\n"
        "AutoConfig.from_pretrained(p)\n"
        "AutoTokenizer.from_pretrained(p, trust_remote_code=True)\n"
        "AutoModelForCausalLM.from_pretrained(p, **kwargs)\n"
        "PeftModel.from_pretrained(m, p)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=flag)\n"
        "load = AutoModelForCausalLM.from_pretrained\n"
    )
    assert [p.split(":")[1] for p in from_pretrained_problems(bad, "x.py")] == ["2", "3", "4", "6", "7"]
    good = "AutoConfig.from_pretrained(p, trust_remote_code=False)\nmodel.save_pretrained(out)\n"
    assert from_pretrained_problems(good, "x.py") == []


def test_every_from_pretrained_in_the_package_passes_trust_remote_code_false():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        problems += from_pretrained_problems(path.read_text(), str(path.relative_to(ROOT)))
    assert problems == [], "\n".join(problems)


# --- end to end: a model that needs its own code ---------------------------------------

EVIL = """from pathlib import Path
Path({marker!r}).write_text("imported")  # runs on import: the test fails if this file ever appears
"""


def plant_custom_code(folder: Path, marker: Path) -> None:
    """Make ``folder`` a model that needs its own code: unknown model_type, auto_map, and the modules."""
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="evil_lm",
        architectures=["EvilForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_evil.EvilConfig",
            "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for module in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / module).write_text(EVIL.format(marker=str(marker)))


CUSTOM = r"needs its own Python code|never runs code from a checkpoint|custom code|trust_remote_code"


def assert_refused_without_running_code(result, marker: Path) -> None:
    import re

    output = (result.stdout or "") + (result.stderr or "")
    assert result.exit_code in (1, 2), output
    assert "Traceback" not in output, output
    assert re.search(CUSTOM, output), output
    assert "[y/N]" not in output and "Do you wish to run the custom code" not in output, output
    assert not marker.exists(), "code from the checkpoint ran"


@pytest.fixture
def hostile_cli():
    """The CLI in-process, stdin given; an escaped exception fails the test (it would be a traceback)."""
    from click.testing import CliRunner

    from tli_recipe.cli import main

    runner = CliRunner()

    def invoke(*args, input=None):
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=True, input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise AssertionError(f"Traceback (uncaught {type(result.exception).__name__}): {result.exception}")
        return result

    return invoke


@pytest.fixture
def grown(tmp_path, tiny, cli):
    """An output of `run` (with plan.json) and a copy of its base, outside the tiny cache."""
    base = tmp_path / "base"
    shutil.copytree(tiny(layers=4), base)
    from tiny_text import add_char_tokenizer

    add_char_tokenizer(base)
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"base_model: {base}\ninject: {{every: 2}}\n")
    result = cli("run", recipe, "--output", out, "--device", "cpu", "--no-progress")
    assert result.exit_code == 0, result.stderr
    return base, out


def test_verify_refuses_an_output_that_needs_custom_code(tmp_path, grown, hostile_cli):
    base, out = grown
    marker = tmp_path / "MARKER-code-ran"
    plant_custom_code(out, marker)
    plan = json.loads((out / "plan.json").read_text())  # the plan agrees, so only the loading can refuse
    plan["config"] = json.loads((out / "config.json").read_text())
    (out / "plan.json").write_text(json.dumps(plan, indent=2))
    assert_refused_without_running_code(hostile_cli("verify", out, "--no-tensors", input="y\ny\ny\n"), marker)


def test_verify_refuses_a_base_model_that_needs_custom_code(tmp_path, grown, hostile_cli):
    base, out = grown
    marker = tmp_path / "MARKER-code-ran"
    plant_custom_code(base, marker)
    assert_refused_without_running_code(hostile_cli("verify", out, "--no-tensors", input="y\ny\ny\n"), marker)


@pytest.mark.parametrize("what", ["model", "tokenizer"])
def test_eval_refuses_a_model_that_needs_custom_code(tmp_path, tiny, hostile_cli, what):
    from tiny_text import add_char_tokenizer, write_text

    model = tmp_path / "model"
    shutil.copytree(tiny(layers=4), model)
    add_char_tokenizer(model)
    marker = tmp_path / "MARKER-code-ran"
    if what == "model":
        plant_custom_code(model, marker)
    else:  # only the tokenizer needs its own code
        settings = json.loads((model / "tokenizer_config.json").read_text())
        settings.update(
            tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
        )
        (model / "tokenizer_config.json").write_text(json.dumps(settings))
        (model / "tokenization_evil.py").write_text(EVIL.format(marker=str(marker)))
    data = write_text(tmp_path / "held.txt", 20)
    result = hostile_cli("eval", model, "--data", data, "--device", "cpu", input="y\ny\ny\n")
    assert_refused_without_running_code(result, marker)
