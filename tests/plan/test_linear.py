"""Plan time is linear in the size of the output: the work of compile_plan, counted (no clock),
grows by about 4x when the model grows by 4x, with every stage kind and the plan table.

Work is counted in two ways, so that a quadratic regression shows whether it is Python
(a scan of every op per layer: line events) or C (``x in set(list)`` rebuilt per tensor:
elements passed to set/sorted/sum/any/all in the plan modules)."""

from __future__ import annotations

import builtins
import importlib
import json
import sys

import pytest
from conftest import write_recipe

from tli_recipe import compile_plan, load_recipe

PLAN_MODULES = (
    "tli_recipe.plan.compile",
    "tli_recipe.plan.sources",
    "tli_recipe.plan.layers",
    "tli_recipe.plan.tensor_ops",
    "tli_recipe.plan.config",
    "tli_recipe.plan.stages",
    "tli_recipe.plan.report",
)
COUNTED = ("set", "frozenset", "sorted", "sum", "any", "all", "max", "min")

RECIPE = """base_model: {base}
inject: {{every: 2}}
stages:
  - name: full
    trainable: [all]
  - name: new
    trainable: [injected, head]
  - name: lora
    trainable: [all]
    lora: {{r: 4, alpha: 8, targets: [q_proj, v_proj]}}
"""


class Work:
    def __init__(self) -> None:
        self.lines = 0
        self.elements = 0

    def total(self) -> int:
        return self.lines + self.elements


def _counting(work: Work, builtin):
    def counted(items):
        for item in items:
            work.elements += 1
            yield item

    def wrapper(*args, **kwargs):
        if args and not isinstance(args[0], (str, bytes)) and hasattr(args[0], "__iter__"):
            args = (counted(args[0]),) + args[1:]
        return builtin(*args, **kwargs)

    return wrapper


def _config(tmp_path, layers: int):
    folder = tmp_path / f"llama{layers}"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 64,
                "num_hidden_layers": layers,
                "torch_dtype": "float32",
            }
        )
    )
    return folder


def work_of(tmp_path, monkeypatch, layers: int) -> int:
    from tli_recipe.plan.report import plan_table

    loaded = load_recipe(write_recipe(tmp_path, RECIPE.format(base=_config(tmp_path, layers)), f"r{layers}.yaml"))
    work = Work()
    modules = [importlib.import_module(name) for name in PLAN_MODULES]
    files = {module.__file__ for module in modules}
    with monkeypatch.context() as patch:
        for module in modules:
            for builtin in COUNTED:
                patch.setattr(module, builtin, _counting(work, getattr(builtins, builtin)), raising=False)

        def local(frame, event, arg):
            if event == "line":
                work.lines += 1
            return local

        def tracer(frame, event, arg):
            return local if frame.f_code.co_filename in files else None

        sys.settrace(tracer)
        try:
            plan_table(compile_plan(loaded))
        finally:
            sys.settrace(None)
    return work.total()


def test_plan_work_grows_linearly_with_the_model(tmp_path, monkeypatch):
    small, large = work_of(tmp_path, monkeypatch, 8), work_of(tmp_path, monkeypatch, 32)
    # 4x the layers (and tensors): linear work is at most ~4x; a per-tensor scan of all
    # tensors makes it ~16x.
    assert large / small < 5.5, (small, large)


QUADRATIC = """
def resolve_stage(stage, i, layers, by_layer, arch, earlier, problems, warnings):
    plan = _real(stage, i, layers, by_layer, arch, earlier, problems, warnings)
    every = [op for ops in by_layer.values() for op in ops]
    sum(1 for op in every if op.name in set(plan.parameters))  # the old bug: a set per tensor
    return plan
"""


def test_the_counter_sees_a_quadratic_stage_resolution(tmp_path, monkeypatch):
    """The counter itself works: the old per-tensor set rebuild, compiled as code of the
    stages module, makes the work grow ~16x."""
    from tli_recipe.plan import stages

    monkeypatch.setattr(stages, "_real", stages.resolve_stage, raising=False)
    monkeypatch.setattr(stages, "resolve_stage", stages.resolve_stage)  # restored after the test
    exec(compile(QUADRATIC, stages.__file__, "exec"), vars(stages))
    small, large = work_of(tmp_path, monkeypatch, 8), work_of(tmp_path, monkeypatch, 32)
    assert large / small > 8, (small, large)


@pytest.mark.parametrize("copies", [64])
def test_a_runaway_output_is_refused_before_anything_is_built(tmp_path, monkeypatch, copies):
    from tli_recipe.errors import RecipeError
    from tli_recipe.plan import compile as compile_module

    built = []
    monkeypatch.setattr(compile_module, "build_layer_map", lambda *a: built.append(a))
    recipe = write_recipe(tmp_path, f"base_model: {_config(tmp_path, 8)}\ninject: {{every: 1, copies: {copies}}}\n")
    with pytest.raises(RecipeError) as err:
        compile_plan(load_recipe(recipe))
    assert (
        f"inject.copies: {copies} copies at 8 positions give {8 + 8 * copies} output layers; expected at most 128"
        in str(err.value)
    )
    assert built == []
