"""Parts of the executor and of verify that other tests would not miss if they broke.

Each test fails when one specific safeguard is removed: zeros written as bytes instead of
holes, the neighbour of an interpolation read from the wrong source, a verify that accepts a
wrong value, `run` skipping its source-vs-plan check, the shard writer's dtype check.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import write_recipe
from growing import grow, load_all
from safetensors.torch import load_file, save_file

from tli_recipe import compile_plan, execute_plan, load_recipe, verify_output
from tli_recipe.errors import TliError
from tli_recipe.execute.shards import ShardWriter, layout_shards
from tli_recipe.source.checkpoint import open_checkpoint

WIDE = {"hidden_size": 128, "intermediate_size": 512}  # down_proj: 256 KiB of float32 per layer


def sparse_files_work(folder) -> bool:
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.seek(8 << 20)
        f.write(b"x")
    sparse = probe.stat().st_blocks * 512 < 4 << 20
    probe.unlink()
    return sparse


def test_zero_tensors_are_written_as_holes(tmp_path, tiny):
    if not sparse_files_work(tmp_path):
        pytest.skip("this file system stores no sparse files")
    plan, out = grow(tmp_path, tiny(layers=4, **WIDE), "inject: {every: 1}\n")
    zero_bytes = sum(op.nbytes for op in plan.tensors if op.op == "zero")
    assert zero_bytes >= 4 * 256 * 1024
    shards = list(out.glob("*.safetensors"))
    size = sum(s.stat().st_size for s in shards)
    allocated = sum(s.stat().st_blocks * 512 for s in shards)
    # every zero tensor spans whole file-system blocks but for its two ends
    assert allocated <= size - zero_bytes + 2 * 4096 * len([op for op in plan.tensors if op.op == "zero"])
    assert all(
        not t.any()
        for name, t in load_all(out).items()
        if name.endswith(("o_proj.weight", "down_proj.weight")) and int(name.split(".")[2]) % 2 == 1
    )


def test_interpolation_reads_the_next_layer_from_its_own_source(tmp_path, tiny):
    a, b = tiny(layers=4), tiny(layers=4, seed=1)
    body = (
        f"slices:\n  - layer_range: [0, 2]\n  - model: {b}\n    layer_range: [2, 4]\n"
        "inject:\n  after: [1]\n  init: {q_proj: {interpolate: 0.5}, o_proj: zero, down_proj: zero}\n"
    )
    plan, out = grow(tmp_path, a, body)
    op = next(op for op in plan.tensors if op.op == "interpolate")
    assert (op.source_name, op.second_name) == (
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_proj.weight",
    )
    assert plan.sources[op.second_source].path == str(b) and plan.sources[op.source].path == str(a)
    src_a, src_b = load_all(a), load_all(b)
    expected = (
        0.5 * src_a["model.layers.1.self_attn.q_proj.weight"] + 0.5 * src_b["model.layers.2.self_attn.q_proj.weight"]
    )
    assert torch.equal(load_all(out)[op.name], expected)
    assert verify_output(out, logits=False).ok


POLICIES = (
    "inject:\n  every: 2\n  init: {q_proj: {scale: 0.5}, k_proj: {noise: 0.01}, v_proj: {random: 0.02},\n"
    "         gate_proj: {interpolate: 0.5}, o_proj: zero, down_proj: zero}\n"
)


def flip_one_bit(folder, name: str) -> None:
    info = open_checkpoint(folder).tensors[name]
    with open(info.file, "r+b") as f:
        f.seek(info.start + 4 * 7)  # the eighth float32 element
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x01]))  # the lowest mantissa bit: still finite, still non-zero


@pytest.mark.parametrize("op_name", ["copy", "zero", "scale", "noise", "random", "interpolate"])
def test_verify_catches_one_wrong_bit_in_any_op(tmp_path, tiny, op_name):
    plan, out = grow(tmp_path, tiny(layers=4), POLICIES)
    assert verify_output(out, logits=False).ok
    target = next(op for op in plan.tensors if op.op == op_name and op.dtype == "F32" and op.layer is not None)
    flip_one_bit(out, target.name)
    report = verify_output(out, logits=False)
    assert report.tensor_problems == [
        f"'{target.name}': values differ from the plan's {op_name} of '{target.source_name}'"
    ]


def test_verify_compares_bits_so_a_nan_copied_exactly_is_no_value_problem_but_is_named(tmp_path, tiny):
    base = tmp_path / "nan-model"
    shutil.copytree(tiny(layers=2), base)
    shard = next(base.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.up_proj.weight"][0, :3] = torch.tensor([float("nan"), -0.0, float("-nan")])
    save_file(tensors, shard, metadata={"format": "pt"})
    _, out = grow(tmp_path, base, "inject: {every: 1}\n")
    report = verify_output(out, logits=False)
    assert not report.tensor_problems  # NaN equals the same NaN bit for bit: the copy is what the plan says
    assert not report.ok  # but the source holds NaN, and verify says which tensor (issue 23)
    assert report.nonfinite_sources == [f"{base}: 'model.layers.0.mlp.up_proj.weight' in {shard} (2 of 2048 values)"]


def test_run_refuses_a_source_that_changed_since_the_plan(tmp_path, tiny):
    base = tmp_path / "changing"
    shutil.copytree(tiny(layers=2), base)
    plan = compile_plan(
        load_recipe(write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / 'out'}\ninject: {{every: 1}}\n"))
    )
    shard = next(base.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"].half()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(
        TliError,
        match=r"2 of \d+ planned source tensors are missing or differ in shape/dtype "
        r"\(first: 'model.layers.1.mlp.up_proj.weight'\); the checkpoint changed",
    ):
        execute_plan(plan, progress=False, log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_shard_writer_refuses_a_tensor_of_another_dtype(tmp_path):
    writer = ShardWriter(tmp_path, layout_shards([("a", "F32", (2, 2))], 1 << 20), {"format": "pt"})
    with pytest.raises(TliError, match=r"tensor 'a': got shape \(2, 2\) torch.float16, the plan says \(2, 2\) F32"):
        writer.write("a", torch.zeros(2, 2, dtype=torch.float16))


def set_element(folder, name: str, value: float) -> None:
    """Overwrite the first element of tensor ``name`` in a written checkpoint, in the tensor's own dtype."""
    from tli_recipe.execute.shards import torch_dtype

    info = open_checkpoint(folder).tensors[name]
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        f.write(torch.tensor([value], dtype=torch_dtype(info.dtype)).view(torch.uint8).numpy().tobytes())


def test_verify_atol_is_the_tolerance_of_the_logits(tmp_path, tiny, cli):
    _, out = grow(tmp_path, tiny(layers=4), "inject: {every: 2}\n")
    set_element(out, "model.norm.weight", 1.5)  # the logits move by far more than 1e-5, far less than 100
    loose = cli("verify", out, "--no-tensors", "--atol", "100")
    assert loose.exit_code == 0 and "= 100 x max(1, max |base logits|" in loose.stdout, loose.output
    diff = float(loose.stdout.split("max |output - base| = ")[1].split()[0])
    scale = max(1.0, float(loose.stdout.split("max |base logits| ")[1].split(")")[0]))
    assert 1e-5 < diff < 100
    atol = diff / 2 / scale  # the tolerance is relative: atol x max(1, max |base logits|)
    strict = cli("verify", out, "--no-tensors", "--atol", f"{atol:g}")
    assert strict.exit_code != 0 and "BEYOND tolerance" in strict.stdout, strict.output
    assert f"= {atol:g} x max(1, max |base logits|" in strict.stdout
    assert f"> tolerance {diff / 2:.3g}" in strict.stderr


def _poisoned(out, op) -> list[str]:
    set_element(out, op.name, float("nan"))
    return verify_output(out, logits=False).tensor_problems


def test_verify_refuses_a_non_finite_lesa_tensor(tmp_path, tiny):
    init = "{q_proj: lesa, o_proj: zero, down_proj: zero}"
    plan, out = grow(tmp_path, tiny(layers=4), f"inject:\n  after: [1]\n  lesa: {{epochs: 1}}\n  init: {init}\n")
    report = verify_output(out, logits=False)
    assert report.ok and report.not_recomputed == 1
    op = next(op for op in plan.tensors if op.op == "lesa")
    assert _poisoned(out, op) == [f"'{op.name}': values differ from the plan's lesa of '{op.source_name}'"]


def test_verify_refuses_a_non_finite_hidden_router(tmp_path):
    from conftest import build_tiny
    from tiny_text import add_char_tokenizer

    base = add_char_tokenizer(build_tiny(tmp_path / "base", layers=2))
    body = "upcycle:\n  experts: 2\n  top_k: 1\n  router: hidden\n  prompts:\n" + "    - {positive: [the cat]}\n" * 2
    plan, out = grow(tmp_path, base, body)
    assert verify_output(out, logits=False).ok
    op = next(op for op in plan.tensors if op.op == "hidden")
    assert _poisoned(out, op) == [f"'{op.name}': values differ from the plan's hidden of '{op.source_name}'"]


def test_noise_seeds_differ_across_injected_layers_copying_the_same_layer(tmp_path, tiny):
    """Two copies after each position copy the same source layer: each tensor still gets its own noise."""
    plan, out = grow(
        tmp_path, tiny(layers=2), "inject:\n  every: 2\n  copies: 2\n  init: {down_proj: {noise: 0.1}, o_proj: zero}\n"
    )
    noisy = [op for op in plan.tensors if op.op == "noise"]
    assert [(op.layer, op.source_name) for op in noisy] == [
        (2, "model.layers.1.mlp.down_proj.weight"),
        (3, "model.layers.1.mlp.down_proj.weight"),
    ]
    assert len({op.seed for op in noisy}) == 2
    weights = load_all(out)
    first, second = (weights[op.name] - load_all(tiny(layers=2))[op.source_name] for op in noisy)
    assert first.abs().min() > 0 and not torch.equal(first, second)
