"""objective: mod (Mixture-of-Depths ensemble tuning): the head's arithmetic, exactness at step 0, what
trains, the saved head, eval with it, generation, resume, and the recipe checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_tiny, write_recipe
from growing import load_all
from safetensors.torch import load_file
from test_train import FAST, _Interrupt
from tiny_text import add_char_tokenizer, write_text

from tli_recipe import compile_plan, execute_plan, load_recipe
from tli_recipe.errors import RecipeError, TliError
from tli_recipe.training import mod
from tli_recipe.training.loading import load_model
from tli_recipe.training.train import stage_configs, train_output, train_stage

STAGE = "stages:\n  - name: mod\n    trainable: [injected]\n    objective: mod\n{extra}" + FAST  # test_train's settings
IDS = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return add_char_tokenizer(build_tiny(tmp_path_factory.mktemp("base"), layers=8))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("data") / "train.txt", 200)


def grow(tmp_path, base, data, steps=6, save=100, extra="") -> Path:
    recipe = write_recipe(
        tmp_path,
        f"base_model: {base}\ninject: {{every: 4}}\noutput: {tmp_path / 'grown'}\n"
        + STAGE.format(data=data, steps=steps, save=save, extra=extra),
    )
    return execute_plan(compile_plan(load_recipe(recipe)), progress=False, log=lambda m: None)


def quiet(msg):
    pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory, base, data):
    root = tmp_path_factory.mktemp("mod")
    grown = grow(root, base, data, extra="    mod: {layers: 3, distill_weight: 0.5, learning_rate: 0.05}\n")
    [out] = train_output(grown, progress=False, log=quiet)
    return grown, out


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_the_exact_init_gives_the_models_own_logits_bit_for_bit(base):
    model = load_model(base, dtype=torch.float32).eval()
    plain = logits(model)
    handles = mod.attach(model, mod.new_head(model, [5, 6, 7], "exact"))
    assert torch.equal(logits(model), plain)
    head = mod.detach(model, handles)
    assert torch.equal(logits(model), plain) and not hasattr(model, "tli_mod_head")
    # uniform: gate 1 and a zero router, so the logits are the plain mean of the three exits
    handles = mod.attach(model, mod.new_head(model, [5, 6, 7], "uniform"))
    mixed = logits(model)
    exits, weights, z = mod.head_of(model).last
    assert torch.equal(z, plain) and torch.allclose(weights, torch.full_like(weights, 1 / 3))
    torch.testing.assert_close(mixed, exits.mean(dim=-2))
    assert exits[..., -1, :].sub(plain).abs().max() < 1e-5  # the last exit is the model's own head path
    mod.detach(model, handles)
    assert head.gate.item() == 0.0


def test_router_weights_and_the_effective_weights_sum_to_one(base):
    model = load_model(base, dtype=torch.float32).eval()
    head = mod.new_head(model, [4, 7], "exact")
    with torch.no_grad():
        head.router.weight.normal_(0, 1)
        head.router.bias.normal_(0, 1)
        head.gate.fill_(0.3)
    mod.attach(model, head)
    mixed = logits(model)
    exits, weights, z = head.last
    torch.testing.assert_close(weights.sum(-1), torch.ones_like(weights[..., 0]))
    assert weights.std() > 0  # a router that routes: the weights differ per token
    effective = torch.cat([(head.gate * weights), (1 - head.gate).expand_as(weights[..., :1])], dim=-1)
    torch.testing.assert_close(effective.sum(-1), torch.ones_like(weights[..., 0]))
    parts = torch.cat([exits, z.unsqueeze(-2)], dim=-2)
    torch.testing.assert_close(mixed, (effective.unsqueeze(-1) * parts).sum(-2), atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # trains the tiny model once (module fixture)
def test_a_mod_stage_trains_the_stage_and_the_head_only(trained):
    grown, out = trained
    before, after = load_all(grown), load_all(out)
    plan = json.loads((grown / "plan.json").read_text())
    trainable = set(plan["stages"][0]["parameters"])
    assert trainable and all(n.startswith(("model.layers.4.", "model.layers.9.")) for n in trainable)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor) != (name in trainable), name
    metrics = json.loads((out / "training_metrics.json").read_text())
    stage = plan["stages"][0]
    assert stage["mod"]["layers"] == [7, 8, 9] and metrics["mod_head"] == "mod_head.safetensors"
    head = load_file(out / "mod_head.safetensors")
    assert sorted(head) == [
        "gate",
        "norms.0.weight",
        "norms.1.weight",
        "norms.2.weight",
        "router.bias",
        "router.weight",
    ]
    assert head["gate"].item() != 0 and head["router.weight"].abs().sum() > 0  # the head trained
    assert metrics["trainable_parameters"] == stage["trainable_parameters"]
    assert stage["mod"]["head_parameters"] == 3 * 32 + 32 * 3 + 3 + 1
    assert "tli_mod_head" not in json.dumps(sorted(after))  # the checkpoint is plain transformers


@pytest.mark.slow  # trains the tiny model once (module fixture)
def test_eval_scores_the_ensemble_and_reload_is_the_same_function(trained, tmp_path, cli):
    from tli_recipe.training.evaluate import evaluate_models

    _, out = trained
    model = mod.load(out)
    again = mod.load(out)
    assert torch.equal(logits(model), logits(again))
    plain = load_model(out, dtype=torch.float32).eval()
    assert not torch.allclose(logits(model), logits(plain))  # the head changes the prediction
    held = write_text(tmp_path / "held.txt", 20)
    [score] = evaluate_models([out], [held], sequence_length=32, device="cpu")
    from tli_recipe.training.data import pack, tokenize
    from tli_recipe.training.loading import load_tokenizer

    blocks = pack(tokenize([(held, "text")], load_tokenizer(out, "")), 32, keep_short=True)
    ids = torch.tensor(blocks)
    by_hand = torch.nn.functional.cross_entropy(logits(model, ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    assert score.loss == pytest.approx(float(by_hand), rel=1e-5)
    result = cli("eval", out, "--data", held, "--sequence-length", "32", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["loss"] == pytest.approx(score.loss)


@pytest.mark.slow  # trains the tiny model once (module fixture)
def test_a_mod_model_generates(trained):
    model = mod.load(trained[1])
    out = model.generate(IDS[:, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 9)
    # greedy decoding follows the mixed logits, step by step
    step = IDS[:, :5]
    for _ in range(4):
        step = torch.cat([step, logits(model, step)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, step)


@pytest.mark.slow  # two trainings of the tiny model
def test_an_interrupted_mod_stage_resumes_to_the_same_weights_and_head(tmp_path, base, data):
    # 4 steps, a checkpoint every 2, stopped after step 3: the resumed run redoes step 3 from checkpoint-2
    grown = grow(tmp_path, base, data, steps=4, save=2, extra="    mod: {learning_rate: 0.05}\n")
    [cfg] = stage_configs(grown)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, progress=False, log=quiet, callbacks=[_Interrupt(3)])
    assert (tmp_path / "grown-mod.partial" / "checkpoint-2" / "mod_head.safetensors").is_file()
    resumed = train_stage(cfg, progress=False, log=quiet)
    straight = train_stage(cfg.model_copy(update={"output_dir": str(tmp_path / "straight")}), progress=False, log=quiet)
    for a, b in (
        (load_all(resumed), load_all(straight)),
        (load_file(resumed / mod.HEAD_FILE), load_file(straight / mod.HEAD_FILE)),
    ):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_trainers_without_the_objective_refuse_it_with_the_reason(tmp_path, base, data):
    grown = grow(tmp_path, base, data)
    for trainer in ("axolotl", "llamafactory"):
        [refused] = (grown / "training" / trainer).glob("*.refused.txt")
        assert "objective: mod trains a Mixture-of-Depths ensemble" in refused.read_text()
        assert "tli-recipe train" in refused.read_text()
    assert list((grown / "training" / "builtin").glob("01-mod.yaml"))


@pytest.mark.parametrize(
    "body, message",
    [
        (
            "    objective: mod\n    mod: {layers: 11}\n",
            "stages[0].mod.layers: an ensemble of the last 11 layers needs at least 11 layers; the output has 10",
        ),
        ("    objective: mod\n    mod: {distill_weight: -0.5}\n", "stages[0].mod.distill_weight: must be >= 0"),
        ("    objective: mod\n    mod: {layers: 1}\n", "stages[0].mod.layers: must be >= 2"),
        ("    mod: {layers: 3}\n", "stages[0].mod: mod settings without objective: mod"),
        ("    objective: modd\n", "stages[0].objective:"),
    ],
)
def test_bad_mod_settings_get_located_errors(tmp_path, base, body, message):
    recipe = write_recipe(
        tmp_path, f"base_model: {base}\ninject: {{every: 4}}\nstages:\n  - name: s\n    trainable: [all]\n{body}"
    )
    with pytest.raises(RecipeError) as err:
        compile_plan(load_recipe(recipe))
    text = str(err.value)
    assert message in text and f"{recipe}:" in text, text


@pytest.mark.slow  # trains the tiny model once (module fixture)
def test_a_head_file_that_does_not_fit_is_refused(trained, tmp_path):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(trained[1], bad)
    head = load_file(bad / mod.HEAD_FILE)
    save_file(
        {**head, "router.weight": head["router.weight"][:, :8].contiguous()},
        str(bad / mod.HEAD_FILE),
        metadata={"format": mod.FORMAT, "version": mod.VERSION, "layers": "[7, 8, 9]"},
    )
    with pytest.raises(TliError, match="do not match a head over layers"):
        mod.load(bad)
    save_file(head, str(bad / mod.HEAD_FILE), metadata={"format": "other"})
    with pytest.raises(TliError, match="not a tli-recipe MoD head"):
        mod.load(bad)
    (bad / mod.HEAD_FILE).write_bytes(b"\x00" * 16)
    with pytest.raises(TliError, match="the safetensors header is not valid JSON"):
        mod.load(bad)
