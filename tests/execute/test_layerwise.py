"""verify's layer-streamed function check: the same numbers as whole models, on every architecture the
tool grows; one layer of weights at a time; divergence of non-preserving plans as information; a
broken output caught at its layer; NaN in a source named; the report, JSON, plot and text input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import logits_of, write_recipe
from safetensors.torch import load_file, save_file
from tiny_text import add_char_tokenizer, write_text

from tli_recipe import compile_plan, execute_plan, load_recipe, verify_output
from tli_recipe.execute import layerwise
from tli_recipe.execute.verify import load_plan

#: case -> (arch, layers, extra config, recipe body). Sliding windows shorter than the 24 tokens verify
#: feeds, so the windows bite; Gemma's post-norms take the recommended init (stored gain -1).
CASES = {
    "llama": ("llama", 4, {}, "inject: {every: 2}"),
    "llama-tied": ("llama", 4, {"tie": True}, "inject: {every: 2}"),
    "mistral-window": ("mistral", 4, {"sliding_window": 5}, "inject: {every: 2}"),
    "qwen2": ("qwen2", 4, {}, "inject: {every: 2}"),
    "qwen3": ("qwen3", 4, {"head_dim": 8}, "inject: {every: 2}"),
    "gemma2-window": ("gemma2", 4, {"head_dim": 8, "sliding_window": 5}, "inject: {every: 2}"),
    "gemma3-window": (
        "gemma3",
        6,
        {"head_dim": 8, "sliding_window": 5, "tie": True},
        "inject: {every: 3}",
    ),
    "gemma3-vlm": ("gemma3-vlm", 4, {}, "inject: {every: 2}"),
    "olmo2": ("olmo2", 4, {}, "inject: {every: 2}"),
    "phi3": ("phi3", 4, {}, "inject: {every: 2}"),
    "qwen3_moe": (
        "qwen3_moe",
        4,
        {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        "inject: {every: 2}",
    ),
    "mixtral": ("mixtral", 4, {"num_local_experts": 4, "num_experts_per_tok": 2}, "inject: {every: 2}"),
    "llama-upcycled-mixtral": ("llama", 4, {}, "upcycle: {experts: 4, top_k: 2, router: zero}"),
    "qwen3-upcycled-qwen3_moe": (
        "qwen3",
        4,
        {"head_dim": 8},
        "inject: {every: 2}\nupcycle: {experts: 3, top_k: 2, layers: [{layers: [0, 4]}], router: {random: 0.5}}",
    ),
}


def grow(tmp_path, base, body: str, name: str = "out"):
    recipe = write_recipe(tmp_path, f"base_model: {base}\noutput: {tmp_path / name}\n{body}\n", f"{name}.yaml")
    plan = compile_plan(load_recipe(recipe))
    return plan, execute_plan(plan, progress=False)


def build(tiny, case: str):
    arch, layers, extra, body = CASES[case]
    extra = dict(extra)
    tie = extra.pop("tie", False)
    return tiny(arch=arch, layers=layers, tie=tie, **extra), body


#: In the quick loop: a tied head, sliding windows with post-norms, an upcycled MoE; every case in `make test`.
QUICK = {"llama-tied", "gemma3-window", "qwen3-upcycled-qwen3_moe"}


@pytest.mark.parametrize("case", [c if c in QUICK else pytest.param(c, marks=pytest.mark.slow) for c in sorted(CASES)])
def test_streamed_gives_the_whole_models_numbers(tmp_path, tiny, case):
    base, body = build(tiny, case)
    plan, out = grow(tmp_path, base, body)
    assert plan.function_preserving
    streamed = verify_output(out, tensors=False)
    whole = verify_output(out, tensors=False, whole=True)
    assert streamed.ok and whole.ok, (streamed.function, whole.function)
    s, w = streamed.function, whole.function
    assert (s.mode, w.mode) == ("streamed", "whole")
    assert len(s.layers) == len(w.layers) == len(plan.layers)
    for a, b in zip(s.layers, w.layers):
        assert a.base_layer == b.base_layer is not None
        assert a.max_abs_diff == pytest.approx(b.max_abs_diff, abs=1e-6)
        assert a.max_abs_diff <= layerwise.layer_tolerance(1e-5, a.base_scale)
        assert a.base_scale == pytest.approx(b.base_scale, rel=1e-6)
    assert s.logits_max_abs_diff == pytest.approx(w.logits_max_abs_diff, abs=1e-6) and s.logits_max_abs_diff <= 1e-5
    assert s.top1_agreement == w.top1_agreement == 1.0
    assert s.first_divergent_layer is None and not s.nonfinite


@pytest.mark.parametrize("case", ["llama-tied", "gemma3-window", "gemma3-vlm", "qwen3_moe", "mixtral"])
def test_streamed_logits_are_from_pretrained_logits(tiny, case):
    """Each path alone, on one model: the streamed forward computes what transformers computes."""
    base, _ = build(tiny, case)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    hidden, logits = layerwise.run_streamed(str(base), ids, device="cpu", dtype=torch.float32, nonfinite=[], label="b")
    assert all(h is not None for h in hidden)
    torch.testing.assert_close(logits, logits_of(base, ids), atol=1e-6, rtol=0)


def test_one_decoder_layer_resident_at_a_time(tiny, monkeypatch):
    base = tiny(arch="llama", layers=8)
    model = layerwise._StreamedModel(
        str(base), device="cpu", dtype=torch.float32, round_to=None, nonfinite=[], label="b"
    )
    resident: list[int] = []
    load = model.load

    def counting(unit):
        load(unit)
        resident.append(sum(1 for layer in model.layers if not next(layer.parameters()).is_meta))

    monkeypatch.setattr(model, "load", counting)
    model.run(torch.zeros((1, 4), dtype=torch.long))
    assert len(resident) == 8 + 3  # 8 layers, the embedding, the head, the final norm
    assert max(resident) == 1
    assert all(p.is_meta for layer in model.layers for p in layer.parameters())  # all freed


def test_each_layer_reads_into_the_previous_layers_buffers(tiny, monkeypatch):
    """Decoder layers share shapes: layer i+1's weights land in the memory freed by layer i (no fresh pages
    per layer), at most one layer's buffers wait in the pool, and none once the head loads."""
    base = tiny(arch="llama", layers=4)
    model = layerwise._StreamedModel(
        str(base), device="cpu", dtype=torch.float32, round_to=None, nonfinite=[], label="b"
    )
    memory: dict[str, set[int]] = {}
    pooled: list[int] = []
    load = model.load

    def spying(unit):
        pooled.append(sum(len(v) for v in model._pool.values()))
        load(unit)
        memory[unit] = {p.data_ptr() for p in model._module(unit).parameters()}
        assert not model._pool  # what a unit does not reuse is dropped once it has loaded

    fresh: list[tuple] = []  # buffers allocated anew, not taken from the pool
    empty = model._empty

    def counting(shape, dtype):
        if not model._pool.get((shape, dtype)):
            fresh.append(shape)
        return empty(shape, dtype)

    monkeypatch.setattr(model, "load", spying)
    monkeypatch.setattr(model, "_empty", counting)
    hidden, logits = model.run(torch.zeros((1, 4), dtype=torch.long))
    layer_params = len(list(model.layers[0].parameters()))
    assert len(fresh) == layer_params + 3  # layer 0, the embedding, the final norm, the head: no other layer
    for i in range(1, 4):
        assert memory[f"layer {i}"] == memory["layer 0"]
    assert max(pooled) == layer_params
    torch.testing.assert_close(logits, logits_of(base, torch.zeros((1, 4), dtype=torch.long)), atol=1e-6, rtol=0)


def test_non_preserving_plans_report_where_they_part(tmp_path, tiny, cli):
    base = tiny(arch="llama", layers=8)
    plan, out = grow(tmp_path, base, "slices:\n  - layer_range: [0, 6]\n  - layer_range: [2, 8]", "dus")
    assert not plan.function_preserving
    report = verify_output(out, tensors=False)
    assert report.ok  # information, not failure
    check = report.function
    assert [r.base_layer for r in check.layers] == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert all(r.max_abs_diff == 0 for r in check.layers[:6])
    assert check.first_divergent_layer == 6 and check.layers[6].max_abs_diff > 1e-3
    assert check.top1_agreement < 1 and check.kl_divergence > 0
    result = cli("verify", out, "--no-tensors")
    assert result.exit_code == 0, result.output
    assert "first layer beyond tolerance (*): 6 (the plan is not function-preserving" in result.output
    # noise on the injected copies: the first injected layer is where they part
    plan, out = grow(tmp_path, base, "inject: {every: 4, init: {o_proj: {noise: 0.01}, down_proj: zero}}", "noise")
    check = verify_output(out, tensors=False).function
    assert check.first_divergent_layer == 4 and check.layers[4].role == "injected"


def test_a_broken_output_is_caught_at_its_layer(tmp_path, tiny, cli):
    base = tiny(arch="llama", layers=8)
    _, out = grow(tmp_path, base, "inject: {every: 4}")
    shard = next(out.glob("*.safetensors"))
    tensors = load_file(shard)
    name = "model.layers.6.mlp.down_proj.weight"  # output layer 6 = source layer 5
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    result = cli("verify", out, "--no-tensors")
    assert result.exit_code == 1, result.output
    assert "first parts from the base at layer 6 (original, from base layer 5)" in result.output
    check = verify_output(out, tensors=False).function
    assert [r.max_abs_diff for r in check.layers[:6]] == [0.0] * 6 and check.layers[6].max_abs_diff > 1e-5


def test_nan_in_a_source_is_named(tmp_path, tiny, cli):
    base = tmp_path / "base"
    shutil.copytree(tiny(arch="llama", layers=4), base)
    shard = next(base.glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["model.layers.1.self_attn.q_proj.weight"][0, 3] = float("nan")
    tensors["model.layers.2.mlp.up_proj.weight"][1, 1] = float("inf")
    save_file(tensors, shard, metadata={"format": "pt"})
    _, out = grow(tmp_path, base, "inject: {every: 2}")
    result = cli("verify", out)
    assert result.exit_code == 1
    assert "non-finite values (NaN or inf) in: " in result.output
    assert "'model.layers.1.self_attn.q_proj.weight'" in result.output and "(1 of 1024 values)" in result.output
    assert "'model.layers.2.mlp.up_proj.weight'" in result.output
    # without the tensor check, the function check names what it loaded
    result = cli("verify", out, "--no-tensors")
    assert result.exit_code == 1
    assert "base: model.layers.1.self_attn.q_proj.weight" in result.output
    assert "output: model.layers.1.self_attn.q_proj.weight" in result.output


def test_json_plot_and_expected_peak(tmp_path, tiny, cli):
    base = tiny(arch="llama", layers=4)
    plan, out = grow(tmp_path, base, "inject: {every: 2}")
    png = tmp_path / "report.png"
    result = cli("verify", out, "--json", "-o", png)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] and data["function"]["mode"] == "streamed"
    assert [r["role"] for r in data["function"]["layers"]] == ["original", "original", "injected"] * 2
    assert all(r["max_abs_diff"] == 0 for r in data["function"]["layers"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "expected peak memory" in result.stderr
    # the estimate: the largest unit is a decoder layer (or the embedding), in float32
    estimate = layerwise.estimate_peak(plan, batch=2, length=24)
    layer0 = sum(4 * torch.Size(op.shape).numel() for op in plan.tensors if op.layer == 0)
    embed = 64 * 32 * 4
    assert estimate.weights == max(layer0, embed) + 4 * min(max(op.nbytes for op in plan.tensors), layerwise.CHUNK)
    assert layerwise.estimate_peak(plan, batch=2, length=24, dtype="bfloat16").weights < estimate.weights


def test_text_input(tmp_path, tiny, cli):
    base = add_char_tokenizer(tmp_path / "base")
    shutil.copytree(tiny(arch="llama", layers=4), base, dirs_exist_ok=True)
    _, out = grow(tmp_path, base, "inject: {every: 2}")
    text = write_text(tmp_path / "text.txt", n=20)
    report = verify_output(out, tensors=False, text=text, batch=2, length=32)
    assert report.ok and report.function.inputs == f"text {text}" and report.function.tokens == 64
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    result = cli("verify", out, "--no-tensors", "--text", short)
    assert result.exit_code == 2 and "7 tokens, verify needs 48" in result.output
    no_tokenizer = tiny(arch="llama", layers=4)
    _, out = grow(tmp_path, no_tokenizer, "inject: {every: 2}", "plain")
    result = cli("verify", out, "--no-tensors", "--text", text)
    assert result.exit_code == 2 and "no tokenizer transformers can load" in result.output


def test_stored_dtype_compute(tmp_path, tiny):
    base = tiny(arch="llama", layers=4, dtype="bfloat16")
    _, out = grow(tmp_path, base, "inject: {every: 2}")
    streamed = verify_output(out, tensors=False, dtype="stored")
    whole = verify_output(out, tensors=False, dtype="stored", whole=True)
    assert streamed.function.dtype == "bfloat16" and streamed.ok
    assert streamed.function.logits_max_abs_diff == whole.function.logits_max_abs_diff == 0
    assert load_plan(out).tensors[0].dtype == "BF16"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_large_tensors_convert_in_slices_exactly(tiny, monkeypatch, dtype):
    """A tensor larger than CHUNK is read and converted slice by slice: the same values, NaN still found."""
    base = tiny(arch="llama", layers=2, dtype=dtype)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(layerwise, "CHUNK", 700)  # embedding rows: 64 or 128 bytes each; up_proj 2 or 4 KiB
    model = layerwise._StreamedModel(
        str(base), device="cpu", dtype=torch.float32, round_to=None, nonfinite=[], label="b"
    )
    keys = list(model.checkpoint.tensors)
    read = model._read(keys)
    whole = load_file(next(base.glob("*.safetensors")))
    assert all(torch.equal(read[k], whole[k].float()) for k in keys)
    _, logits = model.run(ids)
    torch.testing.assert_close(logits, logits_of(base, ids), atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["llama-tied", "gemma3-window", "qwen3-upcycled-qwen3_moe"])
def test_cuda_streamed_matches_whole_on_cuda(tmp_path, tiny, case):
    """--device cuda: every layer runs on the GPU, and the numbers are those of the whole models there."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    base, body = build(tiny, case)
    _, out = grow(tmp_path, base, body)
    streamed = verify_output(out, tensors=False, device="cuda")
    whole = verify_output(out, tensors=False, device="cuda", whole=True)
    assert streamed.ok and whole.ok and streamed.function.device == "cuda"
    assert streamed.function.logits_max_abs_diff == pytest.approx(whole.function.logits_max_abs_diff, abs=1e-6)
    for a, b in zip(streamed.function.layers, whole.function.layers):
        assert a.max_abs_diff == pytest.approx(b.max_abs_diff, abs=1e-6)


def test_text_must_be_a_regular_utf8_file(tmp_path, tiny, cli):
    base = add_char_tokenizer(tmp_path / "base")
    shutil.copytree(tiny(arch="llama", layers=4), base, dirs_exist_ok=True)
    _, out = grow(tmp_path, base, "inject: {every: 2}")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    result = cli("verify", out, "--no-tensors", "--text", latin)
    assert result.exit_code == 2 and "cannot read it as UTF-8 text (UnicodeDecodeError)" in result.output
    result = cli("verify", out, "--no-tensors", "--text", "/dev/zero")
    assert result.exit_code == 2 and "/dev/zero: not a regular file" in result.output


def test_the_logits_tolerance_is_relative_to_the_base_logits():
    """Rounding is relative: a preserving plan exact only up to rounding (a random router's weights sum to 1
    only up to rounding) may differ by a few ulps of logits that reach tens; an absolute 1e-5 would fail it."""
    from types import SimpleNamespace

    from tli_recipe.execute.verify import VerifyReport

    plan = SimpleNamespace(layers=[], base_model="base")
    base = torch.linspace(-30, 30, 2 * 3 * 64).reshape(2, 3, 64)
    for shift, ok in ((5e-5, True), (2e-4, True), (4e-4, False)):
        check = layerwise.FunctionCheck(mode="streamed", inputs="x", tokens=6, dtype="float32", device="cpu")
        layerwise.compare(plan, [], base, [], base + shift, atol=1e-5, check=check)
        assert check.logits_scale == 30 and check.logits_tolerance == pytest.approx(3e-4)
        report = VerifyReport(
            function_preserving=True, atol=1e-5, function=check, max_abs_diff=check.logits_max_abs_diff
        )
        assert report.ok == ok
    small = torch.full((1, 1, 8), 0.5)
    check = layerwise.FunctionCheck(mode="streamed", inputs="x", tokens=1, dtype="float32", device="cpu")
    layerwise.compare(plan, [], small, [], small + 2e-5, atol=1e-5, check=check)
    assert check.logits_tolerance == 1e-5  # at least atol: values below 1 do not shrink it


def test_the_tensor_check_closes_its_file_maps_as_it_reads(tiny):
    """Every page read through an open safetensors map stays resident: the reader drops its maps after
    each budget of bytes (on the 1.1B benchmark model, 5.1 GB RSS with the maps kept, 0.82 GB without)."""
    from tli_recipe.execute.verify import _Files
    from tli_recipe.source.checkpoint import open_checkpoint

    infos = list(open_checkpoint(tiny(arch="llama", layers=2)).tensors.values())
    files = _Files(budget=3000)
    opened = []
    for info in infos:
        files.get(info)
        opened.append(len(files._open))
        assert files._read <= 3000 + info.nbytes
    assert opened.count(0) == 0 and files._read < sum(i.nbytes for i in infos)
    files.close()
    assert not files._open


def test_all_finite():
    x = torch.randn(1000)
    assert layerwise.all_finite(x) and layerwise.all_finite(x.bfloat16())
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[417] = bad
        assert not layerwise.all_finite(y) and not layerwise.all_finite(y.bfloat16())
    big = torch.full((4,), 3e38)  # the sum overflows; every value is finite
    assert layerwise.all_finite(big)
    assert layerwise.all_finite(torch.full((1000,), 60000.0).half())  # fp16: 6e7 overflows its sum
    long = torch.randn(1 << 20).bfloat16()  # the sum of a large tensor in its own dtype: the last value counts
    long[-1] = float("nan")
    assert not layerwise.all_finite(long)
