"""The executor on tiny checkpoints: exact tensors, transformers logits, atomic output."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import logits_of, tree_digest, write_recipe
from growing import grow, load_all
from safetensors import safe_open

from tli_recipe import compile_plan, load_recipe
from tli_recipe.execute.shards import ShardWriter


def reference_tli(source: dict[str, torch.Tensor], layers: int, every: int) -> dict[str, torch.Tensor]:
    """Algorithm 1 written independently of the plan: what every output tensor must be."""
    out = {k: v for k, v in source.items() if not k.startswith("model.layers.")}
    j = 0
    for i in range(layers):
        prefix = f"model.layers.{i}."
        own = {k[len(prefix) :]: v for k, v in source.items() if k.startswith(prefix)}
        out.update({f"model.layers.{j}.{k}": v for k, v in own.items()})
        j += 1
        if (i + 1) % every == 0:
            for k, v in own.items():
                zero = k.startswith(("self_attn.o_proj.", "mlp.down_proj."))
                out[f"model.layers.{j}.{k}"] = torch.zeros_like(v) if zero else v
            j += 1
    return out


@pytest.mark.parametrize("layers,every", [(8, 4), (12, 4), (12, 5)])
def test_tli_tensors_equal_the_reference_map_and_logits_equal(tmp_path, tiny, layers, every):
    base = tiny(layers=layers)
    plan, out = grow(tmp_path, base, f"inject: {{every: {every}}}\n")
    got, expected = load_all(out), reference_tli(load_all(base), layers, every)
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers + layers // every
    assert config["requires_grad_layers"] == [k * (every + 1) + every for k in range(layers // every)]
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "arch,extra",
    [
        ("mistral", {}),
        ("qwen2", {}),
        ("qwen3", {"head_dim": 8}),
        ("qwen3", {"head_dim": 8, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 5}),
        (
            "granite",
            {
                "embedding_multiplier": 2.0,
                "residual_multiplier": 0.5,
                "attention_multiplier": 0.3,
                "logits_scaling": 1.5,
            },
        ),
    ],
)
def test_llama_family_is_exact(tmp_path, tiny, arch, extra):
    base = tiny(arch=arch, layers=8, **extra)
    choice = "output_config: {max_window_layers: 6}\n" if "max_window_layers" in extra else ""
    _, out = grow(tmp_path, base, "inject: {every: 3}\n" + choice)
    config = json.loads((out / "config.json").read_text())
    if "layer_types" in config:
        assert len(config["layer_types"]) == config["num_hidden_layers"] == 10
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


def test_dus_slices_map_and_logits_change(tmp_path, tiny):
    base = tiny(layers=8)
    _, out = grow(tmp_path, base, "slices:\n  - layer_range: [0, 6]\n  - layer_range: [2, 8]\n")
    src, got = load_all(base), load_all(out)
    for j, i in enumerate([0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]):
        assert torch.equal(got[f"model.layers.{j}.mlp.down_proj.weight"], src[f"model.layers.{i}.mlp.down_proj.weight"])
        assert torch.equal(
            got[f"model.layers.{j}.input_layernorm.weight"], src[f"model.layers.{i}.input_layernorm.weight"]
        )
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 12
    assert (logits_of(out) - logits_of(base)).abs().max() > 1e-2


def test_tied_embeddings_stay_tied(tmp_path, tiny):
    base = tiny(layers=4, tie=True)
    with safe_open(str(next(base.glob("*.safetensors"))), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    _, out = grow(tmp_path, base, "inject: {every: 2}\n")
    assert "lm_head.weight" not in load_all(out)
    torch.testing.assert_close(logits_of(out), logits_of(base), atol=1e-5, rtol=0)


def test_bfloat16_output_and_small_shards(tmp_path, tiny, cli):
    base = tiny(layers=4)
    plan, out = grow(tmp_path, base, "dtype: bfloat16\nshard_size: 40KB\ninject: {every: 2}\n")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and all(s.stat().st_size <= 40_000 + 4096 for s in shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {op.name for op in plan.tensors}
    got = load_all(out)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    src = load_all(base)
    assert torch.equal(
        got["model.layers.0.self_attn.q_proj.weight"], src["model.layers.0.self_attn.q_proj.weight"].bfloat16()
    )
    with safe_open(str(shards[0]), "pt") as f:
        assert f.metadata()["recipe_sha256"] == plan.recipe_sha256
    result = cli("verify", out)  # the base is rounded to bf16 before comparing, so this is exact too
    assert result.exit_code == 0, result.output
    assert "max |output - base| = 0 " in result.stdout


def test_policies_are_applied_and_deterministic(tmp_path, tiny):
    base = tiny(layers=4)
    body = (
        "seed: 7\ninject:\n  every: 2\n  init: {o_proj: {scale: 0.5}, down_proj: {noise: 0.1}, "
        "q_proj: {random: 0.02}, k_proj: zero}\n"
    )
    _, first = grow(tmp_path, base, body, name="a")
    _, second = grow(tmp_path, base, body, name="b")
    a, b, src = load_all(first), load_all(second), load_all(base)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert torch.equal(a["model.layers.2.self_attn.o_proj.weight"], src["model.layers.1.self_attn.o_proj.weight"] * 0.5)
    delta = a["model.layers.2.mlp.down_proj.weight"] - src["model.layers.1.mlp.down_proj.weight"]
    assert 0.07 < delta.std() < 0.13
    assert 0.01 < a["model.layers.2.self_attn.q_proj.weight"].std() < 0.03
    assert not a["model.layers.2.self_attn.k_proj.weight"].any()
    # noise differs between injected layers (each tensor has its own stream)
    assert not torch.equal(
        a["model.layers.2.mlp.down_proj.weight"] - src["model.layers.1.mlp.down_proj.weight"],
        a["model.layers.5.mlp.down_proj.weight"] - src["model.layers.3.mlp.down_proj.weight"],
    )


def test_output_files_and_model_card(tmp_path, tiny):
    base = tiny(layers=4)
    plan, out = grow(tmp_path, base, "inject: {every: 2}\nstages:\n  - name: new\n    trainable: [injected]\n")
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "plan.json",
        "recipe.yaml",
        "README.md",
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
    } <= names
    card = (out / "README.md").read_text()
    assert "[2, 5]" in card and "**new**" in card and plan.recipe_sha256 in card
    assert not list(tmp_path.glob(".grown.tmp-*"))


def test_existing_output_is_refused_unless_force(tmp_path, tiny, cli):
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / 'out'}\ninject: {{every: 2}}\n")
    assert cli("run", recipe, "--no-progress").exit_code == 0
    marker = tmp_path / "out" / "config.json"
    before = marker.stat().st_mtime_ns
    again = cli("run", recipe, "--no-progress")
    assert again.exit_code == 2 and "already exists; pass --force" in again.stderr
    assert marker.stat().st_mtime_ns == before
    assert cli("run", recipe, "--no-progress", "--force").exit_code == 0


def test_output_inside_the_source_is_refused(tmp_path, tiny, cli):
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n")
    result = cli("run", recipe, "--output", base / "grown", "--force")
    assert result.exit_code == 2 and "overlaps the source model" in result.stderr


def interrupt_at_once(self, name):
    raise KeyboardInterrupt


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_nothing_and_inputs_untouched(tmp_path, tiny, monkeypatch, interrupt):
    base = tiny(layers=8)
    before = tree_digest(base)
    real, calls = ShardWriter._next, []

    def failing(self, name):
        calls.append(1)
        if len(calls) == 40:
            raise interrupt("stop")
        return real(self, name)

    monkeypatch.setattr(ShardWriter, "_next", failing)
    with pytest.raises(interrupt):
        grow(tmp_path, base, "inject: {every: 4}\n")
    assert list(tmp_path.iterdir()) == [tmp_path / "grown.yaml"]
    assert tree_digest(base) == before


def test_interrupted_force_run_keeps_the_previous_output(tmp_path, tiny, monkeypatch):
    base = tiny(layers=4)
    _, out = grow(tmp_path, base, "inject: {every: 2}\n")
    previous = tree_digest(out)
    monkeypatch.setattr(ShardWriter, "_next", interrupt_at_once)
    with pytest.raises(KeyboardInterrupt):
        grow(tmp_path, base, "inject: {every: 2}\n", force=True)
    assert tree_digest(out) == previous


def test_cli_run_reports_interrupt_without_traceback(tmp_path, tiny, monkeypatch, cli):
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / 'out'}\ninject: {{every: 2}}\n")
    monkeypatch.setattr(ShardWriter, "_next", interrupt_at_once)
    result = cli("run", recipe, "--no-progress")
    assert result.exit_code == 130 and "interrupted: nothing was written" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_verify_detects_a_tampered_tensor(tmp_path, tiny, cli):
    base = tiny(layers=4)
    _, out = grow(tmp_path, base, "inject: {every: 2}\n")
    assert cli("verify", out).exit_code == 0
    # flip one byte inside an injected layer's zero o_proj
    shard = next(out.glob("model-*.safetensors"))
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert "model.layers.2.self_attn.o_proj.weight" in index["weight_map"] and names
    from tli_recipe.source.checkpoint import open_checkpoint

    info = open_checkpoint(out).tensors["model.layers.2.self_attn.o_proj.weight"]
    data = bytearray(shard.read_bytes())
    data[info.start + 3] ^= 0x40
    shard.write_bytes(bytes(data))
    result = cli("verify", out)
    assert result.exit_code == 1
    assert "model.layers.2.self_attn.o_proj.weight" in result.stderr and "BEYOND tolerance" in result.stdout


@pytest.mark.gpu
@pytest.mark.parametrize(
    "body",
    [
        "inject:\n  every: 2\n  init: {o_proj: {scale: 0.5}, down_proj: {noise: 0.1}}\n",
        "inject:\n  every: 2\n  init: {q_proj: {interpolate: 0.5}, o_proj: zero, down_proj: {random: 0.02}}\n",
        "dtype: bfloat16\ninject: {every: 2}\n",
    ],
    ids=["scale-noise", "interpolate-random", "cast"],
)
def test_cuda_matches_cpu(tmp_path, tiny, body):
    """Computed tensors are the same bytes on cuda and cpu: arithmetic per element, random streams drawn on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base = tiny(layers=4)
    _, cpu = grow(tmp_path, base, body, name="cpu", device="cpu")
    _, gpu = grow(tmp_path, base, body, name="gpu", device="cuda")
    a, b = load_all(cpu), load_all(gpu)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_force_refuses_a_directory_that_is_not_a_tli_output(tmp_path, tiny, cli):
    base = tiny(layers=4)
    precious = tmp_path / "models"
    precious.mkdir()
    (precious / "weights.bin").write_bytes(b"keep me")
    recipe = write_recipe(tmp_path, f"base_model: {base}\ninject: {{every: 2}}\n")
    result = cli("run", recipe, "--output", precious, "--force", "--no-progress")
    assert result.exit_code == 2 and "not a tli-recipe output" in result.stderr
    assert (precious / "weights.bin").read_bytes() == b"keep me"


def test_mixed_dtypes_are_kept_unless_the_recipe_casts(tmp_path, tiny):
    from safetensors.torch import save_file

    base = tiny(layers=4, dtype="bfloat16")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in base.iterdir():
        (mixed / f.name).write_bytes(f.read_bytes())
    tensors = load_all(base)
    tensors = {k: v.float() if "norm" in k else v for k, v in tensors.items()}
    save_file(tensors, str(mixed / "model.safetensors"), metadata={"format": "pt"})
    _, out = grow(tmp_path, mixed, "inject: {every: 2}\n")
    got = load_all(out)
    assert got["model.layers.2.input_layernorm.weight"].dtype == torch.float32
    assert got["model.layers.2.self_attn.q_proj.weight"].dtype == torch.bfloat16
    _, cast = grow(tmp_path, mixed, "dtype: float16\ninject: {every: 2}\n", name="cast")
    assert {t.dtype for t in load_all(cast).values()} == {torch.float16}


def test_per_layer_lists_come_from_each_layers_own_source(tmp_path, tiny):
    shallow = tiny(arch="qwen3", layers=4, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    deep = tiny(arch="qwen3", layers=8, head_dim=8, use_sliding_window=True, sliding_window=4, max_window_layers=6)
    plan = compile_plan(
        load_recipe(
            write_recipe(
                tmp_path,
                f"""base_model: {shallow}
slices:
  - layer_range: [0, 4]
  - model: {deep}
    layer_range: [4, 8]
""",
            )
        )
    )
    # shallow: layers 2, 3 slide; deep: layers 6, 7 slide (4, 5 do not)
    assert (
        plan.config["layer_types"]
        == ["full_attention"] * 2 + ["sliding_attention"] * 2 + ["full_attention"] * 2 + ["sliding_attention"] * 2
    )


def test_verify_checks_the_config(tmp_path, tiny, cli):
    base = tiny(layers=4)
    _, out = grow(tmp_path, base, "inject: {every: 2}\n")
    config = json.loads((out / "config.json").read_text())
    config["requires_grad_layers"] = [0]
    (out / "config.json").write_text(json.dumps(config))
    result = cli("verify", out, "--no-logits")
    assert result.exit_code == 1 and "requires_grad_layers" in result.stderr
    assert cli("verify", out, "--no-logits", "--no-tensors").exit_code == 2


def test_zero_tensors_are_holes_that_read_as_zeros(tmp_path, tiny):
    base = tiny(layers=4)
    _, out = grow(tmp_path, base, "shard_size: 1KB\ninject: {every: 4}\n")  # the last tensor of a shard may be zero
    got = load_all(out)
    assert not got["model.layers.4.mlp.down_proj.weight"].any()
    assert not got["model.layers.4.self_attn.o_proj.weight"].any()


def test_output_option_is_recorded_in_the_plan_and_card(tmp_path, tiny, cli):
    base = tiny(layers=4)
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / 'elsewhere'}\ninject: {{every: 2}}\n")
    out = tmp_path / "here"
    assert cli("run", recipe, "--output", out, "--no-progress").exit_code == 0
    assert json.loads((out / "plan.json").read_text())["output"] == str(out)
    card = (out / "README.md").read_text()
    assert "tli-recipe verify .    #" in card and str(tmp_path) not in card.split("## Provenance")[0]
