"""The small template both template and variants tests render (one copy, imported by both)."""

from __future__ import annotations

from conftest import write_recipe

SMALL = """---
variables:
  every: {type: int, default: 4, min: 1, help: K}
  dtype: {type: str, default: bfloat16, choices: [float32, bfloat16]}
  base: {type: str, default: meta-llama/Llama-3.2-1B}
---
# {{ plan.layers_before }} -> {{ plan.layers_after }} layers
name: small-k{{ every }}
base_model: {{ base }}
dtype: {{ dtype }}
inject: {every: {{ every }}}
"""


def template_file(tmp_path, text: str, name: str = "t.yaml.j2"):
    return write_recipe(tmp_path, text, name)
