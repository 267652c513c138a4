"""Shared fixtures: tiny random checkpoints built here (no downloads) and a CLI runner."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import pytest

# Before torch is imported: the tests' tiny models gain nothing from torch's intra-op threads, and on a
# shared 2-core machine those threads wait on each other (the 12-step training test took 27 s with the
# default 2 threads, 9 s with 1, at a load of 9). Subprocesses inherit it; a value already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = Path(__file__).parent.parent / "tli_recipe" / "_data" / "configs"


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """run's digest cache (tli_recipe.source.hashes) goes to a folder of this test session, never ~/.cache."""
    import os

    os.environ["TLI_RECIPE_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "sha256.json")
    yield


def pytest_addoption(parser):
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="Rewrite golden files (tests/bad_recipes/*.err) from the current output.",
    )


@pytest.fixture(autouse=True)
def _no_hub(monkeypatch):
    """No test reaches the real hub: a hub id missing from the cache is refused, as with HF_HUB_OFFLINE=1
    (tests/source/test_hub.py serves its own hub and lifts this)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def update_golden(request) -> bool:
    return request.config.getoption("--update-golden")


#: Tiny widths for every architecture: hidden 32, 4 heads (2 kv), vocab 64.
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=64,
    max_position_embeddings=128,
)


#: test name -> (config class, model class) in transformers
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "gemma3-vlm": ("Gemma3Config", "Gemma3ForConditionalGeneration"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
}


def build_tiny(
    folder: Path,
    arch: str = "llama",
    layers: int = 8,
    tie: bool = False,
    dtype: str = "float32",
    seed: int = 0,
    **extra,
) -> Path:
    """A random checkpoint saved with transformers; norms are random too, so a wrong copy shows in the logits."""
    import torch
    import transformers

    config_cls, model_cls = ARCHS[arch]
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gemma3-vlm":  # the text decoder nests in text_config, beside a tiny vision tower
        text = {**TINY, "num_hidden_layers": layers, "vocab_size": 300, "head_dim": 8, **tokens, **extra}
        config = transformers.Gemma3Config(
            text_config=text,
            vision_config=dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            image_token_index=299,
            boi_token_index=297,
            eoi_token_index=298,
            tie_word_embeddings=tie,
        )
    else:
        config = getattr(transformers, config_cls)(
            num_hidden_layers=layers, tie_word_embeddings=tie, **{**TINY, **tokens, **extra}
        )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Callable[..., Path]:
    """``tiny(arch="llama", layers=8, tie=False, dtype="float32", **config)`` -> a cached checkpoint dir."""
    cache: dict[tuple, Path] = {}

    def make(**kwargs) -> Path:
        key = tuple(sorted((k, repr(v)) for k, v in kwargs.items()))
        if key not in cache:
            name = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
            cache[key] = build_tiny(tmp_path_factory.mktemp(f"tiny-{name}"), **kwargs)
        return cache[key]

    return make


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 and mode of every file below ``folder`` (to prove inputs are untouched)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() + oct(p.stat().st_mode)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def cli():
    """Run the CLI in-process: ``cli("plan", path)`` -> click Result (exit_code, stdout, stderr)."""
    from click.testing import CliRunner

    from tli_recipe.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def logits_of(folder: Path, ids=None):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"{folder}: {problems}"
    model.eval()
    if ids is None:
        ids = torch.randint(0, TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids).logits
