"""The built-in trainer on an upcycled (Mixtral) checkpoint: a router-only stage changes only the routers."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny, write_recipe
from safetensors.torch import load_file
from tiny_text import add_char_tokenizer, write_text

from tli_recipe import compile_plan, execute_plan, load_recipe
from tli_recipe.training.train import train_output


def tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.mark.slow
def test_router_only_stage_changes_only_the_routers(tmp_path):
    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=2))
    data = write_text(tmp_path / "train.txt", 100)
    recipe = write_recipe(
        tmp_path,
        f"""base_model: {base}
output: {tmp_path / "moe"}
upcycle: {{experts: 2, top_k: 2, router: {{random: 0.02}}}}
stages:
  - name: routers
    trainable: [router]
    datasets: [{{path: {data}}}]
    max_steps: 3
    learning_rate: 0.05
    batch_size: 2
    sequence_length: 32
    precision: float32
    validation_fraction: 0.0
""",
    )
    grown = execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)
    [out] = train_output(grown, progress=False, log=lambda m: None)
    before, after = tensors(grown), tensors(out)
    assert sorted(before) == sorted(after)
    routers = {n for n in before if n.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 2
    for name, tensor in before.items():
        if name in routers:
            assert not torch.equal(after[name], tensor), f"{name} did not change"
        else:
            assert torch.equal(after[name], tensor), f"{name} changed but is frozen"
